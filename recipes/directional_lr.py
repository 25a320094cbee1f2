"""Directional learning rates: does learning faster along a few directions cut time-to-accuracy?

    python recipes/directional_lr.py                      # offline, CPU: small ViT on digits + planted task, 3 seeds
    python recipes/directional_lr.py --quick              # a tiny configuration (seconds), as the tests run it
    python recipes/directional_lr.py --model google/vit-small-patch16-224 --dataset cifar100 --image-size 224 ...

Runs, each with every seed, all with the same data order, AdamW and base LR (LoRA runs: --lora-lr):

  E4 suite (full-rank training of the whole model)
    B0       plain full-rank training (the baseline); its momentum subspaces are tracked for experiment #3
    E4       warm-up --warmup-steps, then W = R + U C V^T on W's top-k subspaces, C at lr x --ratio, R projected
    B1       warm-up, then the whole target matrices at lr x --ratio (global instead of directional)
    B2       warm-up, then the same extraction on random k-dim subspaces (are the directions what matters?)
  #3 / 3B  (stable directions of the momentum, found during training)
    3B       B0 + updates inside each target's stable top-k momentum subspace amplified by --amplify
    3B-bulk  the control: the update outside that subspace amplified instead
  #1 / #2  (low-rank branches on every target: LoRA on attn.qkv, attn.proj, mlp.fc1, mlp.fc2; head trained)
    #1-r{4,8}        random frozen backbone + LoRA, branch magnitude (lora_B, LoRA+-style) at lr x --ratio, no WD,
                     sigma_max clamp c/sqrt(d_in) (--clamp); #1-r8 is also B3 (LoRA-only) of the E4 suite
    #1-r8-noclamp    the same with the LR ratio but without the clamp (which of the two does what?)
    #1-r8-plain      the same branches with one LR and no clamp (does the directional treatment help?)
    #2-r{4,8}        backbone target weights zero: a purely low-rank network with the same treatment
    #2-r8-plain      ... with one LR and no clamp

Tasks: `digits` (scikit-learn's real 8x8 digits, upsampled; from scratch) and `planted` (a teacher = the student's
initial weights + a planted rank-`--planted-rank` delta in random subspaces of every target matrix; the student
starts from the unplanted weights and must learn the delta, so the directions it needs are known; accuracy =
agreement with the teacher on held-out inputs). `--model`/`--dataset` run a transformers image classifier (Hub id or
local folder) on an image data set (Hub name, local image folder or parquet file) instead.

Recorded per run: accuracy every --eval-every steps, steps and wall-clock (training only) to reach each --levels
accuracy, final top-1, divergence, sigma_max of every effective target matrix. Written to --output-dir:
results.json, results.md (the table over seeds and the verdict on each success criterion), curves.png, sigma_max.png.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/directional_lr.py` finds its modules

import data  # noqa: E402
import zoo  # noqa: E402
from common import machine  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_ext.files import atomic_directory  # noqa: E402
from trainer_ext import create_directional_optimizer  # noqa: E402
from trainer_ext.extraction import EXTRACTION_MAGNITUDE_PATTERNS, WarmupExtractionCallback, prepare_extraction  # noqa: E402
from trainer_ext.spectral import chance_energy, projection_energy  # noqa: E402


# ------------------------------------------------------------------------------------------------ run specs


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str = "full"  # "full" | "lora_frozen" | "lora_zero"
    rank: int = 0  # LoRA rank
    extract: str | None = None  # "top" (E4) | "random" (B2)
    boost_layers: bool = False  # B1
    amplify_mode: str | None = None  # "subspace" (3B) | "bulk"
    directional: bool = True  # LoRA runs: lora_B x ratio, no WD
    clamp: bool = True  # LoRA runs with directional: sigma_max clamp of every branch


SPECS = (
    Spec("B0"),
    Spec("E4", extract="top"),
    Spec("B1", boost_layers=True),
    Spec("B2", extract="random"),
    Spec("3B", amplify_mode="subspace"),
    Spec("3B-bulk", amplify_mode="bulk"),
    Spec("#1-r4", kind="lora_frozen", rank=4),
    Spec("#1-r8", kind="lora_frozen", rank=8),
    Spec("#1-r8-noclamp", kind="lora_frozen", rank=8, clamp=False),
    Spec("#1-r8-plain", kind="lora_frozen", rank=8, directional=False),
    Spec("#2-r4", kind="lora_zero", rank=4),
    Spec("#2-r8", kind="lora_zero", rank=8),
    Spec("#2-r8-plain", kind="lora_zero", rank=8, directional=False),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="digits,planted", help="comma-separated: digits, planted (ignored with --dataset)")
    p.add_argument("--runs", default=",".join(s.name for s in SPECS), help="comma-separated subset of the runs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for the report)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of full-rank runs")
    p.add_argument("--lora-lr", type=float, default=3e-3, help="AdamW learning rate of LoRA runs (#1, #2)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--ratio", type=float, default=10.0, help="LR factor: E4/B2 core C, B1 layers, LoRA magnitude")
    p.add_argument("--k", type=int, default=8, help="rank of the extracted (E4, B2) and amplified (3B) subspaces")
    p.add_argument("--warmup-steps", type=int, default=50, help="full-rank steps before extraction / B1's boost")
    p.add_argument("--amplify", type=float, default=2.0, help="3B: factor on the update inside the stable subspace")
    p.add_argument("--track-every", type=int, default=10, help="#3/3B: momentum subspace estimated every N steps")
    p.add_argument("--stability-threshold", type=float, default=0.8,
                   help="3B: a subspace is stable once consecutive estimates have mean principal cosine >= this")
    p.add_argument("--stability-checks", type=int, default=3, help="3B: ... for this many consecutive estimates")
    p.add_argument("--clamp", type=float, default=0.7, help="LoRA branches: sigma_max(s B A) <= c / sqrt(d_in)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--levels", default=None,
                   help="two accuracy levels for time-to-X, e.g. 0.9,0.95 (default: per task, see TASK_LEVELS)")
    p.add_argument("--diverge-loss", type=float, default=20.0, help="a run whose loss exceeds this (or is NaN) diverged")
    # model and data
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels per side (default: 16 for digits/planted, the model's own with --model)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--planted-rank", type=int, default=4)
    p.add_argument("--planted-strength", type=float, default=4.0, help="planted sigma as a multiple of sigma_max(W)")
    p.add_argument("--planted-train", type=int, default=4096)
    p.add_argument("--planted-test", type=int, default=1024)
    p.add_argument("--model", default=None, help="Hub id or local folder of a transformers image classifier")
    p.add_argument("--dataset", default=None, help="Hub data set, local image folder or .parquet file (with --model)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--max-train", type=int, default=None, help="cap on training images (--dataset)")
    p.add_argument("--max-test", type=int, default=2000, help="cap on test images (--dataset)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; these matrices are too small to gain from more, and a busy machine "
                   "with more threads than free cores slows every matmul down (measured 25x here)")
    p.add_argument("--output-dir", default="runs/directional_lr")
    p.add_argument("--quick", action="store_true", help="tiny configuration for tests: 2 tiny tasks, 40 steps")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="rebuild results.md and the plots from a results.json of an earlier run (no training)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps, args.eval_every, args.track_every = 40, 10, 5, 5
        args.dim, args.depth, args.heads, args.planted_train, args.planted_test = 16, 2, 2, 256, 128
        args.image_size = args.image_size or 8
        args.batch_size, args.k = 32, 4
    names = {s.name for s in SPECS}
    args.run_list = [r for r in args.runs.split(",") if r]
    bad = [r for r in args.run_list if r not in names]
    if bad:
        p.error(f"--runs: unknown run(s) {bad}; choose from {sorted(names)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        p.error("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    args.task_list = ["hf"] if args.dataset else [t for t in args.tasks.split(",") if t]
    bad = [t for t in args.task_list if t not in ("digits", "planted", "hf")]
    if bad:
        p.error(f"--tasks: unknown task(s) {bad}; choose from digits, planted")
    if args.model and not args.dataset or args.dataset and not args.model:
        p.error("--model and --dataset go together (a transformers image classifier and an image data set)")
    if not args.model:
        args.image_size = args.image_size or 16
    if args.warmup_steps >= args.steps:
        p.error(f"--warmup-steps={args.warmup_steps} must be below --steps={args.steps}")
    if args.levels is not None:
        try:
            args.levels = tuple(float(v) for v in args.levels.split(","))
        except ValueError:
            p.error(f"--levels must be comma-separated numbers such as 0.9,0.95, got {args.levels!r}")
    return args


TASK_LEVELS = {"digits": (0.80, 0.90), "planted": (0.60, 0.70), "hf": (0.85, 0.90)}


# ------------------------------------------------------------------------------------------------ tasks


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@dataclass
class Task:
    name: str
    train: Tensors
    test: Tensors
    make_model: object  # seed -> nn.Module (the model every run of that seed starts from)
    planted: dict = field(default_factory=dict)  # module name -> (U, V), planted task only


def vit_for(args, in_chans=1, num_classes=10, seed=0) -> zoo.ViT:
    return zoo.ViT(image_size=args.image_size, patch=args.image_size // 4, in_chans=in_chans, dim=args.dim,
                   depth=args.depth, heads=args.heads, num_classes=num_classes, seed=seed)


def digits_task(args) -> Task:
    xtr, ytr, xte, yte = data.digits(image_size=args.image_size)
    if args.quick:
        xtr, ytr = xtr[:512], ytr[:512]
    return Task("digits", Tensors(xtr, ytr), Tensors(xte, yte), lambda seed: vit_for(args, seed=seed))


@torch.no_grad()
def planted_task(args, seed: int) -> Task:
    """Teacher = base + planted low-rank deltas; labels = the teacher's class, balanced by centring its logits."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    base = vit_for(args, seed=10_000 + seed)
    teacher = copy.deepcopy(base)
    planted = zoo.plant_low_rank(teacher, args.planted_rank, args.planted_strength, gen)
    n = args.planted_train + args.planted_test
    x = torch.randn(n, 1, args.image_size, args.image_size, generator=gen)
    logits = torch.cat([teacher(x[i : i + 512])["logits"] for i in range(0, n, 512)])
    y = (logits - logits[: args.planted_train].mean(0)).argmax(-1)
    tr, te = slice(0, args.planted_train), slice(args.planted_train, n)
    return Task("planted", Tensors(x[tr], y[tr]), Tensors(x[te], y[te]), lambda _seed: copy.deepcopy(base), planted)


def hf_task(args) -> Task:
    """A transformers image classifier on an image data set: the recommended ViT-S / CIFAR-100 setting on a GPU."""
    from transformers import AutoConfig, AutoModelForImageClassification

    ds = _load_images(args.dataset)
    image_col = next((c for c in ("img", "image", "pixel_values") if c in ds[args.train_split].column_names), None)
    label_col = next((c for c in ("fine_label", "label", "labels") if c in ds[args.train_split].column_names), None)
    if image_col is None or label_col is None:
        raise SystemExit(f"--dataset {args.dataset}: need an image column (img/image) and a label column "
                         f"(fine_label/label); found {ds[args.train_split].column_names}")
    num_labels = len(set(ds[args.train_split][label_col]))
    cfg = AutoConfig.from_pretrained(args.model)
    size = args.image_size or getattr(cfg, "image_size", 224)
    mean, std = _image_stats(args.model)

    def tensors(split, cap):
        part = ds[split]
        if cap is not None:
            part = part.select(range(min(cap, len(part))))
        x = torch.stack([_to_tensor(im, size, mean, std) for im in part[image_col]])
        return Tensors(x, torch.tensor(part[label_col], dtype=torch.long))

    train, test = tensors(args.train_split, args.max_train), tensors(args.test_split, args.max_test)

    def make(seed):
        torch.manual_seed(seed)
        model = AutoModelForImageClassification.from_pretrained(args.model, num_labels=num_labels,
                                                                ignore_mismatched_sizes=True)
        return HFClassifier(model)

    return Task("hf", train, test, make)


def _load_images(spec: str):
    from datasets import load_dataset

    if os.path.isdir(spec):
        return load_dataset("imagefolder", data_dir=spec)
    if spec.endswith(".parquet"):
        return load_dataset("parquet", data_files={"train": spec, "test": spec})
    return load_dataset(spec)


def _image_stats(model_id: str) -> tuple[list[float], list[float]]:
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model_id)
        return list(proc.image_mean), list(proc.image_std)
    except Exception:  # no processor saved with the model: the ImageNet-style default of ViT checkpoints
        return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _to_tensor(image, size: int, mean, std) -> torch.Tensor:
    import numpy as np

    image = image.convert("RGB").resize((size, size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class HFClassifier(nn.Module):
    """A transformers image classifier behind the same dict interface as zoo.ViT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None):
        out = self.model(pixel_values=pixel_values, labels=labels)
        return {"logits": out.logits, **({"loss": out.loss} if labels is not None else {})}


# ------------------------------------------------------------------------------------------------ one run


def head_names(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in ("head", "classifier") and isinstance(m, nn.Linear)]
    if not names:
        raise SystemExit("the model has no Linear named 'head' or 'classifier' to train with the LoRA runs")
    return names


def build(spec: Spec, model: nn.Module, args, seed: int = 0):
    """The model of a run and its optimizer factory kwargs (the `create_directional_optimizer` settings)."""
    targets = zoo.linear_targets(model)
    weight_regex = [rf"(^|\.){re.escape(n)}\.weight$" for n in targets]
    common = {"weight_decay": args.weight_decay}
    if spec.kind == "full":
        kw = dict(common, lr=args.lr, amplify_targets=weight_regex, amplify_rank=args.k, amplify_every=args.track_every,
                  amplify=args.amplify if spec.amplify_mode else 1.0, amplify_mode=spec.amplify_mode or "subspace",
                  stability_threshold=args.stability_threshold, stability_checks=args.stability_checks)
        if spec.extract:
            prepare_extraction(model, targets=[f"re:{re.escape(n)}" for n in targets], k=args.k)
            kw.update(magnitude_patterns=EXTRACTION_MAGNITUDE_PATTERNS, magnitude_lr_ratio=args.ratio)
        elif spec.boost_layers:  # own group from the start at 1x; boosted after the warm-up (LayerBoost)
            kw.update(magnitude_patterns=weight_regex, magnitude_lr_ratio=1.0)
        return model, kw
    from peft import LoraConfig, get_peft_model

    with torch.no_grad():
        for lin in targets.values():
            lin.weight.requires_grad_(False)
            if spec.kind == "lora_zero":
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.rank, target_modules=list(targets), modules_to_save=head_names(model))
    model = get_peft_model(model, cfg)
    if spec.kind == "lora_zero":
        # With W = 0 and PEFT's B = 0 every branch's output gradient passes through another zero matrix (v through
        # proj, fc1 through fc2): a saddle where nothing trains. Start B like the backbone's weights instead.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.nn.init.trunc_normal_(torch.empty_like(p), std=0.02, generator=gen))
    kw = dict(common, lr=args.lora_lr)
    if spec.directional:
        kw.update(magnitude_patterns=(r"lora_B",), magnitude_lr_ratio=args.ratio,
                  spectral_clamp=args.clamp if spec.clamp else None)
    return model, kw


class LayerBoost(TrainerCallback):
    """B1: multiply the LR of the whole target matrices by `ratio` from the end of the warm-up on. The group exists
    from the start (at 1x); the scheduler's base LR is raised, so any schedule keeps applying on top of it."""

    def __init__(self, trainer, warmup: int, ratio: float) -> None:
        self.trainer, self.warmup, self.ratio, self.done = trainer, warmup, ratio, False

    def on_step_end(self, args, state, control, **kw):
        if self.done or state.global_step < self.warmup:
            return
        sched = self.trainer.lr_scheduler
        groups = sched.optimizer.param_groups
        for i, g in enumerate(groups):
            if g.get("role") == "magnitude":
                sched.base_lrs[i] *= self.ratio
                g["lr"] *= self.ratio
                g["initial_lr"] = sched.base_lrs[i]
        self.done = True


def effective_matrices(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The matrix each target applies: W, R + U C V^T after extraction, or W + s B A with a LoRA branch."""
    modules = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()}
    out = {}
    for name in names:
        m = modules[name]
        if hasattr(m, "merged_weight"):  # ExtractableLinear
            out[name] = m.merged_weight()
        elif hasattr(m, "base_layer"):  # PEFT LoRA layer
            out[name] = m.base_layer.weight.detach() + sum(m.get_delta_weight(a) for a in m.active_adapters)
        else:
            out[name] = m.weight.detach()
    return out


class Probe(TrainerCallback):
    """Accuracy, sigma_max of every effective target matrix and (full-rank runs) where the gradient lies relative to
    the tracked momentum subspaces, every `every` steps; the training clock excludes the probe's own time."""

    def __init__(self, test: Tensors, every: int, diverge_loss: float, planted: dict, targets: list[str]) -> None:
        self.test, self.every, self.diverge_loss, self.planted = test, every, diverge_loss, planted
        self.targets = targets
        self.curve: list[dict] = []
        self.momentum: list[dict] = []
        self.train_time = 0.0
        self.diverged = False
        self._t0 = None
        self.optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self._t0 = time.perf_counter()

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        """#3: p_t = ||U^T G V||^2 / ||G||^2 of the gradient G in the momentum's tracked top-k subspace (U, V)."""
        opt = self.optimizer
        if not getattr(opt, "trackers", None) or (state.global_step + 1) % self.every:
            return
        started = time.perf_counter()
        row = {"step": state.global_step + 1}
        for pname, tracker in opt.trackers.items():
            p = opt._targets[pname]
            if p.grad is None or tracker.u is None:
                continue
            g = p.grad.float()
            mod = pname.rsplit(".", 1)[0]
            row[f"{mod}/p"] = projection_energy(g, tracker.u, tracker.v)
            row[f"{mod}/p_chance"] = chance_energy(tuple(g.shape), tracker.u.shape[1], tracker.v.shape[1])
            row[f"{mod}/cos"] = float(min(tracker.history[-1])) if tracker.history else math.nan
            if mod in self.planted:
                u_star, v_star = self.planted[mod]
                row[f"{mod}/planted_u"] = zoo.subspace_overlap(u_star, tracker.u.cpu())
                row[f"{mod}/planted_v"] = zoo.subspace_overlap(v_star, tracker.v.cpu())
        self.momentum.append(row)
        self._t0 += time.perf_counter() - started

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        self.train_time += time.perf_counter() - self._t0
        # the Trainer logs the loss after on_step_end: this is the previous logging window's (None before the first)
        loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None)
        was_training = model.training
        model.eval()
        correct = 0
        for i in range(0, len(self.test), 512):
            x, y = self.test.x[i : i + 512], self.test.y[i : i + 512]
            correct += int((model(pixel_values=x)["logits"].argmax(-1) == y).sum())
        model.train(was_training)
        mats = effective_matrices(model, self.targets)
        sig = {n: float(torch.linalg.matrix_norm(w.float(), ord=2)) for n, w in mats.items()}
        self.curve.append({"step": state.global_step, "time": self.train_time, "acc": correct / len(self.test),
                           "loss": loss, "sigma_max": max(sig.values()), "sigma_max_by_layer": sig})
        bad_loss = loss is not None and (not math.isfinite(loss) or loss > self.diverge_loss)
        if bad_loss or not all(math.isfinite(v) for v in sig.values()):
            self.diverged = True
            control.should_training_stop = True
        self._t0 = time.perf_counter()


def run_one(spec: Spec, task: Task, seed: int, args, workdir: str) -> dict:
    torch.manual_seed(seed)
    model = task.make_model(seed)
    targets = list(zoo.linear_targets(model))
    model, opt_kwargs = build(spec, model, args, seed)
    targs = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=opt_kwargs["lr"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=args.eval_every,
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, max_grad_norm=1.0,
    )
    probe = Probe(task.test, args.eval_every, args.diverge_loss, task.planted, targets)
    trainer = Trainer(model=model, args=targs, train_dataset=task.train, callbacks=[probe],
                      optimizer_cls_and_kwargs=(create_directional_optimizer, opt_kwargs))
    trainer.remove_callback(PrinterCallback)  # the recipe prints one line per run
    extraction = None
    if spec.extract:
        extraction = WarmupExtractionCallback(args.warmup_steps, basis=spec.extract, seed=seed).attach(trainer)
    if spec.boost_layers:
        trainer.add_callback(LayerBoost(trainer, args.warmup_steps, args.ratio))
    start = time.perf_counter()
    trainer.train()
    result = {"run": spec.name, "task": task.name, "seed": seed, "curve": probe.curve, "momentum": probe.momentum,
              "train_time": probe.train_time, "total_time": time.perf_counter() - start, "diverged": probe.diverged,
              "final_acc": probe.curve[-1]["acc"] if probe.curve else math.nan,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if getattr(opt, "trackers", None):
        state = opt.amplifier_state()
        result["amplified_fraction"] = statistics.mean(v["amplified_steps"] for v in state.values()) / args.steps
    if extraction is not None and task.planted:
        result["extracted_planted_overlap"] = statistics.mean(
            (zoo.subspace_overlap(task.planted[n][0], m.extract_U) + zoo.subspace_overlap(task.planted[n][1], m.extract_V)) / 2
            for n, m in zoo.linear_targets(model).items()
            if n in task.planted
        )
    return result


# ------------------------------------------------------------------------------------------------ summaries


def time_to(curve: list[dict], level: float) -> tuple[float, float]:
    """(steps, seconds) of the first evaluation reaching `level`; (nan, nan) if none did."""
    hit = next((c for c in curve if c["acc"] >= level), None)
    return (hit["step"], hit["time"]) if hit else (math.nan, math.nan)


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(results: list[dict], levels: tuple[float, float]) -> dict:
    """Per (task, run): mean/std over seeds of time-to-X (steps, s), final top-1, max sigma_max, divergences."""
    table = {}
    for r in results:
        table.setdefault((r["task"], r["run"]), []).append(r)
    out = {}
    for (task, run), rs in table.items():
        row = {"seeds": len(rs), "diverged": sum(r["diverged"] for r in rs)}
        for x in levels:
            hits = [time_to(r["curve"], x) for r in rs]
            row[f"steps@{x}"] = mean_std([h[0] for h in hits])
            row[f"time@{x}"] = mean_std([h[1] for h in hits])
            row[f"reached@{x}"] = sum(math.isfinite(h[0]) for h in hits)
        row["final_acc"] = mean_std([r["final_acc"] for r in rs])
        row["sigma_max"] = mean_std([max(c["sigma_max"] for c in r["curve"]) for r in rs])
        row["trainable"] = rs[0]["trainable"]
        if "amplified_fraction" in rs[0]:
            row["amplified_fraction"] = mean_std([r["amplified_fraction"] for r in rs])
        if "extracted_planted_overlap" in rs[0]:
            row["extracted_planted_overlap"] = mean_std([r["extracted_planted_overlap"] for r in rs])
        out[f"{task}/{run}"] = row
    return out


def momentum_summary(results: list[dict]) -> dict:
    """#3 from the B0 runs: mean p_t (and its chance level), principal-cosine stability, planted alignment."""
    out = {}
    for task in sorted({r["task"] for r in results}):
        rows = [row for r in results if r["task"] == task and r["run"] == "B0" for row in r["momentum"]]
        if not rows:
            continue
        late = [row for row in rows if row["step"] > max(row["step"] for row in rows) / 2]

        def avg(suffix, rs=late):
            vals = [v for row in rs for k, v in row.items() if k.endswith(suffix) and math.isfinite(v)]
            return statistics.mean(vals) if vals else math.nan

        out[task] = {"p": avg("/p"), "p_chance": avg("/p_chance"), "cos": avg("/cos"),
                     "planted_u": avg("/planted_u"), "planted_v": avg("/planted_v")}
    return out


def fmt(ms: tuple[float, float], digits: int = 0, scale: float = 1.0) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "—"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def verdicts(summary: dict, task: str, levels) -> list[str]:
    """One line per success criterion of the issue, decided from the numbers (never by hand)."""
    def row(run):
        return summary.get(f"{task}/{run}")

    b0, lines = row("B0"), []
    if b0 is None:
        return ["no B0 run: nothing to compare against"]

    def faster(run, x, key="steps"):
        r = row(run)
        if r is None or r[f"reached@{x}"] < r["seeds"] or b0[f"reached@{x}"] < b0["seeds"]:
            return None
        return 1 - r[f"{key}@{x}"][0] / b0[f"{key}@{x}"][0]

    def speed_line(run):
        parts = []
        for x in levels:
            f_steps, f_time = faster(run, x), faster(run, x, "time")
            parts.append(f"X={x}: " + ("not reached by every seed" if f_steps is None else
                                       f"{100 * f_steps:+.0f}% steps, {100 * f_time:+.0f}% wall-clock"))
        return "; ".join(parts)

    e4 = row("E4")
    if e4:
        gains = [faster("E4", x) for x in levels]
        ok = all(g is not None and g >= 0.10 for g in gains)
        lines.append(f"**Speed** (E4 time-to-X ≥10% below B0 at both levels): {'met' if ok else 'NOT met'} — "
                     f"{speed_line('E4')} (positive = fewer than B0).")
        d = 100 * (e4["final_acc"][0] - b0["final_acc"][0])
        lines.append(f"**Final accuracy** (E4 within 0.2 points of B0 or better): {'met' if d >= -0.2 else 'NOT met'} — "
                     f"E4 {100 * e4['final_acc'][0]:.1f}% vs B0 {100 * b0['final_acc'][0]:.1f}% ({d:+.1f} points).")
        lines.append(f"**Stability** (no divergence, sigma_max controlled): E4 diverged in {e4['diverged']}/{e4['seeds']} "
                     f"runs, max sigma_max {e4['sigma_max'][0]:.2f} vs B0 {b0['sigma_max'][0]:.2f}"
                     + (f"; B1 diverged in {row('B1')['diverged']}/{row('B1')['seeds']}, max sigma_max "
                        f"{row('B1')['sigma_max'][0]:.2f}" if row("B1") else "") + ".")
    b2, b1 = row("B2"), row("B1")
    if b2 and e4:
        g2 = [faster("B2", x) for x in levels]
        helps = any(g is not None and g >= 0.10 for g in g2)
        lines.append(f"**Random subspace (B2) does not help**: {'NOT met — it helps as well' if helps else 'met'} — "
                     f"{speed_line('B2')}.")
    if b1 and e4:
        def at_least_as_fast(a, b, x):
            """a reached X in more seeds than b, or in as many and (where all did) in no more steps."""
            if a[f"reached@{x}"] != b[f"reached@{x}"]:
                return a[f"reached@{x}"] > b[f"reached@{x}"]
            return a[f"reached@{x}"] < a["seeds"] or a[f"steps@{x}"][0] <= b[f"steps@{x}"][0]

        fast = all(at_least_as_fast(e4, b1, x) for x in levels)
        accurate = e4["final_acc"][0] >= b1["final_acc"][0]
        lines.append(f"**Directional (E4) beats global LR (B1)** (at least as fast to every X and a higher final "
                     f"top-1): {'met' if fast and accurate else 'NOT met'} — B1: {speed_line('B1')}; final "
                     f"{100 * b1['final_acc'][0]:.1f}% vs E4 {100 * e4['final_acc'][0]:.1f}%.")
    if row("3B"):
        lines.append(f"**3B amplification** (α on the stable momentum subspace; amplified on "
                     f"{100 * row('3B').get('amplified_fraction', (math.nan,))[0]:.0f}% of steps): {speed_line('3B')}; "
                     f"bulk control: {speed_line('3B-bulk') if row('3B-bulk') else '—'}.")
    if row("#1-r8") and row("#2-r8"):
        a1, a2 = row("#1-r8")["final_acc"][0], row("#2-r8")["final_acc"][0]
        lines.append(f"**#1 vs #2** (random full-rank backbone + LoRA vs purely low-rank): r=8 final "
                     f"{100 * a1:.1f}% vs {100 * a2:.1f}%" + (f"; r=4: {100 * row('#1-r4')['final_acc'][0]:.1f}% vs "
                     f"{100 * row('#2-r4')['final_acc'][0]:.1f}%" if row("#1-r4") and row("#2-r4") else "")
                     + (f"; one LR, no clamp, r=8: {100 * row('#1-r8-plain')['final_acc'][0]:.1f}% vs "
                        f"{100 * row('#2-r8-plain')['final_acc'][0]:.1f}%" if row("#1-r8-plain") and row("#2-r8-plain")
                        else "") + ".")
    if row("#1-r8") and row("#1-r8-plain"):
        plain = row("#1-r8-plain")

        def vs_plain(run, label):
            r = row(run)
            if r is None:
                return None
            return (f"{label}: final {100 * (r['final_acc'][0] - plain['final_acc'][0]):+.1f} points, "
                    f"steps to {levels[0]} {fmt(r[f'steps@{levels[0]}'])} vs {fmt(plain[f'steps@{levels[0]}'])}")

        parts = [p for p in (vs_plain("#1-r8", "lora_B ×ratio + clamp"), vs_plain("#1-r8-noclamp", "lora_B ×ratio alone"))
                 if p]
        lines.append("**Directional LoRA treatment** (#1, r=8, against one LR and no clamp): " + "; ".join(parts) + ".")
    return lines


def markdown(summary: dict, momentum: dict, tasks: list[str], levels_of: dict, args, machine_line: str) -> str:
    lines = [f"Runs: {len(args.seed_list)} seeds ({args.seeds}), {args.steps} steps, batch {args.batch_size}, AdamW "
             f"lr {args.lr} (LoRA {args.lora_lr}), wd {args.weight_decay}, ratio ×{args.ratio}, k={args.k}, warm-up "
             f"{args.warmup_steps}, α={args.amplify}; {machine_line}. Mean ± std over seeds; time-to-X in optimizer "
             "steps and seconds of training (evaluation excluded); — = not reached by any seed, (n/N) = reached by "
             "only n of N seeds."]
    for task in tasks:
        levels = levels_of[task]
        lines += ["", f"**{task}**", "",
                  "| run | trainable | steps to " + " | steps to ".join(str(x) for x in levels)
                  + " | s to " + " | s to ".join(str(x) for x in levels) + " | final top-1 (%) | max σ_max | diverged |",
                  "|---|---:|" + "---:|" * (2 * len(levels)) + "---:|---:|---:|"]
        for run in args.run_list:
            r = summary.get(f"{task}/{run}")
            if r is None:
                continue
            reach = lambda x: "" if r[f"reached@{x}"] == r["seeds"] else f" ({r[f'reached@{x}']}/{r['seeds']})"  # noqa: E731
            cells = [fmt(r[f"steps@{x}"]) + reach(x) for x in levels] + [fmt(r[f"time@{x}"], 1) + reach(x) for x in levels]
            lines.append(f"| {run} | {r['trainable']:,} | " + " | ".join(cells)
                         + f" | {fmt(r['final_acc'], 1, 100)} | {fmt(r['sigma_max'], 2)} | {r['diverged']}/{r['seeds']} |")
        m = momentum.get(task)
        if m:
            planted = (f"; overlap of the tracked subspaces with the planted ones {m['planted_u']:.2f} (U) / "
                       f"{m['planted_v']:.2f} (V)" if math.isfinite(m["planted_u"]) else "")
            e4 = summary.get(f"{task}/E4", {}).get("extracted_planted_overlap")
            planted += (f"; E4's extracted top-k subspaces vs planted: {e4[0]:.2f}" if e4 else "")
            lines += ["", f"#3 (B0, second half of training): the gradient's energy in the momentum's tracked top-{args.k} "
                      f"subspace p_t = {m['p']:.2f} (chance {m['p_chance']:.3f}); mean principal cosine between "
                      f"consecutive estimates {m['cos']:.2f}{planted}."]
        lines += [""] + [f"- {v}" for v in verdicts(summary, task, levels)]
    return "\n".join(lines)


def plot(results: list[dict], tasks: list[str], levels_of: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for what, ylabel, fname in (("acc", "test top-1", "curves.png"), ("sigma_max", "max σ_max of target matrices", "sigma_max.png")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            runs = sorted({r["run"] for r in results if r["task"] == task}, key=[s.name for s in SPECS].index)
            for run in runs:
                curves = [r["curve"] for r in results if r["task"] == task and r["run"] == run]
                n = min(len(c) for c in curves)
                steps = [c["step"] for c in curves[0][:n]]
                ys = [statistics.mean(c[i][what] for c in curves) for i in range(n)]
                ax.plot(steps, ys, label=run, lw=1.4, ls="--" if run.startswith("#") else "-")
            if what == "acc":
                for x in levels_of[task]:
                    ax.axhline(x, color="grey", lw=0.6, ls=":")
            ax.set_title(task)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ main


def partial_path(args) -> str:
    """Finished runs of an unfinished recipe, one JSON line each, keyed by everything that changes a run's result:
    a rerun with the same flags picks up where an interrupted one stopped; other flags start afresh."""
    keep = {k: v for k, v in vars(args).items() if k not in ("output_dir", "runs", "run_list", "seeds", "seed_list",
                                                               "no_plots", "threads")}
    digest = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.abspath(args.output_dir) + f".partial-{digest}.jsonl"


def load_partial(args) -> dict[str, dict]:
    path = partial_path(args)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["key"]: row["result"] for row in rows}


def save_partial(args, key: str, result: dict) -> None:
    path = partial_path(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, "result": result}, default=float) + "\n")


def write_report(args, results: list[dict], specs: list[Spec], machine_line: str) -> dict:
    """Summaries, verdicts, table and plots from the per-run results; written atomically to --output-dir."""
    out_dir = args.output_dir
    task_names = list(args.task_list)
    levels_of = {t: (args.levels or TASK_LEVELS[t]) for t in task_names}
    summary = {}
    for t in task_names:
        summary.update(summarise([r for r in results if r["task"] == t], levels_of[t]))
    momentum = momentum_summary(results)
    md = markdown(summary, momentum, task_names, levels_of, args, machine_line)
    report = {"args": {k: v for k, v in vars(args).items()}, "machine": machine_line, "levels": levels_of,
              "specs": [asdict(s) for s in specs], "summary": summary, "momentum": momentum, "results": results,
              "markdown": md}
    with atomic_directory(out_dir, overwrite=True, field="--output-dir") as tmp:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=float)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(md + "\n")
        if not args.no_plots:
            plot(results, task_names, levels_of, tmp)
    if os.path.exists(partial_path(args)):
        os.remove(partial_path(args))  # everything is in results.json now
    print("\n" + md)
    print(f"\nwrote {out_dir}/results.json, results.md" + ("" if args.no_plots else ", curves.png, sigma_max.png"))
    return report


def rebuild(args) -> dict:
    """results.md, results.json's summaries and the plots again from the raw per-run results of a saved run."""
    with open(args.from_json) as f:
        saved = json.load(f)
    old = argparse.Namespace(**{**saved["args"], "output_dir": args.output_dir, "no_plots": args.no_plots,
                                "from_json": None})
    return write_report(old, saved["results"], [Spec(**s) for s in saved["specs"]], saved["machine"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        return rebuild(args)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    specs = [s for s in SPECS if s.name in args.run_list]
    results = []
    done = load_partial(args)
    with tempfile.TemporaryDirectory() as work:
        for task_name in args.task_list:
            shared = {"digits": digits_task, "hf": hf_task}.get(task_name)
            shared = shared(args) if shared else None  # the planted task is drawn per seed (teacher and inputs)
            for seed in args.seed_list:
                task = None
                for spec in specs:
                    key = f"{task_name}/{spec.name}/{seed}"
                    if key in done:
                        results.append(done[key])
                        print(f"[{task_name} seed {seed}] {spec.name:<12} final top-1 "
                              f"{100 * done[key]['final_acc']:5.1f}%  (kept from an interrupted run)", flush=True)
                        continue
                    task = task or shared or planted_task(args, seed)
                    t0 = time.perf_counter()
                    res = run_one(spec, task, seed, args, work)
                    results.append(res)
                    save_partial(args, key, res)
                    print(f"[{task_name} seed {seed}] {spec.name:<12} final top-1 {100 * res['final_acc']:5.1f}%  "
                          f"{time.perf_counter() - t0:5.1f}s" + ("  DIVERGED" if res["diverged"] else ""), flush=True)
    return write_report(args, results, specs, machine())


if __name__ == "__main__":
    main()
