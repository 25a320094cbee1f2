"""Our unlearning metrics as local `evaluate` modules, one folder each (the math lives in `peft_ext.unlearning`).

    import evaluate
    from peft_ext.metrics import metric_path
    tr = evaluate.load(metric_path("truth_ratio"))                   # offline: a local folder, nothing downloaded
    tr.compute(paraphrased_logprob=[-1.2], perturbed_logprobs=[[-2.0, -2.5, -1.9]], split="forget")

Each folder holds `<name>.py` (an `evaluate.Metric`) and is shipped as package data, so the same folder can later be
pushed to the Hub as a Space. Needs the `metrics` extra (`pip install peft-ext[metrics]`: evaluate, scipy).
"""

from __future__ import annotations

import os

METRICS = ("answer_perplexity", "truth_ratio", "forget_quality", "model_utility", "canary_exposure", "extraction")


def metric_path(name: str) -> str:
    """The folder of metric `name`, for `evaluate.load(metric_path(name))`."""
    if name not in METRICS:
        raise ValueError(f"metric_path: name={name!r} is not one of ours; choose from {list(METRICS)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
