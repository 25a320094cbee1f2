"""SubspaceLoRA: fine-tune each weight inside its own top-k singular subspace (W = R + U C V^T, C trained)."""

from .config import SubspaceLoraConfig
from .layer import SubspaceLoraLayer
from .model import SubspaceLoraModel

__all__ = ["SubspaceLoraConfig", "SubspaceLoraLayer", "SubspaceLoraModel"]
