"""SpectralTrainer: a transformers Trainer that wires SpectralTrainingArguments to the callback and optimizer."""

from __future__ import annotations

from transformers import Trainer

from .args import SpectralTrainingArguments, _split
from .callbacks import SpectralMonitorCallback
from .extraction import EXTRACTION_MAGNITUDE_PATTERNS, WarmupExtractionCallback, prepare_extraction
from .optim import DEFAULT_MAGNITUDE_PATTERNS, create_directional_optimizer


class SpectralTrainer(Trainer):
    """`Trainer` plus, from `SpectralTrainingArguments`: a bound `SpectralMonitorCallback` when `spec_monitor`, and
    the directional optimizer when any of `magnitude_lr_ratio`, `spectral_clamp`, `amplify` is set (unless you pass
    your own optimizer), and E4 warm-up extraction when `extract_warmup > 0` (the model's target Linears become
    `ExtractableLinear` here, before the optimizer exists, and a bound `WarmupExtractionCallback` extracts them).
    With plain `TrainingArguments` it behaves exactly like `Trainer`."""

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

    def create_optimizer(self, model=None):
        args = self.args
        if (
            self.optimizer is None
            and self.optimizer_cls_and_kwargs is None
            and isinstance(args, SpectralTrainingArguments)
            and args.uses_directional_optimizer
        ):
            self.optimizer = create_directional_optimizer(
                model if model is not None else self.model,
                lr=args.learning_rate,
                weight_decay=args.weight_decay,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
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
