"""SubspaceLoRA: fine-tune each weight inside its own top-k singular subspace (W = R + U C V^T, C trained).
Importing this package registers the method with peft (as peft's own tuner packages do)."""

from ..registry import register
from .config import SubspaceLoraConfig
from .layer import SubspaceLoraLayer
from .model import SubspaceLoraModel


def register_type() -> None:
    """Register SUBSPACE_LORA with peft (idempotent)."""
    register("subspace_lora", SubspaceLoraConfig, SubspaceLoraModel, prefix=SubspaceLoraModel.prefix)


register_type()

__all__ = ["SubspaceLoraConfig", "SubspaceLoraLayer", "SubspaceLoraModel", "register_type"]
