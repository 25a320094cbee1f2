"""trainer_ext: transformers Trainer integrations of peft-ext.

* `SpectralMonitorCallback`: top-k singular subspaces of chosen matrices (and where gradients and momenta lie
  relative to them), logged through `report_to` every N optimizer updates; CSV/JSON and plots at the end.
* `create_directional_optimizer`: parameter groups by role with LR multipliers, spectral clamps of adapter
  branches, amplification of the update inside stable subspaces (with a bulk-only control).
* `SpectralTrainer` / `SpectralTrainingArguments`: both wired from arguments (and command-line flags).
"""

from .args import SpectralTrainingArguments
from .callbacks import SpectralMonitorCallback
from .optim import DirectionalOptimizer, create_directional_optimizer
from .trainer import SpectralTrainer

__all__ = [
    "DirectionalOptimizer",
    "SpectralMonitorCallback",
    "SpectralTrainer",
    "SpectralTrainingArguments",
    "create_directional_optimizer",
]
