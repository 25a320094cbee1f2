from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .._checks import check_number
from .._config_fields import check_bool, check_shared_fields, shown
from .._tuners import TargetFields, validate_target_fields
from ..registry import ensure_peft_type
from .quant import BASE_KINDS
from .select import SELECTORS

LAYOUTS = ("csr", "fused")
VALUE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class OrthoSplitConfig(PeftConfig, TargetFields):
    """Configuration of an OrthoSplit adapter: each target weight becomes a dense base stream plus a sparse ortho stream.

    Per target layer with weight W a selector picks ``k = round(density * out * in)`` entries (the mask M) of a
    candidate residual D: ``D = W - W_ref`` with reference weights (the fine-tuning delta), else ``D = W - Q(W)`` (the
    quantisation residual). The base stream is ``B = Q(W - M * D)`` (M * D removed, then quantised with `base_kind`),
    the ortho stream holds ``O = (W - B)[M]`` sparsely, and the layer computes ``y = B x + alpha * O x + bias``.
    alpha=1 gives W back on M (exactly W everywhere with base_kind='none'); alpha=0 leaves the base stream alone.

    `get_peft_model(model, config)` splits at once the adapters that need only W (selector magnitude, relative or
    random, without reference weights); for the others it creates placeholders that
    `peft_ext.initialize_orthosplit(model, reference=..., stats=..., fisher=..., forget=..., retain=...)` fills.
    `peft_ext.orthosplit(model, config, ...)` does both in one call. Set alpha with `peft_ext.set_ortho_alpha(model,
    a)` or `with peft_ext.ortho_alpha(model, a):`.
    """

    base_kind: Literal["none", "fp16", "bf16", "int8", "int4", "nf4", "bnb_nf4", "bnb_int8"] = field(
        default="int8",
        metadata={"help": "Base stream: 'none' (full precision), 'fp16'/'bf16' casts, 'int8'/'int4' per-row "
                  "round-to-nearest, 'nf4' (QLoRA's code book, pure torch), 'bnb_nf4'/'bnb_int8' (bitsandbytes)."},
    )
    density: float = field(
        default=0.01, metadata={"help": "Fraction of each target weight's entries the ortho stream holds, in (0, 1)."}
    )
    selector: Literal["magnitude", "relative", "obs", "fisher", "contrastive", "random"] = field(
        default="magnitude",
        metadata={"help": "How entries are chosen: 'magnitude' |D|, 'relative' |D|/|W|, 'obs' D^2/diag(H^-1) (needs "
                  "stats), 'fisher' F D^2/2 (needs fisher), 'contrastive' forget minus retain loss change (needs "
                  "forget and retain saliency), 'random' (control)."},
    )
    contrastive_lambda: float = field(
        default=1.0, metadata={"help": "Weight of the retain-set loss change in the contrastive score (>= 0)."}
    )
    obs_damp: float = field(
        default=0.01, metadata={"help": "Damping of H for the 'obs' selector, as a fraction of mean(diag H)."}
    )
    layout: Literal["csr", "fused"] = field(
        default="csr",
        metadata={"help": "'csr': base matmul plus a sparse CSR matmul when alpha != 0 (lean memory); 'fused': one "
                  "dense matmul with B + alpha * O cached for the current alpha (fastest, one extra dense copy)."},
    )
    values_dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="float16",
        metadata={"help": "dtype of the ortho values in a saved adapter (the split rounds them to it, so saving is "
                  "exact; trained values are saved as they trained). At run time they follow PEFT's rule for adapter "
                  "weights: float32 with autocast_adapter_dtype (PEFT's default), the model's dtype without."},
    )
    train_ortho: bool = field(
        default=False,
        metadata={"help": "Train the ortho values (isolated adaptation: the base stream stays frozen, updates live "
                  "only on the selected entries and vanish at alpha=0)."},
    )
    uses_reference: bool = field(
        default=False,
        metadata={"help": "Whether reference weights (the model before fine-tuning) define the residual: then "
                  "get_peft_model leaves placeholders for initialize_orthosplit(model, reference=...), and each layer "
                  "also stores the reference values on its mask, so the base stream can be rebuilt on load. Set by "
                  "initialize_orthosplit and orthosplit from their reference argument."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' selector."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("ortho_split")
        name = "OrthoSplitConfig"
        if self.base_kind not in BASE_KINDS:
            raise ValueError(f"{name}.base_kind must be one of {BASE_KINDS}, got base_kind={shown(self.base_kind)}")
        check_number(self.density, "density", gt=0, lt=1, where=f"{name}.",
                     why="the fraction of entries in the ortho stream", fix="e.g. density=0.01 for 1%")
        if self.selector not in SELECTORS:
            raise ValueError(f"{name}.selector must be one of {SELECTORS}, got selector={shown(self.selector)}")
        check_number(self.contrastive_lambda, "contrastive_lambda", ge=0, where=f"{name}.")
        check_number(self.obs_damp, "obs_damp", gt=0, where=f"{name}.", fix="the default is 0.01")
        if self.layout not in LAYOUTS:
            raise ValueError(f"{name}.layout must be one of {LAYOUTS}, got layout={shown(self.layout)}")
        if self.values_dtype not in VALUE_DTYPES:
            raise ValueError(f"{name}.values_dtype must be one of {VALUE_DTYPES}, got values_dtype={shown(self.values_dtype)}")
        for flag in ("train_ortho", "uses_reference"):
            check_bool(self, name, flag)
        if self.layout == "fused" and self.base_kind in ("bnb_nf4", "bnb_int8"):
            raise ValueError(
                f"{name}.layout='fused' needs a dense base stream, but base_kind={self.base_kind!r} runs bitsandbytes' "
                "quantised kernels; use layout='csr'"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"{name}.seed must be an integer, got seed={shown(self.seed)}; e.g. seed=0")
        check_shared_fields(self, name)
        validate_target_fields(self, name)
