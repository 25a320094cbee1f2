"""NullSpaceLoRA: adapt each layer in the least-used directions of its input (the tail eigenvectors of the input
covariance), so that what the model does on its calibration data is kept. Importing this package registers the
method with peft (as peft's own tuner packages do)."""

from ..registry import register
from .config import NullSpaceLoraConfig
from .initialize import LayerReport, NullSpaceReport, initialize_nullspace_lora
from .layer import NullSpaceLoraLayer
from .model import NullSpaceLoraModel


def register_type() -> None:
    """Register NULLSPACE_LORA with peft (idempotent)."""
    register("nullspace_lora", NullSpaceLoraConfig, NullSpaceLoraModel, prefix=NullSpaceLoraModel.prefix)


register_type()

__all__ = [
    "LayerReport",
    "NullSpaceLoraConfig",
    "NullSpaceLoraLayer",
    "NullSpaceLoraModel",
    "NullSpaceReport",
    "initialize_nullspace_lora",
    "register_type",
]
