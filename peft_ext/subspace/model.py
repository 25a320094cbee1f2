from __future__ import annotations

import contextvars
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._progress import progress_bar
from .._tuners import (
    CheckTargetsFirst,
    LinearTargetsOnly,
    SafeMergeFirst,
    SaveInitializedOnly,
    install_layer,
    planned_targets,
    unsupported_linear_reason,
)
from .config import SubspaceLoraConfig
from .layer import Linear, SubspaceLoraLayer

# The progress bar of the inject_adapter call in progress (its SVDs take seconds per large layer: ~17 s for MiniLM
# all-linear on 2 CPU cores); a context variable, not state on the model.
_SVD_BAR: contextvars.ContextVar[Any] = contextvars.ContextVar("subspace_svd_bar", default=None)


def _unsupported_reason(layer: nn.Module) -> str | None:
    """Why SubspaceLoRA cannot adapt `layer`, or None if it can."""
    return unsupported_linear_reason(layer, "its SVD")


class SubspaceLoraModel(CheckTargetsFirst, LinearTargetsOnly, SafeMergeFirst, SaveInitializedOnly, BaseTuner):
    """PEFT tuner for SubspaceLoRA. Create it with `peft.get_peft_model(model, SubspaceLoraConfig(...))`: each target
    layer's top-k SVD is computed right there (from W alone, as PEFT's PiSSA), so the adapter is initialised and ready
    to train: there is no initialize_* call.

    `PeftModel.from_pretrained` restores the saved U, V and C0 (they are persistent buffers of the checkpoint): it
    recomputes an SVD when the layers are created and overwrites it on load, unless `low_cpu_mem_usage=True`, which
    skips the SVD altogether.
    """

    method_name = "SubspaceLoRA"
    prefix: str = "subspace_"
    tuner_layer_cls = SubspaceLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's inject_adapter, with a progress bar over the layers whose SVD it computes (Hugging Face's tqdm:
        silenced by HF_HUB_DISABLE_PROGRESS_BARS=1 or huggingface_hub.utils.disable_progress_bars(); main process
        only)."""
        with progress_bar(desc="SubspaceLoRA: top-k SVD", unit="layer") as bar:
            token = _SVD_BAR.set(bar)
            try:
                super().inject_adapter(model, adapter_name, *args, **kwargs)
            finally:
                _SVD_BAR.reset(token)

    def _check_targets(self, model: nn.Module, config: SubspaceLoraConfig) -> None:
        too_small, unsupported, count = [], [], 0
        for key, base in planned_targets(self, model, config):
            count += 1
            reason = _unsupported_reason(base)
            if reason is not None:
                unsupported.append(f"{key!r}: {reason}")
                continue
            in_features, out_features = _get_in_out_features(base)
            if config.k > min(in_features, out_features):
                too_small.append(f"{key} (weight shape (out, in) = ({out_features}, {in_features}))")
        if unsupported:
            raise TypeError(
                f"SubspaceLoRA cannot adapt {len(unsupported)} target module(s): {'; '.join(unsupported[:5])}"
                f"{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules (or use exclude_modules)."
            )
        if too_small:
            raise ValueError(
                f"SubspaceLoraConfig.k={config.k} is larger than min(out, in) of {len(too_small)} target layer(s): "
                f"{', '.join(too_small[:5])}{' ...' if len(too_small) > 5 else ''}. A matrix has at most min(out, in) "
                "singular directions: choose a smaller k or exclude these layers (exclude_modules)."
            )
        bar = _SVD_BAR.get()
        if bar is not None:
            bar.total = count
            bar.refresh()

    def _replace_layer(self, config: SubspaceLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                       parent: nn.Module, current_key: str) -> None:
        kwargs = dict(
            k=config.k,
            core=config.core,
            train_residual=config.train_residual,
            exact_max_dim=config.exact_max_dim,
            niter=config.niter,
            seed=config.seed,
        )
        bar = _SVD_BAR.get()
        if bar is not None:
            bar.set_postfix_str(current_key, refresh=False)
        if isinstance(target, SubspaceLoraLayer):
            target.update_layer(adapter_name, name=current_key, **kwargs)
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            reason = _unsupported_reason(base)
            if reason is not None:
                raise TypeError(f"SubspaceLoRA cannot adapt {current_key!r}: {reason}. Narrow target_modules.")
            # One config may cover Conv1D and Linear layers: the weight layout is a property of each layer.
            new_module = Linear(target, adapter_name, fan_in_fan_out=isinstance(base, Conv1D), name=current_key, **kwargs)
            install_layer(self, parent, target_name, new_module, target, adapter_name)
        if bar is not None:
            bar.update(1)
