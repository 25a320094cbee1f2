"""A small Llama-architecture causal LM pre-trained here, offline, on Python's documentation; cached on disk.

    from tinyllama import TinyLlamaSpec, tiny_llama
    path = tiny_llama("runs/cache")                     # built once (~2 minutes on 2 busy CPU cores), then reused
    model = AutoModelForCausalLM.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)

The tokenizer is a byte-level BPE trained on the same text (no unknown tokens, deterministic), saved next to the model,
so the folder loads with the Auto classes like any Hub checkpoint. The folder name carries a hash of the spec, the
training text and this file's recipe version: a different spec or text builds a new model, the same ones reuse it.
Pre-training: next-token prediction on random windows of the packed text (paragraphs separated by EOS, each window
starting with BOS as every prompt does), AdamW, transformers' linear warm-up then cosine decay to a floor
(`lr_schedule`), gradient clipping at 1; seeded (data order and initialisation).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
from peft_ext.files import atomic_directory  # noqa: E402

RECIPE_VERSION = "2"  # bump when the pre-training code changes what it builds (2: transformers' LR schedule)
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")


@dataclass(frozen=True)
class TinyLlamaSpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    seq_len: int = 128
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_rate: float = 0.1  # the cosine decays to this share of lr, not to 0
    weight_decay: float = 0.1
    seed: int = 0
    data_seed: int = 0  # the calibration/held-out topic split of data.general_text


QUICK = TinyLlamaSpec(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=86, seq_len=64,
                      steps=30, batch_size=8, warmup_steps=3)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation) with <|pad|>, <|bos|>, <|eos|>; BOS is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    bos = tk.token_to_id("<|bos|>")
    tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                      special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def pack(tok, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each followed by EOS (no BOS inside the stream)."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def cache_key(spec: TinyLlamaSpec, texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"spec": asdict(spec), "version": RECIPE_VERSION}, sort_keys=True).encode())
    h.update(hashlib.sha256("\x00".join(texts).encode()).digest())
    return h.hexdigest()[:16]


def lr_schedule(opt: torch.optim.Optimizer, spec: TinyLlamaSpec):
    """transformers' warm-up + cosine schedule with a floor (the Trainer's `lr_scheduler_type=
    "cosine_warmup_with_min_lr"`): lr * (s + 1) / warmup_steps for the first warmup_steps steps, then
    lr * (m + (1 - m) * (1 + cos(pi * (s - warmup_steps + 1) / (steps - warmup_steps))) / 2) with m = min_lr_rate,
    which reaches lr * m exactly at the last step. Call `.step()` after each optimizer step.

    Recipe version 1 computed this by hand with the cosine one step later (progress (s - warmup_steps) / ...): the
    warm-up is identical, after it this one is lower by at most 0.5% of the peak lr (1.6% of the step's lr) at the
    default spec, 5.2% (15%) at QUICK's 30 steps."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

    return get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        opt, num_warmup_steps=spec.warmup_steps, num_training_steps=spec.steps, min_lr_rate=spec.min_lr_rate)


def pretrain(spec: TinyLlamaSpec, texts: list[str], out_dir: str, progress: bool = True) -> dict:
    """Train tokenizer and model from scratch on `texts`; save both to `out_dir` (save_pretrained)."""
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    tok = train_tokenizer(texts, spec.vocab_size)
    stream = pack(tok, texts)
    if stream.numel() <= spec.seq_len:
        raise ValueError(f"pre-training text has {stream.numel()} tokens, fewer than seq_len={spec.seq_len}")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=max(2 * spec.seq_len, 256), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    sched = lr_schedule(opt, spec)

    gen = torch.Generator().manual_seed(spec.seed)
    bos = torch.tensor([tok.bos_token_id])
    model.train()
    losses = []
    bar = tqdm(range(spec.steps), desc="pre-training tiny Llama", disable=not progress, unit="step")
    for step in bar:
        starts = torch.randint(0, stream.numel() - spec.seq_len, (spec.batch_size,), generator=gen)
        # every window starts with BOS, like every prompt and evaluation chunk the model will see
        batch = torch.stack([torch.cat([bos, stream[s : s + spec.seq_len - 1]]) for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    report = {
        "spec": asdict(spec), "params": sum(p.numel() for p in model.parameters()), "train_tokens": int(stream.numel()),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]), "first_loss": losses[0],
        "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
    }
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "pretrain.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def tiny_llama(cache_dir: str = "runs/cache", spec: TinyLlamaSpec = TinyLlamaSpec(), texts: list[str] | None = None,
               rebuild: bool = False, progress: bool = True, log=print) -> str:
    """Path of the cached model for `spec` and `texts` (default: data.general_text("calibration", spec.data_seed)),
    built first when missing or when `rebuild`. Written atomically (a temp folder renamed into place). Under
    torch.distributed rank 0 builds while the others wait."""
    texts = data.general_text("calibration", seed=spec.data_seed) if texts is None else texts
    path = os.path.join(cache_dir, f"tinyllama-{cache_key(spec, texts)}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if rank == 0:
        ready = os.path.isfile(os.path.join(path, "pretrain.json"))
        if ready and not rebuild:
            log(f"tiny Llama: reusing {path}")
        else:
            log(f"tiny Llama: pre-training {spec} on {len(texts)} paragraphs -> {path}")
            # swapped in whole (a rebuild never leaves the cache entry missing or half-written); temporaries of a
            # killed build are removed by the next one
            with atomic_directory(path, overwrite=True, field="cache_dir") as tmp:
                report = pretrain(spec, texts, tmp, progress=progress)
            log(f"tiny Llama: {report['params']:,} parameters, loss {report['first_loss']:.2f} -> "
                f"{report['final_loss']:.2f} on {report['train_tokens']:,} tokens in {report['seconds']} s")
    if distributed:
        torch.distributed.barrier()
    return path


def quick_spec(**overrides) -> TinyLlamaSpec:
    return replace(QUICK, **overrides)
