"""peft_ext.unlearning's unlearning losses against closed forms: NPO, GradDiff and task-vector negation."""

import math

import pytest
import torch

from peft_ext.unlearning import grad_diff_loss, npo_loss, task_vector_negation


def test_npo_at_the_reference_is_two_over_beta_log_two():
    logp = torch.tensor([-3.0, -10.0, -0.5], dtype=torch.float64)
    for beta in (0.05, 0.1, 1.0, 4.0):
        assert npo_loss(logp, logp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-12)


def test_npo_closed_form_and_gradient_weights():
    pol = torch.tensor([-2.0, -7.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-3.0, -4.0], dtype=torch.float64)
    beta = 0.5
    loss = npo_loss(pol, ref, beta)
    # (2/b) * mean(log(1 + exp(b * d))), d = (1, -3)
    want = (2 / beta) * (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1.5))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    # d/dlogp_i = (2/n) * sigmoid(b * d_i): an already-unlikely sequence pushes less
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert pol.grad.tolist() == pytest.approx([sig(0.5), sig(-1.5)], rel=1e-12)


def test_npo_tends_to_gradient_ascent_as_beta_goes_to_zero():
    ref = torch.tensor([-3.0, -4.0, -9.0], dtype=torch.float64)
    d = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for beta, tol in ((1e-2, 1e-2), (1e-4, 1e-4)):
        pol = (ref + d).clone().requires_grad_(True)
        loss = npo_loss(pol, ref, beta)
        # value: (2/b) log 2 + mean(d) + O(b); slope: that of mean(logp) (gradient ascent on the forget NLL), 1/n each
        assert loss.item() - 2 / beta * math.log(2) == pytest.approx(d.mean().item(), abs=tol)
        loss.backward()
        assert pol.grad.tolist() == pytest.approx([1 / 3] * 3, abs=tol)


def test_npo_refuses_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        npo_loss(x, x, 0.0)
    with pytest.raises(ValueError, match="one value per sequence each, got 3 and 2"):
        npo_loss(x, torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="policy_logp must be a non-empty 1-D"):
        npo_loss(torch.zeros(2, 2), x, 0.1)


def test_grad_diff_is_minus_forget_plus_weighted_retain():
    f = torch.tensor(2.0, requires_grad=True)
    r = torch.tensor(3.0, requires_grad=True)
    loss = grad_diff_loss(f, r, 0.5)
    assert loss.item() == pytest.approx(-2.0 + 1.5)
    loss.backward()
    assert (f.grad.item(), r.grad.item()) == (-1.0, 0.5)
    assert grad_diff_loss(2.0, 3.0, 0.0) == -2.0  # weight 0: gradient ascent
    with pytest.raises(ValueError, match="retain_weight must be a finite number >= 0"):
        grad_diff_loss(f, r, -1.0)
    with pytest.raises(ValueError, match="forget_nll must be a scalar loss"):
        grad_diff_loss(torch.zeros(2), r)


def test_task_vector_negation_closed_form():
    ft = {"w": torch.tensor([[1.0, 2.0]]), "steps": torch.tensor([5]), "only_ft": torch.tensor([7.0])}
    fft = {"w": torch.tensor([[1.5, 1.0]]), "steps": torch.tensor([9])}
    out = task_vector_negation(ft, fft, lam=2.0)
    assert out["w"].tolist() == [[1.0 - 2 * 0.5, 2.0 - 2 * -1.0]]  # W - lam (W_forget - W)
    assert out["steps"].tolist() == [5] and out["only_ft"].tolist() == [7.0]  # integers and extra keys untouched
    assert torch.equal(task_vector_negation(ft, fft, lam=0.0)["w"], ft["w"])
    base = {"w": torch.tensor([[0.0, 0.0]])}
    assert task_vector_negation(ft, fft, base=base, lam=1.0)["w"].tolist() == [[1.0 - 1.5, 2.0 - 1.0]]
    with pytest.raises(ValueError, match=r"forget_finetuned\['w'\] has shape \(2,\)"):
        task_vector_negation(ft, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="forget_finetuned has keys finetuned lacks"):
        task_vector_negation(ft, {"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="lam must be a finite number"):
        task_vector_negation(ft, fft, lam=float("nan"))
