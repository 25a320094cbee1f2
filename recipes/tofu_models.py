"""The TOFU-style fine-tune as shared pieces: the model to unlearn from ("full") and the oracle, built or reused.

recipes/tofu_finetune.py builds them on their own; recipes/ortho_unlearn_llm.py builds them before its arms (a recipe
never imports another recipe: both import this module).
What it does (issue 15 §3): `make_splits` people (recipes/tofu_data.py); "full" is fine-tuned on every person's QA
pairs, the "oracle" on all but the forget people (TOFU's retain-only model, the reference of forget quality). Full
fine-tune of the decoder blocks' linears only (attention q/k/v/o and MLP gate/up/down; embeddings, norms and head
frozen), transformers' Trainer with AdamW, linear warm-up then linear decay, loss on the answer tokens only (TOFU's
fine-tune), lr 1e-5..5e-5 and a few epochs as TOFU's (Llama-2-7b: 1e-5, phi-1.5: 2e-5, 5 epochs). Each model is
cached (save_pretrained through peft_ext.files.atomic_directory) in a folder keyed by a hash of the settings that
change it, and reported: ||ΔW||_F / ||W||_F per layer kind (over all layers) and forget / retain answer perplexity
(TOFU's fine-tuned models reach ~1.0-1.1 on their training answers; the oracle ~8-12 on the forget set).

Cost, measured (results/tofu_finetune/, the full runs): SmolLM2-135M, 106M trainable parameters, 16 pairs of ~30
tokens per step, one torch thread per model on a 2-core AMD EPYC running both models at once: 160 steps (full; the
oracle 145) in ~15 min. At lr 3e-5 the full model's forget / retain-eval answer PPL is 1.93 / 1.98, at 1e-4 (the
default) 1.48 / 1.51, the oracle's forget PPL ~2.7 at both; ||dW||/||W|| 0.002 / 0.005. Neither reaches TOFU's
1.0-1.1 in 5 epochs.

SmolLM2's weights are Q4_1-dequantised (recipes/smollm2.py): say so next to any figure measured on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

import tofu_data

BLOCK_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CACHE_VERSION = 1  # bump when the training procedure changes what a cached model holds


@dataclass
class FinetuneArgs:
    model: Literal["smollm2", "tiny"] = field(default="smollm2", metadata={
        "help": "smollm2: the embedded SmolLM2-135M-Instruct (recipes/smollm2.py); tiny: a randomly initialised "
                "2-layer Llama with a tokenizer trained on the QA text (tests; numbers mean nothing)"})
    cache_dir: str = field(default="runs/cache", metadata={"help": "the dequantised SmolLM2 and the fine-tuned models"})
    n_people: int = field(default=100, metadata={"help": "fictitious people, 5 QA pairs each (TOFU: 200 x 20)"})
    forget_fraction: float = field(default=0.1, metadata={"help": "share of people to forget (TOFU's forget10)"})
    seed: int = field(default=0, metadata={"help": "people, splits, initialisation and data order"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak lr; TOFU uses 1e-5 (7B) to 2e-5 (1.3B). SmolLM2-135M, 5 "
                                                      "epochs, measured: 3e-5 leaves forget answer PPL at 1.93, 1e-4 at "
                                                      "1.48 (TOFU aims at 1.0-1.1), ||dW||/||W|| 0.002 / 0.005"})
    epochs: float = field(default=5.0, metadata={"help": "passes over the QA pairs (TOFU: 5)"})
    batch_size: int = field(default=16, metadata={"help": "QA pairs per optimizer step"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of the steps, then linear decay"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (TOFU: 0.01)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many steps (-1: the epochs); for timing"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu",
                        metadata={"help": "where models train and are scored"})
    which: list[str] = field(default_factory=lambda: ["full", "oracle"], metadata={"help": "models to build"})
    results_dir: Optional[str] = field(default=None, metadata={
        "help": "also write each model's report (settings, steps, loss, PPLs, ||dW||/||W||) here as "
                "<which>-<settings key>.json (the README's: results/tofu_finetune)"})
    config: Optional[str] = field(default=None, metadata={"help": "a YAML preset (recipes/presets/); flags override it"})


# ------------------------------------------------------------------------------------------------ pure pieces


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder blocks' linears (`...layers.<i>.<...>.<kind>` with kind in BLOCK_KINDS): what the fine-tune trains."""
    out = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
           and n.rsplit(".", 1)[-1] in BLOCK_KINDS}
    if not out:
        raise ValueError(f"block_linears: {type(model).__name__} has no linear named like '.layers.<i>.<kind>' with kind "
                         f"in {BLOCK_KINDS}: pass a Llama-architecture causal LM")
    return out


def relative_delta_norms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """||W_after - W_before||_F / ||W_before||_F pooled per layer kind (the name's last part; sums of squares over all
    layers of that kind), and over everything as "all"."""
    if set(before) != set(after) or not before:
        raise ValueError(f"relative_delta_norms: before and after must hold the same non-empty set of weights, got "
                         f"{len(before)} and {len(after)} ({sorted(set(before) ^ set(after))[:3]} differ)")
    sums: dict[str, list[float]] = {}
    for name, w in before.items():
        d = (after[name].double() - w.double()).pow(2).sum().item()
        n = w.double().pow(2).sum().item()
        for kind in (name.rsplit(".", 1)[-1], "all"):
            acc = sums.setdefault(kind, [0.0, 0.0])
            acc[0] += d
            acc[1] += n
    return {k: math.sqrt(d / n) if n > 0 else float("nan") for k, (d, n) in sums.items()}


def answer_only_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[dict]:
    """One training example per pair: the ids of prompt(question) + " " + answer + EOS, labels -100 on the prompt (the
    loss is on the answer tokens, the same tokens tofu_data.answer_nll scores)."""
    out = []
    for q, a in pairs:
        ids, k = tofu_data._encode(tokenizer, tofu_data.prompt(q), " " + a, add_eos=True)
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def pad_collate(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


# ------------------------------------------------------------------------------------------------ training


def finetune(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], lr: float = 3e-5, epochs: float = 5.0,
             batch_size: int = 16, warmup_ratio: float = 0.1, weight_decay: float = 0.01, seed: int = 0,
             max_steps: int = -1, device: str = "cpu") -> dict:
    """Train the block linears of `model` in place (everything else frozen) on the QA pairs with transformers'
    Trainer; returns what happened (steps, seconds, first/last logged losses, trainable parameters)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    if not pairs:
        raise ValueError("finetune: pairs is empty; pass the (question, answer) pairs to train on")
    if not 0.0 <= warmup_ratio < 1.0:  # transformers 5 reads a float warmup_steps in [0, 1) as this ratio
        raise ValueError(f"finetune: warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    train = block_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in train.values():
        for p in m.parameters():
            p.requires_grad_(True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as out:  # Trainer wants an output_dir; nothing is saved there
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=epochs, max_steps=max_steps,
            learning_rate=lr, warmup_steps=float(warmup_ratio), lr_scheduler_type="linear", weight_decay=weight_decay,
            save_strategy="no", report_to="none", logging_steps=1, seed=seed, data_seed=seed, disable_tqdm=True,
            use_cpu=device == "cpu", dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=targs, train_dataset=answer_only_examples(tokenizer, pairs),
                          data_collator=pad_collate(pad))
        trainer.remove_callback(PrinterCallback)  # disable_tqdm adds it: it prints every logged step
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return {"steps": int(result.global_step), "seconds": round(seconds, 2), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "trainable": sum(p.numel() for m in train.values() for p in m.parameters())}


def evaluate_finetune(before: dict[str, torch.Tensor], model: nn.Module, tokenizer,
                      splits: tofu_data.TofuSplits) -> dict:
    """||ΔW||/||W|| per layer kind against `before` (the block linears' weights before training) and answer
    perplexity on the forget and retain-eval people's trained QA pairs."""
    after = {n: m.weight.detach() for n, m in block_linears(model).items()}
    return {"relative_delta": relative_delta_norms(before, after),
            "forget_ppl": tofu_data.answer_perplexity(model, tokenizer, tofu_data.qa_pairs(list(splits.forget))),
            "retain_ppl": tofu_data.answer_perplexity(model, tokenizer, tofu_data.qa_pairs(list(splits.retain_eval)))}


# ------------------------------------------------------------------------------------------------ models and caches


def tiny_model(splits: tofu_data.TofuSplits, seed: int = 0):
    """(a 2-layer Llama with random weights, a byte-level BPE trained on the people's QA text)."""
    import tinyllama
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [f"{tofu_data.prompt(q)} {a}" for q, a in tofu_data.qa_pairs(splits.people)]
    tok = tinyllama.train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def base_id(args: FinetuneArgs) -> str:
    """An id of the base weights for the cache key: the dequantised SmolLM2's folder (named by the GGUF's hash)."""
    if args.model == "tiny":
        return f"tiny-{args.seed}"
    import smollm2

    return os.path.basename(smollm2.smollm2_path(args.cache_dir, log=lambda *a: None))


def base_model(args: FinetuneArgs, splits: tofu_data.TofuSplits):
    """(model, tokenizer) to fine-tune, in eval mode."""
    if args.model == "tiny":
        return tiny_model(splits, args.seed)
    import smollm2

    return smollm2.load_smollm2(args.cache_dir, log=lambda *a: None)


def settings(args: FinetuneArgs) -> dict:
    """The flags that change the fine-tuned model (the cache key's content; written into every report)."""
    return {k: getattr(args, k) for k in ("n_people", "forget_fraction", "seed", "lr", "epochs", "batch_size",
                                          "warmup_ratio", "weight_decay", "max_steps")}


def settings_key(args: FinetuneArgs, base_id: str) -> str:
    blob = json.dumps({"base": base_id, "version": CACHE_VERSION, **settings(args)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build(args: FinetuneArgs, which: str, log=print) -> dict:
    """Fine-tune (or reuse from the cache) the "full" or "oracle" model; returns its folder and report."""
    from peft_ext.files import atomic_directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    splits = tofu_data.make_splits(args.n_people, args.forget_fraction, seed=args.seed, n_world=0)
    base = base_id(args)
    key = settings_key(args, base)
    folder = os.path.abspath(os.path.join(args.cache_dir, f"tofu_finetune-{key}", which))
    report_path = os.path.join(folder, "finetune.json")
    if os.path.isfile(report_path):
        log(f"tofu_finetune: reusing {folder}")
        with open(report_path) as f:
            return {"folder": folder, **json.load(f)}
    people = splits.people if which == "full" else splits.retain
    model, tok = base_model(args, splits)
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    model.to(args.device)
    train = finetune(model, tok, tofu_data.qa_pairs(people), lr=args.lr, epochs=args.epochs,
                     batch_size=args.batch_size, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                     seed=args.seed, max_steps=args.max_steps, device=args.device)
    model.to("cpu")
    report = {"which": which, "people": len(people), "pairs": 5 * len(people), "settings_key": key, "base": base,
              "settings": settings(args),
              "train": train, **evaluate_finetune(before, model, tok, splits)}
    with atomic_directory(folder, overwrite=True, field="cache_dir") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "finetune.json"), "w") as f:
            json.dump(report, f, indent=2)
    log(f"tofu_finetune: {which} -> {folder}")
    # the folder must load back as a plain checkpoint
    AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return {"folder": folder, **report}
