"""NullSpaceLoRA: config, layer, tuner model and calibration (see peft_ext/__init__.py for the public API)."""
