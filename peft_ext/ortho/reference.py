"""The reference weights (the model before fine-tuning) of OrthoSplit's target layers, in (out, in) layout.

Its own module because both the initialisation (`initialize.prepare_inputs`) and the saliency maps
(`saliency.entry_saliency`, kind 'attribution') read them, and `initialize` imports `saliency` for `EntrySaliency`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..stats import canonical_name
from .model import _dense_weight

Reference = Union[nn.Module, Mapping[str, torch.Tensor]]


def _strip(key: str) -> str:
    return canonical_name(key)


def _out_in(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer without reading its weight (a bitsandbytes weight is packed)."""
    in_features, out_features = _get_in_out_features(layer)
    return out_features, in_features


def reference_weights(reference: Reference, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The reference weight (out, in) of every layer in `modules` ({name: layer of the model}), from a model with the
    same architecture or a state dict ({'<name>.weight': tensor} in the layer's own layout). Shapes are checked."""
    if isinstance(reference, nn.Module):
        ref_modules = {_strip(k): m for k, m in reference.named_modules()}
        ref_state = None
    elif isinstance(reference, Mapping):
        ref_modules, ref_state = None, {_strip(k): v for k, v in reference.items()}
    else:
        raise TypeError(f"reference must be a model or a state dict of tensors, got {type(reference).__name__}")
    out, missing = {}, []
    for key, module in modules.items():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        conv = isinstance(base, Conv1D)
        name = _strip(key)
        if ref_modules is not None:
            ref = ref_modules.get(name)
            if ref is None or getattr(ref, "weight", None) is None:
                missing.append(name)
                continue
            ref = ref.get_base_layer() if isinstance(ref, BaseTunerLayer) else ref
            w_ref = _dense_weight(ref, isinstance(ref, Conv1D))
        else:
            t = ref_state.get(f"{name}.weight", ref_state.get(name))
            if t is None:
                missing.append(name)
                continue
            w_ref = t.detach().T if conv else t.detach()
        w_shape = _out_in(base)
        if tuple(w_ref.shape) != w_shape:
            raise ValueError(
                f"reference weight for layer {name!r} has shape (out, in) = {tuple(w_ref.shape)}, but the model's "
                f"weight is {w_shape}: pass the weights of the same architecture (e.g. the model before fine-tuning)"
            )
        out[key] = w_ref
    if missing:
        raise ValueError(
            f"reference has no weight for {len(missing)} target layer(s): {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; pass the model before fine-tuning (same module names)"
        )
    return out
