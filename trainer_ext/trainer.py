"""SpectralTrainer: a transformers Trainer that wires SpectralTrainingArguments to the callback and optimizer."""

from __future__ import annotations

import json
import os
import re
import warnings

from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from peft_ext.files import ADAPTER_MERGE, _holds_cwd, atomic_directory

from .args import SpectralTrainingArguments, _split
from .callbacks import SpectralMonitorCallback
from .extraction import EXTRACTION_MAGNITUDE_PATTERNS, WarmupExtractionCallback, prepare_extraction
from .optim import DEFAULT_MAGNITUDE_PATTERNS, create_directional_optimizer


class SpectralTrainer(Trainer):
    """`Trainer` plus, from `SpectralTrainingArguments`: a bound `SpectralMonitorCallback` when `spec_monitor`, and
    the directional optimizer when any of `magnitude_lr_ratio`, `spectral_clamp`, `amplify` is set (unless you pass
    your own optimizer), and warm-up extraction when `extract_warmup > 0` (the model's target Linears become
    `ExtractableLinear` here, before the optimizer exists, and a bound `WarmupExtractionCallback` extracts them).
    With plain `TrainingArguments` it trains exactly like `Trainer`.

    Saving a PEFT model is complete-or-absent: transformers writes `save_model`'s folder (and the model part of each
    `checkpoint-N`) in place, so a process killed while `save_model(output_dir)` rewrites an existing adapter leaves
    an unloadable mix. Here the adapter, tokenizer and training arguments are written beside the folder and swapped
    in at once (`peft_ext.files.atomic_directory`, merge mode: checkpoints and other files already there are kept).
    transformers already writes each checkpoint under a new name and deletes older ones only after it, but
    `resume_from_checkpoint=True` would pick the newest `checkpoint-N` even if it was interrupted before its
    `trainer_state.json`; here it takes the newest complete one and warns about the ones it skips. With several
    processes, DeepSpeed or FSDP (all ranks write into the checkpoint) saving stays transformers' own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spectral_monitor = None
        if isinstance(self.args, SpectralTrainingArguments) and self.args.spec_monitor:
            self.spectral_monitor = SpectralMonitorCallback(
                targets=self.args.spec_target_list,
                every=self.args.spec_every,
                topk=self.args.spec_topk,
                track=self.args.spec_track_list,
                niter=self.args.spec_niter,
                seed=self.args.seed,
            ).attach(self)
        self.extraction = None
        if isinstance(self.args, SpectralTrainingArguments) and self.args.extract_warmup > 0:
            prepare_extraction(self.model, targets=_split(self.args.extract_targets), k=self.args.extract_rank)
            self.extraction = WarmupExtractionCallback(
                self.args.extract_warmup,
                moments=self.args.extract_moments,
                basis=self.args.extract_basis,
                seed=self.args.seed,
            ).attach(self)

    def _atomic_save(self, output_dir: str) -> bool:
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not (self.args.should_save and self.args.world_size == 1 and isinstance(model, PeftModel)
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled):
            return False
        if _holds_cwd(os.path.realpath(output_dir)):  # swapping it would leave this process in a deleted folder
            warnings.warn(f"output_dir={output_dir!r} holds the current working directory, so the model is saved in "
                          "place (not atomically); use an output_dir below the working directory", stacklevel=3)
            return False
        return True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self._atomic_save(output_dir):
            return super()._save(output_dir, state_dict=state_dict)
        with atomic_directory(output_dir, overwrite=True, field="output_dir", **ADAPTER_MERGE) as tmp:
            super()._save(tmp, state_dict=state_dict)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model=None):
        args = self.args
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            factory, kwargs = self.optimizer_cls_and_kwargs
            if factory is create_directional_optimizer and "args" not in kwargs and "lr" not in kwargs:
                # the plain Trainer hands a factory no arguments; ours takes lr / weight decay / betas from them
                self.optimizer_cls_and_kwargs = (factory, {**kwargs, "args": args})
        if (
            self.optimizer is None
            and self.optimizer_cls_and_kwargs is None
            and isinstance(args, SpectralTrainingArguments)
            and args.uses_directional_optimizer
        ):
            self.optimizer = create_directional_optimizer(
                model if model is not None else self.model,
                args=args,
                magnitude_lr_ratio=args.magnitude_lr_ratio,
                magnitude_patterns=EXTRACTION_MAGNITUDE_PATTERNS if args.extract_warmup > 0 else DEFAULT_MAGNITUDE_PATTERNS,
                spectral_clamp=args.spectral_clamp,
                amplify=args.amplify,
                amplify_targets=_split(args.amplify_targets),
                amplify_rank=args.amplify_rank,
                amplify_every=args.amplify_every,
                amplify_mode=args.amplify_mode,
                stability_threshold=args.stability_threshold,
                stability_checks=args.stability_checks,
            )
            return self.optimizer
        return super().create_optimizer(model) if model is not None else super().create_optimizer()


def _complete(checkpoint: str) -> bool:
    # transformers writes trainer_state.json after the model, optimizer, scheduler and RNG states
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as f:
            return "global_step" in json.load(f)
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest `checkpoint-N` in `output_dir` whose trainer_state.json reads; warns about newer ones that are
    incomplete (interrupted while being written) and raises `ValueError` if there is none."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        names = []
    found = sorted(
        ((int(m.group(1)), n) for n in names
         if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", n)) and os.path.isdir(os.path.join(output_dir, n))),
        reverse=True,
    )
    newest_first = [n for _, n in found]
    for i, name in enumerate(newest_first):
        if _complete(os.path.join(output_dir, name)):
            if i:
                warnings.warn(f"resume_from_checkpoint=True: skipping {', '.join(newest_first[:i])} in {output_dir!r} "
                              f"(no readable {TRAINER_STATE_NAME}: interrupted while being written); resuming from "
                              f"{name}", stacklevel=3)
            return os.path.join(output_dir, name)
    why = ""
    if newest_first:
        why = f" ({', '.join(newest_first)} lack a readable {TRAINER_STATE_NAME}: interrupted while being written)"
    raise ValueError(f"resume_from_checkpoint=True, but output_dir={output_dir!r} holds no complete checkpoint{why}; "
                     "train without resume_from_checkpoint or pass the path of a checkpoint")
