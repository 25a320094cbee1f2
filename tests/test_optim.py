"""create_directional_optimizer: role groups, Trainer integration, spectral clamp, amplification, resume, validation."""

from __future__ import annotations

import io
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from trainer_ext.optim import DirectionalOptimizer, create_directional_optimizer


class Net(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        out = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        if labels is None:
            return out
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def dora_net(seed: int = 0) -> nn.Module:
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], use_dora=True, bias="all", modules_to_save=["norm"])
    return get_peft_model(Net(seed=seed), cfg)


# --------------------------------------------------------------------------------------------------- groups


def test_roles_and_multipliers_land_on_intended_params():
    model = dora_net()
    opt = create_directional_optimizer(model, lr=1e-3, weight_decay=0.1, magnitude_lr_ratio=5.0)
    assert isinstance(opt, DirectionalOptimizer) and isinstance(opt, torch.optim.AdamW)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {}
    for n in trainable:
        if "lora_magnitude_vector" in n:
            expected[n] = ("magnitude", 5e-3, 0.0)
        elif n.endswith("bias") or ".norm." in n:
            expected[n] = ("no_decay", 1e-3, 0.0)
        else:
            assert "lora_A" in n or "lora_B" in n, n
            expected[n] = ("default", 1e-3, 0.1)
    assert {r for r, _, _ in expected.values()} == {"magnitude", "no_decay", "default"}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for n, p in trainable.items():
        role, lr, wd = expected[n]
        assert opt.role_of[p] == role, n
        g = group_of[id(p)]
        assert (g["role"], g["lr"], g["weight_decay"]) == (role, pytest.approx(lr), wd), n
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in group_of for p in frozen)
    info = opt.describe()
    assert sum(i.n_params for i in info) == sum(p.numel() for p in trainable.values())
    assert [i.role for i in info] == ["default", "no_decay", "magnitude"]  # logged LR = group 0 = base LR
    assert {i.role: (i.lr, i.weight_decay) for i in info}["magnitude"] == (pytest.approx(5e-3), 0.0)


# -------------------------------------------------------------------------------------------------- Trainer


class DS(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 8, generator=g)
        self.y = torch.randn(16, 4, generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}



def test_trainer_factory_and_scheduler(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen.append({g["role"]: g["lr"] for g in optimizer.param_groups})

    model = dora_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3, save_strategy="no",
        per_device_train_batch_size=4, learning_rate=123.0,  # ignored by the factory: lr comes from its kwargs
        lr_scheduler_type="linear", warmup_steps=0, remove_unused_columns=False, logging_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=DS(), callbacks=[Record()],
        optimizer_cls_and_kwargs=(create_directional_optimizer, {"lr": 1e-2, "magnitude_lr_ratio": 4.0, "spectral_clamp": 1.0}),
    )
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's AcceleratedOptimizer
    assert isinstance(inner, DirectionalOptimizer)
    assert len(seen) == 3
    for k, lrs in enumerate(seen, 1):
        factor = (3 - k) / 3  # linear decay to 0 over 3 steps, no warm-up
        assert lrs["default"] == pytest.approx(1e-2 * factor)
        assert lrs["no_decay"] == pytest.approx(1e-2 * factor)
        assert lrs["magnitude"] == pytest.approx(4e-2 * factor)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_magnitude_vector" in n for n in changed) and any("lora_B" in n for n in changed)


def test_trainer_checkpoint_resume_is_exact(tmp_path):
    """optimizer.pt written by the Trainer (trackers included) reloads with weights_only=True and resumes exactly."""
    from transformers import Trainer, TrainingArguments

    kw = {"lr": 1e-2, "spectral_clamp": 1.0, "amplify": 2.0, "amplify_targets": ["lora_B"], "amplify_rank": 1,
          "amplify_every": 1, "stability_checks": 1, "stability_threshold": 0.1}

    def run(out, max_steps, resume=None):
        model = dora_net()
        args = TrainingArguments(
            output_dir=str(out), use_cpu=True, report_to="none", max_steps=max_steps, save_strategy="steps",
            save_steps=3, lr_scheduler_type="constant", per_device_train_batch_size=16, remove_unused_columns=False,
            logging_strategy="no", seed=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=DS(), optimizer_cls_and_kwargs=(create_directional_optimizer, kw))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.optimizer.optimizer

    ref, ref_opt = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    res, res_opt = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert all(s["amplified_steps"] > 0 for s in ref_opt.amplifier_state().values())
    assert res_opt.amplifier_state() == ref_opt.amplifier_state()
    for (n, p), q in zip(res.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)


# -------------------------------------------------------------------------------------------------- clamp


def lora_linear(d_in=16, d_out=12, r=4, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return model, layer


def branch_sigma(layer) -> float:
    a = layer.lora_A["default"].weight.detach().double()
    b = layer.lora_B["default"].weight.detach().double()
    return float(torch.linalg.svdvals(layer.scaling["default"] * b @ a)[0])


def sgd_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_spectral_clamp_peft_lora_hits_bound_and_is_idle_below():
    x, y = torch.randn(32, 16), torch.randn(32, 12) * 50
    c = 1.0
    bound = c / math.sqrt(16)
    model, layer = lora_linear()
    assert branch_sigma(layer) < bound
    opt = create_directional_optimizer(model, lr=5.0, optimizer_cls=torch.optim.SGD, spectral_clamp=c)
    twin, twin_layer = lora_linear()
    twin_opt = create_directional_optimizer(twin, lr=5.0, optimizer_cls=torch.optim.SGD)
    sgd_step(model, opt, x, y)
    sgd_step(twin, twin_opt, x, y)
    assert branch_sigma(twin_layer) > 2 * bound  # the step would exceed the bound ...
    assert branch_sigma(layer) == pytest.approx(bound, abs=1e-4)  # ... and the clamp brings it back to it
    torch.testing.assert_close(layer.lora_A["default"].weight, twin_layer.lora_A["default"].weight)  # B scaled

    model, layer = lora_linear()
    opt = create_directional_optimizer(model, lr=1e-4, optimizer_cls=torch.optim.SGD, spectral_clamp=c)
    twin, twin_layer = lora_linear()
    twin_opt = create_directional_optimizer(twin, lr=1e-4, optimizer_cls=torch.optim.SGD)
    sgd_step(model, opt, x, y / 50)
    sgd_step(twin, twin_opt, x, y / 50)
    assert branch_sigma(layer) < bound
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_spectral_clamp_split_mode_bisection_and_dense():
    from peft_ext import NullSpaceLoraConfig

    from .conftest import Toy

    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=3, target_modules=["q"], mode="split"))
    layer = model.base_model.model.q
    basis, _ = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(1)))
    layer.set_nullspace_basis("default", basis)
    s = layer.scaling["default"]

    def delta_sigma() -> float:
        a, b = layer.lora_factors("default")
        return float(torch.linalg.svdvals(s * b.detach().double() @ a.detach().double())[0])

    frozen = float(torch.linalg.svdvals(s * layer.nullspace_B0["default"].double() @ layer.nullspace_A0["default"].double())[0])
    assert delta_sigma() == pytest.approx(0.0, abs=1e-6)  # split mode starts at delta = 0
    bound = 2.0 * frozen  # reachable: the frozen part alone is below it
    c = bound * math.sqrt(8)
    for n, p in model.named_parameters():  # train the head densely too, clamped by power iteration
        if n.endswith("out.weight"):
            p.requires_grad_(True)
    opt = create_directional_optimizer(model, lr=50.0, optimizer_cls=torch.optim.SGD, spectral_clamp=c, clamp_patterns=[r"out\.weight$"])
    x, y = torch.randn(16, 8), torch.randn(16, 4) * 100
    sgd_step(model, opt, x, y)
    assert delta_sigma() == pytest.approx(bound, abs=1e-4)
    head = model.base_model.model.out.weight.detach().double()
    assert float(torch.linalg.svdvals(head)[0]) == pytest.approx(c / math.sqrt(12), abs=1e-4)


# ----------------------------------------------------------------------------------------------- amplify


class Mat(nn.Module):
    def __init__(self, a=12, b=10, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(a, b, generator=g))


def planted_grads(n_steps=8, a=12, b=10, k=2, seed=0):
    """G_t = U0 diag(s_t) V0^T + noise: a fixed, known rank-k subspace pair dominating every gradient."""
    g = torch.Generator().manual_seed(seed)
    u0, _ = torch.linalg.qr(torch.randn(a, k, generator=g))
    v0, _ = torch.linalg.qr(torch.randn(b, k, generator=g))
    out = []
    for _ in range(n_steps):
        s = torch.tensor([5.0, 3.0]) + 0.3 * torch.rand(k, generator=g)
        out.append(u0 @ torch.diag(s) @ v0.T + 0.05 * torch.randn(a, b, generator=g))
    return out, u0, v0


def run_planted(opt, model, grads, check):
    p = model.w
    for t, g in enumerate(grads):
        tr = opt.trackers["w"]
        stable = opt.amplifier_state()["w"]["active"]
        u = None if tr.u is None else tr.u.double().clone()
        v = None if tr.v is None else tr.v.double().clone()
        before = p.detach().double().clone()
        p.grad = g.clone()
        opt.step()
        check(t, stable, u, v, p.detach().double() - before)


@pytest.mark.parametrize("mode", ["subspace", "bulk"])
def test_amplification_sgd_exact(mode):
    alpha, lr = 3.0, 0.1
    grads, u0, v0 = planted_grads()
    model = Mat()
    opt = create_directional_optimizer(
        model, lr=lr, optimizer_cls=torch.optim.SGD, amplify=alpha, amplify_targets=["w"], amplify_rank=2,
        amplify_every=1, stability_threshold=0.9, stability_checks=2, amplify_mode=mode,
    )
    log = []

    def check(t, stable, u, v, delta):
        d = -lr * grads[t].double()
        # 2 comparisons need 3 checks (after steps 1, 2, 3): steps 4.. are amplified
        assert stable == (t >= 3)
        if not stable:
            torch.testing.assert_close(delta, d, atol=1e-6, rtol=0)
            return
        proj = u @ u.T @ d @ v @ v.T
        expected = d + (alpha - 1) * (proj if mode == "subspace" else d - proj)
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=0)
        assert (delta - d).abs().max() > 1e-3  # the amplification is not trivially small
        # the tracked subspace is the planted one
        assert float(torch.linalg.svdvals(u0.double().T @ u).min()) > 0.99
        assert float(torch.linalg.svdvals(v0.double().T @ v).min()) > 0.99
        log.append(t)

    run_planted(opt, model, grads, check)
    assert log == [3, 4, 5, 6, 7]
    st = opt.amplifier_state()["w"]
    assert st["active"] and st["checks"] == 8 and st["last_cos"] > 0.99 and st["amplified_steps"] == 5


def test_amplification_adam_scales_realized_update_in_subspace():
    alpha = 2.5
    grads, _, _ = planted_grads(n_steps=7)
    kw = dict(lr=1e-2, amplify_targets=["w"], amplify_rank=2, amplify_every=1, stability_checks=2, stability_threshold=0.9)
    m_amp, m_ref = Mat(), Mat()
    opt_amp = create_directional_optimizer(m_amp, amplify=alpha, **kw)
    opt_ref = create_directional_optimizer(m_ref, amplify=1.0, **kw)
    n_amp = 0
    for t, g in enumerate(grads):
        active = opt_amp.amplifier_state()["w"]["active"]
        assert not opt_ref.amplifier_state()["w"]["active"]
        u = None if opt_amp.trackers["w"].u is None else opt_amp.trackers["w"].u.double().clone()
        v = None if opt_amp.trackers["w"].v is None else opt_amp.trackers["w"].v.double().clone()
        b_amp, b_ref = m_amp.w.detach().double().clone(), m_ref.w.detach().double().clone()
        m_amp.w.grad, m_ref.w.grad = g.clone(), g.clone()
        opt_amp.step()
        opt_ref.step()
        d_amp, d_ref = m_amp.w.detach().double() - b_amp, m_ref.w.detach().double() - b_ref
        if not active:
            torch.testing.assert_close(d_amp, d_ref, atol=1e-7, rtol=0)
            continue
        n_amp += 1
        # Adam state depends on the gradients only (no weight decay): both runs track the same subspace
        torch.testing.assert_close(opt_amp.trackers["w"].u, opt_ref.trackers["w"].u)
        proj = lambda d: u @ u.T @ d @ v @ v.T  # noqa: E731
        torch.testing.assert_close(proj(d_amp), alpha * proj(d_ref), atol=1e-6, rtol=0)
        torch.testing.assert_close(d_amp - proj(d_amp), d_ref - proj(d_ref), atol=1e-6, rtol=0)
        assert float(proj(d_ref).norm()) > 0.5 * float(d_ref.norm())  # most of Adam's step lies in the subspace
    assert n_amp == 4


# -------------------------------------------------------------------------------------------------- resume


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    kw = dict(lr=2e-2, weight_decay=0.01, spectral_clamp=0.5, amplify=2.0, amplify_targets=["lora_B"], amplify_rank=2,
              amplify_every=1, stability_checks=1, stability_threshold=0.5)

    def step(model, opt):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    ref, _ = lora_linear()
    ref_opt = create_directional_optimizer(ref, **kw)
    for _ in range(6):
        step(ref, ref_opt)
    name = next(iter(ref_opt.trackers))
    assert ref_opt.amplifier_state()[name]["amplified_steps"] > 0

    model, _ = lora_linear()
    opt = create_directional_optimizer(model, **kw)
    for _ in range(3):
        step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    amplified_at_save = opt.amplifier_state()[name]["amplified_steps"]
    assert amplified_at_save > 0  # the checkpoint is taken while amplification is on
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # what the Trainer does on resume

    fresh, _ = lora_linear(seed=123)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = create_directional_optimizer(fresh, **kw)
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.amplifier_state() == opt.amplifier_state()
    for _ in range(3):
        step(fresh, fresh_opt)
    for (n, p), q in zip(fresh.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
    assert fresh_opt.amplifier_state() == ref_opt.amplifier_state()


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"magnitude_lr_ratio": 0}, "magnitude_lr_ratio"),
        ({"amplify": 0.5, "amplify_targets": ["w"]}, "amplify"),
        ({"amplify_mode": "both"}, "amplify_mode"),
        ({"amplify": 2.0, "amplify_targets": ["nope"]}, "amplify_targets"),
        ({"amplify": 2.0}, "amplify_targets"),
        ({"amplify": 2.0, "amplify_targets": ["w"], "amplify_rank": 11}, "amplify_rank"),
        ({"spectral_clamp": 0.0}, "spectral_clamp"),
        ({"spectral_clamp": -1.0}, "spectral_clamp"),
        ({"stability_threshold": 0.0}, "stability_threshold"),
        ({"stability_threshold": 1.5}, "stability_threshold"),
    ],
)
def test_bad_inputs_name_the_field(kwargs, field):
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=field):
        create_directional_optimizer(Mat(), **kwargs)


def test_refusals():
    frozen = Mat()
    frozen.w.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_directional_optimizer(frozen, lr=1e-3)

    class DeepSpeedEngine(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = Mat()

    with pytest.raises(RuntimeError, match="DeepSpeed"):
        create_directional_optimizer(DeepSpeedEngine(), lr=1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        create_directional_optimizer(list(Mat().parameters()), lr=1e-3)
    assert create_directional_optimizer() is create_directional_optimizer  # the Trainer's factory() step


# ------------------------------------------------------------------------------- TrainingArguments as the source


def test_training_args_supply_lr_decay_betas_eps_and_explicit_values_win(tmp_path):
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=3e-3,
                              weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    opt = create_directional_optimizer(dora_net(), args=targs, magnitude_lr_ratio=2.0)
    lrs = {g["role"]: (g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups}
    assert lrs["default"] == (pytest.approx(3e-3), pytest.approx(0.05), (0.8, 0.95), 1e-6)
    assert lrs["magnitude"][0] == pytest.approx(6e-3) and lrs["magnitude"][1] == 0.0
    opt = create_directional_optimizer(dora_net(), args=targs, lr=1e-4, weight_decay=0.0, betas=(0.5, 0.6))
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"]) == (pytest.approx(1e-4), 0.0, (0.5, 0.6), 1e-6)
    sgd = create_directional_optimizer(dora_net(), args=targs, optimizer_cls=torch.optim.SGD)  # no betas/eps there
    assert sgd.param_groups[0]["lr"] == pytest.approx(3e-3) and "betas" not in sgd.param_groups[0]
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments"):
        create_directional_optimizer(dora_net(), args={"lr": 1e-3})
    with pytest.raises(ValueError, match="args=training_args"):
        create_directional_optimizer(dora_net())


def test_one_default_ratio_and_warning_when_everything_is_magnitude():
    from trainer_ext import SpectralTrainingArguments
    from trainer_ext.optim import DEFAULT_MAGNITUDE_LR_RATIO

    assert SpectralTrainingArguments.__dataclass_fields__["magnitude_lr_ratio"].default == DEFAULT_MAGNITUDE_LR_RATIO
    opt = create_directional_optimizer(dora_net(), lr=1e-3)
    assert {g["role"]: g["lr"] for g in opt.param_groups}["magnitude"] == pytest.approx(1e-3)

    class Cores(nn.Module):  # SubspaceLoRA-like: the only trainable tensors are cores
        def __init__(self):
            super().__init__()
            self.subspace_C = nn.Parameter(torch.zeros(2, 2))

    with pytest.warns(UserWarning, match="every trainable parameter .* matched magnitude_patterns"):
        create_directional_optimizer(Cores(), lr=1e-3, magnitude_lr_ratio=10.0)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        create_directional_optimizer(Cores(), lr=1e-3)  # ratio 1: nothing to warn about
        create_directional_optimizer(dora_net(), lr=1e-3, magnitude_lr_ratio=10.0)  # mixed groups: fine


def test_spectral_trainer_feeds_its_args_to_the_factory(tmp_path):
    from trainer_ext import SpectralTrainer, SpectralTrainingArguments

    targs = SpectralTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, save_strategy="no",
        per_device_train_batch_size=4, learning_rate=7e-3, weight_decay=0.02, lr_scheduler_type="constant",
        remove_unused_columns=False, logging_strategy="no", disable_tqdm=True,
    )
    trainer = SpectralTrainer(model=dora_net(), args=targs, train_dataset=DS(),
                              optimizer_cls_and_kwargs=(create_directional_optimizer, {"magnitude_lr_ratio": 3.0}))
    trainer.create_optimizer()
    roles = {g["role"]: (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    assert roles["default"] == (pytest.approx(7e-3), pytest.approx(0.02))
    assert roles["magnitude"] == (pytest.approx(2.1e-2), 0.0)
