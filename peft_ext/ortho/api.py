"""OrthoSplit's user API: build a split model, turn the alpha knob, report sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

from torch import nn

from .._tuners import planned_targets
from .config import OrthoSplitConfig
from .layer import OrthoSplitLayer, check_alpha
from .model import _PLAN, LayerInputs, OrthoSplitModel, SplitPlan, unsupported_reason
from .quant import stored_bytes
from .reference import Reference, _out_in, _strip, reference_weights
from .saliency import EntrySaliency
from .select import NEEDS, hessian_inverse_diagonal


def _saliency_maps(what: str, sal: Optional[EntrySaliency], keys: list[str], shapes: dict[str, tuple]) -> dict:
    if sal is None:
        return {}
    if not isinstance(sal, EntrySaliency):
        raise TypeError(f"{what} must be an EntrySaliency (from peft_ext.entry_saliency), got {type(sal).__name__}")
    maps = {_strip(k): v for k, v in sal.maps.items()}
    missing = [k for k in keys if _strip(k) not in maps]
    if missing:
        raise ValueError(f"{what} has no saliency map for target layer(s) {missing[:5]}: compute it with the same config")
    out = {}
    for k in keys:
        m = maps[_strip(k)]
        if tuple(m.shape) != shapes[k]:
            raise ValueError(f"{what} map for layer {k!r} has shape {tuple(m.shape)}, expected (out, in) = {shapes[k]}")
        out[k] = (sal.kind, m)
    return out


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
    """Split every target layer of `model` into base and ortho streams and return the PeftModel.

    reference: the model before fine-tuning (or its state dict): the residual becomes the fine-tuning delta.
    stats: `ActivationStats` of the layers' inputs, for selector='obs'. fisher: an `EntrySaliency` of kind 'fisher'
    for selector='fisher'. forget / retain: `EntrySaliency` maps on the two sets, for selector='contrastive'.
    Everything is checked before the model is touched: on error it is unchanged.
    """
    from peft import get_peft_model

    if not isinstance(config, OrthoSplitConfig):
        raise TypeError(f"config must be an OrthoSplitConfig, got {type(config).__name__}")
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
    targets = dict(planned_targets(OrthoSplitModel, model, config))
    if not targets:
        raise ValueError(f"OrthoSplitConfig.target_modules={config.target_modules!r} matches no module of the model")
    for key, base in targets.items():
        reason = unsupported_reason(base)
        if reason is not None:
            raise TypeError(f"OrthoSplit cannot split {key!r}: {reason}. Narrow target_modules.")
    shapes = {k: _out_in(b) for k, b in targets.items()}
    refs = reference_weights(reference, targets) if reference is not None else {}
    fisher_maps = _saliency_maps("fisher", fisher, list(targets), shapes)
    forget_maps = _saliency_maps("forget", forget, list(targets), shapes)
    retain_maps = _saliency_maps("retain", retain, list(targets), shapes)
    plan = SplitPlan()
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
        plan.layers[key] = LayerInputs(
            reference=refs.get(key),
            hinv_diag=hinv,
            fisher=fisher_maps[key][1] if key in fisher_maps else None,
            forget=forget_maps.get(key),
            retain=retain_maps.get(key),
        )
    config = dataclasses.replace(config, uses_reference=reference is not None)
    token = _PLAN.set(plan)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    finally:
        _PLAN.reset(token)
    empty = [n for n, layer in ortho_layers(peft_model) if not layer.ortho_values[adapter_name].detach().any()]
    if empty:
        warnings.warn(
            f"the ortho stream of {len(empty)} layer(s) holds only zeros (no residual there: {empty[:3]}...): "
            "were these layers changed by the fine-tune?",
            stacklevel=2,
        )
    return peft_model


def ortho_layers(model: nn.Module) -> Iterator[tuple[str, OrthoSplitLayer]]:
    """(name, layer) of every OrthoSplit layer, names without PEFT's wrapper prefixes."""
    for name, module in model.named_modules():
        if isinstance(module, OrthoSplitLayer):
            yield _strip(name), module


def _layers_or_raise(model: nn.Module) -> list[tuple[str, OrthoSplitLayer]]:
    layers = list(ortho_layers(model))
    if not layers:
        raise ValueError("the model has no OrthoSplit layers: build it with peft_ext.orthosplit(model, config)")
    return layers


def set_ortho_alpha(
    model: nn.Module, alpha: Union[float, Mapping[str, float]], adapter_name: Optional[str] = None
) -> dict[str, float]:
    """Set alpha (0: base stream only, 1: base + ortho) on every OrthoSplit layer, or per layer with a mapping
    {layer name or suffix (e.g. 'layers.3.mlp.down_proj' or 'down_proj'): alpha}; layers no key matches keep their
    alpha. Returns the previous alpha of every layer (feed it back to restore)."""
    layers = _layers_or_raise(model)
    if isinstance(alpha, Mapping):
        values = {str(k): check_alpha(v, f"alpha[{k!r}]") for k, v in alpha.items()}
        unmatched = [k for k in values if not any(_matches(n, k) for n, _ in layers)]
        if unmatched:
            raise ValueError(
                f"alpha names {unmatched} match no OrthoSplit layer; layers are e.g. {[n for n, _ in layers][:4]}"
            )
    else:
        values = {"": check_alpha(alpha)}
    previous = {}
    plan = []
    for name, layer in layers:
        adapters = [adapter_name] if adapter_name is not None else list(layer.ortho_values)
        for a in adapters:
            if a not in layer.ortho_values:
                raise ValueError(f"layer {name!r} has no OrthoSplit adapter {a!r}; it has {list(layer.ortho_values)}")
        hits = [v for k, v in values.items() if k == "" or _matches(name, k)]
        if hits:
            plan.append((name, layer, adapters, hits[-1]))
    for name, layer, adapters, value in plan:  # merged layers refuse: check all before changing any
        for a in adapters:
            layer.check_alpha_change(a, value)
    for name, layer, adapters, value in plan:
        for a in adapters:
            previous[name if adapter_name is not None or len(adapters) == 1 else f"{name}:{a}"] = layer.ortho_alpha[a]
            layer.set_alpha(a, value)
    return previous


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


@contextlib.contextmanager
def ortho_alpha(model: nn.Module, alpha: Union[float, Mapping[str, float]], adapter_name: Optional[str] = None):
    """`with ortho_alpha(model, 0.0): ...` runs the block at that alpha and restores every layer's previous alpha."""
    layers = _layers_or_raise(model)
    saved = [(layer, dict(layer.ortho_alpha)) for _, layer in layers]
    set_ortho_alpha(model, alpha, adapter_name)
    try:
        yield model
    finally:
        for layer, alphas in saved:
            layer.ortho_alpha.update(alphas)


def ortho_report(model: nn.Module, adapter_name: str = "default") -> list[dict[str, Any]]:
    """Per layer: shape, entries in the ortho stream, density, alpha and bytes (stored sparse stream, packed base
    stream, the dense weight it replaces)."""
    rows = []
    for name, layer in _layers_or_raise(model):
        if adapter_name not in layer.ortho_values:
            continue
        values, index, anchor = layer.ortho_values[adapter_name], layer.ortho_index[adapter_name], layer.ortho_anchor[adapter_name]
        weight = layer.get_base_layer().weight
        wbytes = weight.element_size() if weight.is_floating_point() else 2
        rows.append({
            "layer": name,
            "shape": [layer.out_features, layer.in_features],
            "nnz": int(values.numel()),
            "density": values.numel() / (layer.out_features * layer.in_features),
            "base_kind": layer.base_kind[adapter_name],
            "alpha": layer.ortho_alpha[adapter_name],
            "sparse_bytes": int(values.numel() * values.element_size() + index.numel() * index.element_size()
                                + anchor.numel() * anchor.element_size()),
            "base_bytes_packed": stored_bytes(layer.base_kind[adapter_name], layer.out_features, layer.in_features, wbytes),
            "dense_bytes": layer.out_features * layer.in_features * wbytes,
        })
    return rows
