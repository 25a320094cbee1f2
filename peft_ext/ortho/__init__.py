"""OrthoSplit: W = base stream + sparse ortho stream, with a run-time knob alpha (0 drops what the ortho stream holds)."""

from .api import orthosplit, ortho_alpha, ortho_layers, ortho_report, reference_weights, set_ortho_alpha
from .config import OrthoSplitConfig
from .layer import OrthoSplitLayer
from .model import OrthoSplitModel, split_weight
from .saliency import EntrySaliency, entry_saliency

__all__ = [
    "EntrySaliency",
    "OrthoSplitConfig",
    "OrthoSplitLayer",
    "OrthoSplitModel",
    "entry_saliency",
    "ortho_alpha",
    "ortho_layers",
    "ortho_report",
    "orthosplit",
    "reference_weights",
    "set_ortho_alpha",
    "split_weight",
]
