"""OrthoSplit: W = base stream + sparse ortho stream, with a run-time knob alpha (0 drops what the ortho stream holds).
Importing this package registers the method with peft (as peft's own tuner packages do)."""

from ..registry import register
from .config import OrthoSplitConfig
from .initialize import OrthoLayerReport, OrthoSplitReport, initialize_orthosplit, orthosplit
from .layer import OrthoSplitLayer
from .model import OrthoSplitModel, split_weight
from .reference import reference_weights
from .runtime import ortho_alpha, ortho_layers, ortho_report, set_ortho_alpha
from .saliency import EntrySaliency, entry_saliency


def register_type() -> None:
    """Register ORTHO_SPLIT with peft (idempotent)."""
    register("ortho_split", OrthoSplitConfig, OrthoSplitModel, prefix=OrthoSplitModel.prefix)


register_type()

__all__ = [
    "EntrySaliency",
    "OrthoLayerReport",
    "OrthoSplitConfig",
    "OrthoSplitLayer",
    "OrthoSplitModel",
    "OrthoSplitReport",
    "entry_saliency",
    "initialize_orthosplit",
    "ortho_alpha",
    "ortho_layers",
    "ortho_report",
    "orthosplit",
    "reference_weights",
    "register_type",
    "set_ortho_alpha",
    "split_weight",
]
