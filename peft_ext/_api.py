"""The public API of peft_ext, which `peft_ext/__init__.py` re-exports and whose `register_types()` it calls.

Apart from the package so that the `peft-ext` command can answer --help and --version without importing torch
(see `peft_ext/__init__.py`).
"""

from . import nullspace, ortho, subspace  # each tuner package registers itself with peft when imported
from .bnb_cpu import disable_bnb_cpu_repack
from .export import export_to_lora, lora_state_dict
from .files import save_adapter_atomic
from .nullspace import (
    NullSpaceLoraConfig,
    NullSpaceLoraLayer,
    NullSpaceLoraModel,
    NullSpaceReport,
    initialize_nullspace_lora,
)
from .ortho import (
    EntrySaliency,
    OrthoSplitConfig,
    OrthoSplitLayer,
    OrthoSplitModel,
    OrthoSplitReport,
    entry_saliency,
    initialize_orthosplit,
    ortho_alpha,
    ortho_report,
    orthosplit,
    set_ortho_alpha,
)
from .registry import missing_type_hint
from .stats import ActivationStats, StatsRecorder, cached_stats, collect_stats, data_fingerprint, model_fingerprint
from .subspace import SubspaceLoraConfig, SubspaceLoraLayer, SubspaceLoraModel


def register_types() -> None:
    """Register our PEFT types with peft (idempotent: importing each tuner package already did; this re-checks)."""
    for package in (nullspace, ortho, subspace):
        package.register_type()


__all__ = [
    "ActivationStats",
    "EntrySaliency",
    "OrthoSplitConfig",
    "OrthoSplitLayer",
    "OrthoSplitModel",
    "OrthoSplitReport",
    "NullSpaceLoraConfig",
    "NullSpaceLoraLayer",
    "NullSpaceLoraModel",
    "NullSpaceReport",
    "StatsRecorder",
    "SubspaceLoraConfig",
    "SubspaceLoraLayer",
    "SubspaceLoraModel",
    "cached_stats",
    "collect_stats",
    "data_fingerprint",
    "disable_bnb_cpu_repack",
    "entry_saliency",
    "export_to_lora",
    "initialize_nullspace_lora",
    "initialize_orthosplit",
    "lora_state_dict",
    "missing_type_hint",
    "model_fingerprint",
    "ortho_alpha",
    "ortho_report",
    "orthosplit",
    "save_adapter_atomic",
    "set_ortho_alpha",
]
