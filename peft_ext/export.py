"""Export peft-ext adapters as plain LoRA adapters that vanilla PEFT (and vLLM, TGI, ...) load without peft_ext.

An adapter whose update is exactly `delta W = s * B @ A` is written as `lora_A = A`, `lora_B = B` with
`lora_alpha = s * rank`, so the exported adapter reproduces the outputs exactly (no SVD, no truncation).
"""

from __future__ import annotations

import ast
import enum
import json
import os
from collections import Counter
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .files import atomic_directory
from .stats import canonical_name

EXPORT_MARKER = "peft_ext_export.json"  # written next to an exported adapter: where it came from
# PeftConfig fields that hold sets in memory (`target_modules` becomes a set in __post_init__). Written as sorted lists;
# markers written before that stored them as the set's repr, e.g. "{'value', 'query'}", which read_export_marker parses.
_SET_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """canonical name -> layer for every peft-ext layer that can give exact LoRA factors for `adapter_name`."""
    found = {}
    for name, module in model.named_modules():
        factors = getattr(module, "lora_factors", None)
        if callable(factors) and adapter_name in getattr(module, "scaling", {}):
            found[canonical_name(name)] = module
    return found


@torch.no_grad()
def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA tensors (PEFT checkpoint keys) and LoraConfig kwargs equivalent to a peft-ext adapter."""
    layers = _lora_layers(model, adapter_name)
    if not layers:
        from .ortho.layer import OrthoSplitLayer

        if any(isinstance(m, OrthoSplitLayer) for m in model.modules()):
            raise ValueError(
                "OrthoSplit adapters are a sparse stream plus a quantised base, not a low-rank update, so no LoRA "
                "reproduces them: use peft_ext.set_ortho_alpha(model, a) then model.merge_and_unload() for plain weights"
            )
        raise ValueError(f"model has no peft-ext layers with adapter {adapter_name!r} to export")
    # an adapter before its initialisation (NullSpaceLoRA before initialize_nullspace_lora) holds zero factors:
    # exported, it is a LoRA that does nothing
    pending = [n for n, layer in layers.items()
               if hasattr(layer, "is_initialized") and not layer.is_initialized(adapter_name)]
    if pending:
        raise ValueError(
            f"adapter {adapter_name!r} was never initialised ({len(pending)} layer(s), e.g. {pending[0]!r}): its "
            "factors are zero and the exported LoRA would change nothing. Call "
            f"{layers[pending[0]].initialize_hint(adapter_name)} first, train it, then export"
        )
    config = model.peft_config[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, layer in layers.items():
        a, b = layer.lora_factors(adapter_name)
        rank = a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().to("cpu").contiguous()
        ranks[name] = rank
        alphas[name] = layer.scaling[adapter_name] * rank
    # Everything else the adapter saves (modules_to_save heads, trained biases) loads the same way under LoRA.
    # Only attributes that hold tensors can appear in the state dict; plain dicts such as `r` or `scaling` must not
    # filter out, say, a modules_to_save head that happens to be named `r`.
    own = {
        a
        for layer in layers.values()
        for a in layer.adapter_layer_names + layer.other_param_names
        if isinstance(getattr(layer, a, None), nn.Module)
    }
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if not any(f".{a}." in key or key.endswith(f".{a}") for a in own):
            tensors[key] = value.detach().to("cpu").contiguous()

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    bias = getattr(config, "bias", "none")
    kwargs = dict(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(layers),
        rank_pattern={f"^{n}$": k for n, k in ranks.items() if k != r},
        alpha_pattern={f"^{n}$": v for n, v in alphas.items() if v != alpha},
        fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        bias="lora_only" if bias.endswith("_only") else bias,
        modules_to_save=getattr(config, "modules_to_save", None),
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        task_type=config.task_type,
        lora_dropout=0.0,
    )
    return tensors, kwargs


def export_to_lora(model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default", overwrite: bool = False) -> str:
    """Write `adapter_name` of a peft-ext model as a plain LoRA adapter (`peft_type: LORA`) to `out_dir`.

    `PeftModel.from_pretrained(base, out_dir)` then gives the same outputs without importing peft_ext. The
    directory appears complete or not at all (written to a temporary directory, then renamed).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; pass overwrite=True or choose another out_dir")
    tensors, kwargs = lora_state_dict(model, adapter_name)
    config = LoraConfig(**kwargs)
    source = getattr(model, "peft_config", {}).get(adapter_name)
    marker = {  # provenance, read by peft_ext.hub for the model card; vanilla PEFT ignores the file
        "source_peft_type": str(getattr(getattr(source, "peft_type", None), "value", "") or "") or None,
        "source_config": source.to_dict() if hasattr(source, "to_dict") else None,
        "exact": True,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
            json.dump(marker, f, indent=2, default=_json_value)
    return out_dir


def _json_value(value: Any) -> Any:
    """What json.dump cannot write itself: sets as sorted lists (a set's repr is not JSON and its order is random),
    enums as their value; anything else as its str (provenance only: an export must not fail on it)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


def read_export_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `peft_ext_export.json` beside an exported adapter, or None when there is none.

    Set-valued fields of `source_config` come back as sorted lists, also from markers written before peft-ext stored
    them as lists (those hold the set's repr, "{'query', 'value'}"). A marker that is not JSON, not an object, or
    holds such a field in another shape raises ValueError naming the file, the field and the fix.
    """
    path = os.path.join(os.fspath(folder), EXPORT_MARKER)
    if not os.path.isfile(path):
        return None
    fix = "re-export the adapter with peft_ext.export_to_lora (or `peft-ext export-lora`), or delete the file"
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(marker, dict):
        raise ValueError(f"{path} holds a {type(marker).__name__}, not an object; {fix}")
    source = marker.get("source_config")
    if source is None:
        return marker
    if not isinstance(source, dict):
        raise ValueError(f"{path}: source_config={source!r} is not an object; {fix}")
    for key in _SET_FIELDS:
        value = source.get(key)
        if value == "set()":  # an old marker's empty set
            source[key] = []
        elif isinstance(value, str) and value.startswith("{") and value.endswith("}"):  # an old marker's set repr
            try:
                parsed = ast.literal_eval(value)  # literals only: never evaluates code
            except (ValueError, SyntaxError):
                parsed = None
            if not isinstance(parsed, (set, dict)) or not all(isinstance(v, str) for v in parsed):
                raise ValueError(f"{path}: source_config.{key}={value!r} is neither a list nor a set of module "
                                 f"names; {fix}")
            source[key] = sorted(parsed)
        elif isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: source_config.{key}={value!r} must be a list of module names; {fix}")
    return marker
