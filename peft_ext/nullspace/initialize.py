"""Calibrate NullSpaceLoRA adapters and verify the null-space property, layer by layer."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..linalg import eigh_tail, energy_ratio
from ..stats import ActivationStats, collect_stats, canonical_name
from .config import NullSpaceLoraConfig
from .layer import NullSpaceLoraLayer

# Thresholds of the verification (the seed note's troubleshooting section).
RATIO_MAX = 0.1  # ||A x|| / ||x|| on held-out tokens
INIT_OUTPUT_MAX = 1e-3  # ||dW x|| / ||x|| right after initialisation
EIG_RATIO_MAX = 0.1  # lambda_min / lambda_max of C


@dataclass
class LayerReport:
    layer: str
    in_features: int
    r: int
    tokens: int
    lambda_min: float
    lambda_max: float
    eig_ratio: float  # lambda_min / lambda_max
    tail_energy: float  # sum of the r smallest eigenvalues / sum of all (calibration data)
    heldout_ratio: float  # sqrt(sum ||A x||^2 / sum ||x||^2) on held-out tokens
    init_output_ratio: float  # sqrt(sum ||dW x||^2 / sum ||x||^2) on held-out tokens, right after init
    flags: list[str] = field(default_factory=list)


@dataclass
class NullSpaceReport:
    """What `initialize_nullspace_lora` did, per layer. `print(report)` shows a table; `to_json()` the data."""

    adapter_name: str
    mode: str
    heldout: str  # where the held-out tokens came from
    layers: list[LayerReport]

    @property
    def warnings(self) -> list[str]:
        return [f"{lr.layer}: {flag}" for lr in self.layers for flag in lr.flags]

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_name": self.adapter_name, "mode": self.mode, "heldout": self.heldout,
                "layers": [asdict(lr) for lr in self.layers]}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    def __str__(self) -> str:
        head = ["layer", "d_in", "r", "tokens", "λmin/λmax", "tail energy", "‖Ax‖/‖x‖", "‖ΔWx‖/‖x‖ init", "flags"]
        rows = [
            [lr.layer, str(lr.in_features), str(lr.r), str(lr.tokens), f"{lr.eig_ratio:.2e}", f"{lr.tail_energy:.2e}",
             f"{lr.heldout_ratio:.2e}", f"{lr.init_output_ratio:.1e}", ",".join(f.split(":")[0] for f in lr.flags) or "ok"]
            for lr in self.layers
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        lines = [f"NullSpaceLoRA adapter {self.adapter_name!r} (mode {self.mode}); held-out tokens: {self.heldout}",
                 fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        n_flagged = sum(1 for lr in self.layers if lr.flags)
        lines.append(f"{len(self.layers)} layers, {n_flagged} flagged" + (": see report.warnings" if n_flagged else ""))
        return "\n".join(lines)


def nullspace_layers(model: nn.Module, adapter_name: str) -> dict[str, NullSpaceLoraLayer]:
    """canonical layer name -> NullSpaceLoRA layer carrying `adapter_name`."""
    return {
        canonical_name(n): m
        for n, m in model.named_modules()
        if isinstance(m, NullSpaceLoraLayer) and adapter_name in m.nullspace_A
    }


@torch.no_grad()
def initialize_nullspace_lora(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    *,
    stats: ActivationStats | None = None,
    heldout_dataloader: Iterable[Any] | None = None,
    heldout_every: int = 10,
    adapter_name: str | None = None,
    max_batches: int | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    warn: bool = True,
) -> NullSpaceReport:
    """Set each NullSpaceLoRA layer's down projection to the null space of its inputs and verify it.

    Statistics come from `dataloader` (collected with the adapters disabled, i.e. on the base model's behaviour)
    or from `stats` (e.g. `ActivationStats.load(path)`). Held-out tokens for the verification come from
    `heldout_dataloader`, else every `heldout_every`-th batch of `dataloader` is held out of the statistics; with
    precomputed `stats` and no held-out data the check is in-sample (the report says so).

    Everything is validated and computed before any weight is written: on error the model is unchanged.
    """
    adapter_name = adapter_name or _active_adapter(model)
    config = _peft_config(model, adapter_name)
    layers = nullspace_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no NullSpaceLoRA layers for adapter {adapter_name!r}")
    if stats is None and dataloader is None:
        raise ValueError("pass a calibration dataloader or stats=ActivationStats.load(path)")
    if stats is not None and dataloader is not None:
        raise ValueError("pass either dataloader or stats, not both")
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2 (every k-th batch is held out), got {heldout_every}")

    names = list(layers)
    heldout_stats = None
    with _adapters_disabled(model):
        if stats is None:
            route = None if heldout_dataloader is not None else (lambda i: i % heldout_every == heldout_every - 1)
            stats, heldout_stats = collect_stats(
                model, dataloader, names, dtype=dtype, heldout=route, max_batches=max_batches, progress=progress
            )
        if heldout_dataloader is not None:
            heldout_stats, _ = collect_stats(model, heldout_dataloader, names, dtype=dtype, progress=progress)
    heldout_desc = (
        "held-out dataloader" if heldout_dataloader is not None
        else f"every {heldout_every}th calibration batch" if heldout_stats is not None
        else "calibration data (in-sample: no held-out batches)"
    )

    # 1) validate everything
    for name, layer in layers.items():
        _check_layer_stats(stats, name, layer, "calibration")
        if heldout_stats is not None:
            _check_layer_stats(heldout_stats, name, layer, "held-out")

    # 2) decompose (once per distinct input: q/k/v share theirs)
    decomps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    plan = {}
    for name, layer in layers.items():
        owner = stats.owner(name)
        r = layer.r[adapter_name]
        key = (owner, r)
        if key not in decomps:
            decomps[key] = eigh_tail(stats.covariance(name), r, dtype=torch.float64)
        plan[name] = key

    # 3) write
    for name, layer in layers.items():
        layer.set_nullspace_basis(adapter_name, decomps[plan[name]][1])

    # 4) verify on held-out tokens, in closed form from their covariance
    reports = []
    for name, layer in layers.items():
        tail_vals, tail_vecs, all_vals = decomps[plan[name]]
        check_cov = (heldout_stats or stats).covariance(name)
        a = layer.nullspace_A[adapter_name].weight
        delta = layer.get_delta_weight(adapter_name)
        delta_in_out = delta.T if layer.fan_in_fan_out else delta  # (out, in)
        lam = all_vals.clamp_min(0)
        lmax = float(lam[-1])
        rep = LayerReport(
            layer=name,
            in_features=layer.in_features,
            r=layer.r[adapter_name],
            tokens=stats.token_count(name),
            lambda_min=float(lam[0]),
            lambda_max=lmax,
            eig_ratio=float(lam[0]) / lmax if lmax > 0 else 0.0,
            tail_energy=float(tail_vals.clamp_min(0).sum() / lam.sum()) if lam.sum() > 0 else 0.0,
            heldout_ratio=math.sqrt(max(energy_ratio(a, check_cov), 0.0)),
            init_output_ratio=math.sqrt(max(energy_ratio(delta_in_out, check_cov), 0.0)),
        )
        if rep.heldout_ratio > RATIO_MAX:
            rep.flags.append(f"ratio: ||Ax||/||x|| = {rep.heldout_ratio:.3f} > {RATIO_MAX}; reduce r or check the covariance")
        if rep.init_output_ratio > INIT_OUTPUT_MAX:
            rep.flags.append(f"init: ||dW x||/||x|| = {rep.init_output_ratio:.2e} > {INIT_OUTPUT_MAX}; initialisation bug")
        if rep.eig_ratio > EIG_RATIO_MAX:
            rep.flags.append(f"eig: lambda_min/lambda_max = {rep.eig_ratio:.3f} > {EIG_RATIO_MAX}; "
                             "use more or different calibration data")
        reports.append(rep)
    report = NullSpaceReport(adapter_name=adapter_name, mode=config.mode, heldout=heldout_desc, layers=reports)
    if warn and report.warnings:
        shown = report.warnings[:5]
        more = len(report.warnings) - len(shown)
        warnings.warn("NullSpaceLoRA verification flagged layers:\n  " + "\n  ".join(shown)
                      + (f"\n  ... and {more} more (report.warnings)" if more > 0 else ""), stacklevel=2)
    return report


def _check_layer_stats(stats: ActivationStats, name: str, layer: NullSpaceLoraLayer, what: str) -> None:
    if name not in stats or stats.token_count(name) == 0:
        raise ValueError(
            f"{what} data reached layer {name!r} with zero tokens"
            + ("" if name in stats else " (the statistics have no entry for it: they were collected for other "
               "target modules or another model)")
            + "; use data and target_modules that reach every adapted layer"
        )
    if stats.dim(name) != layer.in_features:
        source = stats.metadata.get("model_name_or_path") or "another model"
        raise ValueError(
            f"{what} statistics for layer {name!r} have input dimension {stats.dim(name)}, but the layer takes "
            f"{layer.in_features}: they come from {source}, not this model. Recollect them on this model."
        )


def _active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, list):
        active = active[0] if len(active) == 1 else None
    if not isinstance(active, str):
        raise ValueError("cannot tell which adapter to initialise: pass adapter_name=")
    return active


def _peft_config(model: nn.Module, adapter_name: str) -> NullSpaceLoraConfig:
    configs = getattr(model, "peft_config", None)
    if not configs or adapter_name not in configs:
        raise ValueError(f"model has no PEFT adapter named {adapter_name!r}; create it with get_peft_model first")
    config = configs[adapter_name]
    if not isinstance(config, NullSpaceLoraConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a NullSpaceLoraConfig")
    return config


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module):
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield
    else:
        yield
