"""trainer_ext: transformers Trainer integrations of peft-ext.

Spectral monitoring (SpectralMonitorCallback), directional learning rates and warm-up extraction land here
(issue 4 and 5). The package is installed with peft-ext so those additions need no packaging change.
"""
