"""Calibrate NullSpaceLoRA adapters and verify the null-space property, layer by layer."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import all_finite
from .._sharded import full, is_dtensor
from .._tuners import JsonReport, adapter_config, text_table
from .._tuners import active_adapter as _active_adapter  # (trainer_ext.calibration imports it from here)
from ..linalg import eigh_tail, energy_ratio
from ..stats import ActivationStats, _model_inputs, collect_stats, canonical_name
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
    # eigenvalues of the calibration covariance (ascending, clamped at 0) at these indices: the whole r-tail and up to
    # peft_ext.plots.SPECTRUM_POINTS in all (plots.spectrum_sample); empty in reports written before they were kept
    spectrum_index: list[int] = field(default_factory=list)
    spectrum: list[float] = field(default_factory=list)

    def check(self) -> None:
        """Append a flag for every threshold this layer misses. Written so that NaN fails them too: `nan > x` is
        False, so a `>` test would pass a NaN layer as healthy."""
        values = {k: getattr(self, k) for k in ("lambda_min", "lambda_max", "eig_ratio", "tail_energy",
                                                  "heldout_ratio", "init_output_ratio")}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            self.flags.append(f"nonfinite: {', '.join(f'{k}={values[k]}' for k in bad)}; the statistics or the "
                              "adapter hold NaN/Inf: check the calibration data and the model's dtype")
        if self.tokens < self.in_features:
            self.flags.append(
                f"tokens: {self.tokens} calibration tokens < {self.in_features} input dimensions, so the covariance "
                f"has rank <= {self.tokens} and the 'null space' is arbitrary among directions no token reached; "
                "calibrate on more tokens than the layer has inputs"
            )
        if not self.heldout_ratio <= RATIO_MAX:
            self.flags.append(f"ratio: ||Ax||/||x|| = {self.heldout_ratio:.3f} > {RATIO_MAX}; reduce r or check the "
                              "covariance")
        if not self.init_output_ratio <= INIT_OUTPUT_MAX:
            self.flags.append(f"init: ||dW x||/||x|| = {self.init_output_ratio:.2e} > {INIT_OUTPUT_MAX}; "
                              "initialisation bug")
        if not self.eig_ratio <= EIG_RATIO_MAX:
            self.flags.append(f"eig: lambda_min/lambda_max = {self.eig_ratio:.3f} > {EIG_RATIO_MAX}; "
                              "use more or different calibration data")


@dataclass
class NullSpaceReport(JsonReport):
    """What `initialize_nullspace_lora` did, per layer. `print(report)` shows a table; `to_json()` the data."""

    adapter_name: str
    mode: str
    heldout: str  # where the held-out tokens came from
    layers: list[LayerReport]
    model_check: str = ""  # whether precomputed statistics were collected on this model (ActivationStats.model_check)

    @property
    def warnings(self) -> list[str]:
        return [f"{lr.layer}: {flag}" for lr in self.layers for flag in lr.flags]

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_name": self.adapter_name, "mode": self.mode, "heldout": self.heldout,
                "model_check": self.model_check, "layers": [asdict(lr) for lr in self.layers]}

    def plot(self, path: str, *, max_layers: int = 16) -> str:
        """A PNG of each layer's calibration spectrum (log scale), its r-tail marked, λmin/λmax annotated: one panel
        per layer, the first `max_layers`. Needs matplotlib (`pip install 'peft-ext[demo]'`). Returns `path`."""
        from ..plots import plot_nullspace_report

        return plot_nullspace_report(self, path, max_layers=max_layers)

    def __str__(self) -> str:
        head = ["layer", "d_in", "r", "tokens", "λmin/λmax", "tail energy", "‖Ax‖/‖x‖", "‖ΔWx‖/‖x‖ init", "flags"]
        rows = [
            [lr.layer, str(lr.in_features), str(lr.r), str(lr.tokens), f"{lr.eig_ratio:.2e}", f"{lr.tail_energy:.2e}",
             f"{lr.heldout_ratio:.2e}", f"{lr.init_output_ratio:.1e}", ",".join(f.split(":")[0] for f in lr.flags) or "ok"]
            for lr in self.layers
        ]
        lines = [f"NullSpaceLoRA adapter {self.adapter_name!r} (mode {self.mode}); held-out tokens: {self.heldout}"]
        lines += [f"statistics vs this model: {self.model_check}"] if self.model_check else []
        lines += text_table(head, rows)
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
    reinitialize: bool = False,
    allow_other_model: bool = False,
) -> NullSpaceReport:
    """Set each NullSpaceLoRA layer's down projection to the null space of its inputs and verify it.

    Statistics come from `dataloader` (collected with the adapters disabled, i.e. on the base model's behaviour)
    or from `stats` (e.g. `ActivationStats.load(path)`). Held-out tokens for the verification come from
    `heldout_dataloader`, else every `heldout_every`-th batch of `dataloader` is held out of the statistics; with
    precomputed `stats` and no held-out data the check is in-sample (the report says so).

    Precomputed `stats` must come from this model: their recorded fingerprint is compared with the model's (tensors
    of the adapter's `modules_to_save` aside), and statistics of another model are refused unless
    `allow_other_model=True`. An adapter that is already initialised (by an earlier call, or loaded from a file) is
    refused unless `reinitialize=True`: this writes a new basis into A and resets B, which loses any training.

    Everything is validated and computed before any weight is written: on error the model is unchanged.

    FSDP2 (layers wrapped with `fully_shard` after `get_peft_model`, as accelerate does): call it on every rank, each
    with its own share of the data. The statistics are all-reduced, rank 0's basis is written into every rank's rows
    of A (and B), and v1/v2 never read W (split mode gathers it whole, layer by layer). Every forward pass under FSDP
    is a collective, so a rank that runs out of batches early keeps running unrecorded forwards on its last batch
    until all are done (a rank with no batch at all is refused, on every rank).
    """
    adapter_name = adapter_name or _active_adapter(model)
    config = adapter_config(model, adapter_name, NullSpaceLoraConfig)
    layers = nullspace_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no NullSpaceLoRA layers for adapter {adapter_name!r}")
    if stats is None and dataloader is None:
        raise ValueError("pass a calibration dataloader or stats=ActivationStats.load(path)")
    if stats is not None and dataloader is not None:
        raise ValueError("pass either dataloader or stats, not both")
    if stats is not None and not isinstance(stats, ActivationStats):
        raise TypeError(f"stats must be an ActivationStats, got a {type(stats).__name__}; use "
                        "stats=ActivationStats.load(path) or ActivationStats.collect(model, data)")
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2 (every k-th batch is held out), got {heldout_every}")
    if not reinitialize:
        _refuse_reinitialization(layers, adapter_name)

    model_check = "collected on this model by this call"
    if stats is not None:
        stats.validate()  # NaN sums, negative counts, a layer without a count: refused before anything reads them
        same, model_check = stats.model_check(model, ignore_modules=config.modules_to_save or ())
        if same is False:
            if not allow_other_model:
                source = stats.metadata.get("model_name_or_path") or "an unnamed model"
                raise ValueError(
                    f"the statistics were collected on another model ({source}): {model_check}. Their null spaces "
                    "belong to that model's inputs. Recollect them on this model (ActivationStats.collect(model, "
                    "data)), or pass allow_other_model=True if you know the difference cannot reach the adapted "
                    "layers' inputs"
                )
            model_check = f"other model, allowed by allow_other_model=True: {model_check}"

    names = list(layers)
    heldout_stats = None
    if _sharded(layers, adapter_name):
        dataloader = None if dataloader is None else _Lockstep(model, dataloader, max_batches)
        heldout_dataloader = None if heldout_dataloader is None else _Lockstep(model, heldout_dataloader, None)
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
    decomps: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    plan = {}
    for name, layer in layers.items():
        owner = stats.owner(name)
        r = layer.r[adapter_name]
        key = (owner, r)
        if key not in decomps:
            decomps[key] = eigh_tail(stats.covariance(name), r, dtype=torch.float64)
            if not all_finite(*decomps[key]):
                raise ValueError(f"the eigendecomposition of the input covariance of layer {name!r} is not finite "
                                 "(values too large for float64?); check the calibration data")
        plan[name] = key

    # 3) write; should anything below still fail, the layers get back what they held (complete-or-unchanged)
    saved = {name: _layer_state(layer, adapter_name) for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.set_nullspace_basis(adapter_name, decomps[plan[name]][1])
        reports = [_verify(name, layer, adapter_name, decomps[plan[name]], stats, heldout_stats)
                   for name, layer in layers.items()]
    except BaseException:
        for name, layer in layers.items():
            _restore_layer_state(layer, adapter_name, saved[name])
        raise
    report = NullSpaceReport(adapter_name=adapter_name, mode=config.mode, heldout=heldout_desc, layers=reports,
                             model_check=model_check)
    if warn:
        warn_flagged_layers(report)
    return report


def warn_flagged_layers(report: NullSpaceReport) -> None:
    """One UserWarning listing the layers the verification flagged (none: no warning), attributed to the user's code:
    the first frame outside peft_ext/trainer_ext, torch.no_grad's wrapper and the Trainer (transformers, trl,
    accelerate), so also the `trainer.train()` line when NullSpaceCalibrationCallback calibrates."""
    if not report.warnings:
        return
    shown = report.warnings[:5]
    more = len(report.warnings) - len(shown)
    warnings.warn("NullSpaceLoRA verification flagged layers:\n  " + "\n  ".join(shown)
                  + (f"\n  ... and {more} more (report.warnings)" if more > 0 else ""),
                  stacklevel=_user_stacklevel())


def _library_dirs() -> tuple[str, ...]:
    import importlib.util

    dirs = []
    for package in ("peft_ext", "trainer_ext", "transformers", "trl", "accelerate"):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.submodule_search_locations:
                dirs += [os.path.join(os.path.realpath(p), "") for p in spec.submodule_search_locations]
    return tuple(dirs)


def _user_stacklevel() -> int:
    """The `stacklevel` that makes a warning issued by the caller of this function point at the first frame outside
    the libraries (`warnings.warn(skip_file_prefixes=...)` does this from Python 3.12; we support 3.10+). torch's
    decorator frames (`torch/utils/_contextlib.py`) are skipped by name, torch itself is not: a user's module could
    be called from torch (a hook)."""
    skip = _library_dirs()
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if not (path.startswith(skip) or path.endswith(os.path.join("torch", "utils", "_contextlib.py"))):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _verify(name: str, layer: NullSpaceLoraLayer, adapter_name: str,
            decomp: tuple[torch.Tensor, torch.Tensor, torch.Tensor], stats: ActivationStats,
            heldout_stats: ActivationStats | None) -> LayerReport:
    """The layer's report, checked on held-out tokens in closed form from their covariance."""
    tail_vals, _, all_vals = decomp
    check_cov = (heldout_stats or stats).covariance(name)
    # whole factors (all-gathered under FSDP2), so the delta is formed here rather than by get_delta_weight
    a, b = full(layer.nullspace_A[adapter_name].weight), full(layer.nullspace_B[adapter_name].weight)
    da, db = a, b  # delta W = scaling * db @ da, as layer.lora_factors forms it
    if layer.mode[adapter_name] == "split":
        da = torch.cat([a, layer.nullspace_A0[adapter_name].to(a.dtype)], dim=0)
        db = torch.cat([b, -layer.nullspace_B0[adapter_name].to(b.dtype)], dim=1)
    delta_in_out = (db.double() @ da.double()) * layer.scaling[adapter_name]  # (out, in)
    lam = all_vals.clamp_min(0)
    lmax = float(lam[-1])
    from ..plots import spectrum_sample

    spectrum_index, spectrum = spectrum_sample(lam.tolist(), layer.r[adapter_name])
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
        spectrum_index=spectrum_index,
        spectrum=spectrum,
    )
    rep.check()
    return rep


def _refuse_reinitialization(layers: dict[str, NullSpaceLoraLayer], adapter_name: str) -> None:
    done = [name for name, layer in layers.items() if layer.is_initialized(adapter_name)]
    if not done:
        return
    mode = next(iter(layers.values())).mode[adapter_name]
    # what training has put into B: B itself from B = 0 (v1, v2), B - B0 from B = B0 (split)
    moved = 0.0
    for name in done:
        layer = layers[name]
        b = full(layer.nullspace_B[adapter_name].weight.detach()).double()
        if mode == "split":
            b = b - layer.nullspace_B0[adapter_name].to(b)
        moved += float(b.pow(2).sum())
    update = "||B - B0||" if mode == "split" else "||B||"
    lost = (f"its trained update ({update} = {math.sqrt(moved):.3g} over {len(done)} layer(s)"
            + (", and the trained A of mode v1" if mode == "v1" else "") + ") would be lost"
            if moved > 0 else "its current basis in A would be replaced (B is still at its initial value)")
    raise ValueError(
        f"NullSpaceLoRA adapter {adapter_name!r} is already initialised ({len(done)} of {len(layers)} layers, e.g. "
        f"{done[0]!r}): initialising again writes a new null-space basis into A and resets B, so {lost}. Pass "
        "reinitialize=True to start it over, or add a fresh adapter (model.add_adapter(name, config)) and "
        "initialise that one"
    )


def _layer_state(layer: NullSpaceLoraLayer, adapter_name: str) -> dict[str, Any]:
    """What `set_nullspace_basis` changes on one layer, copied, so a failed call can put it back."""
    state: dict[str, Any] = {
        "A": layer.nullspace_A[adapter_name].weight.detach().clone(),
        "B": layer.nullspace_B[adapter_name].weight.detach().clone(),
        "initialized": layer.is_initialized(adapter_name),
    }
    for key, buffers in (("A0", layer.nullspace_A0), ("B0", layer.nullspace_B0)):
        if adapter_name in buffers:
            state[key] = buffers[adapter_name]  # set_nullspace_basis assigns new tensors: keep the old ones
    return state


def _restore_layer_state(layer: NullSpaceLoraLayer, adapter_name: str, state: dict[str, Any]) -> None:
    layer.nullspace_A[adapter_name].weight.copy_(state["A"])
    layer.nullspace_B[adapter_name].weight.copy_(state["B"])
    layer.set_initialized(adapter_name, state["initialized"])
    for key, buffers in (("A0", layer.nullspace_A0), ("B0", layer.nullspace_B0)):
        if key in state:
            buffers[adapter_name] = state[key]


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
    # all-zero inputs leave nothing to compare against: the verification would divide by a zero trace after writing
    if not stats.trace(name) > 0:
        raise ValueError(
            f"{what} inputs of layer {name!r} are all zero over {stats.token_count(name)} tokens, so every direction "
            "is 'null' and none is preferred; exclude the layer (exclude_modules) or use data that reaches it"
        )


def _sharded(layers: dict[str, NullSpaceLoraLayer], adapter_name: str) -> bool:
    """Whether the adapter's factors are FSDP2 shards (DTensors); the same answer on every rank."""
    return any(is_dtensor(layer.nullspace_A[adapter_name].weight) for layer in layers.values())


class _Lockstep:
    """The batches of `data` (at most `max_batches`), with every rank stepping together under FSDP2.

    Each forward pass of a sharded model all-gathers the weights of every wrapped module, so all ranks must run the
    same number of them: before each batch the ranks exchange whether they still have one. A rank that has run out
    while others have not runs its last batch through the model itself, outside the statistics recorder's batch
    scope (so nothing is recorded), and ends its iteration only when every rank has. A rank that never had a batch
    has nothing to run: every rank then raises the same error.
    """

    def __init__(self, model: nn.Module, data: Iterable[Any], max_batches: int | None) -> None:
        self.model, self.data, self.max_batches = model, data, max_batches

    def __len__(self) -> int:
        n = len(self.data)  # type: ignore[arg-type]  (TypeError without a length: the progress bar copes)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self):
        import torch.distributed as dist

        from ..stats import _collective_device, _input_device

        it = iter(self.data) if self.max_batches is None else itertools.islice(iter(self.data), self.max_batches)
        device, world, last = _collective_device(), dist.get_world_size(), None
        while True:
            batch = next(it, _END)
            has = batch is not _END
            last = batch if has else last
            flags = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
            dist.all_gather(flags, torch.tensor([int(has), int(last is None)], dtype=torch.int64, device=device))
            flags = torch.stack(flags).cpu()
            if not bool(flags[:, 0].any()):
                return
            empty = [r for r in range(world) if flags[r, 1]]
            if empty:  # decided on every rank from the same flags, before any rank starts a forward
                raise ValueError(
                    f"initialize_nullspace_lora under FSDP: rank(s) {empty} got no calibration batch while others did, "
                    "and every forward pass of a sharded model needs all ranks; give every rank at least one batch "
                    "(fewer ranks, or more batches)"
                )
            if has:
                yield batch
                continue
            inputs, _ = _model_inputs(last, _input_device(self.model))
            self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)  # unrecorded: keeps step


_END = object()


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module):
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield
    else:
        yield
