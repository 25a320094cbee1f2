"""Per-entry saliency maps on a data set, for OrthoSplit's 'fisher' and 'contrastive' selectors.

- kind="fisher": the diagonal empirical Fisher, the mean over batches of the squared gradient of the loss with
  respect to each target weight (batch granularity: use batch size 1 for the per-example Fisher). The selector turns
  it into the second-order loss change of removing an entry, F * d^2 / 2.
- kind="attribution": the first-order loss change of removing the fine-tuning delta entry by entry, evaluated at the
  midpoint of the fine-tuning path: -g(W_ref + at * D) * D with D = W - W_ref (`at`=0.5 is the midpoint rule of the
  path integral, so the sum over entries estimates L(W_ref) - L(W)). It needs the reference weights. At the
  fine-tuned weights themselves a memorised set has near-zero loss and gradient, which is why the default evaluates
  half-way.

The model is left as it was: weights, requires_grad flags, train/eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .._progress import progress_bar
from .._tuners import planned_targets
from .config import OrthoSplitConfig
from .model import OrthoSplitModel
from .reference import reference_weights

KINDS = ("fisher", "attribution")


@dataclass
class EntrySaliency:
    """Saliency maps (out, in) per target layer name, of one kind, from `batches` batches of one data set."""

    kind: str
    maps: dict[str, torch.Tensor]
    batches: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"EntrySaliency.kind must be one of {KINDS}, got kind={self.kind!r}")
        if self.batches < 1 or not self.maps:
            raise ValueError(
                f"EntrySaliency from an empty data set (batches={self.batches}, {len(self.maps)} maps): the forget and "
                "retain sets must each hold at least one example"
            )


def target_weights(model: nn.Module, config: OrthoSplitConfig) -> dict[str, nn.Parameter]:
    """{layer name: weight parameter} of the layers `config` targets in a plain (not yet split) model."""
    out = {}
    for key, module in planned_targets(OrthoSplitModel, model, config):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            out[key] = weight
    if not out:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer of the model")
    return out


def _layout(name: str, module_types: Mapping[str, nn.Module], t: torch.Tensor) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    return t.T if isinstance(module_types[name], Conv1D) else t


def entry_saliency(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    config: OrthoSplitConfig,
    *,
    kind: str = "fisher",
    reference: Optional[Union[nn.Module, Mapping[str, torch.Tensor]]] = None,
    at: float = 0.5,
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> EntrySaliency:
    """Saliency of every entry of the target weights on `batches` (dicts the model accepts, with labels: the model's
    output must carry `.loss`). Maps are float32 on the CPU in (out, in) layout. `progress`: a progress bar over the
    batches (main process only; also off with HF_HUB_DISABLE_PROGRESS_BARS=1)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")
    if kind == "attribution" and reference is None:
        raise ValueError("kind='attribution' needs reference=the model before fine-tuning (or its state dict)")
    if not isinstance(at, (int, float)) or isinstance(at, bool) or not 0 <= at <= 1:
        raise ValueError(f"at must be a number in [0, 1] (0.5: midpoint of the fine-tuning path), got at={at!r}")
    weights = target_weights(model, config)
    modules = {k: m for k, m in model.named_modules() if k in weights}
    refs = reference_weights(reference, modules) if reference is not None else {}

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    saved = {k: w.detach().clone() for k, w in weights.items()} if kind == "attribution" else {}
    sums = {k: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for k, w in weights.items()}
    n = 0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for k, w in weights.items():
            w.requires_grad_(True)
            if kind == "attribution":
                with torch.no_grad():
                    ref = _layout(k, modules, refs[k]).to(w.device, w.dtype)
                    w.copy_(ref + at * (saved[k] - ref))
        device = next(iter(weights.values())).device
        total = None
        with contextlib.suppress(TypeError):
            total = len(batches)  # type: ignore[arg-type]
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        with progress_bar(batches, enabled=progress, total=total, desc=f"entry saliency ({kind})",
                          unit="batch") as bar:
            for batch in bar:
                if max_batches is not None and n >= max_batches:
                    break
                model.zero_grad(set_to_none=True)
                out = model(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise ValueError("the model returned no loss: the batches must carry labels")
                loss.backward()
                for k, w in weights.items():
                    g = w.grad.float() if w.grad is not None else torch.zeros_like(sums[k])
                    sums[k] += g**2 if kind == "fisher" else g
                n += 1
    finally:
        for k, w in weights.items():
            w.grad = None
            if kind == "attribution":
                with torch.no_grad():
                    w.copy_(saved[k])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    if n == 0:
        raise ValueError("the data set is empty: no batch reached the model (the forget and retain sets need examples)")
    maps = {}
    for k, s in sums.items():
        s = s / n
        if kind == "attribution":
            d = saved[k].float() - _layout(k, modules, refs[k]).to(s.device, torch.float32)
            s = -s * d
        maps[k] = _layout(k, modules, s).contiguous().cpu()
    return EntrySaliency(kind=kind, maps=maps, batches=n)
