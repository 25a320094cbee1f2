"""Small helpers shared by recipes and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import platform

import torch


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none: platform.processor() is often empty or just
    "x86_64" on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def machine_info() -> dict:
    """The machine figures came from, as the benchmarks record it in their JSON ("machine"): processor, cpu_model,
    cpu_count, torch, torch_threads, python, and gpu when CUDA is available."""
    info = {"processor": platform.processor(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine(info: dict | None = None) -> str:
    """One line naming the machine figures came from, recorded next to every result (from `machine_info()`)."""
    m = machine_info() if info is None else info
    cpu = m["cpu_model"] or m["processor"] or platform.machine()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{cpu}, {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads{gpu}, torch {m['torch']}"


def write_json(path: str, payload: dict, indent: int | None = None) -> None:
    """Write a result JSON (what scripts/update_readme.py reads, or a benchmark worker's result) complete or not at
    all (`peft_ext.files.atomic_file`), creating its folder."""
    from peft_ext.files import atomic_file

    with atomic_file(path, field="--json") as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=indent)


def comma_choices(parser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """The names of a comma list flag, each checked against `allowed` (duplicates dropped, order kept); a bad or
    empty list ends the program through `parser.error` with the flag, what was given and the choices."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        parser.error(f"{flag} got {bad or value!r}: unknown or missing name(s); choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_with_preset(args_class, argv: list[str] | None = None, quick_preset: str | None = None):
    """(parser, args) of a recipe's argument dataclass with its YAML preset applied: the preset is `--config` or, when
    that is not given and the recipe's `quick` field is set, `quick_preset`; its keys become defaults, so flags given
    explicitly still win. An unreadable preset or one with keys the dataclass does not have ends the program through `parser.error`."""
    import argparse
    import dataclasses
    import re

    from transformers import HfArgumentParser

    parser = HfArgumentParser(args_class)
    for action in parser._actions:  # argparse %-formats help text: a literal "5%" in a field's help broke --help
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    path = args.config or (quick_preset if getattr(args, "quick", False) else None)
    if path:
        import yaml

        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            parser.error(f"--config {path!r} cannot be read ({e.strerror}); pass an existing YAML file")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(args_class)})
        if unknown:
            parser.error(f"--config {path}: unknown keys {unknown}; use the field names of --help")
        parser.set_defaults(**values)
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    return parser, args


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
