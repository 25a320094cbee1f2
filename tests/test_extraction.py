"""Warm-up extraction (trainer_ext.extraction): function preserved, exact subspaces, projected gradients and updates,
param groups from the start, moments at extraction, and a full Trainer run (extract once, resume does not repeat)."""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tests.test_callbacks import Data, TinyViT, _args
from trainer_ext import create_directional_optimizer
from trainer_ext.extraction import (
    EXTRACTION_MAGNITUDE_PATTERNS,
    ExtractableLinear,
    WarmupExtractionCallback,
    attach_projection,
    extract_,
    handle_moments,
    prepare_extraction,
)

K = 4


def _batch(n=16):
    return Data(n=n, seed=1).x


def _opt(model, lr=1e-2, **kw):
    return create_directional_optimizer(model, lr=lr, weight_decay=0.1, magnitude_lr_ratio=10.0,
                                        magnitude_patterns=EXTRACTION_MAGNITUDE_PATTERNS, **kw)


def _loss(model, seed=2):
    d = Data(n=16, seed=seed)
    return model(d.x, labels=d.y)["loss"]


def test_prepare_keeps_parameters_and_names():
    model = TinyViT()
    before = dict(model.named_parameters())
    x = _batch()
    ref = model(x)["logits"]
    mods = prepare_extraction(model, k=K)
    assert len(mods) == 8 and all(isinstance(m, ExtractableLinear) and isinstance(m, torch.nn.Linear) for m in mods)
    after = dict(model.named_parameters())
    for n, p in before.items():
        assert after[n] is p  # same Parameter objects under the same names
    cores = sorted(n for n in after if n.endswith("extract_C"))
    assert len(cores) == 8 and "blocks.0.mlp.fc1.extract_C" in cores
    assert all(float(after[n].detach().abs().sum()) == 0 for n in cores)
    sd = model.state_dict()
    assert {"blocks.0.attn.qkv.extract_U", "blocks.0.attn.qkv.extract_V", "blocks.0.attn.qkv.extracted"} <= set(sd)
    assert sd["blocks.0.attn.qkv.extract_U"].shape == (36, K) and sd["blocks.0.attn.qkv.extract_V"].shape == (12, K)
    torch.testing.assert_close(model(x)["logits"], ref, rtol=0, atol=0)
    assert prepare_extraction(model, k=K) == mods  # idempotent


def test_extraction_preserves_function_and_uses_top_k_subspaces():
    model = TinyViT()
    mods = prepare_extraction(model, k=K)
    ws = [m.weight.detach().double().clone() for m in mods]
    params = [m.weight for m in mods]
    x = _batch()
    with torch.no_grad():
        ref = model(x)["logits"]
    for m in mods:
        extract_(m)
    with torch.no_grad():
        out = model(x)["logits"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for m, w, p in zip(mods, ws, params):
        assert m.weight is p and m.is_extracted and bool(m.extracted)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        uk, vk = u[:, :K], vh[:K].T
        U, V = m.extract_U.double(), m.extract_V.double()
        # same subspaces (singular values are distinct here): |U^T uk| = I
        torch.testing.assert_close((U.T @ uk).abs(), torch.eye(K, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close((V.T @ vk).abs(), torch.eye(K, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.extract_C.detach().double(), torch.diag(s[:K]), atol=1e-5, rtol=0)
        R = m.weight.detach().double()
        assert float((U.T @ R).abs().max()) < 1e-5 and float((R @ V).abs().max()) < 1e-5
        torch.testing.assert_close(m.merged_weight().double(), w, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already extracted"):
        extract_(mods[0])


def test_gradient_and_update_of_R_stay_in_the_complement():
    model = TinyViT()
    mods = prepare_extraction(model, k=K)
    opt = _opt(model)
    attach_projection(opt, mods)
    n_groups = len(opt.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.1 * s)
    seen = []

    def check(o, a, kw):  # registered after the projection hook: sees what the optimizer uses
        for m in mods:
            if m.is_extracted:
                g = m.weight.grad.double()
                U, V = m.extract_U.double(), m.extract_V.double()
                seen.append(max(float((U.T @ g).abs().max()), float((g @ V).abs().max())))

    opt.register_step_pre_hook(check)
    cores_before = None
    for step in range(6):
        if step == 3:
            cores_before = [m.extract_C.detach().clone() for m in mods]
            assert all(float(c.abs().sum()) == 0 for c in cores_before)  # untouched during the warm-up
            for m in mods:
                extract_(m)
            handle_moments(opt, mods)
            cores_before = [m.extract_C.detach().clone() for m in mods]
        opt.zero_grad()
        _loss(model, seed=step).backward()
        opt.step()
        sched.step()
    assert len(opt.param_groups) == n_groups and len(seen) == 3 * len(mods)
    assert max(seen) < 1e-6
    for m, c0 in zip(mods, cores_before):
        assert not torch.equal(m.extract_C.detach(), c0)  # C trains after extraction
        R = m.weight.detach().double()
        U, V = m.extract_U.double(), m.extract_V.double()
        # Adam's per-coordinate scaling and weight decay would leave the complement: the post-step hook prevents it
        assert float((U.T @ R).abs().max()) < 1e-5 and float((R @ V).abs().max()) < 1e-5


def test_core_group_has_ratio_lr_and_no_decay_from_construction():
    model = TinyViT()
    prepare_extraction(model, k=K)
    opt = _opt(model, lr=1e-3)
    core = [g for g in opt.param_groups if any(opt.name_of[p].endswith("extract_C") for p in g["params"])]
    assert len(core) == 1 and core[0]["role"] == "magnitude"
    assert core[0]["lr"] == pytest.approx(1e-2) and core[0]["weight_decay"] == 0.0
    assert all(opt.name_of[p].endswith("extract_C") for p in core[0]["params"]) and len(core[0]["params"]) == 8
    default = next(g for g in opt.param_groups if g["role"] == "default")
    assert default["weight_decay"] == 0.1 and default["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("moments", ["project", "reset"])
def test_moments_of_W_at_extraction(moments):
    model = TinyViT()
    mods = prepare_extraction(model, k=K)
    opt = _opt(model)
    for step in range(3):
        opt.zero_grad()
        _loss(model, seed=step).backward()
        opt.step()
    m = mods[2]
    st = opt.state[m.weight]
    m1, m2, step = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st["step"].clone()
    assert m.extract_C not in opt.state  # no gradient before extraction: no state, stays zero
    for mod in mods:
        extract_(mod)
    handle_moments(opt, mods, moments)
    if moments == "reset":
        assert not opt.state[m.weight]
        opt.zero_grad()
        _loss(model).backward()
        opt.step()  # Adam re-initialises lazily
        assert float(opt.state[m.weight]["step"]) == 1
        return
    U, V = m.extract_U, m.extract_V
    new = opt.state[m.weight]["exp_avg"]
    expect = (torch.eye(U.shape[0]) - U @ U.T) @ m1 @ (torch.eye(V.shape[0]) - V @ V.T)
    torch.testing.assert_close(new, expect, atol=1e-6, rtol=1e-5)
    assert float((U.T @ new).abs().max()) < 1e-6 and float((new @ V).abs().max()) < 1e-6
    assert torch.equal(opt.state[m.weight]["exp_avg_sq"], m2) and torch.equal(opt.state[m.weight]["step"], step)


class _Watch(TrainerCallback):
    """Per update: whether any core is non-zero after the step, and the worst U^T G / G V of W's gradient."""

    def __init__(self):
        self.core_nonzero, self.grad_err = {}, {}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        step = state.global_step + 1
        errs = []
        for m in model.modules():
            if isinstance(m, ExtractableLinear) and m.is_extracted and m.weight.grad is not None:
                g = m.weight.grad.double()
                errs.append(max(float((m.extract_U.double().T @ g).abs().max()), float((g @ m.extract_V.double()).abs().max())))
        self.grad_err[step] = max(errs) if errs else None

    def on_step_end(self, args, state, control, model=None, **kw):
        self.core_nonzero[state.global_step] = [
            float(m.extract_C.detach().abs().sum()) > 0 for m in model.modules() if isinstance(m, ExtractableLinear)
        ]


def _trainer(out, max_steps=6, **kw):
    model = TinyViT()
    prepare_extraction(model, k=K)
    watch = _Watch()
    trainer = Trainer(model=model, args=TrainingArguments(**_args(out, max_steps=max_steps, **kw)), train_dataset=Data(),
                      callbacks=[watch],
                      optimizer_cls_and_kwargs=(create_directional_optimizer, {
                          "lr": 5e-2, "magnitude_patterns": EXTRACTION_MAGNITUDE_PATTERNS, "weight_decay": 0.01}))
    cb = WarmupExtractionCallback(warmup_steps=3).attach(trainer)
    return trainer, cb, watch


def test_trainer_run_extracts_once_at_warmup_and_trains_the_core(tmp_path):
    trainer, cb, watch = _trainer(tmp_path)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "extraction/step" in e]
    assert len(logs) == 1 and logs[0]["extraction/step"] == 3 and logs[0]["extraction/modules"] == 8
    assert 0 < logs[0]["extraction/energy"] <= 1
    assert cb.extracted_at == 3
    assert [any(watch.core_nonzero[s]) for s in (1, 2)] == [False, False]
    assert all(all(watch.core_nonzero[s]) for s in (4, 5, 6))  # (our callback runs after _Watch at step 3)
    assert [watch.grad_err[s] for s in (1, 2, 3)] == [None, None, None]
    assert all(watch.grad_err[s] < 1e-6 for s in (4, 5, 6))
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs["magnitude"] == pytest.approx(10 * lrs["default"])  # the scheduler kept the ratio


def test_trainer_cores_change_after_extraction(tmp_path):
    cores = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            cores[state.global_step] = model.blocks[0].mlp.fc1.extract_C.detach().clone()

    trainer, _, _ = _trainer(tmp_path, max_steps=5)
    trainer.add_callback(Snap())
    trainer.train()
    assert float(cores[2].abs().sum()) == 0
    assert not torch.equal(cores[3], cores[4]) and not torch.equal(cores[4], cores[5])


def test_resume_after_warmup_does_not_extract_again(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    trainer.train()
    trainer2, cb2, watch2 = _trainer(tmp_path, max_steps=6, save_strategy="no")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert cb2.extracted_at is None
    assert not [e for e in trainer2.state.log_history if "extraction/step" in e and e["step"] > 4]
    fc1 = trainer2.model.blocks[0].mlp.fc1
    assert fc1.is_extracted and all(watch2.grad_err[s] < 1e-6 for s in (5, 6))


@pytest.mark.parametrize("call, match", [
    (lambda: prepare_extraction(TinyViT(), k=13), r"k=13 is larger than the smaller dimension"),
    (lambda: prepare_extraction(TinyViT(), k=0), r"k must be an integer >= 1, got k=0"),
    (lambda: prepare_extraction(TinyViT(), targets=["nothing.here"]), r"matched no nn.Linear"),
    (lambda: prepare_extraction(TinyViT(), targets=[]), r"targets is empty"),
    (lambda: WarmupExtractionCallback(0), r"warmup_steps must be an integer >= 1"),
    (lambda: WarmupExtractionCallback(3, moments="zero"), r"moments must be one of"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_peft_model_and_late_preparation_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="PEFT adapter layers"):
        prepare_extraction(get_peft_model(TinyViT(), LoraConfig(r=2, target_modules=["fc1"])))
    model = TinyViT()
    trainer = Trainer(model=model, args=TrainingArguments(**_args(tmp_path, max_steps=1)), train_dataset=Data())
    WarmupExtractionCallback(1).attach(trainer)
    with pytest.raises(ValueError, match="no ExtractableLinear"):
        trainer.train()


def test_randomized_path_also_preserves_function():
    model = TinyViT()
    mods = prepare_extraction(model, targets="mlp.fc1", k=K)
    x = _batch()
    with torch.no_grad():
        ref = model(x)["logits"]
    for m in mods:
        extract_(m, exact_max_dim=0, niter=4, generator=torch.Generator().manual_seed(0))
        U = m.extract_U.double()
        torch.testing.assert_close(U.T @ U, torch.eye(K, dtype=torch.float64), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], ref, rtol=0, atol=1e-5)


def test_random_basis_preserves_function_in_a_data_blind_subspace():
    model = TinyViT()
    mods = prepare_extraction(model, targets="mlp.fc1", k=K)
    x = _batch()
    with torch.no_grad():
        ref = model(x)["logits"]
    (m,) = mods[:1]
    w = m.weight.detach().double().clone()
    extract_(m, basis="random", generator=torch.Generator().manual_seed(3))
    for mod in mods[1:]:
        extract_(mod, basis="random")
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], ref, rtol=0, atol=1e-5)
    U, V = m.extract_U.double(), m.extract_V.double()
    torch.testing.assert_close(U.T @ U, torch.eye(K, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(K, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.extract_C.detach().double(), U.T @ w @ V, atol=1e-5, rtol=0)
    # not the top subspace: the core holds much less of W than the top-k singular values would
    s = torch.linalg.svdvals(w)
    assert float(m.extract_C.detach().double().pow(2).sum()) < 0.8 * float(s[:K].pow(2).sum())
    with pytest.raises(ValueError, match="basis must be one of"):
        extract_(prepare_extraction(TinyViT(), k=K)[0], basis="bottom")
    with pytest.raises(ValueError, match="basis must be one of"):
        WarmupExtractionCallback(3, basis="bottom")


def test_spectral_trainer_wires_extraction_from_arguments(tmp_path):
    from trainer_ext import SpectralTrainer, SpectralTrainingArguments

    args = SpectralTrainingArguments(**_args(tmp_path, max_steps=5), extract_warmup=3, extract_rank=K,
                                     extract_targets="mlp.fc1", magnitude_lr_ratio=10.0, extract_basis="random")
    model = TinyViT()
    trainer = SpectralTrainer(model=model, args=args, train_dataset=Data())
    assert isinstance(model.blocks[0].mlp.fc1, ExtractableLinear) and not isinstance(model.blocks[0].attn.qkv,
                                                                                       ExtractableLinear)
    trainer.train()
    assert trainer.extraction.extracted_at == 3 and trainer.extraction.basis == "random"
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    groups = {g["role"]: g for g in opt.param_groups}
    core = model.blocks[0].mlp.fc1.extract_C
    assert any(p is core for p in groups["magnitude"]["params"])
    assert groups["magnitude"]["lr"] == pytest.approx(10 * groups["default"]["lr"])
    with pytest.raises(ValueError, match="extract_basis must be"):
        SpectralTrainingArguments(**_args(tmp_path), extract_warmup=3, extract_basis="bottom")


def test_request_extraction_in_a_hand_written_loop_matches_extracting_between_steps():
    """The optimizer's post-step hook does the split right after the requested step: the same weights, cores and
    moments as splitting by hand between that step and the next (the former callback), and W's stale gradient is
    dropped."""
    from trainer_ext.extraction import extraction_result, request_extraction

    def run(by_request):
        torch.manual_seed(0)
        model = TinyViT()
        mods = prepare_extraction(model, k=K)
        opt = _opt(model)
        attach_projection(opt, mods)
        for step in range(5):
            if by_request and step == 2:
                request_extraction(opt, seed=1)
                assert extraction_result(opt) is None  # nothing happens before the step
            opt.zero_grad()
            _loss(model, seed=step).backward()
            opt.step()
            if by_request and step == 2:
                done = extraction_result(opt)
                assert done["modules"] == len(mods) and 0 < done["energy"] <= 1
                assert all(m.is_extracted and m.weight.grad is None for m in mods)
                assert extraction_result(opt) is None  # taken once
            if not by_request and step == 2:
                gen = torch.Generator().manual_seed(1)
                for m in mods:
                    extract_(m, generator=gen)
                handle_moments(opt, mods)
        return {k: v.clone() for k, v in model.state_dict().items()}, opt.state[mods[0].weight]["exp_avg"].clone()

    (sd_a, m_a), (sd_b, m_b) = run(True), run(False)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a) and torch.equal(m_a, m_b)
    with pytest.raises(ValueError, match="attach_projection"):
        request_extraction(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
