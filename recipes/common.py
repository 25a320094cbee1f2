"""Small helpers shared by recipes and benchmarks."""

from __future__ import annotations

import contextlib
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


def comma_choices(parser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """The names of a comma list flag, each checked against `allowed` (duplicates dropped, order kept); a bad or
    empty list ends the program through `parser.error` with the flag, what was given and the choices."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        parser.error(f"{flag} got {bad or value!r}: unknown or missing name(s); choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def recipe_runtime(threads: int):
    """What a recipe's main() runs inside: transformers' logging quiet (errors only, no progress bars) and `threads`
    torch threads, the previous count restored afterwards (main() may run inside another program, e.g. the tests)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
