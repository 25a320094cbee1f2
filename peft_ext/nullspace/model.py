from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._tuners import CheckTargetsFirst, install_layer, planned_targets
from .config import NullSpaceLoraConfig
from .layer import Linear, NullSpaceLoraLayer


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(layer)
    return backend is not None and backend.layer_type == "linear"


class NullSpaceLoraModel(CheckTargetsFirst, BaseTuner):
    """PEFT tuner for NullSpaceLoRA. Create it with `peft.get_peft_model(model, NullSpaceLoraConfig(...))`, then
    call `peft_ext.initialize_nullspace_lora` to put each adapter's input side into the null space of its inputs.
    """

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

    def _create_and_replace(
        self,
        config: NullSpaceLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("NullSpaceLoRA adapts linear layers; target_parameters is not supported")
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
