"""Progress bars of peft-ext: Hugging Face's tqdm, on the main process only.

Every long step (activation statistics, SubspaceLoRA's SVDs, entry saliency, LoRA-X) draws its bar through
`progress_bar`, so the switches users already know silence all of them:

- `HF_HUB_DISABLE_PROGRESS_BARS=1` in the environment,
- `huggingface_hub.utils.disable_progress_bars()` (or `disable_progress_bars("peft_ext")` for ours only),
- `transformers.utils.logging.disable_progress_bar()` (it calls the former),
- `progress=False` on the call itself.

Under torch.distributed (torchrun, accelerate) only rank 0 draws: the other ranks do the same work in step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

BAR_GROUP = "peft_ext"  # huggingface_hub's progress-bar group of our bars


def is_main_process() -> bool:
    """Rank 0 of an initialised torch.distributed group, else the `RANK` a launcher set (torchrun and accelerate
    set it before the group exists), else True. torch is consulted only if the process has already imported it."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", "0")
    return not rank.isdigit() or int(rank) == 0


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **tqdm_kwargs: Any):
    """`huggingface_hub.utils.tqdm(iterable, **tqdm_kwargs)`, disabled unless `enabled` and on the main process.

    huggingface_hub's class also turns it off when its global switches (or our group's) say so. Use it as a
    context manager or close it, so that a loop left early does not leave the bar behind.
    """
    from huggingface_hub.utils import tqdm

    return tqdm(iterable, disable=not (enabled and is_main_process()), name=BAR_GROUP, **tqdm_kwargs)
