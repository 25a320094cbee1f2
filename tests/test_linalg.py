import math

import pytest
import torch

from peft_ext.linalg import eigh_tail, energy_ratio, symmetric_eigh

from .conftest import planted_inputs


def test_eigh_tail_recovers_planted_null_space():
    eig = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    x, q = planted_inputs(500, eig)
    cov = x.T @ x / x.shape[0]
    vals, vecs, all_vals = eigh_tail(cov, 3)
    assert torch.allclose(vals, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # the tail spans exactly the planted null space: projectors agree
    planted = q[:, 5:]
    assert torch.allclose(vecs @ vecs.T, planted @ planted.T, atol=1e-10)
    assert torch.allclose(all_vals, eig.sort().values, atol=1e-10)


def test_energy_ratio_is_sqrt_tail_share_in_closed_form():
    eig = torch.tensor([4.0, 2.0, 1.0, 1e-2, 1e-4, 1e-6], dtype=torch.float64)
    x, _ = planted_inputs(300, eig, seed=1)
    cov = x.T @ x / x.shape[0]
    tail_vals, tail_vecs, _ = eigh_tail(cov, 2)
    ratio = energy_ratio(tail_vecs.T, cov)
    assert ratio == pytest.approx(float((1e-4 + 1e-6) / eig.sum()), rel=1e-8)
    # and it is the sample ratio sum ||A x||^2 / sum ||x||^2 (the seed note's ||BX||/||X||, squared)
    a = tail_vecs.T
    direct = float(((x @ a.T) ** 2).sum() / (x**2).sum())
    assert ratio == pytest.approx(direct, rel=1e-8)
    assert math.sqrt(ratio) == pytest.approx(math.sqrt(float(tail_vals.sum() / eig.sum())), rel=1e-8)


def test_symmetric_eigh_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        symmetric_eigh(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="r must be in"):
        eigh_tail(torch.eye(3), 4)


def test_energy_ratio_rejects_zero_trace():
    with pytest.raises(ValueError, match="zero trace"):
        energy_ratio(torch.eye(2), torch.zeros(2, 2))
