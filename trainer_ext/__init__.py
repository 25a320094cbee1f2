"""trainer_ext: transformers Trainer integrations of peft-ext.

* `SpectralMonitorCallback`: top-k singular subspaces of chosen matrices (and where gradients and momenta lie
  relative to them), logged through `report_to` every N optimizer updates; CSV/JSON and plots at the end.
* `create_directional_optimizer`: parameter groups by role with LR multipliers, spectral clamps of adapter
  branches, amplification of the update inside stable subspaces (with a bulk-only control).
* `prepare_extraction` / `WarmupExtractionCallback`: warm-up extraction, W = R + U C V^T after N steps with C
  in a high-LR group from the start and R kept out of the subspace.
* `ForgettingCallback`: cross-entropy on held-out reference text and KL to the base model, logged while training.
* `SpectralTrainer` / `SpectralTrainingArguments`: both wired from arguments (and command-line flags).
* `NullSpaceCalibrationCallback`: calibrates a NullSpaceLoRA adapter at the start of `train()` (Trainer,
  SpectralTrainer, TRL's SFTTrainer(peft_config=...)), every rank on its shard, skipped on resume.
"""

from .args import SpectralTrainingArguments
from .calibration import NullSpaceCalibrationCallback
from .callbacks import SpectralMonitorCallback
from .forgetting import ForgettingCallback
from .extraction import EXTRACTION_MAGNITUDE_PATTERNS, ExtractableLinear, WarmupExtractionCallback, prepare_extraction
from .optim import DirectionalOptimizer, create_directional_optimizer
from .trainer import SpectralTrainer

__all__ = [
    "EXTRACTION_MAGNITUDE_PATTERNS",
    "DirectionalOptimizer",
    "ExtractableLinear",
    "ForgettingCallback",
    "NullSpaceCalibrationCallback",
    "WarmupExtractionCallback",
    "prepare_extraction",
    "SpectralMonitorCallback",
    "SpectralTrainer",
    "SpectralTrainingArguments",
    "create_directional_optimizer",
]
