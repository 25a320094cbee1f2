"""Does OrthoSplit forget selectively? A TOFU-style evaluation of the alpha knob, offline on CPU by default.

    python recipes/ortho_unlearn.py                       # tiny Llama + fictitious people, ~10 minutes on 2 cores
    python recipes/ortho_unlearn.py --quick               # seconds: the smoke configuration the tests run
    python recipes/ortho_unlearn.py --model PATH --dataset locuslab/TOFU --forget-split forget10 --retain-split retain90

Pipeline: a small pre-trained causal LM (recipes/tinyllama.py, or --model) is fine-tuned on question-answer pairs
about fictitious people (recipes/tofu_data.py; or the real TOFU) plus canaries (a secret digit string per person);
only the linear layers of the transformer blocks are trained, so the whole fine-tuning delta lives in the layers
OrthoSplit splits. An oracle is fine-tuned the same way on the retain people only. Then every configuration in the grid
(base kind x selector x density) splits the fine-tuned model, with the pre-fine-tune model as reference (the residual
is the fine-tuning delta), and is evaluated at each alpha: answer perplexity on forget and retain questions,
perplexity of held-out general text, mean canary exposure of forget and retain people, and the bytes of the split.
Controls: the prior attempt's setup (no reference: the ortho stream holds quantisation residuals, so alpha=0 is the
plain RTN model), the generic-Hessian selector (obs, H from general text), and random selection at the same density.

Targets (the issue, from TOFU's reference numbers), checked per configuration at alpha=0: forget PPL >= half the
oracle's forget PPL; retain PPL <= 1.5x the fine-tuned model's; general PPL <= 1.1x the pre-trained model's; forget
exposure within 1 bit of the oracle's (which never saw the canaries); and at alpha=1 the fine-tuned behaviour back
(forget PPL <= 1.1x fine-tuned, forget exposure within 1 bit of the fine-tuned model's). Verdicts are computed.
Writes results.json, results.md, alpha_sweep.png and tradeoff.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import tinyllama  # noqa: E402
import tofu_data  # noqa: E402
from common import comma_choices, machine, recipe_runtime  # noqa: E402

import peft_ext  # noqa: E402
from peft_ext import OrthoSplitConfig, entry_saliency, ortho_alpha, ortho_report, orthosplit  # noqa: E402
from peft_ext.plots import save_png  # noqa: E402
from peft_ext.files import atomic_directory  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SELECTORS = ("magnitude", "relative", "obs", "fisher", "contrastive", "random")
BASE_KINDS = ("none", "fp16", "bf16", "int8", "int4", "nf4", "bnb_nf4", "bnb_int8")
AT_VALUES: list[float] = []  # the --attribution-at values of the run (labels name `at` only when there are several)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ortho_unlearn", help="output folder (replaced atomically)")
    p.add_argument("--cache-dir", default="runs/cache", help="where the pre-trained tiny Llama is cached")
    p.add_argument("--model", default=None, help="a causal LM folder or Hub id instead of the tiny Llama")
    p.add_argument("--dataset", default=None,
                   help="TOFU (a local folder shaped like locuslab/TOFU, or the Hub id) instead of fictitious people")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--retain-split", default="retain90")
    p.add_argument("--people", type=int, default=40, help="fictitious people (without --dataset)")
    p.add_argument("--forget-fraction", type=float, default=0.2)
    p.add_argument("--canary-repeats", type=int, default=4, help="copies of each canary in the fine-tuning data")
    p.add_argument("--canaries", type=int, default=4, help="forget and retain people whose canary exposure is measured")
    p.add_argument("--candidates", type=int, default=199, help="random secrets each canary is ranked against")
    p.add_argument("--ft-steps", type=int, default=500)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--replay", type=int, default=96,
                   help="general-text chunks (the calibration split, disjoint from the held-out general text) mixed "
                        "into the fine-tuning data, so the fine-tune does not wreck general text")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-kinds", default="int8,none,int4", help=f"comma list of {BASE_KINDS}")
    p.add_argument("--selectors", default=",".join(SELECTORS), help=f"comma list of {SELECTORS}")
    p.add_argument("--densities", default="0.01,0.02,0.05", help="comma list of ortho-stream densities in (0, 1)")
    p.add_argument("--alphas", default="0,0.25,0.5,1", help="comma list of alphas to evaluate")
    p.add_argument("--attribution-at", default="0.5",
                   help="where on the fine-tuning path W_ref + at*(W - W_ref) the contrastive selector's gradients are "
                        "taken (0.5: midpoint rule for removing the whole delta; 1: at the fine-tuned weights); one row "
                        "per value")
    p.add_argument("--contrastive-lambdas", default="1",
                   help="weights of the retain-set loss change in the contrastive score; one row per value")
    p.add_argument("--general-texts", type=int, default=48, help="held-out general-text chunks for the general PPL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke configuration")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="rebuild results.md and the plot from a results.json of an earlier run (no training)")
    args = p.parse_args(argv)
    if args.quick:
        args.people, args.ft_steps, args.canaries, args.candidates, args.general_texts = 10, 30, 2, 19, 8
        args.base_kinds, args.densities, args.alphas, args.contrastive_lambdas = "int8", "0.05", "0,1", "1"
    args.base_kind_list = comma_choices(p, "--base-kinds", args.base_kinds, BASE_KINDS)
    args.selector_list = comma_choices(p, "--selectors", args.selectors, SELECTORS)
    args.density_list = _floats(p, "--densities", args.densities, lo=0.0, hi=1.0, open_interval=True)
    args.alpha_list = _floats(p, "--alphas", args.alphas)
    args.lambda_list = _floats(p, "--contrastive-lambdas", args.contrastive_lambdas, lo=0.0)
    args.at_list = _floats(p, "--attribution-at", args.attribution_at, lo=0.0, hi=1.0)
    if 0.0 not in args.alpha_list or 1.0 not in args.alpha_list:
        p.error(f"--alphas must include 0 and 1 (the targets are checked there), got {args.alphas!r}")
    if not 0 < args.forget_fraction < 1:
        p.error(f"--forget-fraction must be in (0, 1), got {args.forget_fraction}")
    if args.dataset is None and args.people < 2:
        p.error(f"--people must be at least 2 (one to forget, one to retain), got {args.people}")
    return args


def _floats(p, flag: str, value: str, lo=None, hi=None, open_interval=False) -> list[float]:
    try:
        items = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} must be a comma list of numbers, got {value!r}")
    for v in items:
        if not math.isfinite(v) or (lo is not None and (v <= lo if open_interval else v < lo)) or \
                (hi is not None and (v >= hi if open_interval else v > hi)):
            p.error(f"{flag} value {v} is out of range ({lo}, {hi})")
    if not items:
        p.error(f"{flag} is empty")
    return items


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class Task:
    forget: list[tuple[str, str]]
    retain: list[tuple[str, str]]
    forget_canaries: list[tuple[str, str]]  # (prefix, secret)
    retain_canaries: list[tuple[str, str]]
    general: list[str]


def build_task(args) -> Task:
    general = data.general_text("heldout", seed=0)[: args.general_texts]
    if args.dataset:
        forget, retain = tofu_data.load_tofu(args.dataset, args.forget_split, args.retain_split)
        return Task(forget, retain, [], [], general)
    people = tofu_data.make_people(args.people, seed=args.seed)
    forget_people, retain_people = tofu_data.split_people(people, args.forget_fraction, seed=args.seed)
    canaries_f = [tofu_data.canary(p, seed=args.seed) for p in forget_people]
    canaries_r = [tofu_data.canary(p, seed=args.seed) for p in retain_people]
    return Task(tofu_data.qa_pairs(forget_people), tofu_data.qa_pairs(retain_people), canaries_f, canaries_r, general)


def training_texts(pairs, canaries, repeats: int) -> list[str]:
    texts = [f"{tofu_data.prompt(q)} {a}" for q, a in pairs]
    return texts + [prefix + secret for prefix, secret in canaries for _ in range(repeats)]


def batches(tok, texts: list[str], batch_size: int, device, shuffle_seed=None, max_length: int = 128) -> list[dict]:
    texts = list(texts)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(texts)
    out = []
    eos = tok.eos_token or ""
    for i in range(0, len(texts), batch_size):
        enc = tok([t + eos for t in texts[i : i + batch_size]], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                    "labels": labels.to(device)})
    return out


# ------------------------------------------------------------------------------------------------ models
def load_base(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        path = args.model
    else:
        spec = tinyllama.QUICK if args.quick else tinyllama.TinyLlamaSpec()
        path = tinyllama.tiny_llama(args.cache_dir, spec, progress=False, log=print)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(args.device).eval()
    return model, tok, path


def finetune(base, tok, texts: list[str], args, seed: int, replay: list[str] = ()) -> tuple[torch.nn.Module, dict]:
    """Train only the block linear layers (TARGETS) on `texts` (plus `replay` general text, batched apart and cut to
    64 tokens so short QA batches are not padded to paragraph length); everything else stays pre-trained."""
    model = copy.deepcopy(base).train()
    torch.manual_seed(seed)
    params = []
    for name, p in model.named_parameters():
        train = name.endswith(".weight") and any(f".{t}." in f".{name}" for t in TARGETS)
        p.requires_grad_(train)
        if train:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=args.ft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / args.ft_steps))
    step, epoch, losses = 0, 0, []
    start = time.perf_counter()
    while step < args.ft_steps:
        order = batches(tok, texts, args.batch_size, args.device, shuffle_seed=seed * 1000 + epoch)
        if replay:
            order += batches(tok, replay, args.batch_size, args.device, shuffle_seed=seed * 1000 + epoch, max_length=64)
            random.Random(seed * 1000 + epoch).shuffle(order)
        for batch in order:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step >= args.ft_steps:
                break
        epoch += 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"steps": step, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                   "seconds": time.perf_counter() - start}


def evaluate(model, tok, task: Task, args) -> dict:
    def mean_exposure(canaries):
        if not canaries:
            return None
        chosen = canaries[: args.canaries]
        return sum(tofu_data.exposure(model, tok, prefix, secret, n_candidates=args.candidates, seed=args.seed)
                   for prefix, secret in chosen) / len(chosen)

    return {
        "forget_ppl": tofu_data.answer_perplexity(model, tok, task.forget),
        "retain_ppl": tofu_data.answer_perplexity(model, tok, task.retain),
        "general_ppl": tofu_data.text_perplexity(model, tok, task.general),
        "forget_exposure": mean_exposure(task.forget_canaries),
        "retain_exposure": mean_exposure(task.retain_canaries),
    }


# ------------------------------------------------------------------------------------------------ the grid
def configurations(args) -> list[dict]:
    """Every split to evaluate: (label, base kind, selector, density, uses reference)."""
    confs = []
    for kind in args.base_kind_list:
        for selector in args.selector_list:
            for density in args.density_list:
                contrastive = selector == "contrastive"
                for at in (args.at_list if contrastive else [None]):
                    for lam in (args.lambda_list if contrastive else [None]):
                        confs.append({"base_kind": kind, "selector": selector, "density": density, "reference": True,
                                      "contrastive_lambda": lam, "at": at})
    # the prior attempt's setup: no reference, the ortho stream holds quantisation residuals (alpha=0 = plain RTN)
    for kind in args.base_kind_list:
        if kind != "none":
            confs.append({"base_kind": kind, "selector": "magnitude", "density": args.density_list[0], "reference": False,
                          "contrastive_lambda": None, "at": None})
    return confs


def label(c: dict) -> str:
    ref = "" if c["reference"] else " (no ref: RTN residual)"
    lam = f" λ={c['contrastive_lambda']:g}" if c["contrastive_lambda"] is not None else ""
    if c["at"] is not None and len(AT_VALUES) > 1:
        lam += f" at={c['at']:g}"
    return f"{c['base_kind']} / {c['selector']}{lam} / {c['density']:.2%}{ref}"


def verdicts(row: dict, ref: dict) -> dict:
    """Each target met (True) or not, with the measured ratio, for one configuration."""
    a0, a1 = row["alphas"]["0.0"], row["alphas"]["1.0"]
    out = {
        "forget_ppl>=0.5*oracle": (a0["forget_ppl"] / ref["oracle"]["forget_ppl"], a0["forget_ppl"] >= 0.5 * ref["oracle"]["forget_ppl"]),
        "retain_ppl<=1.5*finetuned": (a0["retain_ppl"] / ref["finetuned"]["retain_ppl"], a0["retain_ppl"] <= 1.5 * ref["finetuned"]["retain_ppl"]),
        "general_ppl<=1.1*base": (a0["general_ppl"] / ref["base"]["general_ppl"], a0["general_ppl"] <= 1.1 * ref["base"]["general_ppl"]),
        "alpha1_forget_ppl<=1.1*finetuned": (a1["forget_ppl"] / ref["finetuned"]["forget_ppl"], a1["forget_ppl"] <= 1.1 * ref["finetuned"]["forget_ppl"]),
    }
    if a0["forget_exposure"] is not None:
        out["exposure<=oracle+1"] = (a0["forget_exposure"] - ref["oracle"]["forget_exposure"],
                                     a0["forget_exposure"] <= ref["oracle"]["forget_exposure"] + 1)
        out["alpha1_exposure>=finetuned-1"] = (a1["forget_exposure"] - ref["finetuned"]["forget_exposure"],
                                               a1["forget_exposure"] >= ref["finetuned"]["forget_exposure"] - 1)
    return {k: {"value": float(v), "met": bool(m)} for k, (v, m) in out.items()}


def run(args) -> dict:
    AT_VALUES[:] = args.at_list
    base, tok, path = load_base(args)
    task = build_task(args)
    if not task.forget:
        raise SystemExit("the forget set is empty: pick a larger --forget-fraction or another --forget-split")
    print(f"model {path}: {sum(p.numel() for p in base.parameters()):,} parameters; forget {len(task.forget)} / retain "
          f"{len(task.retain)} QA pairs, {len(task.forget_canaries)} + {len(task.retain_canaries)} canaries")
    replay = data.general_text("calibration", seed=0)[: args.replay]
    ft_texts = training_texts(task.forget + task.retain, task.forget_canaries + task.retain_canaries,
                              args.canary_repeats)
    oracle_texts = training_texts(task.retain, task.retain_canaries, args.canary_repeats)
    finetuned, ft_log = finetune(base, tok, ft_texts, args, args.seed, replay)
    oracle, oracle_log = finetune(base, tok, oracle_texts, args, args.seed, replay)
    print(f"fine-tune: loss {ft_log['first_loss']:.2f} -> {ft_log['final_loss']:.3f} in {ft_log['seconds']:.0f} s; "
          f"oracle: {oracle_log['first_loss']:.2f} -> {oracle_log['final_loss']:.3f}")
    reference = {"base": evaluate(base, tok, task, args), "finetuned": evaluate(finetuned, tok, task, args),
                 "oracle": evaluate(oracle, tok, task, args)}
    for name, r in reference.items():
        print(f"  {name:9s} " + "  ".join(f"{k} {v:.3g}" for k, v in r.items() if v is not None))

    # data the selectors need, computed once on the fine-tuned model
    probe = OrthoSplitConfig(target_modules=TARGETS, base_kind="none")
    forget_batches = batches(tok, training_texts(task.forget, task.forget_canaries, 1), 8, args.device)
    retain_batches = batches(tok, training_texts(task.retain, task.retain_canaries, 1), 8, args.device)
    general_batches = batches(tok, task.general, 8, args.device)
    t = time.perf_counter()
    need = set(args.selector_list)
    inputs: dict[str, Any] = {}
    if "obs" in need:
        stats, _ = peft_ext.collect_stats(finetuned, [{k: v for k, v in b.items() if k != "labels"} for b in general_batches],
                                          target_modules=TARGETS, progress=False)
        inputs["obs"] = {"stats": stats}
    if "fisher" in need:
        inputs["fisher"] = {"fisher": entry_saliency(finetuned, forget_batches, probe, kind="fisher")}
    if "contrastive" in need:
        for at in args.at_list:
            inputs[("contrastive", at)] = {
                "forget": entry_saliency(finetuned, forget_batches, probe, kind="attribution", reference=base, at=at),
                "retain": entry_saliency(finetuned, retain_batches, probe, kind="attribution", reference=base, at=at),
            }
    saliency_seconds = time.perf_counter() - t

    rows = []
    for c in configurations(args):
        cfg = OrthoSplitConfig(target_modules=TARGETS, base_kind=c["base_kind"], density=c["density"],
                               selector=c["selector"], contrastive_lambda=1.0 if c["contrastive_lambda"] is None else c["contrastive_lambda"],
                               seed=args.seed)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*holds only zeros.*")
            split = orthosplit(copy.deepcopy(finetuned), cfg, reference=base if c["reference"] else None,
                               **inputs.get((c["selector"], c["at"]) if c["at"] is not None else c["selector"], {}))
        split_seconds = time.perf_counter() - t
        row = {**c, "label": label(c), "split_seconds": split_seconds, "alphas": {}}
        for a in args.alpha_list:
            with ortho_alpha(split, a):
                row["alphas"][str(float(a))] = evaluate(split, tok, task, args)
        report = ortho_report(split)
        row["sparse_bytes"] = sum(r["sparse_bytes"] for r in report)
        row["base_bytes_packed"] = sum(r["base_bytes_packed"] for r in report)
        row["dense_bytes"] = sum(r["dense_bytes"] for r in report)
        row["verdicts"] = verdicts(row, reference)
        a0 = row["alphas"]["0.0"]
        print(f"  {row['label']:44s} a=0: forget {a0['forget_ppl']:.3g} retain {a0['retain_ppl']:.3g} general "
              f"{a0['general_ppl']:.3g}" + (f" exposure {a0['forget_exposure']:.2f}" if a0["forget_exposure"] is not None else "")
              + f"  [{sum(v['met'] for v in row['verdicts'].values())}/{len(row['verdicts'])} targets]")
        rows.append(row)
        del split
    return {"reference": reference, "finetune": ft_log, "oracle_finetune": oracle_log, "rows": rows,
            "saliency_seconds": saliency_seconds, "model": path,
            "data": {"forget_pairs": len(task.forget), "retain_pairs": len(task.retain),
                     "forget_canaries": len(task.forget_canaries), "retain_canaries": len(task.retain_canaries)}}


# ------------------------------------------------------------------------------------------------ report
def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.2e}"


def markdown(results: dict, args) -> str:
    ref = results["reference"]
    exp = ref["finetuned"]["forget_exposure"] is not None
    lines = [
        f"Machine: {results['machine']}. Model: {os.path.basename(results['model'].rstrip('/'))}; "
        f"{results['data']['forget_pairs']} forget / {results['data']['retain_pairs']} retain QA pairs"
        + (f", {results['data']['forget_canaries']} + {results['data']['retain_canaries']} canaries "
           f"(exposure among {args.candidates + 1} secrets: chance ~{1 / math.log(2):.2f}, max "
           f"{math.log2(args.candidates + 1):.2f} bits)" if exp else "")
        + f"; fine-tune {results['finetune']['steps']} steps of the block linear layers only; {results['seconds']:.0f} s in all.",
        "",
        "| model | forget PPL | retain PPL | general PPL |" + (" forget exposure | retain exposure |" if exp else ""),
        "|---|---|---|---|" + ("---|---|" if exp else ""),
    ]
    for name, r in ref.items():
        lines.append(f"| {name} | {_fmt(r['forget_ppl'])} | {_fmt(r['retain_ppl'])} | {_fmt(r['general_ppl'])} |"
                     + (f" {_fmt(r['forget_exposure'])} | {_fmt(r['retain_exposure'])} |" if exp else ""))
    lines += ["", "At alpha=0 (and the forget PPL at alpha=1); a check mark is a target met:", "",
              "| base / selector / density | forget PPL | retain PPL | general PPL |"
              + (" forget exp. | retain exp. |" if exp else "") + " alpha=1 forget PPL | sparse KiB | targets met |",
              "|---|---|---|---|" + ("---|---|" if exp else "") + "---|---|---|"]
    for row in results["rows"]:
        a0, a1, v = row["alphas"]["0.0"], row["alphas"]["1.0"], row["verdicts"]

        def mark(key, text):
            return f"{text} ✓" if v.get(key, {}).get("met") else text

        lines.append(
            f"| {row['label']} | {mark('forget_ppl>=0.5*oracle', _fmt(a0['forget_ppl']))} | "
            f"{mark('retain_ppl<=1.5*finetuned', _fmt(a0['retain_ppl']))} | {mark('general_ppl<=1.1*base', _fmt(a0['general_ppl']))} |"
            + (f" {mark('exposure<=oracle+1', _fmt(a0['forget_exposure']))} | {_fmt(a0['retain_exposure'])} |" if exp else "")
            + f" {mark('alpha1_forget_ppl<=1.1*finetuned', _fmt(a1['forget_ppl']))} | {row['sparse_bytes'] / 1024:.0f} | "
            f"{sum(x['met'] for x in v.values())}/{len(v)} |")
    memorised = ref["finetuned"]["forget_ppl"] <= 0.5 * ref["oracle"]["forget_ppl"]
    if not memorised:
        lines.insert(1, f"\n**The fine-tune did not memorise the forget set** (forget PPL {_fmt(ref['finetuned']['forget_ppl'])} "
                        f"vs the oracle's {_fmt(ref['oracle']['forget_ppl'])}): the targets below say nothing about forgetting.")
    full = [r for r in results["rows"] if all(x["met"] for x in r["verdicts"].values())]
    selective = [r for r in results["rows"] if r["verdicts"]["forget_ppl>=0.5*oracle"]["met"]
                 and r["verdicts"]["retain_ppl<=1.5*finetuned"]["met"]]
    best = max(results["rows"], key=lambda r: r["alphas"]["0.0"]["forget_ppl"] / max(r["alphas"]["0.0"]["retain_ppl"], 1e-9))
    lines += ["", "Verdict (computed): "
              + (f"{len(full)} configuration(s) meet every target: {', '.join(r['label'] for r in full)}." if full else
                 "no configuration meets every target.")
              + f" {len(selective)} forget selectively (forget PPL >= half the oracle's with retain PPL <= 1.5x the "
              f"fine-tuned model's)." + f" Highest forget/retain PPL ratio at alpha=0: {best['label']} "
              f"({_fmt(best['alphas']['0.0']['forget_ppl'])} / {_fmt(best['alphas']['0.0']['retain_ppl'])}; oracle "
              f"{_fmt(ref['oracle']['forget_ppl'])} / {_fmt(ref['oracle']['retain_ppl'])})."]
    targets = {"forget_ppl>=0.5*oracle": ("forget PPL / oracle's", ">= 0.5"),
               "retain_ppl<=1.5*finetuned": ("retain PPL / fine-tuned's", "<= 1.5"),
               "general_ppl<=1.1*base": ("general PPL / pre-trained's", "<= 1.1"),
               "alpha1_forget_ppl<=1.1*finetuned": ("alpha=1 forget PPL / fine-tuned's", "<= 1.1"),
               "exposure<=oracle+1": ("forget exposure - oracle's", "<= 1 bit"),
               "alpha1_exposure>=finetuned-1": ("alpha=1 exposure - fine-tuned's", ">= -1 bit")}
    closest = max(results["rows"], key=lambda r: (sum(x["met"] for x in r["verdicts"].values()),
                                                   r["verdicts"]["forget_ppl>=0.5*oracle"]["value"]
                                                   / max(r["verdicts"]["retain_ppl<=1.5*finetuned"]["value"], 1e-9)))
    lines.append(f"Closest configuration ({closest['label']}), measured (required): " + "; ".join(
        f"{targets[k][0]} {v['value']:.2f} ({targets[k][1]}) {'met' if v['met'] else 'MISSED'}"
        for k, v in closest["verdicts"].items()) + ".")
    # alpha is a knob: the best point anywhere on it, not only at 0
    points = [(r, a, m) for r in results["rows"] for a, m in r["alphas"].items()
              if m["forget_ppl"] >= 0.5 * ref["oracle"]["forget_ppl"]]
    if points:
        r, a, m = min(points, key=lambda p: p[2]["retain_ppl"])
        lines.append(f"Over every alpha, the point with the lowest retain PPL that still meets the forget target: {r['label']} "
                     f"at alpha={float(a):g}: forget PPL {_fmt(m['forget_ppl'])} ({m['forget_ppl'] / ref['oracle']['forget_ppl']:.2f}x "
                     f"the oracle's), retain PPL {_fmt(m['retain_ppl'])} ({m['retain_ppl'] / ref['finetuned']['retain_ppl']:.2f}x the "
                     f"fine-tuned model's; target <= 1.5x: {'met' if m['retain_ppl'] <= 1.5 * ref['finetuned']['retain_ppl'] else 'MISSED'})"
                     + (f", forget exposure {_fmt(m['forget_exposure'])} bits" if m["forget_exposure"] is not None else "") + ".")
    over = [r["label"] for r in results["rows"] if r["alphas"]["0.0"]["forget_ppl"] > 5 * ref["oracle"]["forget_ppl"]]
    if over:
        lines.append(f"Over-forgetting (forget PPL above 5x the oracle's at alpha=0): {', '.join(over)}.")
    if ref["finetuned"]["general_ppl"] > 1.1 * ref["base"]["general_ppl"]:
        lines.append(f"The fine-tuned model's own general PPL is {ref['finetuned']['general_ppl'] / ref['base']['general_ppl']:.2f}x "
                     "the pre-trained model's, so 'general PPL <= 1.1x base' asks alpha=0 to undo more than the forget set.")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["base_kind"] for r in results["rows"] if r["reference"]})
    kind = "int8" if "int8" in kinds else kinds[0]
    rows = [r for r in results["rows"] if r["reference"] and r["base_kind"] == kind]
    density = max(r["density"] for r in rows)
    rows = [r for r in rows if r["density"] == density]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric, title in ((axes[0], "forget_ppl", "forget answers"), (axes[1], "retain_ppl", "retain answers")):
        for r in rows:
            alphas = sorted(float(a) for a in r["alphas"])
            ax.plot(alphas, [r["alphas"][str(a)][metric] for a in alphas], marker="o", label=r["selector"])
        for name, style in (("oracle", ":"), ("finetuned", "--")):
            ax.axhline(results["reference"][name][metric], color="gray", linestyle=style, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("alpha")
        ax.set_title(f"{title}: base {kind}, density {density:.0%}")
    axes[0].set_ylabel("answer perplexity")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def plot_tradeoff(results: dict, path: str) -> None:
    """Forget vs retain answer PPL at alpha=0 for every configuration, with the fine-tuned model and the oracle:
    selective forgetting is up and to the left (towards the oracle), plain damage is along the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"none": "o", "int8": "s", "int4": "^", "nf4": "v", "fp16": "D", "bf16": "d", "bnb_nf4": "P", "bnb_int8": "X"}
    selectors = sorted({r["selector"] for r in results["rows"]})
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(selectors)}
    for r in results["rows"]:
        a0 = r["alphas"]["0.0"]
        ax.scatter(a0["retain_ppl"], a0["forget_ppl"], marker=markers.get(r["base_kind"], "o"),
                   color=colors[r["selector"]], alpha=0.8 if r["reference"] else 0.3, s=20 + 600 * r["density"])
    ref = results["reference"]
    for name, style in (("finetuned", "k*"), ("oracle", "r*")):
        ax.plot(ref[name]["retain_ppl"], ref[name]["forget_ppl"], style, markersize=14, label=name)
    lo = min(ref["finetuned"]["retain_ppl"], ref["oracle"]["retain_ppl"])
    ax.axhline(0.5 * ref["oracle"]["forget_ppl"], color="r", linestyle=":", label="forget target (half the oracle's)")
    ax.axvline(1.5 * ref["finetuned"]["retain_ppl"], color="k", linestyle=":", label="retain target (1.5x fine-tuned)")
    hi = 2 * max(r["alphas"]["0.0"]["retain_ppl"] for r in results["rows"])
    slope = ref["finetuned"]["forget_ppl"] / ref["finetuned"]["retain_ppl"]  # both PPLs scaled alike: no selectivity
    ax.plot([lo, hi], [lo * slope, hi * slope], color="gray", lw=0.5)
    for s in selectors:
        ax.scatter([], [], color=colors[s], label=s)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("retain answer PPL at alpha=0")
    ax.set_ylabel("forget answer PPL at alpha=0")
    ax.set_title("selectivity at alpha=0 (marker: base kind; size: density)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    with recipe_runtime(args.threads):
        if args.from_json:
            with open(args.from_json) as f:
                results = json.load(f)
            saved = results["args"]
            for k in ("candidates", "alpha_list"):
                setattr(args, k, saved[k])
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                results = run(args)
            results["seconds"] = time.perf_counter() - start
            results["machine"] = machine()
            results["args"] = {k: v for k, v in vars(args).items()}
        results["markdown"] = markdown(results, args)
        with atomic_directory(args.out, overwrite=True, field="--out") as tmp:
            with open(os.path.join(tmp, "results.json"), "w") as f:
                json.dump(results, f, indent=1, default=float)
            with open(os.path.join(tmp, "results.md"), "w") as f:
                f.write(results["markdown"] + "\n")
            if not args.no_plots:
                plot(results, os.path.join(tmp, "alpha_sweep.png"))
                plot_tradeoff(results, os.path.join(tmp, "tradeoff.png"))
        print("\n" + results["markdown"])
        print(f"\nwrote {args.out}/results.json, results.md" + ("" if args.no_plots else ", alpha_sweep.png, tradeoff.png"))
    return results


if __name__ == "__main__":
    main()
