"""SpectralTrainingArguments: TrainingArguments plus the spectral-monitoring and directional-LR knobs.

Every field is also a command-line flag through HfArgumentParser, dashed or not: `--spec-monitor --spec-every 100
--spec-topk 8 --spec-targets attn.qkv,attn.proj,mlp.fc1,mlp.fc2`, and `--log-wandb --wandb-project NAME` map onto
`report_to`/`project`. `--extract-warmup 50 --extract-rank 8 --magnitude-lr-ratio 10` turns on warm-up extraction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from peft_ext._checks import check_int, check_number

from .targets import split_patterns as _split  # "a,b" and ["a", "b"] alike, as SpectralMonitorCallback takes them


_WHERE = "SpectralTrainingArguments."


@dataclass
class SpectralTrainingArguments(TrainingArguments):
    spec_monitor: bool = field(default=False, metadata={"help": "Log spectral metrics of the spec_targets matrices."})
    spec_every: int = field(default=100, metadata={"help": "Check every N optimizer updates."})
    spec_topk: int = field(default=8, metadata={"help": "Number of singular vectors/values tracked per matrix."})
    spec_targets: str = field(
        default="attn.qkv,attn.proj,mlp.fc1,mlp.fc2",
        metadata={"help": "Comma-separated matrices to watch: aliases (attn.qkv, attn.proj, mlp.fc1, mlp.fc2 match "
                  "timm and transformers names), module-name suffixes, or re:<regex>."},
    )
    spec_niter: int = field(
        default=2, metadata={"help": "Power iterations of the randomized SVD (raise it where spectra are flat)."}
    )
    spec_track: str = field(default="weight,grad,momentum", metadata={"help": "What to measure: weight[,grad][,momentum]."})
    magnitude_lr_ratio: float = field(
        default=1.0, metadata={"help": "LR multiplier (and no weight decay) for magnitude-like parameters; 1 = off."}
    )
    spectral_clamp: float = field(
        default=None, metadata={"help": "Keep each adapter branch's sigma_max <= c / sqrt(d_in) after every step."}
    )
    amplify: float = field(default=1.0, metadata={"help": "Amplify the update inside each stable tracked subspace by this factor (1 = off)."})
    amplify_targets: str = field(default=None, metadata={"help": "Comma-separated parameter patterns to amplify."})
    amplify_rank: int = field(default=8, metadata={"help": "Rank of the amplified subspace."})
    amplify_every: int = field(default=10, metadata={"help": "Re-estimate the amplified subspaces every N updates."})
    amplify_mode: str = field(default="subspace", metadata={"help": "'subspace', or 'bulk' (the control: amplify the complement)."})
    stability_threshold: float = field(default=0.9, metadata={"help": "Mean principal cosine that counts as stable."})
    stability_checks: int = field(default=3, metadata={"help": "Consecutive stable checks before amplifying."})
    extract_warmup: int = field(
        default=0, metadata={"help": "Warm-up extraction: after N optimizer updates split each extract_targets matrix "
                             "into W = R + U C V^T (function-preserving); C trains at lr * magnitude_lr_ratio. 0 = off."}
    )
    extract_rank: int = field(default=8, metadata={"help": "k, the rank of the extracted core C (k x k)."})
    extract_targets: str = field(
        default="attn.qkv,attn.proj,mlp.fc1,mlp.fc2",
        metadata={"help": "Comma-separated nn.Linear modules to extract (same pattern syntax as spec_targets)."},
    )
    extract_basis: str = field(
        default="top", metadata={"help": "'top' (W's top-k singular subspaces) or 'random' (the data-blind control)."}
    )
    extract_moments: str = field(
        default="project", metadata={"help": "W's Adam moments at extraction: 'project' (to the complement) or 'reset'."}
    )
    log_wandb: bool = field(default=False, metadata={"help": "Add 'wandb' to report_to."})
    wandb_project: str = field(default=None, metadata={"help": "W&B (and Trackio) project name."})

    def __post_init__(self):
        if self.log_wandb:
            report = _split(self.report_to) if self.report_to not in (None, "none") else []
            self.report_to = report + ([] if "wandb" in report else ["wandb"])
        if self.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", self.wandb_project)
            self.project = self.wandb_project
        super().__post_init__()
        # one wording for every number (peft_ext._checks): NaN, inf, bools and strings are refused like bad values
        check_int(self.spec_every, "spec_every", ge=1, where=_WHERE, fix="a check every N optimizer updates, e.g. 100")
        check_int(self.spec_topk, "spec_topk", ge=1, where=_WHERE, fix="e.g. 8")
        check_number(self.magnitude_lr_ratio, "magnitude_lr_ratio", gt=0, where=_WHERE, noun="a finite number",
                     fix="1 leaves the learning rates as they are")
        if self.spectral_clamp is not None:
            check_number(self.spectral_clamp, "spectral_clamp", gt=0, where=_WHERE, noun="a finite number",
                         fix="or leave it unset (None)")
        check_number(self.amplify, "amplify", ge=1, where=_WHERE, noun="a finite number", fix="1 = off")
        if self.amplify > 1 and not _split(self.amplify_targets):
            raise ValueError("amplify > 1 needs amplify_targets: the parameter patterns whose updates to amplify")
        check_int(self.extract_warmup, "extract_warmup", ge=0, where=_WHERE, fix="0 = no extraction")
        if self.extract_warmup:
            check_int(self.extract_rank, "extract_rank", ge=1, where=_WHERE, fix="e.g. 8")
        if self.extract_basis not in ("top", "random"):
            raise ValueError(f"extract_basis must be 'top' or 'random', got {self.extract_basis!r}")
        if self.extract_moments not in ("project", "reset"):
            raise ValueError(f"extract_moments must be 'project' or 'reset', got {self.extract_moments!r}")
        if self.extract_warmup and not _split(self.extract_targets):
            raise ValueError("extract_warmup > 0 needs extract_targets: the nn.Linear modules to extract")

    @property
    def spec_target_list(self) -> list[str]:
        return _split(self.spec_targets)

    @property
    def spec_track_list(self) -> list[str]:
        return _split(self.spec_track)

    @property
    def uses_directional_optimizer(self) -> bool:
        return (
            self.magnitude_lr_ratio != 1.0 or self.spectral_clamp is not None or self.amplify > 1
            or self.extract_warmup > 0
        )
