"""Small helpers shared by recipes and benchmarks."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    """One line naming the machine figures came from, recorded next to every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"
