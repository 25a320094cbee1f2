"""Small pure linear-algebra helpers, each checked against closed forms in tests/test_linalg.py."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_finite


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


# ------------------------------------------------------------------------------------------------- top-k SVD
# `top_k_svd` is shared by trainer_ext.spectral (which re-exports it; checked in tests/test_spectral.py) and
# SubspaceLoRA's initialisation (tests/test_subspace.py). Its private helpers come with it, unchanged.

# Start vectors that the caller did not supply come from a generator with this seed, never from the global RNG:
# a monitoring check must not shift the random stream that dropout and data shuffling consume, or switching the
# monitor on would change the training run it is supposed to observe.
_DEFAULT_SEED = 0


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    """`x` as a detached, finite 2-D float32/float64 tensor on its own device, or a clear error naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix, got a {x.dim()}-D tensor of shape {tuple(x.shape)}; "
            f"reshape it first (a conv kernel as {name}.flatten(1), a batch one matrix at a time)"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}; convert it with {name}.float()")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): it has no singular values")
    x = x.detach()
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    check_finite(x, name, why="its spectrum is undefined", fix="look for a diverged step, or skip this check")
    return x


def _check_int(value: Any, name: str, lo: int, hi: int | None = None, hint: str = "") -> int:
    """`value` as an int in [lo, hi], or a TypeError/ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {name}={value}{hint}")
    return value


def _check_k(k: Any, shape: tuple[int, int], name: str = "k") -> int:
    """k in [1, min(a, b)]; the error names k and the shape because the caller must choose k, we do not clip it."""
    a, b = shape
    return _check_int(
        k, name, 1, min(a, b),
        hint=f" for a matrix of shape ({a}, {b}); choose {name} <= min(a, b) = {min(a, b)}",
    )


def _default_generator() -> torch.Generator:
    return torch.Generator().manual_seed(_DEFAULT_SEED)


def _randn(rows: int, cols: int, *, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Gaussian (rows, cols) drawn on the generator's own device, then moved: a CPU generator (the usual choice for
    rank-identical results) can then feed a CUDA matrix."""
    g = generator if generator is not None else _default_generator()
    return torch.randn(rows, cols, generator=g, dtype=dtype, device=g.device).to(device)


def range_test_matrix(shape: tuple[int, int], l: int, k: int, oversample: int, warm_start, generator, dtype, device):
    """The (b, l) test matrix of the randomized range finder: the warm-start columns first, then Gaussian ones from
    `generator`. One function, so the sharded path (trainer_ext.spectral) draws exactly the same numbers."""
    a, b = shape
    cols = []
    if warm_start is not None:
        w = _as_matrix(warm_start, "warm_start")
        if w.shape[0] != b:
            raise ValueError(
                f"warm_start must have one row per column of m: m has shape ({a}, {b}), "
                f"warm_start has shape {tuple(w.shape)}; pass the previous check's V (shape ({b}, k))"
            )
        if w.shape[1] > l:
            raise ValueError(
                f"warm_start has {w.shape[1]} columns, more than the {l} test vectors used "
                f"(min(k + oversample, min(a, b)) with k={k}, oversample={oversample}); pass at most {l} columns"
            )
        cols.append(w.to(device=device, dtype=dtype))
    j = cols[0].shape[1] if cols else 0
    if l > j:
        cols.append(_randn(b, l - j, generator=generator, dtype=dtype, device=device))
    return torch.cat(cols, dim=1)


def top_k_svd(
    m: torch.Tensor,
    k: int,
    *,
    warm_start: torch.Tensor | None = None,
    exact_max_dim: int = 512,
    oversample: int = 8,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of a 2-D matrix `m` of shape (a, b): `U (a, k)`, `S (k,)` descending, `V (b, k)`.

    float32 (float64 if `m` is float64), on `m`'s device, so `m ~= U diag(S) V^T` restricted to the top k.

    Exact (`torch.linalg.svd`, `full_matrices=False`) when `min(a, b) <= exact_max_dim`: below that size a full SVD
    costs little and has no approximation error. Above it, a randomized range finder (Halko, Martinsson & Tropp
    2011): the range of `m` is sampled with `k + oversample` test vectors (the extra columns absorb the tail so the
    top k are resolved), refined by `niter` power iterations `m m^T`, each re-orthonormalised with QR (otherwise all
    columns collapse onto the top singular vector in floating point), and the small projected matrix `Q^T m` is
    decomposed exactly. Cost O(a b (k + oversample) (2 niter + 2)) instead of O(a b min(a, b)).

    `warm_start` (a (b, j) matrix, j <= k + oversample, typically the previous check's V) becomes the first j
    columns of the test matrix; the rest are Gaussian. A slowly rotating subspace is then already almost in the
    sampled range, so it converges in fewer power iterations than from random vectors. The exact path ignores it.

    `generator` draws the Gaussian columns. With None a fresh CPU generator seeded 0 is used, so the result is
    deterministic and the global RNG (dropout, data order) is never advanced by a monitoring call.
    """
    m = _as_matrix(m, "m")
    a, b = m.shape
    k = _check_k(k, (a, b))
    _check_int(exact_max_dim, "exact_max_dim", 0)
    _check_int(oversample, "oversample", 0)
    _check_int(niter, "niter", 0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    if min(a, b) <= exact_max_dim:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T

    # sample size: never more columns than the matrix has rank room for
    l = min(k + oversample, min(a, b))
    omega = range_test_matrix((a, b), l, k, oversample, warm_start, generator, m.dtype, m.device)

    q, _ = torch.linalg.qr(m @ omega)  # (a, l), orthonormal basis of the sampled range
    for _ in range(niter):
        z, _ = torch.linalg.qr(m.T @ q)  # (b, l)
        q, _ = torch.linalg.qr(m @ z)  # (a, l)
    ub, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)  # (l, b): small
    return q @ ub[:, :k], s[:k], vh[:k].T
