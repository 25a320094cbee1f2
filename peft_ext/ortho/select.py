"""Which entries of a weight go to OrthoSplit's sparse ortho stream: per-entry scores and the top-k mask.

`d` is the candidate residual of one layer in (out, in) layout: the fine-tuning delta `W - W_ref` when reference
weights are given, otherwise the quantisation residual `W - Q(W)`. Every score is "how much this entry of `d`
matters"; the ortho stream takes the `k` highest. Scores are pure functions of tensors, tested against closed forms.

- magnitude:   |d|
- relative:    |d| / (|W| + eps), eps = 1e-8 * max|W|     (large relative change of a small weight)
- obs:         d^2 / [H^-1]_jj, H = E[x x^T] + damp * mean(diag) * I   (Optimal Brain Surgeon's saliency: the output
               error of removing one entry when the others may not compensate; H from the layer's input statistics)
- fisher:      F * d^2 / 2                                 (second-order loss change of removing the entry; F is the
               diagonal Fisher, the mean squared gradient on some data)
- contrastive: l_forget - lambda * l_retain                (estimated loss increase on the forget set minus that on the
               retain set if the entry is removed; l is the attribution -g(mid) * d or F * d^2 / 2, see saliency.py)
- random:      uniform noise (the control: same density, no information)
"""

from __future__ import annotations

import torch

SELECTORS = ("magnitude", "relative", "obs", "fisher", "contrastive", "random")
NEEDS = {"obs": "stats", "fisher": "fisher", "contrastive": "forget and retain"}


def hessian_inverse_diagonal(cov: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """diag((C + damp * mean(diag C) * I)^-1) in float64, for an input second-moment matrix C (in, in).

    The damping (GPTQ uses 1%) makes the inverse exist when some input directions are never excited.
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square (in, in) matrix, got shape {tuple(cov.shape)}")
    c = cov.double()
    c = (c + c.T) / 2
    lam = damp * c.diagonal().mean().clamp_min(1e-12)
    h = c + lam * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    chol = torch.linalg.cholesky(h)
    return torch.cholesky_inverse(chol).diagonal().clone()


def loss_change(saliency_kind: str, saliency: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Estimated loss increase from removing each entry of `d`, from a saliency map of kind 'fisher' or 'attribution'."""
    if saliency_kind == "fisher":
        return 0.5 * saliency.float() * d.float() ** 2
    if saliency_kind == "attribution":
        return saliency.float()
    raise ValueError(f"saliency kind must be 'fisher' or 'attribution', got {saliency_kind!r}")


def entry_scores(
    selector: str,
    d: torch.Tensor,
    w: torch.Tensor,
    *,
    hinv_diag: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    forget: tuple[str, torch.Tensor] | None = None,
    retain: tuple[str, torch.Tensor] | None = None,
    contrastive_lambda: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Score of every entry of the (out, in) residual `d` of weight `w` (float32, same shape)."""
    d = d.float()
    if selector == "magnitude":
        return d.abs()
    if selector == "relative":
        wa = w.float().abs()
        return d.abs() / (wa + 1e-8 * wa.max().clamp_min(1e-30))
    if selector == "obs":
        if hinv_diag is None:
            raise ValueError("the 'obs' selector needs hinv_diag (the diagonal of the damped inverse input Hessian)")
        return d**2 / hinv_diag.to(d.device, torch.float32)[None, :]
    if selector == "fisher":
        if fisher is None:
            raise ValueError("the 'fisher' selector needs a diagonal Fisher map")
        return loss_change("fisher", fisher.to(d.device), d)
    if selector == "contrastive":
        if forget is None or retain is None:
            raise ValueError("the 'contrastive' selector needs forget and retain saliency maps")
        lf = loss_change(forget[0], forget[1].to(d.device), d)
        lr = loss_change(retain[0], retain[1].to(d.device), d)
        return lf - contrastive_lambda * lr
    if selector == "random":
        return torch.rand(d.shape, generator=generator).to(d.device)
    raise ValueError(f"unknown selector {selector!r}; choose one of {SELECTORS}")


def entry_count(density: float, numel: int) -> int:
    """Entries the ortho stream holds for a layer of `numel` weights: round(density * numel), at least 1."""
    return max(1, min(numel, int(round(density * numel))))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat (row-major) indices of the `k` highest scores, sorted ascending (CSR order); NaN scores rank lowest."""
    flat = torch.nan_to_num(scores.reshape(-1).float(), nan=float("-inf"))
    if not 0 < k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got k={k}")
    return torch.sort(torch.topk(flat, k, sorted=False).indices).values
