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
from peft_ext.linalg import _as_matrix, _check_int, _check_k, _randn, range_test_matrix, top_k_svd  # noqa: F401

__all__ = [
    "top_k_svd",
    "low_rank_top_k",
    "sigma_max",
    "principal_cosines",
    "projection_energy",
    "chance_energy",
    "relative_change",
    "SubspaceTracker",
    "ShardedMatrix",
    "tsqr",
    "sharded_top_k_svd",
    "sharded_projection_energy",
    "all_finite_everywhere",
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
        if isinstance(m, ShardedMatrix):  # split across ranks (FSDP2): same maths, block-wise, same generator draws
            _check_k(self.k, m.shape)
            self._check_shape(m.shape)
            return sharded_top_k_svd(
                m, self.k, warm_start=self.v, exact_max_dim=self.exact_max_dim, oversample=self.oversample,
                niter=self.niter, generator=self.generator,
            )
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
    def update(self, m: "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | ShardedMatrix") -> dict[str, float]:
        """Decompose `m` (a 2-D tensor, a LoRA pair `(b, a)` meaning `b @ a`, or a `ShardedMatrix`: then every rank
        of its group must call this, and all get the same result), compare with the previous check,
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


# ------------------------------------------------------------------------------------------- sharded matrices
#
# Under FSDP2 (`torch.distributed.fsdp.fully_shard`) a weight, its gradient and its optimizer moments arrive as
# DTensors whose rows are split across ranks (Shard(0); a Conv1D weight, stored transposed, is then split by columns
# of the (out, in) matrix). The functions below compute what `top_k_svd` and `projection_energy` compute, from each
# rank's block, with collectives whose sizes depend only on the global shape, k and the shard sizes, so every rank
# runs the same sequence of collectives (no rank-dependent branch, no deadlock). What crosses ranks is small:
# (b, l) or (l, l) sketches, R factors of a tall-skinny QR, and the final k columns of U or V, never the matrix.
# Results are replicated: every rank returns the same U, S, V (full, not sharded), equal to the one-process result up
# to round-off (same random test matrix, same power iterations, same Rayleigh-Ritz step).


class ShardedMatrix:
    """One rank's block of a 2-D matrix split along one dimension across the ranks of `group`.

    `local` is this rank's block, `shape` the global (a, b), `dim` the split dimension (0: row blocks, 1: column
    blocks), `sizes` every rank's block length along `dim` in rank order (so offsets and padding are known without
    asking), `rank` this process's index in `group` (None: the default group). Build one from a DTensor with
    `ShardedMatrix.from_dtensor`.
    """

    __slots__ = ("local", "shape", "dim", "sizes", "rank", "group")

    def __init__(self, local: torch.Tensor, shape: tuple[int, int], dim: int, sizes: tuple[int, ...], rank: int,
                 group: Any = None) -> None:
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (row blocks) or 1 (column blocks), got dim={dim!r}")
        shape = (int(shape[0]), int(shape[1]))
        sizes = tuple(int(s) for s in sizes)
        if sum(sizes) != shape[dim] or not 0 <= rank < len(sizes):
            raise ValueError(
                f"sizes={sizes} must add up to shape[{dim}]={shape[dim]} with rank={rank} one of their indices"
            )
        expect = (sizes[rank], shape[1]) if dim == 0 else (shape[0], sizes[rank])
        if tuple(local.shape) != expect:
            raise ValueError(
                f"local block has shape {tuple(local.shape)} but rank {rank} of a {shape} matrix split along dim {dim} "
                f"with sizes {sizes} holds {expect}"
            )
        if not local.is_floating_point():
            raise TypeError(f"local must be a real floating-point tensor, got dtype {local.dtype}")
        local = local.detach()
        self.local = local if local.dtype == torch.float64 else local.to(torch.float32)
        self.shape, self.dim, self.sizes, self.rank, self.group = shape, dim, sizes, rank, group

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def world(self) -> int:
        return len(self.sizes)

    def transpose(self) -> "ShardedMatrix":
        """The same blocks seen as the transposed matrix (row blocks become column blocks)."""
        return ShardedMatrix(self.local.T, (self.shape[1], self.shape[0]), 1 - self.dim, self.sizes, self.rank, self.group)

    @staticmethod
    def from_dtensor(x: Any, transposed: bool = False) -> "ShardedMatrix | None":
        """The ShardedMatrix of a 2-D DTensor sharded along one tensor dim on one mesh dim (FSDP2's Shard(0), a
        tensor-parallel Shard(1); other mesh dims Replicate, as HSDP's), seen as `x.T` when `transposed`. None for any
        other layout (Partial, strided or several sharded mesh dims): the caller gathers with `full_tensor()` then."""
        from torch.distributed.tensor import Replicate, Shard

        sharded = [(i, p.dim) for i, p in enumerate(x.placements) if type(p) is Shard]
        others_replicated = all(type(p) is Shard or isinstance(p, Replicate) for p in x.placements)
        if x.dim() != 2 or len(sharded) != 1 or not others_replicated or sharded[0][1] not in (0, 1):
            return None
        mesh_dim, tensor_dim = sharded[0]
        mesh = x.device_mesh
        n = mesh.size(mesh_dim)
        full = x.shape[tensor_dim]
        sizes = tuple(_shard_size(full, n, r) for r in range(n))
        m = ShardedMatrix(x.to_local(), tuple(x.shape), tensor_dim, sizes, mesh.get_local_rank(mesh_dim),
                          mesh.get_group(mesh_dim))
        return m.transpose() if transposed else m


def _shard_size(full: int, n: int, r: int) -> int:
    """Rows (or columns) rank r of n holds under torch's Shard placement (chunk semantics: ceil-sized blocks, the
    last ones shorter or empty), as DTensor.to_local() returns them."""
    from torch.distributed.tensor import Shard

    fn = getattr(Shard, "local_shard_size_and_offset", None) or getattr(Shard, "_local_shard_size_and_offset")
    return int(fn(full, n, r)[0])


def _dist_world(group: Any) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    """Sum (or `op`) of `x` over `group`, identical on every rank; the identity outside a process group."""
    if _dist_world(group) == 1:
        return x
    x = x.contiguous()
    torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM, group=group)
    return x


def _all_gather_rows(x: torch.Tensor, sizes: tuple[int, ...], group: Any) -> torch.Tensor:
    """Stack every rank's row block (rank order; block r has sizes[r] rows) into the full matrix on every rank.
    Blocks are padded to the largest size so the collective has one shape everywhere."""
    if len(sizes) == 1 or _dist_world(group) == 1:
        return x
    pad = max(sizes)
    padded = torch.zeros(pad, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def tsqr(block: torch.Tensor, sizes: tuple[int, ...], rank: int, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tall-skinny QR of a row-sharded matrix X (rank r holds rows of length `sizes[r]`): returns this rank's rows of
    Q and the replicated R, with X = Q R and Q orthonormal, as `torch.linalg.qr(X)` gives them up to column signs.

    Each rank factors its block, the R factors (at most min(rows, cols) x cols each, padded to one size) are
    all-gathered and factored again: as stable as Householder QR of X (no Gram matrix, whose squared condition number
    would lose the small singular values), and what crosses ranks is cols^2 numbers per rank, not X."""
    ncols = block.shape[1]
    c = min(ncols, max(sizes))
    q, r = torch.linalg.qr(block)  # (n_r, min(n_r, ncols)), (min(n_r, ncols), ncols); an empty block gives (0, 0)
    r_pad = torch.zeros(c, ncols, dtype=block.dtype, device=block.device)
    r_pad[: r.shape[0]] = r
    q_pad = torch.zeros(block.shape[0], c, dtype=block.dtype, device=block.device)
    q_pad[:, : q.shape[1]] = q
    stacked = _all_gather_rows(r_pad, (c,) * len(sizes), group)
    q2, r2 = torch.linalg.qr(stacked)
    return q_pad @ q2[rank * c : (rank + 1) * c], r2


def sharded_top_k_svd(
    m: ShardedMatrix,
    k: int,
    *,
    warm_start: torch.Tensor | None = None,
    exact_max_dim: int = 512,
    oversample: int = 8,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`top_k_svd` of a matrix given as row or column blocks across ranks: the same U (a, k), S (k,), V (b, k) on
    every rank, equal to `top_k_svd(full matrix, ...)` with the same arguments up to round-off.

    Exact path (min(a, b) <= exact_max_dim): a tall-skinny QR of the matrix along its split side (`tsqr`), then the SVD
    of the small replicated R. Randomized path: the same Gaussian test matrix (drawn from `generator` on every rank,
    warm start first), the same `niter` power iterations and Rayleigh-Ritz step as `top_k_svd`; products with the
    matrix are local block products, summed over ranks (all-reduce of a (a or b, l) sketch) where the contraction
    runs over the split side, and orthonormalised by `tsqr` where the result stays split. Only U's or V's k columns
    are gathered at the end. The caller checks finiteness collectively beforehand (`all_finite_everywhere`): a check
    on one rank's block alone would make ranks disagree and stop at different collectives.
    """
    if not isinstance(m, ShardedMatrix):
        raise TypeError(f"m must be a ShardedMatrix, got {type(m).__name__}; build it with ShardedMatrix.from_dtensor")
    a, b = m.shape
    k = _check_k(k, (a, b))
    _check_int(exact_max_dim, "exact_max_dim", 0)
    _check_int(oversample, "oversample", 0)
    _check_int(niter, "niter", 0)
    x, g, rows = m.local, m.group, m.dim == 0

    def gather(block: torch.Tensor) -> torch.Tensor:
        return _all_gather_rows(block, m.sizes, g)

    def factor(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # QR of a split (tall) operand
        return tsqr(block, m.sizes, m.rank, g)

    if min(a, b) <= exact_max_dim:
        q, r = factor(x if rows else x.T)
        ur, s, vh = torch.linalg.svd(r, full_matrices=False)
        if rows:  # m = Q R = (Q ur) s vh
            return gather(q @ ur[:, :k]), s[:k], vh[:k].T
        return vh[:k].T, s[:k], gather(q @ ur[:, :k])  # m^T = (Q ur) s vh

    l = min(k + oversample, min(a, b))
    omega = range_test_matrix((a, b), l, k, oversample, warm_start, generator, x.dtype, x.device)
    if not rows:
        omega = omega[m.offset : m.offset + m.sizes[m.rank]]

    def times(z: torch.Tensor) -> torch.Tensor:  # m @ z: a row block, or summed over column blocks
        return x @ z if rows else _all_reduce(x @ z, g)

    def times_t(q: torch.Tensor) -> torch.Tensor:  # m^T @ q: summed over row blocks, or a column block
        return _all_reduce(x.T @ q, g) if rows else x.T @ q

    def orth(y: torch.Tensor, split: bool) -> torch.Tensor:
        return factor(y)[0] if split else torch.linalg.qr(y)[0]

    q = orth(times(omega), rows)
    for _ in range(niter):
        z = orth(times_t(q), not rows)
        q = orth(times(z), rows)
    bt = times_t(q)  # (Q^T m)^T, (b, l)
    if rows:  # replicated: the small SVD of top_k_svd itself
        ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
        return gather(q @ ub[:, :k]), s[:k], vh[:k].T
    z, r = factor(bt)  # split by columns of m: Q^T m = (z r)^T with r = x s yh
    xr, s, yh = torch.linalg.svd(r, full_matrices=False)
    return q @ yh[:k].T, s[:k], gather(z @ xr[:, :k])


def sharded_projection_energy(g: ShardedMatrix, u: torch.Tensor, v: torch.Tensor) -> float:
    """`projection_energy(G, U, V)` of a G split across ranks (U, V full and replicated, as `sharded_top_k_svd` returns
    them): each rank contracts its block with its rows of U (or V), and one all-reduce sums the (k_u, k_v) core with
    the block's squared norm. Same value on every rank."""
    if not isinstance(g, ShardedMatrix):
        raise TypeError(f"g must be a ShardedMatrix, got {type(g).__name__}")
    a, b = g.shape
    u = _as_matrix(u, "u")
    v = _as_matrix(v, "v")
    if u.shape[0] != a or v.shape[0] != b:
        raise ValueError(f"u must have g's rows and v g's columns: g has shape {(a, b)}, u {tuple(u.shape)}, v {tuple(v.shape)}")
    dtype = _common_dtype(g.local, u, v)
    x = g.local.to(dtype)
    u, v = u.to(device=x.device, dtype=dtype), v.to(device=x.device, dtype=dtype)
    lo, hi = g.offset, g.offset + g.sizes[g.rank]
    core = (u[lo:hi].T @ x @ v) if g.dim == 0 else (u.T @ x @ v[lo:hi])
    packed = _all_reduce(torch.cat([core.reshape(-1), x.pow(2).sum().reshape(1)]), g.group)
    total = float(packed[-1])
    if total == 0.0:
        return 0.0
    return min(max(float(packed[:-1].pow(2).sum()) / total, 0.0), 1.0)


def all_finite_everywhere(flags: list[bool], group: Any = None, device: Any = "cpu") -> list[bool]:
    """Element-wise AND of per-rank finiteness flags over `group` (one all-reduce for all of them): every rank then
    skips the same matrices, which a decision from its own block alone would not guarantee. `device`: where the
    backend reduces (a CUDA device under NCCL, which cannot reduce CPU tensors)."""
    if not flags:
        return []
    bad = torch.tensor([0.0 if f else 1.0 for f in flags], dtype=torch.float64, device=device)
    bad = _all_reduce(bad, group, torch.distributed.ReduceOp.MAX if _dist_world(group) > 1 else None)
    return [float(x) == 0.0 for x in bad]
