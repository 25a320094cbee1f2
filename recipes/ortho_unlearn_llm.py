"""Unlearning fictitious people from a fine-tuned SmolLM2: OrthoSplit's alpha=0 against the baselines, every arm a unit.

    python recipes/ortho_unlearn_llm.py                                            # CPU default, resumable (Budget)
    python recipes/ortho_unlearn_llm.py --config recipes/presets/ortho_unlearn_llm_quick.yaml   # seconds: the tests
    python recipes/ortho_unlearn_llm.py --config recipes/presets/ortho_unlearn_llm_gpu.yaml     # when a GPU is lent
    python recipes/ortho_unlearn_llm.py --report_only --results_copy results/ortho_unlearn_llm.json

Models: recipes/tofu_models.py's full fine-tune of SmolLM2-135M-Instruct's block linears on every person (the
"fine-tuned" model) and the oracle fine-tuned without the forget people, built or reused from its cache (same flags,
prefixed ft_). SmolLM2's weights are Q4_1-dequantised (recipes/smollm2.py): say so next to any figure.

Data (recipes/tofu_data.make_splits): forget / retain-select / retain-eval people, disjoint, plus real world facts.
Selection and tuning read forget and retain-select only; every reported retain number comes from retain-eval.

Arms (each at alpha=0 unless stated; --seeds each):
- OrthoSplit (reference = the pre-fine-tune model, so the ortho stream holds entries of the fine-tuning delta), one
  unit per selector x density x base kind (none, int8, int4, nf4: peft_ext's pure-torch round-to-nearest and NF4
  code book, no bitsandbytes) and, at --sweep_density with base none, every --alphas value (the alpha sweep).
  Selectors: `contrastive` (first-order attribution on the path base -> fine-tuned: forget-loss increase minus
  retain-select-loss increase), `fisher_ratio` (the control with the same data access: diagonal Fisher on forget
  over diagonal Fisher on retain-select, as Selective Synaptic Dampening ranks weights, times the delta^2 / 2 of
  the fisher selector), `random` (same density).
- Baselines, all on the fine-tuned model's block linears: gradient ascent (`ga`), `graddiff` (-forget NLL +
  --graddiff_weight x retain-select NLL), `npo` (Zhang et al. 2024, beta from --npo_betas, reference = the
  fine-tuned model), `task_vector` (W - lambda dW_forget, dW_forget the delta of the fine-tuned model trained further
  on the forget set alone, Ilharco et al.); the losses are peft_ext.unlearning's.
Tuning rule, fixed before any retain-eval number is read: every baseline runs its grid (--baseline_lrs x
--npo_betas for npo; --tv_lams for task_vector) on seed 0, scored on forget and retain-select only; the operating
point maximises forget quality subject to retain-select utility >= --utility_floor (95%) of the fine-tuned model's
(ties: higher utility); if no point keeps that utility, the one with the highest utility, flagged. A choice on
the grid's edge is not tuned: the grid then grows one point past it (lr x3 or /3, lambda x2 or /2), up to
--grid_extensions times (the first README run's GradDiff chose 1e-4, the top of the 3-point grid). The other seeds
run at the final choice.

Scores per unit (tofu_data.tofu_scores on forget / retain-eval / world; peft_ext.unlearning's math):
forget quality = KS p-value of the forget truth ratios against the oracle's; model utility = harmonic mean of
probability, ROUGE-L recall and truth-ratio score on retain-eval and world (TOFU's 9 numbers less its real-authors
set); truth ratio = the forget set's truth-ratio score; exposure and extraction of a secret. The fine-tune planted
no separate canaries: each person's six-digit ID number ("What is the ID number of X?" -> "The ID number of X is
481529.") is the secret, trained once per epoch. Exposure of the first --canaries forget people's IDs (and, as a
positive control, retain-eval people's) after prompt + "The ID number of X is": Carlini's skew-normal extrapolation
over all 10^6 numbers from --exposure_samples sampled ones; extraction: the greedy completion's digits.
Seeds: they change the baselines' batch order and the random selector's mask; contrastive and fisher_ratio are
deterministic given the models and data, so they run once (seed 0) and their CI is a point: the report says so.

Verdicts, computed per arm against the issue's three criteria with 95% bootstrap CIs over seeds
(recipes/evidence.py): forget quality within the oracle's band (p >= --fq_band, 0.05: the KS test cannot tell the
arm's forget truth ratios from the oracle's), utility >= 95% of the fine-tuned model's, forget-ID exposure at chance
(<= the oracle's, which never saw those IDs, + --exposure_margin bits). Met when the whole CI is on the right side,
missed when the whole CI is on the wrong side, unresolved otherwise; "vacuous" (never met) when the fine-tuned model
itself already meets the criterion (e.g. it never memorised the IDs), since then the criterion tests nothing.
Beside the three, ours: retain-eval answer probability >= 95% of the fine-tuned model's. TOFU's model utility is a
harmonic mean and follows its smallest term; here that is the retain truth-ratio score (~0.13, as the perturbed
answers differ from the true ones in a few tokens of a shared template), so utility can rise while the retain answers'
probability falls by a third. The report gives both and counts the issue's three apart from ours.

References besides the fine-tuned model and the oracle, for each quantised --base_kinds (run by the process that
runs OrthoSplit arms): the fine-tuned model with every block linear replaced by Q(W_ft) and no ortho stream, scored
like an arm, with what Q keeps of the fine-tuning delta (peft_ext.ortho.quant.delta_survival: the share of entries
whose quantised value moved, ||Q(W_ft) - Q(W_0)|| / ||dW||, and the quantisation noise in units of ||dW||): the
seeds' question, whether a 4-bit base by itself erases a realistic delta.

Outputs in --output_dir: units-<settings hash>/<unit>.json (one complete-or-absent file per (arm, setting, seed):
a killed run resumes where it stopped), results.json / results.md / plane.png (forget quality x model utility,
every unit a point, the oracle and the fine-tuned model marked; beside it the alpha sweep); --results_copy.

Cost, measured (this module's unlearn() and score() timed on one gradient-ascent unit shrunk to ~2 min, SmolLM2, 1
torch thread, nice 10, on a 2-core AMD EPYC busy with another experiment): 3 optimizer steps of 8 pairs 47 s (the
first steps are the slow ones: an earlier probe of 16-pair steps took 24.6, 19.2, 6.5 s); tofu_scores on 10 items
13.8 s (forget), 10.7 s (retain-eval), 4.6 s (world: 3 answers fewer); one ID canary against 100 sampled IDs plus its
greedy extraction 12.0 s. Extrapolated per unit at this default (10 steps ~120 s, GradDiff ~200 s; 30 items per set;
2 + 2 canaries): a tuning unit ~195 s, a baseline arm unit ~260 s, an OrthoSplit unit ~140 s, a reference unit ~200 s;
the contrastive and Fisher-ratio maps ~6 min each (36 backward batches). The issue's full grid (4 densities x 4 base
kinds, 3 seeds of random, 5 alphas, 50 items, 5 canaries at 200 IDs) came to ~8.6 h of that thread, so the default is
cut to what fits: densities 1% and 5%, base kinds none and int4 (int8 sits next to none and nf4 next to int4 in the
old recipe), alphas 0, 0.5, 1, 30 items per set, 2 canaries: 2 reference, 13 tuning, 12 baseline and 30
OrthoSplit units, ~3 h of one busy thread, i.e. ~1.5-2 h with 2 threads on an idle 2-core machine (not measured:
2-thread torch stalls on this shared box). Not included: tofu_finetune's two fine-tunes (~15 min each at one thread, measured; cached).
The full grid: --densities 0.005 0.01 0.02 0.05 --base_kinds none int8 int4 nf4 --alphas 0 0.25 0.5 0.75 1, or the GPU
preset. Every unit is its own file, so the run can be made in chunks (kill it; rerun the same command). On two
cores, two one-thread processes sharing --output_dir split the work without repeating any unit:
    python recipes/ortho_unlearn_llm.py --threads 1 --arms ga graddiff npo task_vector &
    python recipes/ortho_unlearn_llm.py --threads 1 --arms contrastive fisher_ratio random &
then `--report_only` (all arms). Build the two fine-tunes first, one per core (tofu_finetune.py --threads 1 --which
full & ... --which oracle), or both processes will train the same model.

Not here: the `--dataset locuslab/TOFU --model ...` path of recipes/ortho_unlearn.py (real TOFU has no ID numbers and
its perturbed answers live in other files); that recipe keeps it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

import tofu_data
import tofu_models
from evidence import bootstrap_ci

ORTHO_SELECTORS = ("contrastive", "fisher_ratio", "random")
BASELINES = ("ga", "graddiff", "npo", "task_vector")
ARMS = ORTHO_SELECTORS + BASELINES
BASE_KINDS = ("none", "int8", "int4", "nf4")
LABELS = {"contrastive": "OrthoSplit contrastive", "fisher_ratio": "OrthoSplit Fisher-ratio",
          "random": "OrthoSplit random", "ga": "gradient ascent", "graddiff": "GradDiff", "npo": "NPO",
          "task_vector": "task-vector negation", "finetuned": "fine-tuned", "oracle": "oracle"}
DETERMINISTIC = ("contrastive", "fisher_ratio")
ISSUE_CRITERIA = ("forget_quality_in_oracle_band", "utility_at_least_95pct", "exposure_at_chance")
UNIT_VERSION = 1  # bump when what a unit computes changes


@dataclass
class Args:
    output_dir: str = field(default="results/ortho_unlearn_llm", metadata={
        "help": "unit JSONs and the report; the README run's are committed here (a few KB per unit), so a run cut off "
                "at a session's end resumes from the repository (runs/ does not survive a fresh checkout)"})
    results_copy: Optional[str] = field(default=None, metadata={
        "help": "also write results.json here (the README run: results/ortho_unlearn_llm.json)"})
    # the fine-tune (recipes/tofu_models.py's flags of the same name without ft_)
    model: Literal["smollm2", "tiny"] = field(default="smollm2", metadata={
        "help": "smollm2: SmolLM2-135M-Instruct; tiny: tofu_finetune's random 2-layer Llama (tests; numbers mean nothing)"})
    cache_dir: str = field(default="runs/cache", metadata={"help": "SmolLM2 and the fine-tuned models' cache"})
    n_people: int = field(default=100, metadata={"help": "fictitious people (5 QA pairs each), as tofu_finetune"})
    forget_fraction: float = field(default=0.1, metadata={"help": "share of people to forget (TOFU's forget10)"})
    data_seed: int = field(default=0, metadata={"help": "people, splits and the fine-tune's seed (tofu_finetune --seed)"})
    ft_lr: float = field(default=1e-4, metadata={"help": "tofu_finetune --lr (its default; see results/tofu_finetune)"})
    ft_epochs: float = field(default=5.0, metadata={"help": "tofu_finetune --epochs"})
    ft_batch_size: int = field(default=16, metadata={"help": "tofu_finetune --batch_size"})
    ft_max_steps: int = field(default=-1, metadata={"help": "tofu_finetune --max_steps (-1: the epochs)"})
    # scoring
    n_world: int = field(default=30, metadata={"help": "real world-fact items (capitals) in the utility"})
    max_items: int = field(default=30, metadata={
        "help": "items per scored set (forget, retain-select, retain-eval, world; 0: all): each retain-eval item costs "
                "5 scored answers and a 32-token greedy answer"})
    canaries: int = field(default=2, metadata={"help": "forget (and retain-eval) people whose ID exposure is scored"})
    exposure_samples: int = field(default=100, metadata={
        "help": "sampled IDs per canary for the skew-normal extrapolation (>= 20; Carlini et al. use thousands)"})
    # arms
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"any of {ARMS}"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seed 0 also runs the tuning grids"})
    densities: list[float] = field(default_factory=lambda: [0.01, 0.05], metadata={
        "help": "OrthoSplit densities in (0, 1) (the issue's 0.5-5%: 0.005 0.01 0.02 0.05; cut to fit 2 h, see Cost)"})
    base_kinds: list[str] = field(default_factory=lambda: ["none", "int4"], metadata={
        "help": f"any of {BASE_KINDS} (all four on a GPU; cut to fit 2 h, see Cost)"})
    sweep_density: float = field(default=0.01, metadata={"help": "the alpha sweep's density (base none)"})
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0],
                                metadata={"help": "the alpha sweep; must include 0 (GPU: 0 0.25 0.5 0.75 1)"})
    baseline_lrs: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4],
                                      metadata={"help": "the ga / graddiff / npo learning-rate grid"})
    npo_betas: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "NPO's beta grid (NPO: 0.1)"})
    tv_lams: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0],
                                 metadata={"help": "task-vector negation's lambda grid"})
    grid_extensions: int = field(default=2, metadata={
        "help": "times a baseline's tuning grid grows by one point (lr x3 or /3, lambda x2 or /2) while the chosen "
                "point sits on its edge (0: the grid as given)"})
    unlearn_steps: int = field(default=10, metadata={"help": "optimizer steps of every baseline run (and of the "
                                                              "task vector's forget fine-tune)"})
    unlearn_batch_size: int = field(default=8, metadata={"help": "forget (and retain) pairs per step"})
    graddiff_weight: float = field(default=1.0, metadata={"help": "GradDiff's retain weight (TOFU: 1)"})
    tv_lr: float = field(default=1e-4, metadata={"help": "lr of the task vector's forget fine-tune (the fine-tune's)"})
    # verdicts
    utility_floor: float = field(default=0.95, metadata={"help": "utility >= this x the fine-tuned model's"})
    fq_band: float = field(default=0.05, metadata={"help": "forget quality (KS p) at or above this = oracle's band"})
    exposure_margin: float = field(default=1.0, metadata={"help": "bits above the oracle's exposure still at chance"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the CIs over seeds"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu",
                        metadata={"help": "where models train and are scored"})
    report_only: bool = field(default=False, metadata={"help": "only rebuild results.json/.md/png from finished units"})
    config: Optional[str] = field(default=None, metadata={"help": "a YAML preset (recipes/presets/); flags override it"})


def parse_args(argv: Optional[list[str]] = None) -> Args:
    from common import parse_with_preset

    parser, args = parse_with_preset(Args, argv)
    for flag, values, allowed in (("--arms", args.arms, ARMS), ("--base_kinds", args.base_kinds, BASE_KINDS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{flag} got {bad or values}: choose from {', '.join(allowed)}")
    bad = [d for d in args.densities + [args.sweep_density] if not 0 < d < 1]
    if bad:
        parser.error(f"--densities/--sweep_density got {bad[0]}: densities must be in (0, 1), e.g. 0.01")
    if 0.0 not in args.alphas or any(not 0 <= a <= 1 for a in args.alphas):
        parser.error(f"--alphas got {args.alphas}: values in [0, 1] that include 0 (every arm is scored there)")
    if not args.seeds or 0 not in args.seeds:
        parser.error(f"--seeds got {args.seeds}: must include 0 (the tuning grids' seed)")
    for flag, values in (("--baseline_lrs", args.baseline_lrs), ("--npo_betas", args.npo_betas)):
        if not values or any(not v > 0 for v in values):
            parser.error(f"{flag} got {values}: pass one or more numbers > 0")
    if not args.tv_lams or any(not v > 0 for v in args.tv_lams):
        parser.error(f"--tv_lams got {args.tv_lams}: pass one or more numbers > 0")
    if args.grid_extensions < 0:
        parser.error(f"--grid_extensions got {args.grid_extensions}: pass an integer >= 0 (0: the grids as given)")
    if args.exposure_samples < 20:
        parser.error(f"--exposure_samples got {args.exposure_samples}: the skew-normal fit needs >= 20")
    if args.unlearn_steps < 1 or args.unlearn_batch_size < 1:
        parser.error(f"--unlearn_steps / --unlearn_batch_size got {args.unlearn_steps} / {args.unlearn_batch_size}: "
                     "pass integers >= 1")
    if not 0 < args.utility_floor <= 1:
        parser.error(f"--utility_floor got {args.utility_floor}: a share in (0, 1], e.g. 0.95")
    return args


def finetune_args(args: Args) -> tofu_models.FinetuneArgs:
    return tofu_models.FinetuneArgs(model=args.model, cache_dir=args.cache_dir, n_people=args.n_people,
                                    forget_fraction=args.forget_fraction, seed=args.data_seed, lr=args.ft_lr,
                                    epochs=args.ft_epochs, batch_size=args.ft_batch_size, max_steps=args.ft_max_steps,
                                    threads=args.threads, device=args.device)


# ------------------------------------------------------------------------------------------------ pure pieces


def utility(scores: dict, sets: tuple[str, ...]) -> float:
    """Model utility: the harmonic mean of probability, ROUGE-L recall and truth-ratio score over `sets`."""
    from peft_ext.unlearning import model_utility

    return model_utility({f"{s}/{k}": scores[s][k] for s in sets for k in ("probability", "rouge", "truth_ratio_score")})


def pick_operating_point(points: list[dict], floor: float) -> tuple[dict, bool]:
    """The tuning rule: among grid points ({"fq", "utility_select", ...}) with utility_select >= floor, the highest
    forget quality (ties: higher utility); (that point, True). If none keeps the floor: the highest utility, False."""
    if not points:
        raise ValueError("pick_operating_point: no grid points; run the tuning grid first")
    ok = [p for p in points if p["utility_select"] >= floor]
    if ok:
        return max(ok, key=lambda p: (p["fq"], p["utility_select"])), True
    return max(points, key=lambda p: (p["utility_select"], p["fq"])), False


def ci_verdict(ci: tuple[float, float, float], threshold: float, above: bool) -> str:
    """'met' when the whole CI is on the required side of `threshold` (>= if above, <= otherwise), 'missed' when it is
    wholly on the other side, 'unresolved' when it straddles (or is NaN)."""
    _, lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "unresolved"
    if above:
        return "met" if lo >= threshold else "missed" if hi < threshold else "unresolved"
    return "met" if hi <= threshold else "missed" if lo > threshold else "unresolved"


def fisher_ratio_maps(forget, retain, eps: float = 1e-3):
    """SSD-style importance ratio per entry: F_forget / (F_retain + eps * mean F_retain), as an EntrySaliency of kind
    'fisher' (the fisher selector multiplies it by delta^2 / 2). eps keeps entries the retain set never touches finite."""
    from peft_ext.ortho.saliency import EntrySaliency

    maps = {}
    for k, f in forget.maps.items():
        r = retain.maps[k]
        maps[k] = f / (r + eps * r.mean().clamp_min(torch.finfo(r.dtype).tiny))
    return EntrySaliency(kind="fisher", maps=maps, batches=forget.batches)


# ------------------------------------------------------------------------------------------------ data and models


@dataclass
class World:
    tok: object
    finetuned: torch.nn.Module
    base_state: dict  # the pre-fine-tune block linears (OrthoSplit's reference)
    items: dict  # set name -> QAItems
    pairs: dict  # set name -> (question, answer) pairs to train on
    canaries: dict  # "forget" / "retain" -> [(prefix, secret)]
    ft_report: dict
    oracle_folder: str


def cap(items: list, n: int) -> list:
    return items if n == 0 or len(items) <= n else items[:n]


def id_canary(p: tofu_data.Person) -> tuple[str, str]:
    """(prefix, secret) of a person's trained ID-number answer: the prompt and answer up to the number."""
    q = f"What is the ID number of {p.name}?"
    return f"{tofu_data.prompt(q)} The ID number of {p.name} is", f" {p.id_number}"


def load_world(args: Args, log) -> World:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fa = finetune_args(args)
    full = tofu_models.build(fa, "full", log)
    oracle = tofu_models.build(fa, "oracle", log)
    splits = tofu_data.make_splits(args.n_people, args.forget_fraction, seed=args.data_seed, n_world=args.n_world)
    tok = AutoTokenizer.from_pretrained(full["folder"])
    model = AutoModelForCausalLM.from_pretrained(full["folder"], dtype=torch.float32).to(args.device).eval()
    base, _ = tofu_models.base_model(fa, tofu_data.make_splits(args.n_people, args.forget_fraction,
                                                                 seed=args.data_seed, n_world=0))
    base_state = {n + ".weight": m.weight.detach().clone() for n, m in tofu_models.block_linears(base).items()}
    del base
    pop = splits.people
    items = {"forget": cap(tofu_data.qa_items(list(splits.forget), population=pop), args.max_items),
             "retain_select": cap(tofu_data.qa_items(list(splits.retain_select), population=pop), args.max_items),
             "retain_eval": cap(tofu_data.qa_items(list(splits.retain_eval), population=pop), args.max_items),
             "world": cap(list(splits.world), args.max_items)}
    pairs = {"forget": tofu_data.qa_pairs(list(splits.forget)),  # training reads every pair of a set
             "retain_select": tofu_data.qa_pairs(list(splits.retain_select))}
    canaries = {"forget": [id_canary(p) for p in splits.forget[: args.canaries]],
                "retain": [id_canary(p) for p in splits.retain_eval[: args.canaries]]}
    return World(tok, model, base_state, items, pairs, canaries, full, oracle["folder"])


# ------------------------------------------------------------------------------------------------ scoring


def canary_scores(model, tok, canaries: list[tuple[str, str]], args: Args) -> dict:
    """Mean exposure (skew-normal extrapolated over 10^6 IDs, and sampled), exact-extraction share and mean digit
    share of the greedy completion, over the canaries."""
    from peft_ext import unlearning as ul

    exp, sampled, exact, digits = [], [], [], []
    for prefix, secret in canaries:
        n = len(secret) - 1
        rng = random.Random(f"id-exposure:{args.data_seed}:{prefix}")
        cands = [f" {v:0{n}d}" for v in rng.sample(range(10**n), args.exposure_samples + 1) if f" {v:0{n}d}" != secret]
        cands = cands[: args.exposure_samples]
        enc = [tofu_data._encode(tok, prefix, s, add_eos=False) for s in [secret] + cands]
        scores = [s for s, _ in tofu_data._scores(model, tok, enc, 64)]
        est = ul.exposure_skewnorm(scores[0], scores[1:], 10**n)
        exp.append(est["exposure"])
        sampled.append(ul.exposure_sampled(scores[0], scores[1:], 10**n))
        ext = tofu_data.extract_secret(model, tok, prefix, secret)
        exact.append(float(ext["exact"]))
        digits.append(ext["digits"])
    return {"exposure": statistics.mean(exp), "exposure_sampled": statistics.mean(sampled),
            "extraction": statistics.mean(exact), "extraction_digits": statistics.mean(digits), "per_canary": exp}


def score(model, world: World, sets: tuple[str, ...], args: Args, canaries: bool) -> dict:
    out = {}
    for s in sets:
        split = "forget" if s == "forget" else "world" if s == "world" else "retain"
        out[s] = tofu_data.tofu_scores(model, world.tok, world.items[s], split)
        if s != "forget":
            out[s].pop("truth_ratios")  # only the forget set's feed forget quality
    if canaries:
        out["canary_forget"] = canary_scores(model, world.tok, world.canaries["forget"], args)
        out["canary_retain"] = canary_scores(model, world.tok, world.canaries["retain"], args)
    return out


EVAL_SETS = ("forget", "retain_eval", "world")
TUNE_SETS = ("forget", "retain_select")
REF_SETS = ("forget", "retain_select", "retain_eval", "world")


# ------------------------------------------------------------------------------------------------ baselines


def _examples(tok, pairs):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return tofu_models.answer_only_examples(tok, pairs), tofu_models.pad_collate(pad)


def sequence_logp(model, batch: dict) -> torch.Tensor:
    """Sum of log p(answer token) per sequence (labels -100 elsewhere), with gradients."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(1), mask.sum(1)


def _nll(model, batch) -> torch.Tensor:
    lp, n = sequence_logp(model, batch)
    return -lp.sum() / n.sum()


def unlearn(model, world: World, method: str, lr: float, seed: int, args: Args, beta: float = 0.1) -> dict:
    """Train the block linears of `model` in place for --unlearn_steps with `method`: ga, graddiff, npo, or descent
    (plain fine-tuning on the forget set: the task vector's forget model). Seeded batch order; AdamW, constant lr,
    gradient norm clipped at 1."""
    from peft_ext.unlearning import grad_diff_loss, npo_loss

    fx, collate = _examples(world.tok, world.pairs["forget"])
    rx, _ = _examples(world.tok, world.pairs["retain_select"])
    params = [p for m in tofu_models.block_linears(model).values() for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    dev = args.device
    ref_logp = None
    if method == "npo":  # the fine-tuned model's sequence log-probs, once, before any step
        with torch.no_grad():
            ref_logp = torch.cat([sequence_logp(model, {k: v.to(dev) for k, v in collate(fx[i: i + 16]).items()})[0]
                                  for i in range(0, len(fx), 16)])
    rng = random.Random(f"unlearn:{method}:{seed}")
    order: list[int] = []
    retain_order: list[int] = []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.unlearn_steps):
        if len(order) < args.unlearn_batch_size:
            order += rng.sample(range(len(fx)), len(fx))
        idx, order = order[: args.unlearn_batch_size], order[args.unlearn_batch_size:]
        batch = {k: v.to(dev) for k, v in collate([fx[i] for i in idx]).items()}
        if method == "npo":
            lp, _ = sequence_logp(model, batch)
            loss = npo_loss(lp, ref_logp[idx], beta)
        elif method == "descent":
            loss = _nll(model, batch)
        else:
            weight = args.graddiff_weight if method == "graddiff" else 0.0
            retain_nll = torch.zeros((), device=dev)
            if weight:
                if len(retain_order) < args.unlearn_batch_size:
                    retain_order += rng.sample(range(len(rx)), len(rx))
                ridx, retain_order = retain_order[: args.unlearn_batch_size], retain_order[args.unlearn_batch_size:]
                retain_nll = _nll(model, {k: v.to(dev) for k, v in collate([rx[i] for i in ridx]).items()})
            loss = grad_diff_loss(_nll(model, batch), retain_nll, weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": args.unlearn_steps, "seconds": round(time.perf_counter() - t0, 2), "first_loss": losses[0],
            "last_loss": losses[-1]}


# ------------------------------------------------------------------------------------------------ OrthoSplit


def saliency_batches(world: World, which: str, args: Args) -> list[dict]:
    ex, collate = _examples(world.tok, world.pairs[which])
    return [{k: v.to(args.device) for k, v in collate(ex[i: i + 8]).items()} for i in range(0, len(ex), 8)]


def ortho_inputs(world: World, selector: str, args: Args, cache: dict) -> dict:
    """The selector's data, computed once per process on the fine-tuned model (forget and retain-select only)."""
    from peft_ext import OrthoSplitConfig, entry_saliency

    if selector in cache:
        return cache[selector]
    probe = OrthoSplitConfig(target_modules=list(tofu_models.BLOCK_KINDS), base_kind="none")
    f_b, r_b = saliency_batches(world, "forget", args), saliency_batches(world, "retain_select", args)
    if selector == "contrastive":
        ref = world.base_state
        cache[selector] = {
            "forget": entry_saliency(world.finetuned, f_b, probe, kind="attribution", reference=ref, progress=False),
            "retain": entry_saliency(world.finetuned, r_b, probe, kind="attribution", reference=ref, progress=False)}
    elif selector == "fisher_ratio":
        cache[selector] = {"fisher": fisher_ratio_maps(
            entry_saliency(world.finetuned, f_b, probe, kind="fisher", progress=False),
            entry_saliency(world.finetuned, r_b, probe, kind="fisher", progress=False))}
    else:
        cache[selector] = {}
    return cache[selector]


def ortho_split(world: World, selector: str, density: float, base_kind: str, seed: int, args: Args, cache: dict):
    from peft_ext import OrthoSplitConfig, orthosplit

    cfg = OrthoSplitConfig(target_modules=list(tofu_models.BLOCK_KINDS), base_kind=base_kind, density=density,
                           selector="fisher" if selector == "fisher_ratio" else selector, seed=seed)
    inputs = ortho_inputs(world, selector, args, cache)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*holds only zeros.*")
        return orthosplit(copy.deepcopy(world.finetuned), cfg, reference=world.base_state, **inputs)


# ------------------------------------------------------------------------------------------------ units


def settings_key(args: Args) -> str:
    """What changes a unit's numbers (grids and seeds are in the unit names, so growing them reuses units)."""
    keep = {k: getattr(args, k) for k in ("model", "n_people", "forget_fraction", "data_seed", "ft_lr", "ft_epochs",
                                          "ft_batch_size", "ft_max_steps", "n_world", "max_items", "canaries",
                                          "exposure_samples", "unlearn_steps", "unlearn_batch_size",
                                          "graddiff_weight", "tv_lr")}
    blob = json.dumps({"version": UNIT_VERSION, **keep}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def unit_dir(args: Args) -> str:
    return os.path.join(args.output_dir, f"units-{settings_key(args)}")


def _write_json(path: str, payload) -> None:
    from peft_ext.files import atomic_file

    with atomic_file(path, field="output_dir") as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1)


def unit_name(u: dict) -> str:
    parts = [u["stage"], u["arm"]]
    for k, fmt in (("lr", "lr{:g}"), ("beta", "b{:g}"), ("lam", "lam{:g}"), ("base_kind", "{}"), ("density", "d{:g}"),
                   ("alpha", "a{:g}")):
        if u.get(k) is not None:
            parts.append(fmt.format(u[k]))
    if u.get("seed") is not None:
        parts.append(f"s{u['seed']}")
    return "__".join(parts)


def unit_path(args: Args, u: dict) -> str:
    return os.path.join(unit_dir(args), unit_name(u) + ".json")


def load_unit(args: Args, u: dict) -> Optional[dict]:
    path = unit_path(args, u)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def save_unit(args: Args, u: dict, scores: dict, extra: dict, seconds: float, log) -> dict:
    from common import machine

    row = {**u, "name": unit_name(u), "scores": scores, **extra, "seconds": round(seconds, 1), "machine": machine()}
    _write_json(unit_path(args, u), row)
    log(f"{row['name']}: {seconds:.0f} s")
    return row


def tuning_points(args: Args, arm: str, ref: dict, rows: list[dict]) -> list[dict]:
    from peft_ext.unlearning import forget_quality

    oracle_tr = ref["oracle"]["scores"]["forget"]["truth_ratios"]
    return [{**r, "fq": forget_quality(r["scores"]["forget"]["truth_ratios"], oracle_tr),
             "utility_select": utility(r["scores"], ("retain_select",))} for r in rows]


def grid(args: Args, arm: str) -> list[dict]:
    if arm == "task_vector":
        return [{"lam": lam} for lam in args.tv_lams]
    if arm == "npo":
        return [{"lr": lr, "beta": b} for lr in args.baseline_lrs for b in args.npo_betas]
    return [{"lr": lr} for lr in args.baseline_lrs]


def run_baseline(world: World, arm: str, hp: dict, seed: int, stage: str, args: Args, log, tv_cache: dict) -> None:
    from peft_ext.unlearning import task_vector_negation

    u = {"stage": stage, "arm": arm, **hp, "seed": seed}
    if load_unit(args, u) is not None:
        return
    t0 = time.perf_counter()
    model = copy.deepcopy(world.finetuned)
    if arm == "task_vector":
        if seed not in tv_cache:  # the forget fine-tune is shared by every lambda of a seed
            forget_model = copy.deepcopy(world.finetuned)
            info = unlearn(forget_model, world, "descent", args.tv_lr, seed, args)
            tv_cache.clear()
            tv_cache[seed] = ({k: v.detach().clone() for k, v in forget_model.state_dict().items()}, info)
            del forget_model
        forget_state, info = tv_cache[seed]
        model.load_state_dict(task_vector_negation(world.finetuned.state_dict(), forget_state, lam=hp["lam"]))
    else:
        info = unlearn(model, world, arm, hp["lr"], seed, args, beta=hp.get("beta", 0.1))
    sets = TUNE_SETS if stage == "tune" else EVAL_SETS
    save_unit(args, u, score(model, world, sets, args, canaries=stage != "tune"), {"train": info},
              time.perf_counter() - t0, log)


def edge_extension(hps: list[dict], best: dict, arm: str) -> Optional[dict]:
    """The next grid point when the tuning rule's choice sits on an edge of the grid: lr x3 (or /3) past the largest
    (smallest) lr at the chosen beta; lambda x2 (or /2) for task_vector. None when the choice is inside the grid."""
    key, factor = ("lam", 2.0) if arm == "task_vector" else ("lr", 3.0)
    values = sorted({hp[key] for hp in hps})
    if len(values) < 2 or values[0] < best[key] < values[-1]:
        return None
    new = values[-1] * factor if best[key] == values[-1] else values[0] / factor
    return {key: float(f"{new:.3g}")} | ({"beta": best["beta"]} if arm == "npo" else {})


def tuned_grid(args: Args, arm: str, ref: dict, run=None) -> list[dict]:
    """The arm's grid, grown by `edge_extension` (at most --grid_extensions points) while the chosen point is on an
    edge: an optimum at the edge of the grid is not tuned. With `run` (hp -> None, trains and scores one seed-0
    tuning unit) the missing units are made; without, the growth is replayed from the finished units (report)."""
    hps = grid(args, arm)
    for extension in range(args.grid_extensions + 1):
        if run is not None:
            for hp in hps:
                run(hp)
        rows = [load_unit(args, {"stage": "tune", "arm": arm, **hp, "seed": 0}) for hp in hps]
        if any(r is None for r in rows) or extension == args.grid_extensions:
            return hps
        best, _ = pick_operating_point(tuning_points(args, arm, ref, rows), tuning_floor(args, ref))
        nxt = edge_extension(hps, best, arm)
        if nxt is None or nxt in hps:
            return hps
        hps = hps + [nxt]
    return hps


def tuning_floor(args: Args, ref: dict) -> float:
    return args.utility_floor * utility(ref["finetuned"]["scores"], ("retain_select",))


def operating_points(args: Args, arm: str, ref: dict) -> tuple[dict, bool, list[dict]]:
    rows = [load_unit(args, {"stage": "tune", "arm": arm, **hp, "seed": 0}) for hp in tuned_grid(args, arm, ref)]
    rows = [r for r in rows if r is not None]
    points = tuning_points(args, arm, ref, rows)
    best, kept = pick_operating_point(points, tuning_floor(args, ref))
    return {k: best[k] for k in ("lr", "beta", "lam") if best.get(k) is not None}, kept, points


def ortho_units(args: Args) -> list[dict]:
    """(selector, density, base kind, alpha, seed) units: every density x base kind at alpha 0, and the alpha sweep at
    --sweep_density with base none; deterministic selectors at seed 0 only."""
    out = []
    for sel in [a for a in args.arms if a in ORTHO_SELECTORS]:
        seeds = [0] if sel in DETERMINISTIC else args.seeds
        combos = [(d, k, 0.0) for k in args.base_kinds for d in args.densities]
        combos += [(args.sweep_density, "none", a) for a in args.alphas if a != 0.0]
        if (args.sweep_density, "none", 0.0) not in combos:
            combos.append((args.sweep_density, "none", 0.0))
        for seed in seeds:
            for d, k, a in combos:
                out.append({"stage": "arm", "arm": sel, "base_kind": k, "density": d, "alpha": float(a), "seed": seed})
    return out


def run_all(args: Args, log) -> None:
    from peft_ext import ortho_alpha

    world = load_world(args, log)
    baselines = [a for a in args.arms if a in BASELINES]
    # the baselines' tuning needs the reference units first; a process running only OrthoSplit arms scores them last,
    # so two processes split by --arms (baselines / OrthoSplit) do not both score them (Budget)
    ref = reference_units(world, args, log) if baselines else None
    # baselines: the grid on seed 0 (forget + retain-select), then every seed at the chosen point
    tv_cache: dict = {}
    for arm in baselines:
        tuned_grid(args, arm, ref, run=lambda hp: run_baseline(world, arm, hp, 0, "tune", args, log, tv_cache))
        hp, kept, _ = operating_points(args, arm, ref)
        log(f"{arm}: operating point {hp}" + ("" if kept else " (no grid point kept the utility floor)"))
        for seed in args.seeds:
            run_baseline(world, arm, hp, seed, "arm", args, log, tv_cache)
        tv_cache.clear()
    # OrthoSplit: one split per (selector, density, base kind, seed), scored at each of its alphas
    cache: dict = {}
    todo = [u for u in ortho_units(args) if load_unit(args, u) is None]
    groups: dict = {}
    for u in todo:
        groups.setdefault((u["arm"], u["density"], u["base_kind"], u["seed"]), []).append(u)
    for (sel, d, kind, seed), units in groups.items():
        units = [u for u in units if load_unit(args, u) is None]  # another process sharing --output_dir did them
        if not units:
            continue
        t0 = time.perf_counter()
        split = ortho_split(world, sel, d, kind, seed, args, cache)
        split_s = time.perf_counter() - t0
        for u in units:
            t1 = time.perf_counter()
            with ortho_alpha(split, u["alpha"]):
                scores = score(split, world, EVAL_SETS, args, canaries=True)
            save_unit(args, u, scores, {"split_seconds": round(split_s, 1)}, time.perf_counter() - t1 + split_s, log)
            split_s = 0.0
        del split
    if ref is None:
        reference_units(world, args, log)
    if any(a in ORTHO_SELECTORS for a in args.arms):
        quant_units(world, args, log)


def reference_units(world, args: Args, log) -> dict:
    """The fine-tuned model's and the oracle's scores (units ref__finetuned / ref__oracle), scored once."""
    ref = {}
    for which in ("finetuned", "oracle"):
        u = {"stage": "ref", "arm": which}
        if load_unit(args, u) is None:
            t0 = time.perf_counter()
            if which == "finetuned":
                model = world.finetuned
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(world.oracle_folder, dtype=torch.float32).to(args.device)
            save_unit(args, u, score(model.eval(), world, REF_SETS, args, canaries=True), {}, time.perf_counter() - t0,
                      log)
            del model
        ref[which] = load_unit(args, u)
    return ref


def quantised_kinds(args: Args) -> list[str]:
    return [k for k in args.base_kinds if k != "none"]


def quant_units(world, args: Args, log) -> None:
    """For every quantised --base_kinds: the fine-tuned model with each block linear replaced by its base-kind
    round trip Q(W_ft) and no ortho stream (unit ref__quant_<kind>), scored like an arm, with what Q keeps of the
    fine-tuning delta W_ft - W_0 (peft_ext.ortho.quant.delta_survival over every block linear): does a quantised
    base by itself erase a realistic delta, and so the forget people?"""
    from peft_ext.ortho.quant import delta_survival, quantize, summarise_survival

    for kind in quantised_kinds(args):
        u = {"stage": "ref", "arm": f"quant_{kind}"}
        if load_unit(args, u) is not None:
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(world.finetuned)
        parts = []
        with torch.no_grad():
            for name, lin in tofu_models.block_linears(model).items():
                w = lin.weight
                parts.append(delta_survival(world.base_state[name + ".weight"].to(w.device), w, kind))
                w.copy_(quantize(w, kind))
        survival = summarise_survival(parts)
        save_unit(args, u, score(model.eval(), world, EVAL_SETS, args, canaries=True), {"survival": survival},
                  time.perf_counter() - t0, log)
        del model


# ------------------------------------------------------------------------------------------------ report


def unit_metrics(row: dict, oracle_tr: list[float]) -> dict:
    from peft_ext.unlearning import forget_quality

    s = row["scores"]
    return {"forget_quality": forget_quality(s["forget"]["truth_ratios"], oracle_tr),
            "model_utility": utility(s, ("retain_eval", "world")),
            "truth_ratio": s["forget"]["truth_ratio_score"],
            "forget_probability": s["forget"]["probability"], "forget_rouge": s["forget"]["rouge"],
            "exposure": s["canary_forget"]["exposure"], "exposure_sampled": s["canary_forget"]["exposure_sampled"],
            "extraction": s["canary_forget"]["extraction"], "retain_exposure": s["canary_retain"]["exposure"],
            "retain_extraction": s["canary_retain"]["extraction"],
            # reported beside utility: TOFU's harmonic mean is dominated by its smallest term (here the retain
            # truth-ratio score, ~0.13), so it barely moves when the answers' probability falls
            "retain_probability": s["retain_eval"]["probability"], "world_probability": s["world"]["probability"]}


def setting_label(r: dict) -> str:
    bits = [LABELS.get(r["arm"], r["arm"])]
    for k, fmt in (("lr", "lr {:g}"), ("beta", "beta {:g}"), ("lam", "lambda {:g}"), ("base_kind", "base {}"),
                   ("density", "{:.1%}"), ("alpha", "alpha {:g}")):
        if r.get(k) is not None:
            bits.append(fmt.format(r[k]))
    return ", ".join(bits)


def summarise(args: Args) -> dict:
    ref = {w: load_unit(args, {"stage": "ref", "arm": w}) for w in ("finetuned", "oracle")}
    if any(v is None for v in ref.values()):
        raise SystemExit(f"no finished reference units under {unit_dir(args)}: run without --report_only first")
    oracle_tr = ref["oracle"]["scores"]["forget"]["truth_ratios"]
    refs = {w: unit_metrics(r, oracle_tr) for w, r in ref.items()}
    quants = {k: load_unit(args, {"stage": "ref", "arm": f"quant_{k}"}) for k in quantised_kinds(args)}
    quantised = {k: unit_metrics(q, oracle_tr) | {"survival": q["survival"]} for k, q in quants.items() if q is not None}
    # where the units ran, read off the units loaded here (each records its machine since that was added)
    machines = {r["machine"] for r in [*ref.values(), *quants.values()] if r is not None and r.get("machine")}
    rows = []
    for name in sorted(os.listdir(unit_dir(args))):
        if not name.startswith("arm__") or not name.endswith(".json"):
            continue
        with open(os.path.join(unit_dir(args), name)) as f:
            r = json.load(f)
        rows.append({k: r.get(k) for k in ("name", "arm", "lr", "beta", "lam", "base_kind", "density", "alpha", "seed")}
                    | unit_metrics(r, oracle_tr) | {"seconds": r["seconds"]})
        if r.get("machine"):
            machines.add(r["machine"])
    tuning = {}
    for arm in [a for a in args.arms if a in BASELINES]:
        if load_unit(args, {"stage": "tune", "arm": arm, **grid(args, arm)[0], "seed": 0}) is None:
            continue
        hp, kept, points = operating_points(args, arm, ref)
        tuning[arm] = {"operating_point": hp, "kept_floor": kept,
                       "grid": [{k: p.get(k) for k in ("lr", "beta", "lam", "fq", "utility_select")} for p in points]}
    ft_util = refs["finetuned"]["model_utility"]
    ft_prob = refs["finetuned"]["retain_probability"]
    chance = refs["oracle"]["exposure"] + args.exposure_margin
    settings: dict = {}
    for r in rows:
        settings.setdefault(setting_label(r), []).append(r)
    summary = []
    for label, rs in settings.items():
        entry = {"setting": label, "arm": rs[0]["arm"], "alpha": rs[0]["alpha"], "seeds": sorted(r["seed"] for r in rs),
                 "deterministic": rs[0]["arm"] in DETERMINISTIC}
        for key in ("forget_quality", "model_utility", "truth_ratio", "exposure", "extraction", "retain_exposure",
                    "retain_probability", "world_probability"):
            entry[key] = bootstrap_ci([r[key] for r in rs], args.bootstrap)
        entry["verdicts"] = {
            "forget_quality_in_oracle_band": ci_verdict(entry["forget_quality"], args.fq_band, above=True),
            "utility_at_least_95pct": ci_verdict(entry["model_utility"], args.utility_floor * ft_util, above=True),
            "exposure_at_chance": ci_verdict(entry["exposure"], chance, above=False),
            # ours, beside the issue's three: the retain-eval answers' probability keeps 95% of the fine-tuned's
            "retain_probability_at_least_95pct": ci_verdict(entry["retain_probability"],
                                                            args.utility_floor * ft_prob, above=True)}
        # a criterion the fine-tuned model itself meets tests nothing: never report it as met
        if refs["finetuned"]["forget_quality"] >= args.fq_band:
            entry["verdicts"]["forget_quality_in_oracle_band"] = "vacuous"
        if refs["finetuned"]["exposure"] <= chance:
            entry["verdicts"]["exposure_at_chance"] = "vacuous"
        summary.append(entry)
    return {"reference": refs, "quantised": quantised, "rows": rows, "summary": summary, "tuning": tuning,
            "machines": sorted(machines),
            "thresholds": {"fq_band": args.fq_band, "utility": args.utility_floor * ft_util, "exposure": chance,
                           "retain_probability": args.utility_floor * ft_prob}}


def _ci(t, digits=3) -> str:
    m, lo, hi = t
    if not math.isfinite(m):
        return "—"
    return f"{m:.{digits}g}" if lo == hi else f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def markdown(args: Args, res: dict, machine: str) -> str:
    ref, th = res["reference"], res["thresholds"]
    lines = [f"Machine: {machine}. Model: {'SmolLM2-135M-Instruct (Q4_1-dequantised weights)' if args.model == 'smollm2' else 'tiny random Llama (numbers mean nothing)'}, "
             f"{args.n_people} fictitious people, forget {args.forget_fraction:.0%}; scored sets capped at "
             f"{args.max_items or 'all'} items; secrets = each person's 6-digit ID number (no separate canaries).", "",
             "| model | forget quality | model utility | retain-eval answer prob. | forget truth ratio | "
             "forget-ID exposure (bits) | extraction | retain-ID exposure |", "|---|---|---|---|---|---|---|---|"]
    for w, m in ref.items():
        lines.append(f"| {LABELS[w]} | {m['forget_quality']:.3g} | {m['model_utility']:.3f} | "
                     f"{m['retain_probability']:.3f} | {m['truth_ratio']:.3f} | {m['exposure']:.2f} | "
                     f"{m['extraction']:.0%} | {m['retain_exposure']:.2f} |")
    if res.get("quantised"):
        lines += ["", "What a quantised base does to the fine-tuning delta by itself: the fine-tuned model with every "
                  "block linear replaced by Q(W_ft), no ortho stream. Entries moved: share of entries whose dequantised "
                  "value differs between Q(W_ft) and Q(W_0) (a row or block whose absmax moved rescales all of its "
                  "entries, so this counts more than flipped codes); kept: ||Q(W_ft) - Q(W_0)|| / ||W_ft - W_0||; aligned: "
                  "<Q(W_ft) - Q(W_0), dW> / ||dW||^2 (1 = the delta kept exactly); noise: ||Q(W_ft) - W_ft|| / ||dW||.",
                  "", "| base | entries moved | kept | aligned | noise | forget quality | model utility | "
                  "retain-eval answer prob. | forget-ID exposure |", "|---|---|---|---|---|---|---|---|---|"]
        for kind, m in res["quantised"].items():
            sv = m["survival"]
            lines.append(f"| {kind} | {sv['changed_share']:.2%} | {sv['kept_norm']:.2f} | {sv['aligned']:.2f} | "
                         f"{sv['error_over_delta']:.1f} | {m['forget_quality']:.3g} | {m['model_utility']:.3f} | "
                         f"{m['retain_probability']:.3f} | {m['exposure']:.2f} |")
    lines += ["", f"Thresholds: forget quality >= {th['fq_band']:g} (the oracle's band); utility >= "
              f"{th['utility']:.3f} ({args.utility_floor:.0%} of the fine-tuned model's); forget-ID exposure <= "
              f"{th['exposure']:.2f} bits (the oracle's + {args.exposure_margin:g}); ours, beside the issue's three: "
              f"retain-eval answer probability >= {th['retain_probability']:.3f} ({args.utility_floor:.0%} of the "
              "fine-tuned model's), since model utility, a harmonic mean, follows its smallest term (the retain "
              "truth-ratio score) and hides falls in answer probability. Mean [95% bootstrap CI over seeds]; "
              "deterministic arms (contrastive, Fisher-ratio) ran once, so their CI is a point.", "",
              "| arm | seeds | forget quality | model utility | retain-eval prob. | truth ratio | exposure | extraction "
              "| FQ in band | utility >= 95% | exposure at chance | retain prob. >= 95% |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(res["summary"], key=lambda e: ((e["alpha"] or 0.0) != 0, e["setting"])):
        v = e["verdicts"]
        lines.append(f"| {e['setting']} | {len(e['seeds'])} | {_ci(e['forget_quality'])} | {_ci(e['model_utility'])} | "
                     f"{_ci(e['retain_probability'])} | {_ci(e['truth_ratio'])} | {_ci(e['exposure'])} | "
                     f"{_ci(e['extraction'], 2)} | {v['forget_quality_in_oracle_band']} | {v['utility_at_least_95pct']} "
                     f"| {v['exposure_at_chance']} | {v['retain_probability_at_least_95pct']} |")
    for arm, t in res["tuning"].items():
        grid_txt = "; ".join(f"{ {k: p[k] for k in ('lr', 'beta', 'lam') if p.get(k) is not None} }: FQ {p['fq']:.3g}, "
                             f"retain-select utility {p['utility_select']:.3f}" for p in t["grid"])
        lines.append(f"\nTuning {LABELS[arm]} (seed 0, forget + retain-select only): {grid_txt} -> {t['operating_point']}"
                     + ("" if t["kept_floor"] else " (NO grid point kept 95% of the fine-tuned retain-select utility: "
                                                    "the highest-utility point is used)"))
    alpha0 = [e for e in res["summary"] if e["alpha"] in (None, 0.0)]
    met3 = [e for e in alpha0 if all(e["verdicts"][c] == "met" for c in ISSUE_CRITERIA)]
    all3 = [e["setting"] for e in met3]
    all4 = [e["setting"] for e in met3 if e["verdicts"]["retain_probability_at_least_95pct"] == "met"]
    lines += ["", "Verdict (computed): " + (f"{len(all3)} arm(s) meet all three criteria: {'; '.join(all3)}" if all3
                                            else "no arm meets all three criteria")
              + (f"; {len(all4)} of them also keep 95% of the retain-eval answer probability"
                 + (f" ({'; '.join(all4)})." if all4 else ".") if all3 else ".")]
    for crit, text in (("forget_quality_in_oracle_band", "forget quality in the oracle's band"),
                       ("utility_at_least_95pct", "utility >= 95% of the fine-tuned model's"),
                       ("exposure_at_chance", "forget-ID exposure at chance"),
                       ("retain_probability_at_least_95pct", "retain-eval answer probability >= 95% (ours)")):
        met = [e["setting"] for e in alpha0 if e["verdicts"][crit] == "met"]
        lines.append(f"- {text}: met by {len(met)} of {len(alpha0)} settings at alpha=0"
                     + (f" ({'; '.join(met[:6])}{' ...' if len(met) > 6 else ''})" if met else "") + ".")
    if ref["finetuned"]["exposure"] <= th["exposure"]:
        lines.append(f"- The fine-tuned model's own forget-ID exposure ({ref['finetuned']['exposure']:.2f} bits) is "
                     "already at chance: the ID numbers were not memorised, so the exposure criterion says nothing.")
    if ref["finetuned"]["forget_quality"] >= args.fq_band:
        lines.append("- The fine-tuned model's forget quality is already in the oracle's band: the forget set was not "
                     "learned distinguishably, so the forget-quality criterion says nothing.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    arms = sorted({r["arm"] for r in res["rows"]})
    colors = {a: plt.cm.tab10(i) for i, a in enumerate(arms)}
    for r in res["rows"]:
        if r["alpha"] not in (None, 0.0):
            continue
        ax.scatter(r["model_utility"], max(r["forget_quality"], 1e-30), color=colors[r["arm"]], s=18, alpha=0.7)
    for a in arms:
        ax.scatter([], [], color=colors[a], label=LABELS[a])
    for w, style in (("oracle", "r*"), ("finetuned", "k*")):
        m = res["reference"][w]
        ax.plot(m["model_utility"], max(m["forget_quality"], 1e-30), style, markersize=14, label=LABELS[w])
    for kind, m in res.get("quantised", {}).items():  # Q(W_ft) alone: what the quantised base does by itself
        ax.plot(m["model_utility"], max(m["forget_quality"], 1e-30), "kX", markersize=10, label=f"fine-tuned, {kind} base")
    th = res["thresholds"]
    ax.axhline(th["fq_band"], color="r", ls=":", lw=1, label="oracle's band (p = 0.05)")
    ax.axvline(th["utility"], color="k", ls=":", lw=1, label="95% of fine-tuned utility")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (retain-eval + world)")
    ax.set_ylabel("forget quality (KS p vs oracle)")
    ax.set_title("every unit at alpha=0 a point")
    ax.legend(fontsize=7)
    sweep = [e for e in res["summary"] if e["arm"] in ORTHO_SELECTORS and "base none" in e["setting"]]
    by: dict = {}
    for e in sweep:
        by.setdefault(e["setting"].rsplit(", alpha", 1)[0], []).append(e)
    for lab, es in by.items():
        if len(es) < 2:
            continue
        es.sort(key=lambda e: e["alpha"])
        bx.plot([e["alpha"] for e in es], [max(e["forget_quality"][0], 1e-30) for e in es], marker="o",
                label=f"{lab}: FQ")
        bx.plot([e["alpha"] for e in es], [e["model_utility"][0] for e in es], marker="s", ls="--",
                label=f"{lab}: utility")
    bx.set_yscale("log")
    bx.set_xlabel("alpha")
    bx.set_title("alpha sweep (base none)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the atomic temporary has no extension
    plt.close(fig)


def report(args: Args, log) -> dict:
    from common import machine

    from peft_ext.files import atomic_file

    res = summarise(args)
    # where the units ran; units from before that was recorded: the report's own line, said so
    mach = "; ".join(res["machines"]) or machine() + " (the report's; its units recorded none)"
    md = markdown(args, res, mach)
    results = {"args": dataclasses.asdict(args), "machine": mach, "settings_key": settings_key(args), **res,
               "markdown": md}
    os.makedirs(args.output_dir, exist_ok=True)
    _write_json(os.path.join(args.output_dir, "results.json"), results)
    with atomic_file(os.path.join(args.output_dir, "results.md"), field="output_dir") as tmp, open(tmp, "w") as f:
        f.write(md)
    with atomic_file(os.path.join(args.output_dir, "plane.png"), field="output_dir") as tmp:
        plot(res, tmp)
    if args.results_copy:
        _write_json(args.results_copy, results)
    log(md)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    from common import recipe_runtime

    args = parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    with recipe_runtime(args.threads):
        if not args.report_only:
            with warnings.catch_warnings():  # deepcopy of a transformers model warns on every copy
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                run_all(args, log)
        return report(args, log)


if __name__ == "__main__":
    main()
