"""ForgettingCallback: how much of what the base model knew a fine-tune is losing, logged while it trains.

    from trainer_ext import ForgettingCallback
    cb = ForgettingCallback(reference_texts, tokenizer, every=100).attach(trainer)   # texts the task never trains on
    trainer.train()       # logs forget/ref_nll, forget/ref_ppl, forget/nll_increase, forget/kl_base every 100 updates

Every `every` optimizer updates (and once before the first, as the reference), on held-out reference text:

    forget/ref_nll        mean cross-entropy per token (nats) of the model being trained
    forget/ref_ppl        exp(ref_nll)
    forget/nll_increase   ref_nll minus its value before training
    forget/kl_base        mean per-token KL(base || model): how far the predictive distribution moved

The base distribution: with `base="cache"` (default) the log-probabilities at the scored positions are computed once,
before the first update, from the model as it starts (for every PEFT init that starts at the base function: LoRA,
NullSpaceLoRA, PiSSA, CorDA, ...), and kept on CPU in float32 — positions x vocabulary x 4 bytes (8 texts of 128
tokens, vocabulary 49152: ~190 MB; the size is logged; bfloat16 would halve it but its rounding alone reads as a KL
of ~3e-4 nats, the size of early forgetting). With `base="disable_adapter"` nothing is cached and the base
comes from the same model with its adapters disabled (PEFT's `disable_adapter()`: no second model copy; only right
for adapters whose disabled model is the base, not PiSSA/CorDA, which rewrite the base weights). Padding is excluded.

Distributed: each rank scores its share of the texts and the sums are all-reduced, so every rank logs the same
values. Values are emitted like the spectral monitor's (`callbacks.emit_log`): they never cost the Trainer its own log.
No library offered this during training (PEFT's MetaMathQA benchmark computes the forgetting only after training).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
from accelerate.utils import send_to_device

from .callbacks import AttachableCallback, collective_group, emit_log

logger = logging.getLogger(__name__)


def reference_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """`texts` tokenized in batches of `batch_size` (right-padded, cut to `max_length` tokens)."""
    return [dict(tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                           max_length=max_length))
            for i in range(0, len(texts), batch_size)]


@contextlib.contextmanager
def _eval(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def scored_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(log-probabilities at the scored positions (n, vocab), their targets (n,), n) for one batch: every token after
    the first, padding excluded."""
    batch = send_to_device(batch, next(model.parameters()).device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"][:, 1:].bool()
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[mask]
    return logp, batch["input_ids"][:, 1:][mask], int(mask.sum())


def base_logprobs(model, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The model's log-probabilities at the scored positions of each batch, on CPU in float32 (bfloat16 rounding
    alone reads as |KL| ~ 3e-4 nats, the size of early forgetting), in eval mode without gradients; with PEFT's
    adapters disabled when the model has them."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with _eval(model), ctx:
        return [scored_logprobs(model, batch)[0].to("cpu", torch.float32) for batch in batches]


def nll_kl_sums(model, batches: list[dict[str, torch.Tensor]], base: list[torch.Tensor] | None = None) -> torch.Tensor:
    """float64 [summed NLL, summed KL(base || model), scored tokens] over `batches` (per token: divide by the last).
    `base`: one tensor per batch as `base_logprobs` gives; None takes the base from `model.disable_adapter()`."""
    sums = torch.zeros(3, dtype=torch.float64)
    with _eval(model):
        for i, batch in enumerate(batches):
            logp, target, n = scored_logprobs(model, batch)
            if base is not None:
                ref = base[i].to(logp.device)
            else:
                with model.disable_adapter():
                    ref, _, _ = scored_logprobs(model, batch)
            sums[0] -= logp.gather(-1, target[:, None]).sum().item()
            sums[1] += (ref.exp() * (ref - logp)).sum().item()
            sums[2] += n
    return sums


class ForgettingCallback(AttachableCallback):
    """Log cross-entropy on held-out reference text and KL to the base model every `every` updates (see module doc)."""

    def __init__(
        self,
        reference_texts: Sequence[str],
        tokenizer,
        every: int = 100,
        max_length: int = 128,
        batch_size: int = 8,
        base: Literal["cache", "disable_adapter"] = "cache",
        prefix: str = "forget/",
    ) -> None:
        if isinstance(reference_texts, str) or not reference_texts or not all(isinstance(t, str) and t.strip()
                                                                              for t in reference_texts):
            raise ValueError("reference_texts must be a non-empty list of non-empty strings (held-out text the task "
                             f"never trains on), got {type(reference_texts).__name__} of {len(reference_texts or [])}")
        for name, value, low in (("every", every, 1), ("max_length", max_length, 2), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ForgettingCallback {name} must be an integer >= {low}, got {value!r}")
        if base not in ("cache", "disable_adapter"):
            raise ValueError(f"ForgettingCallback base must be 'cache' or 'disable_adapter', got {base!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id: set tokenizer.pad_token = tokenizer.eos_token first")
        self.texts, self.tokenizer = list(reference_texts), tokenizer
        self.every, self.max_length, self.batch_size, self.base, self.prefix = every, max_length, batch_size, base, prefix
        self.trainer = None
        self._batches: list[dict[str, torch.Tensor]] = []
        self._base_logprobs: list[torch.Tensor] = []
        self._ref_nll: float | None = None
        self.records: list[dict[str, float]] = []

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        rank, world = collective_group()
        mine = self.texts[rank::world]  # this rank's share; the sums are all-reduced
        self._batches = reference_batches(self.tokenizer, mine, self.max_length, self.batch_size)
        if self.base == "disable_adapter" and not hasattr(model, "disable_adapter"):
            raise ValueError("ForgettingCallback(base='disable_adapter') needs a PeftModel (its disable_adapter() gives "
                             f"the base); this model is a {type(model).__name__}: use base='cache'")
        self._base_logprobs = []
        if self.base == "cache":  # the model as it starts is the base for every init that starts at the base function
            with _eval(model):
                self._base_logprobs = [scored_logprobs(model, b)[0].to("cpu", torch.float32) for b in self._batches]
            mb = sum(t.numel() for t in self._base_logprobs) * 4 / 2**20
            logger.info("ForgettingCallback: cached the base model's log-probabilities at %d positions (%.0f MB)",
                        sum(t.shape[0] for t in self._base_logprobs), mb)
        if state.global_step > 0:
            # the base is not saved in checkpoints: after a resume both references are the resumed model
            logger.warning("ForgettingCallback: training resumed at step %d, so forget/kl_base and forget/nll_increase "
                           "are measured against the model at that step, not the base model", state.global_step)
        values = self.measure(model)
        self._ref_nll = values[f"{self.prefix}ref_nll"]
        values[f"{self.prefix}nll_increase"] = 0.0
        self.records.append({"step": state.global_step, **values})
        return emit_log(self, args, state, control, values)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every != 0:
            return control
        values = self.measure(model)
        values[f"{self.prefix}nll_increase"] = values[f"{self.prefix}ref_nll"] - self._ref_nll
        if not all(math.isfinite(v) for v in values.values()):
            logger.warning("ForgettingCallback, step %d: non-finite values %s (the model diverged?); logged as they are",
                           state.global_step, {k: v for k, v in values.items() if not math.isfinite(v)})
        self.records.append({"step": state.global_step, **values})
        return emit_log(self, args, state, control, values)

    # ------------------------------------------------------------------ measuring
    def measure(self, model) -> dict[str, float]:
        """The forgetting metrics of `model` now (also usable outside training)."""
        sums = nll_kl_sums(model, self._batches, self._base_logprobs if self.base == "cache" else None)
        _, world = collective_group()
        if world > 1:
            backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            sums = sums.to(backend_device)
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        nll, kl, n = (float(x) for x in sums)
        if n == 0:
            raise ValueError("ForgettingCallback: the reference texts give no token to score (each needs >= 2 tokens)")
        return {f"{self.prefix}ref_nll": nll / n, f"{self.prefix}ref_ppl": math.exp(min(nll / n, 700.0)),
                f"{self.prefix}kl_base": kl / n}
