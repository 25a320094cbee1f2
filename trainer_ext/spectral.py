"""Tracking the top-k singular subspaces of big matrices during training, in pure torch.

Each function is small and checked against closed forms in tests/test_spectral.py. No Trainer code here: the
callback that logs these numbers is a thin layer on top, and the maths stays testable (and usable from a plain
training loop) without it. The randomized SVD itself lives in `peft_ext.linalg`, shared with SubspaceLoRA.

Conventions shared by every public function:

* inputs are detached (monitoring never enters autograd) and computed in float32 at least: half precision inputs
  are promoted, because an SVD in float16/bfloat16 is either unsupported or loses the small singular values;
  float64 inputs stay float64, so the tests can check closed forms to round-off;
* results live on the input's device;
* bad arguments raise ValueError/TypeError naming the argument, the value received and what to do instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from peft_ext._checks import check_finite, check_number
from peft_ext.linalg import _as_matrix, _check_int, _check_k, _randn, top_k_svd  # noqa: F401

__all__ = [
    "top_k_svd",
    "low_rank_top_k",
    "sigma_max",
    "principal_cosines",
    "projection_energy",
    "chance_energy",
    "relative_change",
    "SubspaceTracker",
]

# --------------------------------------------------------------------------------------------------- validation


def _common_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (inputs are already promoted by `_as_matrix`)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------------- decompositions


# `top_k_svd` lives in peft_ext.linalg (imported above): one implementation, shared with SubspaceLoRA.


def low_rank_top_k(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k SVD of the product `b @ a` (b: (out, r), a: (r, in)) without forming the (out, in) matrix.

    With `b = Q_b R_b` and `a^T = Q_a R_a`, `b a = Q_b (R_b R_a^T) Q_a^T`; the core `R_b R_a^T` is at most r x r, so
    its SVD is cheap and rotating its singular vectors by `Q_b` and `Q_a` gives those of the product exactly. This
    is how a LoRA branch's effective delta `W = s * B @ A` is measured at O((out + in) r^2) instead of
    O(out * in * min(out, in)) (scale `b` by s first; s only scales the singular values).

    Returns `U (out, k)`, `S (k,)` descending, `V (in, k)`; k <= r (the product has rank at most r).
    """
    b = _as_matrix(b, "b")
    a = _as_matrix(a, "a")
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"b @ a needs b's columns to match a's rows: b has shape {tuple(b.shape)}, a has shape {tuple(a.shape)} "
            "(a LoRA pair is b = lora_B.weight (out, r) and a = lora_A.weight (r, in))"
        )
    if a.device != b.device:
        raise ValueError(f"b and a must be on the same device, got b on {b.device} and a on {a.device}")
    out, r = b.shape
    n_in = a.shape[1]
    k = _check_int(
        k, "k", 1, min(out, r, n_in),
        hint=f" for b of shape {tuple(b.shape)} and a of shape {tuple(a.shape)}; "
        f"b @ a has rank at most min(out, r, in) = {min(out, r, n_in)}",
    )
    dtype = _common_dtype(a, b)
    qb, rb = torch.linalg.qr(b.to(dtype))  # (out, p), (p, r)
    qa, ra = torch.linalg.qr(a.T.to(dtype))  # (in, q), (q, r)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (p, q)
    return qb @ uc[:, :k], s[:k], qa @ vch[:k].T


def sigma_max(m: torch.Tensor, iters: int = 10, v0: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Largest singular value of `m` (its spectral norm), and the right singular vector `v` (shape (b,)) it came from.

    Power iteration on `m^T m`: each step costs two matrix-vector products, and the error in `v` shrinks like
    `(sigma_2 / sigma_1)^(2 iters)`. Pass the previous call's `v` as `v0` and a matrix that changed little since
    needs only an iteration or two. For small matrices (min dim <= 64) the exact value from an SVD is returned: it
    is as cheap and has no convergence caveat.

    Without `v0` the start vector comes from a generator seeded 0, so the result is deterministic. Returns
    `(0.0, v)` for an all-zero matrix.
    """
    m = _as_matrix(m, "m")
    a, b = m.shape
    iters = _check_int(iters, "iters", 1)
    if min(a, b) <= 64:
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        return float(s[0]), vh[0]

    starts = []
    if v0 is not None:
        if not isinstance(v0, torch.Tensor):
            raise TypeError(f"v0 must be a torch.Tensor or None, got {type(v0).__name__}")
        if v0.shape != (b,):
            raise ValueError(f"v0 must have shape ({b},) (one entry per column of m), got shape {tuple(v0.shape)}")
        v0 = _as_matrix(v0.reshape(b, 1), "v0").reshape(b).to(device=m.device, dtype=m.dtype)
        if float(v0.norm()) == 0.0:
            raise ValueError("v0 is all zeros: a power iteration cannot start from it; pass None or the previous v")
        starts.append(v0)
    starts.append(None)  # fallback: a v0 orthogonal to m's row space would give sigma = 0 for a nonzero m

    for start in starts:
        v = start if start is not None else _randn(b, 1, generator=None, dtype=m.dtype, device=m.device).reshape(b)
        v = v / v.norm()
        for _ in range(iters):
            v = m.T @ (m @ v)
            v = v / v.norm().clamp_min(torch.finfo(m.dtype).tiny)
        sigma = float((m @ v).norm())
        if sigma > 0.0:
            return sigma, v
    return 0.0, v


# ------------------------------------------------------------------------------------------------------ metrics


def principal_cosines(q_prev: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between `span(q_prev)` and `span(q)`, descending, clamped to [0, 1].

    Both must have orthonormal columns and the same number of rows. The cosines are the singular values of
    `q_prev^T q`: unlike comparing columns one by one, they do not change when a singular vector flips sign or when
    vectors with (nearly) equal singular values rotate among themselves, both of which an SVD does freely from one
    check to the next. min(j_prev, j) values are returned; 1 means a shared direction, 0 an orthogonal one.
    """
    q_prev = _as_matrix(q_prev, "q_prev")
    q = _as_matrix(q, "q")
    if q_prev.shape[0] != q.shape[0]:
        raise ValueError(
            f"q_prev and q must live in the same space (same number of rows), got q_prev {tuple(q_prev.shape)} "
            f"and q {tuple(q.shape)}"
        )
    dtype = _common_dtype(q_prev, q)
    c = q_prev.to(device=q.device, dtype=dtype).T @ q.to(dtype)
    return torch.linalg.svdvals(c).clamp(0.0, 1.0)


def projection_energy(g: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """`p = ||U^T G V||_F^2 / ||G||_F^2` in [0, 1]: the share of G's energy inside the tracked subspace pair.

    `G` (a, b) is typically a gradient or an optimizer moment of the tracked weight, `U` (a, k_u) and `V` (b, k_v)
    the orthonormal bases from the last check. `U U^T G V V^T` is the orthogonal projection of G onto
    {U C V^T}, so p is the fraction of the update that only re-weights the current top directions; compare it with
    `chance_energy` to see how concentrated that is. Returns 0.0 when G is all zeros (no energy anywhere). Clamped
    to [0, 1] against round-off; the bound itself needs orthonormal U and V.
    """
    g = _as_matrix(g, "g")
    u = _as_matrix(u, "u")
    v = _as_matrix(v, "v")
    if u.shape[0] != g.shape[0] or v.shape[0] != g.shape[1]:
        raise ValueError(
            f"u must have g's rows and v g's columns: g has shape {tuple(g.shape)}, u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}"
        )
    dtype = _common_dtype(g, u, v)
    g = g.to(dtype)
    total = float(g.pow(2).sum())
    if total == 0.0:
        return 0.0
    inside = float((u.to(device=g.device, dtype=dtype).T @ g @ v.to(device=g.device, dtype=dtype)).pow(2).sum())
    return min(max(inside / total, 0.0), 1.0)


def chance_energy(shape: tuple[int, int], k_u: int, k_v: int) -> float:
    """Expected `projection_energy` of an isotropic random G of this shape: `k_u * k_v / (a * b)`.

    vec(G) is then uniformly oriented in R^(a b) and the subspace pair is a fixed (k_u k_v)-dimensional subspace of
    it, so the expected captured share is its dimension over the total. Dividing a measured p by this gives how
    many times more than chance G lives in the subspace.
    """
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be a pair (a, b), got {shape!r}")
    a = _check_int(shape[0], "shape[0]", 1)
    b = _check_int(shape[1], "shape[1]", 1)
    k_u = _check_int(k_u, "k_u", 1, a, hint=f" for shape ({a}, {b}): U has at most a = {a} orthonormal columns")
    k_v = _check_int(k_v, "k_v", 1, b, hint=f" for shape ({a}, {b}): V has at most b = {b} orthonormal columns")
    return k_u * k_v / (a * b)


def relative_change(s_prev: torch.Tensor, s: torch.Tensor) -> float:
    """`||s - s_prev|| / ||s_prev||`: how much a spectrum moved between checks, scale-free.

    inf if `s_prev` is all zeros and `s` is not (growth from nothing), 0.0 if both are all zeros.
    """
    for name, x in (("s_prev", s_prev), ("s", s)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}; convert it with {name}.float()")
    if s_prev.shape != s.shape:
        raise ValueError(f"s_prev and s must have the same shape, got {tuple(s_prev.shape)} and {tuple(s.shape)}")
    dtype = torch.float64 if torch.float64 in (s_prev.dtype, s.dtype) else torch.float32
    sp = s_prev.detach().to(dtype)
    sn = s.detach().to(device=sp.device, dtype=dtype)
    for name, x in (("s_prev", sp), ("s", sn)):
        check_finite(x, name, why="the relative change is undefined")
    diff = float((sn - sp).norm())
    base = float(sp.norm())
    if base == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / base


# ------------------------------------------------------------------------------------------------------ tracker


class SubspaceTracker:
    """Tracks the top-k singular subspaces of one matrix across checks.

    `update(m)` runs `top_k_svd` warm-started from the previous V (or `low_rank_top_k` when `m` is a LoRA pair
    `(b, a)`) and returns plain floats under exactly these keys:

    * every check: `'sigma_max'`, `'sv1'` ... `'svK'`;
    * from the second check on: `'delta_sv_rel'` (`relative_change` of the top-k values), `'cos_u1'` ...
      `'cos_uK'` and `'cos_v1'` ... `'cos_vK'` (`principal_cosines` against the previous check, descending), and
      `'cos_u_max'`, `'cos_u_mean'`, `'cos_v_max'`, `'cos_v_mean'`.

    K is `k`: it is never clipped; a matrix with min(a, b) < k raises, because a silently smaller K would change
    the logged keys and make checks incomparable.

    After each check `u`, `s`, `v` hold the last decomposition (None before the first), so a caller can measure
    `projection_energy` of a gradient or optimizer moment in the current subspace. `history` holds
    `(cos_u_mean, cos_v_mean)` of the most recent checks (at most `max_history`, from the second check on) for
    `is_stable`. `num_checks` counts updates.

    The Gaussian columns of the randomized path come from a CPU `torch.Generator` seeded with `seed` and owned by
    the tracker: every process of a distributed run computes identical numbers from identical weights, and the
    global RNG stream of training is left alone. `state_dict`/`load_state_dict` carry u, s, v, history, the check
    count and the generator state, so a resumed run continues exactly where the checkpoint left off.
    """

    max_history: int = 256

    def __init__(self, k: int, *, exact_max_dim: int = 512, oversample: int = 8, niter: int = 2, seed: int = 0) -> None:
        self.k = _check_int(k, "k", 1, hint="; the tracker needs at least one singular direction")
        self.exact_max_dim = _check_int(exact_max_dim, "exact_max_dim", 0)
        self.oversample = _check_int(oversample, "oversample", 0)
        self.niter = _check_int(niter, "niter", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r} of type {type(seed).__name__}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.u: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.history: list[tuple[float, float]] = []
        self.num_checks = 0

    def _decompose(self, m: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(m, (tuple, list)):
            if len(m) != 2:
                raise ValueError(f"a low-rank m must be a pair (b, a) with b @ a the matrix, got {len(m)} elements")
            b, a = m
            if not (isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor)) or b.dim() != 2 or a.dim() != 2:
                raise ValueError("a low-rank m must be a pair (b, a) of 2-D tensors, b: (out, r) and a: (r, in)")
            shape = (b.shape[0], a.shape[1])
            _check_k(self.k, shape)
            self._check_shape(shape)
            return low_rank_top_k(b, a, self.k)
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            _check_k(self.k, (m.shape[0], m.shape[1]))
            self._check_shape((m.shape[0], m.shape[1]))
        warm = self.v if self.v is not None and isinstance(m, torch.Tensor) and m.dim() == 2 else None
        return top_k_svd(
            m, self.k, warm_start=warm, exact_max_dim=self.exact_max_dim, oversample=self.oversample,
            niter=self.niter, generator=self.generator,
        )

    def _check_shape(self, shape: tuple[int, int]) -> None:
        if self.u is None or self.v is None:
            return
        prev = (self.u.shape[0], self.v.shape[0])
        if tuple(shape) != prev:
            raise ValueError(
                f"m has shape {tuple(shape)} but this tracker followed a matrix of shape {prev}; "
                "use one tracker per matrix (or a fresh one after a resize)"
            )

    @torch.no_grad()
    def update(self, m: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """Decompose `m` (a 2-D tensor, or a LoRA pair `(b, a)` meaning `b @ a`), compare with the previous check,
        store the new u, s, v and return the metrics dict described on the class."""
        u, s, v = self._decompose(m)
        metrics: dict[str, float] = {"sigma_max": float(s[0])}
        s_list = s.tolist()
        for i, val in enumerate(s_list, 1):
            metrics[f"sv{i}"] = float(val)
        if self.u is not None and self.s is not None and self.v is not None:
            metrics["delta_sv_rel"] = relative_change(self.s.to(s.device), s)
            cu = principal_cosines(self.u, u).tolist()
            cv = principal_cosines(self.v, v).tolist()
            for i, c in enumerate(cu, 1):
                metrics[f"cos_u{i}"] = float(c)
            for i, c in enumerate(cv, 1):
                metrics[f"cos_v{i}"] = float(c)
            metrics["cos_u_max"] = float(max(cu))
            metrics["cos_u_mean"] = float(sum(cu) / len(cu))
            metrics["cos_v_max"] = float(max(cv))
            metrics["cos_v_mean"] = float(sum(cv) / len(cv))
            self.history.append((metrics["cos_u_mean"], metrics["cos_v_mean"]))
            del self.history[: -self.max_history]
        self.u, self.s, self.v = u, s, v
        self.num_checks += 1
        return metrics

    def is_stable(self, threshold: float, checks: int) -> bool:
        """True when each of the last `checks` comparisons had `min(cos_u_mean, cos_v_mean) >= threshold`.

        False while fewer comparisons exist (the first check has none, so this needs `checks + 1` updates): a
        subspace is not declared settled before it was seen to stay put.
        """
        check_number(threshold, "threshold", why="a cosine, typically in [0, 1]")
        checks = _check_int(
            checks, "checks", 1, self.max_history,
            hint=f"; only the last max_history={self.max_history} comparisons are kept",
        )
        if len(self.history) < checks:
            return False
        return all(min(cu, cv) >= threshold for cu, cv in self.history[-checks:])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue monitoring after a resume: config, u, s, v, history, check count and the
        generator state (so the randomized path draws the same columns it would have drawn without the restart).
        Tensors are cloned: later updates do not alter a saved state."""
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return {
            "k": self.k,
            "exact_max_dim": self.exact_max_dim,
            "oversample": self.oversample,
            "niter": self.niter,
            "seed": self.seed,
            "u": clone(self.u),
            "s": clone(self.s),
            "v": clone(self.v),
            "history": [list(h) for h in self.history],
            "num_checks": self.num_checks,
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`. The saved k must equal this tracker's k (the logged keys depend on it)."""
        missing = {"k", "u", "s", "v", "history", "num_checks"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}; pass a dict produced by SubspaceTracker.state_dict()")
        if state["k"] != self.k:
            raise ValueError(f"state was saved with k={state['k']} but this tracker has k={self.k}; build it with k={state['k']}")
        for key in ("exact_max_dim", "oversample", "niter", "seed"):
            if key in state:
                setattr(self, key, state[key])
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        self.u, self.s, self.v = clone(state["u"]), clone(state["s"]), clone(state["v"])
        self.history = [(float(cu), float(cv)) for cu, cv in state["history"]][-self.max_history :]
        self.num_checks = int(state["num_checks"])
        self.generator = torch.Generator().manual_seed(self.seed)
        if state.get("generator_state") is not None:
            self.generator.set_state(state["generator_state"])
