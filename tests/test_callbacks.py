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
    with pytest.raises(ValueError, match="spec_every must be an integer >= 1, got spec_every=0"):
        SpectralTrainingArguments(output_dir=str(tmp_path), spec_every=0)
    for field, value in (("magnitude_lr_ratio", float("nan")), ("amplify", float("inf")), ("spectral_clamp", -1.0)):
        with pytest.raises(ValueError, match=rf"SpectralTrainingArguments\.{field} must be a finite number"):
            SpectralTrainingArguments(output_dir=str(tmp_path), **{field: value})
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
    (dict(deepspeed={"zero_optimization": {"stage": 3}}), "ZeRO-3 partitions every weight"),
])  # FSDP2 is supported (tests/test_fsdp2_monitor.py, with the rest of the DeepSpeed decision)
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


# ---------------------------------------------------------------------------------------- logging next to the Trainer
LLAMA_SPEC = ("spec/model.layers.0.mlp.gate_proj/sigma_max", "spec/model.layers.0.mlp.up_proj/sigma_max")


def _tiny_llama():
    """A 1-layer Llama over a 17-word WordLevel tokenizer built in memory (nothing from the Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + "the cat sat on a mat and dog ran to big red house".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg), tok


def _token_rows(with_labels: bool, n: int = 64, length: int = 10):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 17, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids} if with_labels else {"input_ids": ids})


class LogRecorder(TrainerCallback):
    """What a report_to integration receives: every on_log call, with its step."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.seen.append({**logs, "step": state.global_step})


@pytest.mark.parametrize("every, logging_steps", [(2, 2), (2, 4), (3, 2)],
                         ids=["every=logging", "logging-a-multiple-like-the-defaults", "neither-divides"])
@pytest.mark.parametrize("kind", ["Trainer", "SpectralTrainer", "SFTTrainer"])
# TRL 1.16's SFTConfig turns activation checkpointing on through its deprecated name; kept, as users get it
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_loss_and_spectral_values_are_both_logged_at_their_steps(tmp_path, kind, every, logging_steps):
    model, tok = _tiny_llama()
    rec = LogRecorder()
    common = _args(tmp_path, max_steps=6, logging_steps=logging_steps, learning_rate=5e-3)
    monitor = dict(targets=["mlp.fc1"], every=every, topk=2, plots=False)
    if kind == "Trainer":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=_token_rows(True), callbacks=[rec])
        SpectralMonitorCallback(**monitor).attach(trainer)
    elif kind == "SpectralTrainer":
        args = SpectralTrainingArguments(**common, spec_monitor=True, spec_every=every, spec_topk=2, spec_targets="mlp.fc1")
        trainer = SpectralTrainer(model=model, args=args, train_dataset=_token_rows(True), callbacks=[rec])
    else:
        from trl import SFTConfig, SFTTrainer  # the dev extra installs trl

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=16), train_dataset=_token_rows(False),
                             processing_class=tok, callbacks=[rec])
        SpectralMonitorCallback(**monitor).attach(trainer)
    trainer.train()

    history = trainer.state.log_history
    train_logs = [e for e in history if "loss" in e]
    spec_logs = [e for e in history if any(k.startswith("spec/") for k in e)]
    assert [e["step"] for e in train_logs] == [s for s in range(1, 7) if s % logging_steps == 0]
    assert [e["step"] for e in spec_logs] == [s for s in range(1, 7) if s % every == 0]
    for e in train_logs:
        assert all(math.isfinite(e[k]) for k in ("loss", "grad_norm", "learning_rate"))
        assert not any(k.startswith("spec/") for k in e)  # our values never ride on the Trainer's entry
    for e in spec_logs:
        assert all(math.isfinite(e[k]) for k in LLAMA_SPEC)
        assert not {"loss", "grad_norm", "learning_rate"} & e.keys()
    if kind == "SFTTrainer":  # TRL's own averaged metrics stay with its log, not spent on ours
        assert all({"mean_token_accuracy", "entropy", "num_tokens"} <= e.keys() for e in train_logs)
        assert not any("mean_token_accuracy" in e for e in spec_logs)
    assert rec.seen == history  # the integrations see exactly what log_history holds, both kinds of entries


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["PrinterCallback", "ProgressCallback"])
def test_console_gets_one_short_line_per_check(tmp_path, capsys, disable_tqdm):
    trainer = Trainer(model=TinyViT(), args=TrainingArguments(**_args(tmp_path, max_steps=4, logging_steps=2,
                                                                      disable_tqdm=disable_tqdm)), train_dataset=Data())
    monitor = SpectralMonitorCallback(every=2, topk=3, plots=False).attach(trainer)  # 8 matrices
    trainer.train()
    out = capsys.readouterr()
    console = out.out + out.err
    lines = [line for line in console.splitlines() if "spectral check" in line]
    assert len(lines) == 2 and all(len(line) < 120 for line in lines)
    assert len(str(monitor.records[-1])) > 3000  # what used to be printed per check
    assert "spec/" not in console
    for line, record in zip(lines, monitor.records):
        sigma = [v for k, v in record.items() if k.endswith("/sigma_max")]
        assert f"step {record['step']}: 8/8 matrices, sigma_max {min(sigma):.4g}..{max(sigma):.4g}" in line
    cos_u = [v for k, v in monitor.records[1].items() if k.endswith("/cos_u_mean")]
    assert "mean cos" not in lines[0] and f"mean cos u {sum(cos_u) / len(cos_u):.3f}" in lines[1]
    assert console.count("'loss'") == 2  # the Trainer's own log lines are still printed, at steps 2 and 4


# ---------------------------------------------------------------------------------------------- non-finite values
class NaNLossAt(TinyViT):
    """A TinyViT whose loss is NaN at its `bad`-th training forward: that step's gradients, and after its update
    every weight, are NaN (AdamW spreads the NaN gradient norm through clipping into every parameter)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            self.calls += 1
            if self.calls == self.bad:
                out["loss"] = out["loss"] * float("nan")
        return out


def _spectral_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "trainer_ext.callbacks" and r.levelname == "WARNING"]


def test_nan_loss_does_not_end_training_and_nothing_false_is_logged(tmp_path, caplog):
    trainer = Trainer(model=NaNLossAt(3), args=TrainingArguments(**_args(tmp_path, logging_steps=1)),
                      train_dataset=Data())
    monitor = SpectralMonitorCallback(targets=["mlp.fc1", "attn.qkv"], every=1, topk=2, plots=False).attach(trainer)
    with caplog.at_level("WARNING", logger="trainer_ext.callbacks"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    spec = [e for e in trainer.state.log_history if any(k.startswith("spec/") for k in e)]
    assert [e["step"] for e in spec] == [r["step"] for r in monitor.records] == [1, 2]  # from step 3 on: not finite
    assert all(math.isfinite(v) for e in spec for k, v in e.items() if k.startswith("spec/"))
    names = [t.name for t in monitor.targets]
    warnings = _spectral_warnings(caplog)
    assert len(warnings) == 4  # one per check at steps 3..6, each naming every matrix once
    for step, (msg, what) in enumerate(zip(warnings, ["gradient", "weight and gradient", "weight and gradient",
                                                      "weight and gradient"]), start=3):
        assert f"step {step}: skipped 4 of 4 matrices" in msg
        assert all(msg.count(f"{n} ({what})") == 1 for n in names), msg


class PoisonOnce(TrainerCallback):
    """A NaN in `name`'s weight (or its Adam moment) during the monitor's check at update `step` only, restored
    right after, so training itself never sees it. Registered before the monitor, so its hooks run first."""

    def __init__(self, model, name, step, where):
        self.w = dict(model.named_parameters())[name + ".weight"]
        self.step, self.where, self.saved = step, where, None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if state.global_step + 1 == self.step and self.where == "weight":
            self.saved = self.w.detach().clone()
            self.w.data[0, 0] = float("nan")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        if state.global_step + 1 != self.step:
            return
        if self.where == "weight":
            self.w.data.copy_(self.saved)  # the weight before this update: the matrix just skips one step
        else:
            moment = optimizer.state[self.w]["exp_avg"]
            self.saved = moment.clone()
            moment[0, 0] = float("nan")

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step == self.step and self.where == "moment":
            optimizer.state[self.w]["exp_avg"].copy_(self.saved)  # the monitor has read it by now


@pytest.mark.parametrize("where", ["weight", "moment"])
def test_a_skipped_matrix_leaves_its_tracker_at_the_last_logged_check(tmp_path, caplog, where):
    model = TinyViT()
    name = "blocks.0.mlp.fc1"
    rec = Recorder(name, 1)
    trainer = Trainer(model=model, args=TrainingArguments(**_args(tmp_path, max_steps=4, lr_scheduler_type="constant")),
                      train_dataset=Data(), callbacks=[rec, PoisonOnce(model, name, 2, where)])
    monitor = SpectralMonitorCallback(targets=["mlp.fc1"], every=1, topk=2, plots=False).attach(trainer)
    with caplog.at_level("WARNING", logger="trainer_ext.callbacks"):
        trainer.train()
    by_step = {r["step"]: r for r in monitor.records}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert not any(k.startswith(f"spec/{name}/") for k in by_step[2])  # skipped, nothing logged for it ...
    assert "spec/blocks.1.mlp.fc1/momentum_energy" in by_step[2]  # ... while the other matrix is checked as usual
    what = "weight" if where == "weight" else "optimizer moment"
    assert _spectral_warnings(caplog) == [
        f"spectral monitor, step 2: skipped 1 of 2 matrices whose values are not finite (nothing logged for them at "
        f"this check; their next finite check compares against their last logged one): {name} ({what})"
    ]
    # the next finite check compares against step 1 (the last logged), exactly; the warm start was not poisoned
    u1, s1, _ = torch.linalg.svd(rec.seen[1]["w"].double())
    u3, s3, _ = torch.linalg.svd(rec.seen[3]["w"].double())
    cos = torch.linalg.svdvals(u1[:, :2].T @ u3[:, :2]).clamp(0, 1)
    assert by_step[3][f"spec/{name}/cos_u1"] == pytest.approx(float(cos[0]), abs=1e-5)
    assert by_step[3][f"spec/{name}/cos_u2"] == pytest.approx(float(cos[1]), abs=1e-5)
    assert by_step[3][f"spec/{name}/delta_sv_rel"] == pytest.approx(
        float(torch.linalg.norm(s3[:2] - s1[:2]) / torch.linalg.norm(s1[:2])), rel=1e-4)
    assert monitor.trackers[name].num_checks == 3 and monitor.trackers["blocks.1.mlp.fc1"].num_checks == 4
    assert all(math.isfinite(v) for r in monitor.records for v in r.values())
