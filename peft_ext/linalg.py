"""Small pure linear-algebra helpers, each checked against closed forms in tests/test_linalg.py."""

from __future__ import annotations

import torch


def symmetric_eigh(cov: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues ascending.

    Computed in `dtype` (float64 by default: the tail of an activation covariance spans many decades, and float32
    eigh loses the smallest eigenvalues to round-off). The input is symmetrised first, so accumulated round-off in
    the two triangles cannot make the result complex or unstable.
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    c = cov.to(dtype)
    c = (c + c.T) / 2
    return torch.linalg.eigh(c)


def eigh_tail(cov: torch.Tensor, r: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `r` eigenpairs of `cov` with the smallest eigenvalues.

    Returns `(tail_values (r,), tail_vectors (d, r), all_values (d,))`, values ascending. The columns of
    `tail_vectors` are orthonormal and span the approximate null space of `cov`.
    """
    d = cov.shape[0]
    if not 0 < r <= d:
        raise ValueError(f"r must be in [1, {d}] for a {d}x{d} covariance, got r={r}")
    values, vectors = symmetric_eigh(cov, dtype)
    return values[:r], vectors[:, :r], values


def energy_ratio(m: torch.Tensor, cov: torch.Tensor) -> float:
    """`sum_i ||M x_i||^2 / sum_i ||x_i||^2` for samples whose second-moment matrix is `cov`.

    Equals `tr(M C M^T) / tr(C)`, so a held-out set summarised by its covariance gives the exact ratio without
    keeping the samples. For `M` = the transposed tail eigenvectors of `C` itself this is the tail energy share
    `sum(tail eigenvalues) / sum(eigenvalues)`.
    """
    m64 = m.to(torch.float64)
    c64 = cov.to(torch.float64)
    total = torch.trace(c64)
    if total <= 0:
        raise ValueError("cov has zero trace: no energy to compare against")
    return float(((m64 @ c64) * m64).sum() / total)
