import math

import pytest
import torch

from trainer_ext.spectral import (
    SubspaceTracker,
    chance_energy,
    low_rank_top_k,
    principal_cosines,
    projection_energy,
    relative_change,
    sigma_max,
    top_k_svd,
)

F64 = torch.float64


def orthonormal(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=F64))
    return q.to(dtype)


def planted(a: int, b: int, s: list[float], noise: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """m = U diag(s) V^T + noise * Gaussian, with the planted U, s, V (float64)."""
    k = len(s)
    basis_u = orthonormal(a, k, seed)
    basis_v = orthonormal(b, k, seed + 1)
    sv = torch.tensor(s, dtype=F64)
    g = torch.Generator().manual_seed(seed + 2)
    m = (basis_u * sv) @ basis_v.T + noise * torch.randn(a, b, generator=g, dtype=F64)
    return m, basis_u, sv, basis_v


def rotation_in_plane(d: int, p: torch.Tensor, w: torch.Tensor, theta: float) -> torch.Tensor:
    """The d x d rotation by theta in the plane spanned by orthonormal p, w; identity on its complement."""
    eye = torch.eye(d, dtype=F64)
    c, s = math.cos(theta), math.sin(theta)
    return eye + (c - 1) * (torch.outer(p, p) + torch.outer(w, w)) + s * (torch.outer(w, p) - torch.outer(p, w))


# ------------------------------------------------------------------------------------------------------ top_k_svd


@pytest.mark.parametrize("exact_max_dim", [512, 0], ids=["exact", "randomized"])
def test_top_k_svd_recovers_planted_triplets(exact_max_dim):
    s = [10.0, 8.0, 6.0, 4.0, 2.0]
    m, u0, s0, v0 = planted(300, 200, s, noise=1e-6)
    u, sv, v = top_k_svd(m.float(), 5, exact_max_dim=exact_max_dim, generator=torch.Generator().manual_seed(1))
    assert u.shape == (300, 5) and sv.shape == (5,) and v.shape == (200, 5)
    assert u.dtype == sv.dtype == v.dtype == torch.float32
    assert torch.all(sv[:-1] >= sv[1:])
    assert torch.allclose(sv.to(F64), s0, rtol=1e-4, atol=0)
    assert principal_cosines(u0, u).min() > 0.9999
    assert principal_cosines(v0, v).min() > 0.9999
    # and the triplets really decompose m: U^T m V = diag(S)
    assert torch.allclose(u.T @ m.float() @ v, torch.diag(sv), atol=1e-4)


def test_top_k_svd_keeps_float64_and_promotes_half():
    m, _, s0, _ = planted(40, 30, [3.0, 1.0], noise=0.0)
    _, sv, _ = top_k_svd(m, 2)
    assert sv.dtype == F64 and torch.allclose(sv, s0, rtol=1e-12)
    _, sv16, v16 = top_k_svd(m.to(torch.bfloat16), 2, exact_max_dim=0)
    assert sv16.dtype == v16.dtype == torch.float32
    assert torch.allclose(sv16.to(F64), s0, rtol=1e-2)


def test_warm_start_from_true_basis_beats_cold_start_without_power_iterations():
    # noise large enough that one pass of a cold range finder (niter=0) misses part of the top subspace
    m, _, _, v0 = planted(300, 200, [10.0, 8.0, 6.0, 4.0, 2.0], noise=1e-2, seed=3)
    m = m.float()
    u_ex, s_ex, v_ex = top_k_svd(m, 5)  # exact reference
    kw = dict(exact_max_dim=0, oversample=2, niter=0)
    u_c, s_c, v_c = top_k_svd(m, 5, generator=torch.Generator().manual_seed(0), **kw)
    u_w, s_w, v_w = top_k_svd(m, 5, warm_start=v0.float(), generator=torch.Generator().manual_seed(0), **kw)
    err_cold = float(((s_c - s_ex).abs() / s_ex).max())
    err_warm = float(((s_w - s_ex).abs() / s_ex).max())
    cos_cold = float(principal_cosines(u_ex, u_c).min())
    cos_warm = float(principal_cosines(u_ex, u_w).min())
    assert err_warm <= err_cold and cos_warm >= cos_cold
    # not just "at least as good": warm is accurate, cold visibly is not
    assert err_warm < 1e-3 and cos_warm > 0.999
    assert err_cold > 1e-2


def test_top_k_svd_generator_makes_randomized_path_reproducible():
    m = torch.randn(120, 90, generator=torch.Generator().manual_seed(5))
    r1 = top_k_svd(m, 4, exact_max_dim=0, generator=torch.Generator().manual_seed(7))
    r2 = top_k_svd(m, 4, exact_max_dim=0, generator=torch.Generator().manual_seed(7))
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    # no generator: deterministic too, and the global RNG is not advanced
    state = torch.get_rng_state()
    r3 = top_k_svd(m, 4, exact_max_dim=0)
    r4 = top_k_svd(m, 4, exact_max_dim=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r3[1], r4[1])


def test_top_k_svd_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\].*\(3, 5\)"):
        top_k_svd(torch.randn(3, 5), 4)
    with pytest.raises(ValueError, match="k must be"):
        top_k_svd(torch.randn(3, 5), 0)
    with pytest.raises(ValueError, match="m must be a 2-D matrix.*3-D"):
        top_k_svd(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match="m contains NaN"):
        top_k_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
    with pytest.raises(TypeError, match="m must be a real floating-point"):
        top_k_svd(torch.ones(3, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="warm_start must have one row per column"):
        top_k_svd(torch.randn(10, 8), 2, exact_max_dim=0, warm_start=torch.randn(10, 2))
    with pytest.raises(ValueError, match="warm_start has 9 columns"):
        top_k_svd(torch.randn(10, 8), 2, exact_max_dim=0, oversample=1, warm_start=torch.randn(8, 9))
    with pytest.raises(ValueError, match="niter must be"):
        top_k_svd(torch.randn(10, 8), 2, niter=-1)


# ------------------------------------------------------------------------------------------------- low_rank_top_k


def test_low_rank_top_k_matches_svd_of_formed_product():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(70, 6, generator=g)
    a = torch.randn(6, 50, generator=g)
    u, s, v = low_rank_top_k(b, a, 4)
    uu, ss, vh = torch.linalg.svd(b @ a, full_matrices=False)
    assert u.shape == (70, 4) and s.shape == (4,) and v.shape == (50, 4)
    assert torch.allclose(s, ss[:4], rtol=1e-5)
    assert principal_cosines(uu[:, :4], u).min() > 1 - 1e-5
    assert principal_cosines(vh[:4].T, v).min() > 1 - 1e-5
    # per-vector too: each column pair reproduces the product's action
    assert torch.allclose(u.T @ (b @ a) @ v, torch.diag(s), atol=1e-3)
    # float64 if either factor is float64
    assert low_rank_top_k(b.double(), a, 2)[1].dtype == F64


def test_low_rank_top_k_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        low_rank_top_k(torch.randn(70, 6), torch.randn(6, 50), 7)
    with pytest.raises(ValueError, match="b's columns to match a's rows"):
        low_rank_top_k(torch.randn(70, 6), torch.randn(5, 50), 2)
    with pytest.raises(ValueError, match="a must be a 2-D matrix"):
        low_rank_top_k(torch.randn(70, 6), torch.randn(6), 2)


# ------------------------------------------------------------------------------------------------------ sigma_max


def test_sigma_max_power_iteration_matches_spectral_norm():
    m, _, _, _ = planted(200, 150, [10.0, 5.0, 1.0], noise=1e-3, seed=4)
    m = m.float()
    exact = float(torch.linalg.matrix_norm(m, ord=2))
    sigma, v = sigma_max(m)
    assert sigma == pytest.approx(exact, rel=1e-4)
    assert v.shape == (150,) and float(v.norm()) == pytest.approx(1.0, rel=1e-5)
    # warm start from the returned v: one iteration is enough
    sigma2, _ = sigma_max(m, iters=1, v0=v)
    assert sigma2 == pytest.approx(exact, rel=1e-5)
    # small matrices take the exact path
    small = m[:30, :20]
    assert sigma_max(small)[0] == pytest.approx(float(torch.linalg.matrix_norm(small, ord=2)), rel=1e-6)
    assert sigma_max(torch.zeros(100, 80))[0] == 0.0


def test_sigma_max_rejects_bad_inputs():
    with pytest.raises(ValueError, match="v0 must have shape"):
        sigma_max(torch.randn(100, 80), v0=torch.randn(100))
    with pytest.raises(ValueError, match="iters must be"):
        sigma_max(torch.randn(100, 80), iters=0)
    with pytest.raises(ValueError, match="m contains NaN"):
        sigma_max(torch.full((3, 3), float("inf")))


# ---------------------------------------------------------------------------------------------- principal_cosines


def test_principal_cosines_closed_forms():
    d, k = 12, 3
    q = orthonormal(d, d, seed=2)
    base = q[:, :k]
    assert torch.allclose(principal_cosines(base, base), torch.ones(k, dtype=F64), atol=1e-12)

    # rotate the first basis vector by theta towards a direction outside the subspace
    theta = 0.3
    rot = rotation_in_plane(d, q[:, 0], q[:, k], theta)
    expected = torch.tensor([1.0] * (k - 1) + [math.cos(theta)], dtype=F64)
    assert torch.allclose(principal_cosines(base, rot @ base), expected, atol=1e-12)

    # sign flips and a rotation inside the subspace change the basis, not the subspace
    inner = orthonormal(k, k, seed=9)
    same_span = (base * torch.tensor([-1.0, 1.0, -1.0], dtype=F64)) @ inner
    assert torch.allclose(principal_cosines(base, same_span), torch.ones(k, dtype=F64), atol=1e-12)

    # orthogonal subspaces
    assert torch.allclose(principal_cosines(base, q[:, k : 2 * k]), torch.zeros(k, dtype=F64), atol=1e-12)

    # different widths: min(j_prev, j) cosines
    assert principal_cosines(base, q[:, :2]).shape == (2,)


def test_principal_cosines_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        principal_cosines(torch.eye(4)[:, :2], torch.eye(5)[:, :2])


# ---------------------------------------------------------------------------------------------- projection_energy


def test_projection_energy_closed_forms():
    a, b, ku, kv = 10, 8, 3, 2
    qa, qb = orthonormal(a, a, seed=0), orthonormal(b, b, seed=1)
    u, u_perp = qa[:, :ku], qa[:, ku:]
    v, v_perp = qb[:, :kv], qb[:, kv:]
    g = torch.Generator().manual_seed(3)
    c = torch.randn(ku, kv, generator=g, dtype=F64)
    inside = u @ c @ v.T
    assert projection_energy(inside, u, v) == pytest.approx(1.0, abs=1e-12)

    d = torch.randn(a - ku, b - kv, generator=g, dtype=F64)
    outside = u_perp @ d @ v_perp.T
    assert projection_energy(outside, u, v) == pytest.approx(0.0, abs=1e-12)
    # outside on one side only is still outside
    half = u @ torch.randn(ku, b - kv, generator=g, dtype=F64) @ v_perp.T
    assert projection_energy(half, u, v) == pytest.approx(0.0, abs=1e-12)

    # a known mixture: the two parts are Frobenius-orthogonal, so energies add
    alpha, beta = 2.0, 0.5
    mix = alpha * inside + beta * outside + half
    e_in = alpha**2 * float((c**2).sum())
    total = e_in + beta**2 * float((d**2).sum()) + float((half**2).sum())
    assert projection_energy(mix, u, v) == pytest.approx(e_in / total, rel=1e-10)

    assert projection_energy(torch.zeros(a, b), u, v) == 0.0


def test_chance_energy_is_the_monte_carlo_mean():
    # p ~ Beta(ku kv / 2, (a b - ku kv) / 2), relative sd ~ sqrt(2 / (ku kv)) = 0.14 per draw: 300 draws put 5%
    # at more than 6 standard errors
    a, b, ku, kv = 40, 30, 10, 10
    u = orthonormal(a, ku, seed=4, dtype=torch.float32)
    v = orthonormal(b, kv, seed=5, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    gs = torch.randn(300, a, b, generator=g)
    mean = sum(projection_energy(x, u, v) for x in gs) / len(gs)
    expected = chance_energy((a, b), ku, kv)
    assert expected == ku * kv / (a * b)
    assert mean == pytest.approx(expected, rel=0.05)


def test_projection_and_chance_energy_reject_bad_inputs():
    with pytest.raises(ValueError, match="u must have g's rows"):
        projection_energy(torch.randn(4, 3), torch.eye(5)[:, :1], torch.eye(3)[:, :1])
    with pytest.raises(ValueError, match=r"k_u must be in \[1, 4\]"):
        chance_energy((4, 3), 5, 1)
    with pytest.raises(ValueError, match="shape must be a pair"):
        chance_energy((4, 3, 2), 1, 1)


# ------------------------------------------------------------------------------------------------ relative_change


def test_relative_change():
    assert relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert relative_change(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])) == pytest.approx(1.0)
    assert relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(0.8)
    assert relative_change(torch.zeros(2), torch.tensor([0.0, 1.0])) == math.inf
    assert relative_change(torch.zeros(2), torch.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        relative_change(torch.zeros(2), torch.zeros(3))


# ------------------------------------------------------------------------------------------------ SubspaceTracker


def rotating_stream(n_checks: int, theta: float, a: int = 40, b: int = 30, k: int = 3):
    """W_t = U_t diag(s) V^T with U_t = R^t U_0, R the rotation by theta in the plane of U_0's first column and a
    direction outside span(U_0). Consecutive U_t then have principal cosines exactly [1, ..., 1, cos(theta)]."""
    qa = orthonormal(a, a, seed=10)
    u0, w = qa[:, :k], qa[:, k]
    v = orthonormal(b, k, seed=11)
    s = torch.tensor([5.0, 3.0, 2.0], dtype=F64)[:k]
    rot = rotation_in_plane(a, u0[:, 0], w, theta)
    us = [u0]
    for _ in range(n_checks - 1):
        us.append(rot @ us[-1])
    return [(ut * s) @ v.T for ut in us], us, s, v


def expected_keys(k: int, first: bool) -> set[str]:
    keys = {"sigma_max"} | {f"sv{i}" for i in range(1, k + 1)}
    if not first:
        keys |= {"delta_sv_rel", "cos_u_max", "cos_u_mean", "cos_v_max", "cos_v_mean"}
        keys |= {f"cos_u{i}" for i in range(1, k + 1)} | {f"cos_v{i}" for i in range(1, k + 1)}
    return keys


@pytest.mark.parametrize("exact_max_dim", [512, 0], ids=["exact", "randomized"])
def test_tracker_logs_exact_principal_cosines_of_a_rotating_stream(exact_max_dim):
    k, theta = 3, 0.05
    ws, us, s, v = rotating_stream(4, theta, k=k)
    tracker = SubspaceTracker(k, exact_max_dim=exact_max_dim)
    assert tracker.u is None and tracker.s is None and tracker.v is None

    first = tracker.update(ws[0])
    assert set(first) == expected_keys(k, first=True)
    assert all(type(x) is float for x in first.values())
    assert first["sigma_max"] == pytest.approx(5.0, rel=1e-12) == first["sv1"]
    assert [first[f"sv{i}"] for i in range(1, k + 1)] == pytest.approx(s.tolist(), rel=1e-12)
    assert tracker.u.shape == (40, k) and tracker.v.shape == (30, k) and tracker.s.shape == (k,)

    for t in range(1, 4):
        metrics = tracker.update(ws[t])
        assert set(metrics) == expected_keys(k, first=False)
        direct = principal_cosines(us[t - 1], us[t]).tolist()
        cos_u = [metrics[f"cos_u{i}"] for i in range(1, k + 1)]
        assert cos_u == pytest.approx(direct, abs=1e-5)
        assert cos_u == pytest.approx([1.0, 1.0, math.cos(theta)], abs=1e-5)
        assert [metrics[f"cos_v{i}"] for i in range(1, k + 1)] == pytest.approx([1.0] * k, abs=1e-5)
        assert metrics["cos_u_max"] == pytest.approx(max(cos_u), abs=1e-12)
        assert metrics["cos_u_mean"] == pytest.approx(sum(cos_u) / k, abs=1e-12)
        assert metrics["cos_v_mean"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["delta_sv_rel"] == pytest.approx(0.0, abs=1e-10)

    # the spectrum grows by a known factor, the subspaces stay: delta_sv_rel = |factor - 1|
    metrics = tracker.update(1.25 * ws[3])
    assert metrics["delta_sv_rel"] == pytest.approx(0.25, rel=1e-8)
    assert metrics["cos_u_mean"] == pytest.approx(1.0, abs=1e-5)
    assert tracker.num_checks == 5 and len(tracker.history) == 4


def test_tracker_accepts_a_low_rank_pair():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 4, generator=g), torch.randn(4, 30, generator=g)
    tracker = SubspaceTracker(2)
    m1 = tracker.update((b, a))
    assert m1["sv1"] == pytest.approx(float(torch.linalg.matrix_norm(b @ a, ord=2)), rel=1e-5)
    # the dense product and the pair describe the same matrix: nothing moved
    m2 = tracker.update(b @ a)
    assert m2["cos_u_mean"] == pytest.approx(1.0, abs=1e-5) and m2["cos_v_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m2["delta_sv_rel"] == pytest.approx(0.0, abs=1e-5)


def test_tracker_is_stable():
    tracker = SubspaceTracker(2)
    assert not tracker.is_stable(0.9, 1)
    tracker.history = [(0.5, 0.99), (0.95, 0.99), (0.99, 0.96)]
    assert tracker.is_stable(0.95, 2)
    assert not tracker.is_stable(0.95, 3)  # the oldest has cos_u_mean 0.5
    assert not tracker.is_stable(0.97, 1)  # min(0.99, 0.96) < 0.97
    assert not tracker.is_stable(0.5, 4)  # not enough comparisons yet
    with pytest.raises(ValueError, match="checks must be"):
        tracker.is_stable(0.9, 0)
    # from real updates: a constant matrix is stable after checks + 1 updates
    m = planted(20, 10, [3.0, 1.0], noise=0.0)[0]
    tracker = SubspaceTracker(2)
    for _ in range(3):
        tracker.update(m)
    assert tracker.is_stable(0.999, 2) and not tracker.is_stable(0.999, 3)


def test_tracker_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(1)
    stream = [torch.randn(60, 50, generator=g) for _ in range(5)]
    a = SubspaceTracker(4, exact_max_dim=0, niter=1, seed=3)
    for m in stream[:3]:
        a.update(m)
    state = a.state_dict()
    b = SubspaceTracker(4, exact_max_dim=0, niter=1, seed=99)  # the seed is restored from the state
    b.load_state_dict(state)
    assert b.num_checks == 3 and b.history == a.history
    for m in stream[3:]:
        assert a.update(m) == b.update(m)
    # the saved state is a copy: later updates did not alter it
    c = SubspaceTracker(4, exact_max_dim=0, niter=1, seed=3)
    c.load_state_dict(state)
    assert c.num_checks == 3 and torch.equal(c.v, state["v"])
    with pytest.raises(ValueError, match="k=4"):
        SubspaceTracker(5).load_state_dict(state)


def test_tracker_state_survives_safetensors_and_json(tmp_path):
    # the Trainer callback stores tensors with safetensors and everything else as JSON metadata
    import json

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(4)
    stream = [torch.randn(40, 30, generator=g) for _ in range(4)]
    for n_before in (0, 2):  # before the first check u, s, v are None
        a = SubspaceTracker(3, exact_max_dim=0, seed=1)
        for m in stream[:n_before]:
            a.update(m)
        sd = a.state_dict()
        tensors = {k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}
        meta = {k: json.dumps(v) for k, v in sd.items() if not torch.is_tensor(v)}
        save_file(tensors, str(tmp_path / "t.safetensors"), metadata=meta)
        restored = {**load_file(str(tmp_path / "t.safetensors")), **{k: json.loads(v) for k, v in meta.items()}}
        b = SubspaceTracker(3, exact_max_dim=0, seed=1)
        b.load_state_dict(restored)
        for m in stream[n_before:]:
            assert a.update(m) == b.update(m)


def test_trackers_with_the_same_seed_are_bit_identical_on_the_randomized_path():
    g = torch.Generator().manual_seed(2)
    stream = [torch.randn(80, 70, generator=g) for _ in range(3)]
    t1 = SubspaceTracker(5, exact_max_dim=0, niter=1, seed=7)
    t2 = SubspaceTracker(5, exact_max_dim=0, niter=1, seed=7)
    for m in stream:
        assert t1.update(m) == t2.update(m)
    assert torch.equal(t1.u, t2.u) and torch.equal(t1.v, t2.v)


def test_tracker_rejects_bad_inputs():
    with pytest.raises(ValueError, match="k must be"):
        SubspaceTracker(0)
    tracker = SubspaceTracker(4)
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\].*\(3, 5\)"):
        tracker.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="m must be a 2-D matrix"):
        tracker.update(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="m contains NaN"):
        tracker.update(torch.full((6, 6), float("nan")))
    assert tracker.num_checks == 0 and tracker.u is None  # failed checks leave no trace
    tracker.update(torch.randn(6, 6))
    with pytest.raises(ValueError, match=r"shape \(6, 7\).*\(6, 6\)"):
        tracker.update(torch.randn(6, 7))
