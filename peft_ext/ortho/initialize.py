"""Initialise OrthoSplit adapters from data and report what each layer's split holds.

The protocol of peft-ext's data-driven tuners (the shape of PEFT's EVA): `get_peft_model` creates the adapter (split
at once from W alone when the selector needs nothing else, placeholders otherwise), `initialize_orthosplit(model,
reference=..., stats=..., fisher=..., forget=..., retain=..., adapter_name=...)` validates everything, then fills every
layer and returns an `OrthoSplitReport`. `orthosplit(model, config, ...)` does both in one call. The tensors reach the
layers as arguments of these calls: PEFT's config stays JSON, and nothing travels through module-level state.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .._checks import all_finite
from .._progress import progress_bar
from .._sharded import is_dtensor
from .._tuners import JsonReport, active_adapter, adapter_config, planned_targets, text_table
from .config import OrthoSplitConfig
from .layer import SPLIT_BEFORE_SHARDING, OrthoSplitLayer
from .model import (
    LayerInputs,
    OrthoSplitModel,
    _dense_weight,
    layer_generator,
    split_weight_with_share,
    splits_from_weight_alone,
    unsupported_reason,
)
from .reference import Reference, _out_in, _strip, reference_weights
from .saliency import EntrySaliency
from .select import NEEDS, hessian_inverse_diagonal

EMPTY = "empty: the ortho stream holds only zeros (no residual on this layer: was it changed by the fine-tune?)"


@dataclass
class OrthoLayerReport:
    layer: str
    shape: list[int]  # (out, in)
    entries: int  # entries in the ortho stream, round(density * out * in)
    residual_share: float  # ||D[M]||^2 / ||D||^2: the share of the candidate residual's energy on the mask
    max_value: float  # largest |value| in the ortho stream
    flags: list[str] = field(default_factory=list)


@dataclass
class OrthoSplitReport(JsonReport):
    """What `initialize_orthosplit` did, per layer. `print(report)` shows a table; `to_json()` the data."""

    adapter_name: str
    selector: str
    base_kind: str
    density: float
    residual: str  # what the mask was chosen from
    inputs: list[str]  # the data the split used, one line per argument
    layers: list[OrthoLayerReport]

    @property
    def warnings(self) -> list[str]:
        return [f"{lr.layer}: {flag}" for lr in self.layers for flag in lr.flags]

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_name": self.adapter_name, "selector": self.selector, "base_kind": self.base_kind,
                "density": self.density, "residual": self.residual, "inputs": self.inputs,
                "layers": [asdict(lr) for lr in self.layers]}

    def __str__(self) -> str:
        head = ["layer", "(out, in)", "entries", "residual on mask", "max |value|", "flags"]
        rows = [[lr.layer, f"({lr.shape[0]}, {lr.shape[1]})", str(lr.entries), f"{lr.residual_share:.1%}",
                 f"{lr.max_value:.2e}", ",".join(f.split(":")[0] for f in lr.flags) or "ok"] for lr in self.layers]
        lines = [f"OrthoSplit adapter {self.adapter_name!r} (selector {self.selector}, base {self.base_kind}, density "
                 f"{self.density:g}); mask chosen from the {self.residual}",
                 f"inputs: {'; '.join(self.inputs) if self.inputs else 'the weights alone'}"]
        lines += text_table(head, rows)
        n_flagged = sum(1 for lr in self.layers if lr.flags)
        lines.append(f"{len(self.layers)} layers, {n_flagged} flagged" + (": see report.warnings" if n_flagged else ""))
        return "\n".join(lines)


def initialize_orthosplit(
    model: nn.Module,
    *,
    reference: Optional[Reference] = None,
    stats: Any = None,
    fisher: Optional[EntrySaliency] = None,
    forget: Optional[EntrySaliency] = None,
    retain: Optional[EntrySaliency] = None,
    adapter_name: Optional[str] = None,
    reinitialize: bool = False,
    progress: bool = True,
    warn: bool = True,
) -> OrthoSplitReport:
    """Split every layer of an OrthoSplit adapter that `get_peft_model` created, and report the splits.

    reference: the model before fine-tuning (or its state dict): the residual becomes the fine-tuning delta (the
    adapter's config then records uses_reference=True, so the reference values on the mask are saved with it).
    stats: `ActivationStats` of the layers' inputs, for selector='obs'. fisher: an `EntrySaliency` of kind 'fisher' for
    selector='fisher'. forget / retain: `EntrySaliency` maps on the two sets, for selector='contrastive'.

    An adapter that is already split (by get_peft_model for a data-free selector without reference weights, by an
    earlier call, or loaded) is refused unless `reinitialize=True`, which replaces its ortho stream. To split against
    reference weights from the start, create it with OrthoSplitConfig(uses_reference=True): get_peft_model then
    leaves placeholders instead of a split from W alone. Everything is validated and every split computed before any
    layer is written: on error the model is unchanged. `warn`: one UserWarning naming the layers the report flags.
    """
    adapter_name = adapter_name or active_adapter(model)
    config = adapter_config(model, adapter_name, OrthoSplitConfig)
    layers = {key: m for key, m in _tuned_model(model).named_modules()
              if isinstance(m, OrthoSplitLayer) and adapter_name in m.ortho_values}
    if not layers:
        raise ValueError(f"model has no OrthoSplit layers for adapter {adapter_name!r}")
    merged = [key for key, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"OrthoSplit layer(s) {merged[:3]} hold merged adapters, so their weight is not the original "
                         "W the split reads: call model.unmerge_adapter() first")
    if config.uses_reference and reference is None:
        raise ValueError(
            f"OrthoSplit adapter {adapter_name!r} was created with OrthoSplitConfig.uses_reference=True: pass "
            "reference=<model before fine-tuning> (or its state dict), or create it with uses_reference=False"
        )
    split_config = dataclasses.replace(config, uses_reference=reference is not None)
    given = dict(reference=reference, stats=stats, fisher=fisher, forget=forget, retain=retain)
    check_arguments(split_config, **given)
    done = [key for key, layer in layers.items() if layer.is_initialized(adapter_name)]
    if done and not reinitialize:
        hint = (" To split against reference weights from the start, create the adapter with "
                "OrthoSplitConfig(uses_reference=True): get_peft_model then leaves placeholders."
                if reference is not None and not config.uses_reference else "")
        how = (f"by get_peft_model, as selector {config.selector!r} needs no data" if splits_from_weight_alone(config)
               else "by an earlier call or a loaded checkpoint")
        raise ValueError(
            f"OrthoSplit adapter {adapter_name!r} is already split ({len(done)} of {len(layers)} layers, e.g. "
            f"{done[0]!r}, {how}): splitting again replaces its ortho stream (and any training of it). Pass "
            f"reinitialize=True to split it again.{hint}"
        )
    inputs = prepare_inputs(split_config, {key: layer.get_base_layer() for key, layer in layers.items()}, **given)
    described = describe_inputs(**given)
    report = fill(layers, adapter_name, split_config, inputs, progress=progress)
    report.inputs = described
    if split_config.uses_reference != config.uses_reference:  # a saved adapter must record it (anchors on load)
        model.peft_config[adapter_name] = split_config
    if warn and report.warnings:
        warnings.warn(empty_warning([lr.layer for lr in report.layers if EMPTY in lr.flags]), stacklevel=2)
    return report


def orthosplit(
    model: nn.Module,
    config: OrthoSplitConfig,
    *,
    reference: Optional[Reference] = None,
    stats: Any = None,
    fisher: Optional[EntrySaliency] = None,
    forget: Optional[EntrySaliency] = None,
    retain: Optional[EntrySaliency] = None,
    adapter_name: str = "default",
):
    """`get_peft_model` and `initialize_orthosplit` in one call: split every target layer of `model` into base and
    ortho streams and return the PeftModel.

    reference: the model before fine-tuning (or its state dict): the residual becomes the fine-tuning delta.
    stats: `ActivationStats` of the layers' inputs, for selector='obs'. fisher: an `EntrySaliency` of kind 'fisher'
    for selector='fisher'. forget / retain: `EntrySaliency` maps on the two sets, for selector='contrastive'.
    Everything is checked before the model is touched: on error it is unchanged.
    """
    from peft import get_peft_model

    if not isinstance(config, OrthoSplitConfig):
        raise TypeError(f"config must be an OrthoSplitConfig, got {type(config).__name__}")
    config = dataclasses.replace(config, uses_reference=reference is not None)
    given = dict(reference=reference, stats=stats, fisher=fisher, forget=forget, retain=retain)
    check_arguments(config, **given)
    targets = dict(planned_targets(OrthoSplitModel, model, config))
    if not targets:
        raise ValueError(f"OrthoSplitConfig.target_modules={config.target_modules!r} matches no module of the model")
    inputs = prepare_inputs(config, targets, **given)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    layers = {key: m for key, m in _tuned_model(peft_model).named_modules()
              if isinstance(m, OrthoSplitLayer) and adapter_name in m.ortho_values}
    if not splits_from_weight_alone(config):  # placeholders: fill them (split from W alone in get_peft_model else)
        fill(layers, adapter_name, config, inputs, progress=False)
    empty = [_strip(key) for key, layer in layers.items() if not layer.ortho_values[adapter_name].detach().any()]
    if empty:
        warnings.warn(empty_warning(empty), stacklevel=2)
    return peft_model


def empty_warning(layers: list[str]) -> str:
    return (f"the ortho stream of {len(layers)} layer(s) holds only zeros (no residual there: {layers[:3]}...): "
            "were these layers changed by the fine-tune?")


def _tuned_model(model: nn.Module) -> nn.Module:
    """The model the tuner adapted (PEFT's layer names, and the 'random' selector's seeds, are relative to it)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.base_model
    return model.model if isinstance(model, BaseTuner) else model


def check_arguments(config: OrthoSplitConfig, *, reference, stats, fisher, forget, retain) -> None:
    """The data the selector needs is given, nothing it does not use is, and the residual cannot be zero."""
    given = {"stats": stats, "fisher": fisher, "forget": forget, "retain": retain}
    wanted = {"obs": ("stats",), "fisher": ("fisher",), "contrastive": ("forget", "retain")}.get(config.selector, ())
    for name in wanted:
        if given[name] is None:
            raise ValueError(
                f"OrthoSplitConfig.selector={config.selector!r} needs {NEEDS[config.selector]}: pass {name}=... "
                + ("(peft_ext.collect_stats(model, dataloader))" if name == "stats" else
                   f"(peft_ext.entry_saliency(model, {name if name != 'fisher' else 'data'}_batches, config, ...))")
            )
    unused = [n for n, v in given.items() if v is not None and n not in wanted]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} given but OrthoSplitConfig.selector={config.selector!r} does not use "
            f"{'it' if len(unused) == 1 else 'them'}: choose the selector that does, or drop the argument"
        )
    if reference is None and config.base_kind == "none":
        raise ValueError(
            "OrthoSplitConfig.base_kind='none' keeps the weight in full precision, so without reference weights the "
            "residual is zero and the ortho stream would hold nothing: pass reference=<model before fine-tuning> or "
            "choose a quantised base_kind"
        )


def prepare_inputs(config: OrthoSplitConfig, targets: dict[str, nn.Module], *, reference, stats, fisher, forget,
                   retain) -> dict[str, LayerInputs]:
    """Per target layer ({name: base layer}), what its split needs beyond its weight, every input checked against the
    layer (names, shapes): the ValueErrors name the layer and the argument."""
    for key, base in targets.items():
        reason = unsupported_reason(base)
        if reason is not None:
            raise TypeError(f"OrthoSplit cannot split {key!r}: {reason}. Narrow target_modules.")
    shapes = {k: _out_in(b) for k, b in targets.items()}
    refs = reference_weights(reference, targets) if reference is not None else {}
    maps = {what: _saliency_maps(what, sal, shapes) for what, sal in
            (("fisher", fisher), ("forget", forget), ("retain", retain))}
    inputs = {}
    for key in targets:
        hinv = None
        if stats is not None:
            name = _strip(key)
            if name not in stats:
                raise ValueError(f"stats has no statistics for target layer {name!r}; collect them on the same model")
            cov = stats.covariance(name)
            if cov.shape[0] != shapes[key][1]:
                raise ValueError(f"stats for layer {name!r} are {cov.shape[0]}-dim, the layer takes {shapes[key][1]} inputs")
            hinv = hessian_inverse_diagonal(cov, config.obs_damp)
        inputs[key] = LayerInputs(
            reference=refs.get(key),
            hinv_diag=hinv,
            fisher=maps["fisher"][key][1] if key in maps["fisher"] else None,
            forget=maps["forget"].get(key),
            retain=maps["retain"].get(key),
        )
    return inputs


def _saliency_maps(what: str, sal: Optional[EntrySaliency], shapes: dict[str, tuple]) -> dict:
    if sal is None:
        return {}
    if not isinstance(sal, EntrySaliency):
        raise TypeError(f"{what} must be an EntrySaliency (from peft_ext.entry_saliency), got {type(sal).__name__}")
    maps = {_strip(k): v for k, v in sal.maps.items()}
    missing = [k for k in shapes if _strip(k) not in maps]
    if missing:
        raise ValueError(f"{what} has no saliency map for target layer(s) {missing[:5]}: compute it with the same config")
    out = {}
    for k, shape in shapes.items():
        m = maps[_strip(k)]
        if tuple(m.shape) != shape:
            raise ValueError(f"{what} map for layer {k!r} has shape {tuple(m.shape)}, expected (out, in) = {shape}")
        out[k] = (sal.kind, m)
    return out


def fill(layers: dict[str, OrthoSplitLayer], adapter_name: str, config: OrthoSplitConfig,
         inputs: dict[str, LayerInputs], *, progress: bool) -> OrthoSplitReport:
    """Compute every layer's split, refuse non-finite ones, then write them all (complete or unchanged)."""
    sharded = [_strip(key) for key, layer in layers.items() if is_dtensor(layer.ortho_values[adapter_name])]
    if sharded:
        raise ValueError(f"OrthoSplit adapter {adapter_name!r} is sharded (FSDP2) on layer(s) {sharded[:3]}: "
                         f"{SPLIT_BEFORE_SHARDING}")
    splits, reports = {}, []
    with progress_bar(layers.items(), enabled=progress, total=len(layers), desc="OrthoSplit: split",
                      unit="layer") as bar:
        for key, layer in bar:
            w = _dense_weight(layer.get_base_layer(), layer.fan_in_fan_out)
            index, anchor, values, share = split_weight_with_share(w, config, inputs[key], layer_generator(config, key))
            if not all_finite(values):
                raise ValueError(f"the ortho values of layer {_strip(key)!r} are not finite: the layer's weight or its "
                                 "reference weight holds NaN/Inf")
            splits[key] = (index, anchor, values)
            max_value = float(values.abs().max()) if values.numel() else 0.0
            reports.append(OrthoLayerReport(layer=_strip(key), shape=list(_out_in(layer.get_base_layer())),
                                            entries=int(values.numel()), residual_share=share, max_value=max_value,
                                            flags=[] if max_value > 0 else [EMPTY]))
    saved = {key: (layer.ortho_index[adapter_name].clone(), layer.ortho_anchor[adapter_name].clone(),
                   layer.ortho_values[adapter_name].detach().clone(), layer.is_initialized(adapter_name))
             for key, layer in layers.items()}
    try:
        for key, layer in layers.items():
            layer.write_split(adapter_name, splits[key])
    except BaseException:
        for key, layer in layers.items():
            index, anchor, values, initialized = saved[key]
            layer.write_split(adapter_name, (index, anchor, values))
            layer.set_initialized(adapter_name, initialized)
        raise
    residual = ("fine-tuning delta W - W_ref" if config.uses_reference
                else f"quantisation residual W - Q(W) (Q: base_kind {config.base_kind!r})")
    return OrthoSplitReport(adapter_name=adapter_name, selector=config.selector, base_kind=config.base_kind,
                            density=config.density, residual=residual, inputs=[], layers=reports)


def describe_inputs(*, reference, stats, fisher, forget, retain) -> list[str]:
    """One line per data argument given, for the report."""
    lines = []
    if reference is not None:
        lines.append(f"reference: {'a model' if isinstance(reference, nn.Module) else 'a state dict'}")
    if stats is not None:
        lines.append(f"stats: input statistics of {len(stats.layers)} layer(s)")
    for name, sal in (("fisher", fisher), ("forget", forget), ("retain", retain)):
        if sal is not None:
            lines.append(f"{name}: {sal.kind} saliency over {sal.batches} batch(es)")
    return lines
