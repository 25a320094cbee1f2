from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.config import PeftConfig

from .._checks import check_number
from .._config_fields import check_bool, check_shared_fields, shown
from .._tuners import TargetFields, validate_target_fields
from ..registry import ensure_peft_type

MODES = ("v2", "v1", "split")


@dataclass
class NullSpaceLoraConfig(PeftConfig, TargetFields):
    """Configuration of a NullSpaceLoRA adapter (LoRA-Null: adapt in the approximate null space of the inputs).

    The down projection `nullspace_A` (PEFT's `lora_A`) is set by `initialize_nullspace_lora` to the `r`
    eigenvectors of the layer's input covariance C = E[x x^T] with the smallest eigenvalues, so the adapter reads
    the directions the pre-trained inputs barely use and learning the task disturbs pre-trained behaviour least.

    Modes:
      * ``"v2"`` (default): A frozen at the null-space basis, B trainable from 0. Base weight untouched.
      * ``"v1"``: same initialisation, A and B both trainable.
      * ``"split"``: the released LoRA-Null variant. The adapter starts from W P (P = A^T A, the null-space
        projector) and the base keeps W - W P, so the function is unchanged at init and the adapter owns the part
        of W that acts on the null space. Implemented as ``W x + s (B A - B0 A0) x`` with the frozen copy
        ``s B0 A0 = W P`` instead of rewriting W: identical function and gradients, the base weight is never touched
        (quantised bases work, save/load needs nothing special) and the export to LoRA is exact at rank 2r.
    """

    r: int = field(default=16, metadata={"help": "Rank: number of null-space directions per layer (1 <= r <= in_features)."})
    mode: Literal["v2", "v1", "split"] = field(
        default="v2",
        metadata={"help": "'v2': A frozen at the null-space basis, B trained from 0; 'v1': both trained; "
                  "'split': adapter starts from W P and the base effectively keeps W - W P (released LoRA-Null)."},
    )
    nullspace_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "Scaling numerator: the adapter output is multiplied by nullspace_alpha / r "
                  "(default: nullspace_alpha = r, i.e. scaling 1)."},
    )
    nullspace_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Set True for layers that store weight as (in, out), like GPT-2's Conv1D (set automatically)."},
    )
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'nullspace_only'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("nullspace_lora")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"NullSpaceLoraConfig.r must be a positive integer, got r={shown(self.r)}; e.g. r=16")
        if self.mode not in MODES:
            raise ValueError(f"NullSpaceLoraConfig.mode must be one of {MODES}, got mode={shown(self.mode)}")
        if self.nullspace_alpha is None:
            self.nullspace_alpha = float(self.r)
        # finite as well as positive: a NaN or inf scaling passes `<= 0` and turns B into NaN a few steps later
        where = "NullSpaceLoraConfig."
        check_number(self.nullspace_alpha, "nullspace_alpha", gt=0, noun="a finite number", where=where,
                     why="the adapter output is scaled by nullspace_alpha / r",
                     fix=f"leave it unset for nullspace_alpha = r = {self.r}")
        check_number(self.nullspace_dropout, "nullspace_dropout", ge=0, lt=1, where=where,
                     fix="e.g. 0.1, or 0.0 for no dropout")
        check_bool(self, "NullSpaceLoraConfig", "fan_in_fan_out")
        if self.bias not in ("none", "all", "nullspace_only"):
            raise ValueError(
                f"NullSpaceLoraConfig.bias must be 'none', 'all' or 'nullspace_only', got bias={shown(self.bias)}"
            )
        check_shared_fields(self, "NullSpaceLoraConfig")
        validate_target_fields(self, "NullSpaceLoraConfig")

    @property
    def scaling(self) -> float:
        return float(self.nullspace_alpha) / self.r
