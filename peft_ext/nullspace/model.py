from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._checks import nonfinite_count
from .._tuners import CheckTargetsFirst, LinearTargetsOnly, SafeMergeFirst, SaveInitializedOnly
from .._tuners import install_layer, planned_targets
from .config import NullSpaceLoraConfig
from .layer import Linear, NullSpaceLoraLayer


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(layer)
    return backend is not None and backend.layer_type == "linear"


class NullSpaceLoraModel(CheckTargetsFirst, LinearTargetsOnly, SafeMergeFirst, SaveInitializedOnly, BaseTuner):
    """PEFT tuner for NullSpaceLoRA. Create it with `peft.get_peft_model(model, NullSpaceLoraConfig(...))`, then
    call `peft_ext.initialize_nullspace_lora` to put each adapter's input side into the null space of its inputs.
    Saving a never-initialised adapter is refused (SaveInitializedOnly): its A is zero, it would change nothing.
    """

    method_name = "NullSpaceLoRA"
    prefix: str = "nullspace_"
    tuner_layer_cls = NullSpaceLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_targets(self, model: nn.Module, config: NullSpaceLoraConfig) -> None:
        too_small, unsupported = [], []
        for key, base in planned_targets(self, model, config):
            if not _supported(base):
                unsupported.append(f"{key} ({type(base).__name__})")
                continue
            in_features = _get_in_out_features(base)[0]
            if config.r > in_features:
                too_small.append(f"{key} (in_features={in_features})")
        if unsupported:
            raise TypeError(
                f"NullSpaceLoRA cannot adapt {', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}: "
                "only nn.Linear, transformers' Conv1D and bitsandbytes Linear4bit/Linear8bitLt are supported. "
                "Narrow target_modules (or use exclude_modules)."
            )
        if too_small:
            raise ValueError(
                f"NullSpaceLoraConfig.r={config.r} is larger than the input dimension of {len(too_small)} target "
                f"layer(s): {', '.join(too_small[:5])}{' ...' if len(too_small) > 5 else ''}. The null space of a "
                "d-dim input has at most d directions: choose a smaller r or exclude these layers (exclude_modules)."
            )

    def _replace_layer(self, config: NullSpaceLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                       parent: nn.Module, current_key: str) -> None:
        if isinstance(target, NullSpaceLoraLayer):
            target.update_layer(
                adapter_name, config.r, config.scaling, config.mode, config.nullspace_dropout, name=current_key
            )
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        # One config may cover Conv1D and Linear layers: the weight layout is a property of each layer.
        fan_in_fan_out = isinstance(base, Conv1D)
        new_module = Linear(
            target,
            adapter_name,
            r=config.r,
            scaling=config.scaling,
            mode=config.mode,
            dropout=config.nullspace_dropout,
            fan_in_fan_out=fan_in_fan_out,
            name=current_key,
        )
        install_layer(self, parent, target_name, new_module, target, adapter_name)

    # ------------------------------------------------------------------ saving and loading (PEFT's tuner hooks)
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # set_peft_model_state_dict calls this (PeftModel.from_pretrained, load_adapter) before load_state_dict, so a
        # saved adapter that does not fit is refused here, naming the tensor, before any layer is written. Torch would
        # otherwise cast integer tensors silently, load NaN, warn about missing keys, or raise a multi-line size
        # mismatch.
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_saved_adapter(cls, model, adapter_name, remapped)
        return remapped


def _check_saved_adapter(tuner_cls, model: nn.Module, adapter_name: str, loaded: dict) -> None:
    """Refuse, in one line naming the tensor, a loaded state dict that lacks a factor of some layer, holds one no layer
    takes, or holds one of the wrong dtype, shape or with NaN/Inf values."""
    expected: dict[str, tuple[int, ...]] = {}
    for module_name, m in model.named_modules():
        if not (isinstance(m, NullSpaceLoraLayer) and adapter_name in m.nullspace_A):
            continue
        module_name = module_name.removeprefix("_fsdp_wrapped_module.")  # as PEFT's remapped keys name it under FSDP
        prefix = f"{module_name}." if module_name else ""
        expected[f"{prefix}nullspace_A.{adapter_name}.weight"] = tuple(m.nullspace_A[adapter_name].weight.shape)
        expected[f"{prefix}nullspace_B.{adapter_name}.weight"] = tuple(m.nullspace_B[adapter_name].weight.shape)
        for buffers, attr in ((m.nullspace_A0, "nullspace_A0"), (m.nullspace_B0, "nullspace_B0")):
            if adapter_name in buffers:  # split mode
                expected[f"{prefix}{attr}.{adapter_name}"] = tuple(buffers[adapter_name].shape)
    if not expected:
        return
    shown = lambda key: tuner_cls._remove_adapter_name_from_key(key, adapter_name)  # noqa: E731 - the file's key
    where = f"the saved NullSpaceLoRA adapter {adapter_name!r} (adapter_model.safetensors)"
    redo = "save the adapter again from the model it was trained on, with the adapter_config.json it was saved with"
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise ValueError(
            f"{where} has no tensor {shown(missing[0])!r}" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ", which adapter_config.json's target_modules/r/mode call for on this base model: the weights file is "
            f"incomplete or belongs to another adapter or base model; {redo}"
        )
    # the checkpoint holds one adapter; a key of it that no layer took was passed through unmapped (no adapter name)
    unexpected = sorted(k for k in loaded if ".nullspace_" in k and k not in expected)
    if unexpected:
        raise ValueError(
            f"{where} holds {shown(unexpected[0])!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + ", which no NullSpaceLoRA layer of this model takes: adapter_config.json's target_modules or mode differ "
            f"from the weights', or the base model differs; {redo}"
        )
    for key, shape in expected.items():
        value = loaded[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}: {shown(key)!r} has dtype {kind}, but NullSpaceLoRA factors are floating point: "
                             f"the weights file is damaged or not this adapter's; {redo}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{where}: {shown(key)!r} has shape {tuple(value.shape)}, but adapter_config.json on this base model "
                f"makes it {shape}: the weights and the config (r, mode) come from different adapters, or the base "
                f"model differs; {redo}"
            )
        bad = nonfinite_count(value)
        if bad:
            raise ValueError(f"{where}: {shown(key)!r} holds {bad} NaN/Inf value(s): training diverged or the file is "
                             "damaged; load an earlier checkpoint")
