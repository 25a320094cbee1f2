"""recipes/tinyllama.py's learning-rate schedule: transformers' warm-up + cosine with a floor, against its closed form."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
import tinyllama  # noqa: E402


def _lrs(spec: tinyllama.TinyLlamaSpec) -> list[float]:
    """The lr each optimizer step of `pretrain` uses, driven as pretrain drives it (opt.step, then sched.step)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    sched = tinyllama.lr_schedule(opt, spec)
    out = []
    for _ in range(spec.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _recipe_v1(spec: tinyllama.TinyLlamaSpec, step: int) -> float:
    """The hand-written `lr_at` of recipe version 1, kept here to bound the documented difference."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@pytest.mark.parametrize("spec, v1_gap, v1_step_gap", [(tinyllama.TinyLlamaSpec(), 0.0051, 0.016),
                                                      (tinyllama.QUICK, 0.053, 0.153)])
def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor(spec, v1_gap, v1_step_gap):
    lrs = _lrs(spec)
    w, t, m = spec.warmup_steps, spec.steps, spec.min_lr_rate
    for s, lr in enumerate(lrs):
        if s < w:
            want = spec.lr * (s + 1) / w
        else:
            want = spec.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (s - w + 1) / (t - w))))
        assert lr == pytest.approx(want, rel=1e-12, abs=0), s
    assert lrs[w - 1] == pytest.approx(spec.lr)  # peak at the end of the warm-up
    assert lrs[-1] == pytest.approx(spec.lr * m)  # the floor, reached at the last step
    assert all(a >= b for a, b in zip(lrs[w - 1:], lrs[w:]))  # decays monotonically after the peak
    # recipe version 1 (hand-written): same warm-up, cosine one step later; the gap the docstring states
    v1 = [_recipe_v1(spec, s) for s in range(t)]
    assert max(abs(a - b) / b for a, b in zip(lrs[:w], v1)) < 1e-12
    assert all(a <= b * (1 + 1e-12) for a, b in zip(lrs, v1))  # never above v1 (beyond rounding)
    assert 0 < max(b - a for a, b in zip(lrs, v1)) / spec.lr <= v1_gap
    assert max((b - a) / b for a, b in zip(lrs, v1)) <= v1_step_gap


def test_recipe_version_is_in_the_cache_key():
    """The schedule changed what pretrain builds, so the cache key changed with it (an old folder is not reused)."""
    spec = tinyllama.QUICK
    key = tinyllama.cache_key(spec, ["a b c"])
    old, tinyllama.RECIPE_VERSION = tinyllama.RECIPE_VERSION, "1"
    try:
        assert tinyllama.cache_key(spec, ["a b c"]) != key
    finally:
        tinyllama.RECIPE_VERSION = old
