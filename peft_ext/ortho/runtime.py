"""What a user does with a split model: find its OrthoSplit layers, turn the alpha knob, report their sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

from torch import nn

from .layer import OrthoSplitLayer, check_alpha
from .quant import stored_bytes
from .reference import _strip


def ortho_layers(model: nn.Module) -> Iterator[tuple[str, OrthoSplitLayer]]:
    """(name, layer) of every OrthoSplit layer, names without PEFT's wrapper prefixes."""
    for name, module in model.named_modules():
        if isinstance(module, OrthoSplitLayer):
            yield _strip(name), module


def _layers_or_raise(model: nn.Module) -> list[tuple[str, OrthoSplitLayer]]:
    layers = list(ortho_layers(model))
    if not layers:
        raise ValueError("the model has no OrthoSplit layers: build it with get_peft_model(model, OrthoSplitConfig(...)) "
                         "(and peft_ext.initialize_orthosplit), or peft_ext.orthosplit(model, config, ...)")
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
