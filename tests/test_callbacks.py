"""SpectralMonitorCallback inside a real transformers Trainer: values equal exact computations, at the right step."""

import json
import math
import os

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from trainer_ext import SpectralMonitorCallback, SpectralTrainer, SpectralTrainingArguments
from trainer_ext.targets import find_targets


class TinyViTBlock(nn.Module):
    """timm-style names: blocks.{i}.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2."""

    def __init__(self, d=12, hidden=20):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(3 * d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, hidden)
        self.mlp.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.attn.proj(torch.tanh(self.attn.qkv(x)))
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class TinyViT(nn.Module):
    def __init__(self, d=12, n_classes=3, depth=2):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([TinyViTBlock(d) for _ in range(depth)])
        self.head = nn.Linear(d, n_classes)

    def forward(self, x, labels=None):
        for b in self.blocks:
            x = b(x)
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self, n=64, d=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 1).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    """Keeps W, grad (pre-step) and Adam's exp_avg (post-step) of one matrix at the monitor's checks."""

    def __init__(self, module_name, every):
        self.name, self.every, self.seen = module_name, every, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if (state.global_step + 1) % self.every == 0:
            w = dict(model.named_parameters())[self.name + ".weight"]
            self.seen[state.global_step + 1] = {"w": w.detach().clone(), "g": w.grad.detach().clone()}

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kw):
        if (state.global_step + 1) % self.every == 0:
            w = dict(model.named_parameters())[self.name + ".weight"]
            self.seen[state.global_step + 1]["m"] = optimizer.state[w]["exp_avg"].detach().clone()


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=5e-2,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=100, seed=0,
                remove_unused_columns=False, disable_tqdm=True)
    base.update(kw)
    return base


def test_aliases_match_timm_and_transformers_names():
    from peft_ext.stats import canonical_name  # noqa: F401 - names are canonical

    vit = TinyViT()
    assert [t.name for t in find_targets(vit, ["mlp.fc2"])] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24))
    names = {p: [t.name for t in find_targets(bert, [p])] for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert names["attn.qkv"] == [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
    assert names["attn.proj"] == ["encoder.layer.0.attention.output.dense"]
    assert names["mlp.fc1"] == ["encoder.layer.0.intermediate.dense"]
    assert names["mlp.fc2"] == ["encoder.layer.0.output.dense"]  # not attention.output.dense
    with pytest.raises(ValueError, match="matched no 2-D weight"):
        find_targets(vit, ["nothing.here"])


def test_logged_values_equal_exact_computations_at_the_right_step(tmp_path):
    model = TinyViT()
    every, k = 2, 3
    rec = Recorder("blocks.0.mlp.fc1", every)
    trainer = Trainer(model=model, args=TrainingArguments(**_args(tmp_path)), train_dataset=Data(), callbacks=[rec])
    SpectralMonitorCallback(targets=["mlp.fc1", "attn.qkv"], every=every, topk=k).attach(trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "spec/blocks.0.mlp.fc1/sigma_max" in e]
    assert [e["step"] for e in logs] == [2, 4, 6]
    prev_u = prev_s = None
    for e in logs:
        seen = rec.seen[e["step"]]
        u, s, vh = torch.linalg.svd(seen["w"].double())
        u, s, v = u[:, :k], s[:k], vh[:k].T
        assert e["spec/blocks.0.mlp.fc1/sigma_max"] == pytest.approx(float(s[0]), rel=1e-5)
        for i in range(k):
            assert e[f"spec/blocks.0.mlp.fc1/sv{i + 1}"] == pytest.approx(float(s[i]), rel=1e-5)
        for kind, g in (("grad", seen["g"]), ("momentum", seen["m"])):
            g = g.double()
            p = float((u.T @ g @ v).pow(2).sum() / g.pow(2).sum())
            assert e[f"spec/blocks.0.mlp.fc1/{kind}_energy"] == pytest.approx(p, rel=1e-4, abs=1e-7)
            chance = k * k / (g.shape[0] * g.shape[1])
            assert e[f"spec/blocks.0.mlp.fc1/{kind}_energy_vs_chance"] == pytest.approx(p / chance, rel=1e-4, abs=1e-6)
        if prev_u is None:
            assert "spec/blocks.0.mlp.fc1/cos_u1" not in e
        else:
            cos = torch.linalg.svdvals(prev_u.T @ u).clamp(0, 1)
            for i in range(k):
                assert e[f"spec/blocks.0.mlp.fc1/cos_u{i + 1}"] == pytest.approx(float(cos[i]), abs=1e-5)
            assert e["spec/blocks.0.mlp.fc1/cos_u_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
            assert e["spec/blocks.0.mlp.fc1/delta_sv_rel"] == pytest.approx(
                float(torch.linalg.norm(s - prev_s) / torch.linalg.norm(prev_s)), rel=1e-4)
        prev_u, prev_s = u, s
    # plots and files at the end
    out = tmp_path / "spectral"
    assert sorted(os.listdir(out)) == ["principal_cosines.png", "sigma_max.png", "spectral.csv", "spectral.json"]
    assert len(json.loads((out / "spectral.json").read_text())) == 3


def test_lora_branches_are_measured_as_their_effective_delta(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TinyViT(), LoraConfig(r=4, target_modules=["fc1"], init_lora_weights=False))
    layer = model.base_model.model.blocks[0].mlp.fc1
    deltas = []

    class Delta(TrainerCallback):  # the branch as the monitor sees it: before the step
        def on_pre_optimizer_step(self, *a, **kw):
            deltas.append((layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
                          * layer.scaling["default"])

    trainer = Trainer(model=model, args=TrainingArguments(**_args(tmp_path, max_steps=2)), train_dataset=Data(),
                      callbacks=[Delta()])
    monitor = SpectralMonitorCallback(targets=["mlp.fc1"], every=1, topk=2, plots=False).attach(trainer)
    trainer.train()
    for record, delta in zip(monitor.records, deltas):
        s = torch.linalg.svdvals(delta)
        assert record["spec/blocks.0.mlp.fc1/sigma_max"] == pytest.approx(float(s[0]), rel=1e-5)
        assert record["spec/blocks.0.mlp.fc1/sv2"] == pytest.approx(float(s[1]), rel=1e-5)
    last = monitor.records[-1]
    assert "spec/blocks.0.mlp.fc1/grad_energy" not in last  # branches: weight metrics only


def test_spectral_trainer_from_arguments_and_cli_flags(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SpectralTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--spec-monitor", "--spec-every", "3", "--spec-topk", "2",
         "--spec-targets", "attn.qkv,mlp.fc2", "--max_steps", "3", "--use_cpu", "--report_to", "none",
         "--remove_unused_columns", "false", "--save_strategy", "no", "--per_device_train_batch_size", "8"]
    )
    assert args.spec_monitor and args.spec_every == 3 and args.spec_target_list == ["attn.qkv", "mlp.fc2"]
    trainer = SpectralTrainer(model=TinyViT(), args=args, train_dataset=Data())
    trainer.train()
    step3 = [e for e in trainer.state.log_history if e.get("step") == 3 and "spec/blocks.1.attn.qkv/sigma_max" in e]
    assert len(step3) == 1 and math.isfinite(step3[0]["spec/blocks.1.mlp.fc2/sv2"])


def test_log_wandb_flag_maps_onto_report_to(tmp_path):
    args = SpectralTrainingArguments(output_dir=str(tmp_path), log_wandb=True, wandb_project="peft-ext-test")
    assert "wandb" in args.report_to and args.project == "peft-ext-test"


@pytest.mark.parametrize("kw, match", [
    (dict(every=0), "spec_every must be a positive integer"),
    (dict(topk=0), "spec_topk must be a positive integer"),
    (dict(track=("grad",)), "spec_track must include 'weight'"),
])
def test_bad_callback_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SpectralMonitorCallback(**kw)


def test_topk_larger_than_matrix_is_refused_at_train_begin(tmp_path):
    trainer = Trainer(model=TinyViT(), args=TrainingArguments(**_args(tmp_path, max_steps=1)), train_dataset=Data())
    SpectralMonitorCallback(targets=["mlp.fc1"], every=1, topk=13).attach(trainer)
    with pytest.raises(ValueError, match=r"spec_topk=13 is larger than the smaller dimension"):
        trainer.train()


def test_bad_arguments_in_training_args(tmp_path):
    with pytest.raises(ValueError, match="spec_every must be >= 1"):
        SpectralTrainingArguments(output_dir=str(tmp_path), spec_every=0)
    with pytest.raises(ValueError, match="amplify > 1 needs amplify_targets"):
        SpectralTrainingArguments(output_dir=str(tmp_path), amplify=2.0)


def test_checkpoint_and_resume_continue_without_a_gap(tmp_path):
    def run(out, max_steps, resume=None):
        # constant LR: a 4-step and an 8-step run must train identically up to the checkpoint
        trainer = Trainer(model=TinyViT(), args=TrainingArguments(**_args(out, max_steps=max_steps, save_strategy="steps",
                                                                          save_steps=4, lr_scheduler_type="constant")),
                          train_dataset=Data())
        mon = SpectralMonitorCallback(targets=["mlp.fc1"], every=2, topk=2, plots=False).attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return mon

    straight = run(tmp_path / "a", 8)
    first = run(tmp_path / "b", 4)
    assert (tmp_path / "b" / "checkpoint-4" / "spectral_monitor_rank0.safetensors").exists()
    resumed = run(tmp_path / "b", 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert [r["step"] for r in resumed.records] == [2, 4, 6, 8]
    after = {r["step"]: r for r in resumed.records}
    ref = {r["step"]: r for r in straight.records}
    # the first check after resume has cosines against the pre-checkpoint basis, equal to the uninterrupted run
    for key in ("spec/blocks.0.mlp.fc1/cos_u_mean", "spec/blocks.0.mlp.fc1/sigma_max", "spec/blocks.0.mlp.fc1/delta_sv_rel"):
        assert after[6][key] == pytest.approx(ref[6][key], rel=1e-4, abs=1e-6)
    assert first.records[-1]["step"] == 4


@pytest.mark.parametrize("setting, match", [
    (dict(deepspeed="ds_config.json"), "cannot run under DeepSpeed"),
    (dict(fsdp="full_shard"), "does not support FSDP"),
])
def test_deepspeed_and_fsdp_are_refused_with_an_explanation(setting, match):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(**{"deepspeed": None, "fsdp": None, "output_dir": "unused", **setting})
    with pytest.raises(RuntimeError, match=match):
        SpectralMonitorCallback(targets=["mlp.fc1"]).on_train_begin(args, TrainerState(), TrainerControl(), model=TinyViT())


def test_spectral_trainer_builds_the_directional_optimizer_from_arguments(tmp_path):
    from peft import LoraConfig, get_peft_model

    from trainer_ext import DirectionalOptimizer

    model = get_peft_model(TinyViT(), LoraConfig(r=2, target_modules=["fc1", "fc2"], use_dora=True))
    args = SpectralTrainingArguments(**_args(tmp_path, max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant"),
                                     magnitude_lr_ratio=10.0, spectral_clamp=0.7)
    trainer = SpectralTrainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, DirectionalOptimizer)
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs["magnitude"] == pytest.approx(10 * lrs["default"]) and lrs["default"] == pytest.approx(1e-2)
    layer = model.base_model.model.blocks[0].mlp.fc1
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    bound = 0.7 / layer.in_features**0.5
    assert float(torch.linalg.matrix_norm(delta.detach().double(), 2)) <= bound * (1 + 1e-4)
