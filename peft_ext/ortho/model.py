from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._checks import all_finite
from .._tuners import (
    CheckTargetsFirst,
    LinearTargetsOnly,
    SaveInitializedOnly,
    install_layer,
    planned_targets,
    unsupported_linear_reason,
)
from .config import OrthoSplitConfig
from .layer import MERGE_ONE_PER_LAYER, VALUE_DTYPES, Linear, OrthoSplitLayer, base_stream, index_dtype
from .quant import BITSANDBYTES
from .select import entry_count, entry_scores, top_k_indices


DATA_FREE_SELECTORS = ("magnitude", "relative", "random")


@dataclass
class LayerInputs:
    """What one layer's split needs beyond its weight (all (out, in) layout; None where the selector does not use it)."""

    reference: Optional[torch.Tensor] = None
    hinv_diag: Optional[torch.Tensor] = None
    fisher: Optional[torch.Tensor] = None
    forget: Optional[tuple[str, torch.Tensor]] = None
    retain: Optional[tuple[str, torch.Tensor]] = None


def splits_from_weight_alone(config: OrthoSplitConfig) -> bool:
    """Whether an adapter of `config` is split from each layer's weight alone, inside get_peft_model (as SubspaceLoRA
    and PEFT's PiSSA initialise): a data-free selector and no reference weights. Otherwise get_peft_model creates
    placeholders and `initialize_orthosplit` fills them."""
    return config.selector in DATA_FREE_SELECTORS and not config.uses_reference


def split_weight(
    w: torch.Tensor, config: OrthoSplitConfig, inputs: LayerInputs, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(index, anchor or None, values) of the ortho stream of weight `w` (out, in), following `config`.

    The candidate residual is D = W - W_ref (reference) or W - Q(W); the selector scores D and the top
    k = round(density * numel) entries form the mask M; the base stream is B = Q(W with M set to W_ref) and the
    values are (W - B)[M], so B + O equals W on M.
    """
    index, anchor, values, _ = split_weight_with_share(w, config, inputs, generator)
    return index, anchor, values


def split_weight_with_share(
    w: torch.Tensor, config: OrthoSplitConfig, inputs: LayerInputs, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, float]:
    """`split_weight`, plus the share of the candidate residual's energy that the mask holds, ||D[M]||^2 / ||D||^2
    (0 where D is zero): 1 when the ortho stream holds the whole residual, about the density for a random mask."""
    dtype = w.dtype
    w = w.detach().contiguous()
    w = w if w.dtype == torch.float64 else w.float()  # residuals and scores in float32 whatever the weight's dtype
    kind = config.base_kind
    if inputs.reference is not None:
        d = w - inputs.reference.to(w.device, w.dtype)
    else:
        _, qw = base_stream(w, kind, dtype)
        d = w - qw.to(w.dtype)
    scores = entry_scores(
        config.selector, d, w,
        hinv_diag=inputs.hinv_diag, fisher=inputs.fisher, forget=inputs.forget, retain=inputs.retain,
        contrastive_lambda=config.contrastive_lambda, generator=generator,
    )
    index = top_k_indices(scores, entry_count(config.density, w.numel()))
    total = float(d.square().sum(dtype=torch.float64))
    share = float(d.reshape(-1)[index].square().sum(dtype=torch.float64)) / total if total > 0 else 0.0
    anchor = None
    if inputs.reference is not None:
        anchor = inputs.reference.to(w.device).reshape(-1)[index].float()
        target = w.to(dtype).to(w.dtype).clone()  # the weight as stored (what the layer rebuilds from); a copy
        target.view(-1)[index] = anchor.to(dtype).to(w.dtype)
        _, base = base_stream(target, kind, dtype)
    else:
        base = qw
    values = (w - base.to(w.dtype)).reshape(-1)[index].to(VALUE_DTYPES[config.values_dtype])
    return index.to(index_dtype(w.numel())), anchor, values, share


def unsupported_reason(layer: nn.Module) -> Optional[str]:
    """Why OrthoSplit cannot split `layer`, or None if it can."""
    return unsupported_linear_reason(layer, "the split")


class OrthoSplitModel(CheckTargetsFirst, LinearTargetsOnly, SaveInitializedOnly, BaseTuner):
    """PEFT tuner for OrthoSplit. Create it with `get_peft_model(model, OrthoSplitConfig(...))`: the data-free
    selectors without reference weights are split right there, from W alone; the others get placeholders that
    `peft_ext.initialize_orthosplit(model, reference=..., stats=..., ...)` fills (`peft_ext.orthosplit` does both in
    one call). Load a saved one with `PeftModel.from_pretrained` (the base stream is rebuilt from the base model's
    weights)."""

    method_name = "OrthoSplit"
    prefix: str = "ortho_"
    tuner_layer_cls = OrthoSplitLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT's rule for adapter weights, applied to the values: float32 with autocast_adapter_dtype (its default),
        # the model's dtype without (a float32 model thus holds float32 values either way, one dtype for FSDP). PEFT's
        # cast re-wraps each upcast tensor as a new Parameter, trainable whatever the old one was: that unfroze the
        # values of an inactive adapter after add_adapter and of an adapter loaded with is_trainable=False. Keep the
        # cast, restore requires_grad.
        held = [(m, m.ortho_values[adapter_name].requires_grad) for m in self.model.modules()
                if isinstance(m, OrthoSplitLayer) and adapter_name in m.ortho_values]
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for layer, requires_grad in held:
            values = layer.ortho_values[adapter_name]
            dtype = values.dtype if autocast_adapter_dtype else layer.model_dtype()
            if values.dtype != dtype:  # created in a dtype that holds values_dtype exactly, e.g. float32 on bfloat16
                layer.ortho_values[adapter_name] = nn.Parameter(values.detach().to(dtype), requires_grad=requires_grad)
            else:
                values.requires_grad_(requires_grad)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # PEFT's hook for what a saved adapter holds: frozen values go to disk in values_dtype (float16 by default,
        # half the bytes of the float32 they are held in under PEFT's autocast), exactly, as the split rounded them to
        # it. Trained values (train_ortho) are saved as they trained, so saving does not round the training away. The
        # model's own state_dict() keeps the live tensors, so torch.distributed.checkpoint can load into them in place.
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.train_ortho:
            return to_return
        saved_dtype = VALUE_DTYPES[config.values_dtype]
        suffix = f".ortho_values.{adapter_name}"
        return {k: (v.to(saved_dtype) if k.endswith(suffix) and v.is_floating_point() else v)
                for k, v in to_return.items()}

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge(adapter_names, safe_merge)  # before any layer merges: a refusal leaves the model as it was
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            self._check_merge(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def _check_merge(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        """Refuse, naming the layers, a merge that would put two OrthoSplit adapters into one layer or (safe_merge)
        a non-finite weight into any layer. Checked on all layers first: PEFT merges layer by layer, so a refusal
        from the tenth layer would leave nine merged (or, in merge_and_unload, already unloaded)."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got the string {adapter_names!r}; "
                            f"pass adapter_names=[{adapter_names!r}]")
        conflicts, broken = [], []
        for key, module in self.model.named_modules():
            if not isinstance(module, OrthoSplitLayer):
                continue
            requested = list(module.active_adapters if adapter_names is None else adapter_names)
            after = module.merge_conflict(requested)
            if after:
                conflicts.append(f"layer {key!r} would take {after}")
            elif safe_merge:
                new = [n for n in requested if n in module.ortho_values and n not in module.merged_adapters]
                with torch.no_grad():
                    if new and not all_finite(module.effective_weight(new[0])):
                        broken.append(f"{key!r} (adapter {new[0]!r})")
        if broken:
            raise ValueError(
                f"safe_merge: NaNs/Infs in the merged weight of layer(s) {', '.join(broken[:5])}: their ortho values "
                "or base weights are not finite; nothing was merged"
            )
        if conflicts:
            raise ValueError(
                f"cannot merge adapter_names={adapter_names!r}: {'; '.join(conflicts[:3])}"
                f"{' ...' if len(conflicts) > 3 else ''}. {MERGE_ONE_PER_LAYER[0].upper()}{MERGE_ONE_PER_LAYER[1:]}"
            )

    def _check_targets(self, model: nn.Module, config: OrthoSplitConfig) -> None:
        unsupported = []
        for key, base in planned_targets(self, model, config):
            reason = unsupported_reason(base)
            if reason is not None:
                unsupported.append(f"{key!r}: {reason}")
        if unsupported:
            raise TypeError(
                f"OrthoSplit cannot split {len(unsupported)} target module(s): {'; '.join(unsupported[:5])}"
                f"{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules (or use exclude_modules)."
            )
        if config.base_kind in BITSANDBYTES:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError(
                    f"OrthoSplitConfig.base_kind={config.base_kind!r} needs bitsandbytes, which is not installed: pip "
                    "install 'peft-ext[quant]'; base_kind='nf4' or 'int8' simulate the same rounding in pure torch"
                )

    def _replace_layer(self, config: OrthoSplitConfig, adapter_name: str, target: nn.Module, target_name: str,
                       parent: nn.Module, current_key: str) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        fan_in_fan_out = isinstance(base, Conv1D)
        split = self._split_for(config, current_key, base, fan_in_fan_out)
        kwargs = dict(
            base_kind=config.base_kind, density=config.density, layout=config.layout,
            values_dtype=config.values_dtype, train_ortho=config.train_ortho, uses_reference=config.uses_reference,
        )
        if isinstance(target, OrthoSplitLayer):
            target.update_layer(adapter_name, split=split, **kwargs)
            return
        new_module = Linear(target, adapter_name, fan_in_fan_out=fan_in_fan_out, split=split, **kwargs)
        install_layer(self, parent, target_name, new_module, target, adapter_name)

    @staticmethod
    def _split_for(config: OrthoSplitConfig, key: str, base: nn.Module, fan_in_fan_out: bool):
        """The split of one layer from its weight alone, or None (placeholders) when it needs data or reference
        weights (initialize_orthosplit, or a checkpoint while loading), or the weight is not there (meta)."""
        weight = getattr(base, "weight", None)
        if weight is None or weight.device.type == "meta" or not splits_from_weight_alone(config):
            return None
        return split_weight(_dense_weight(base, fan_in_fan_out), config, LayerInputs(), layer_generator(config, key))


def _dense_weight(base: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The (out, in) weight of a linear layer, dequantised if it is a bitsandbytes layer."""
    backend = resolve_quantization_backend(base)
    if backend is not None:
        from peft.utils.integrations import dequantize_module_weight

        w = dequantize_module_weight(base)
    else:
        w = base.weight
    return transpose(w.detach(), fan_in_fan_out)


def layer_generator(config: OrthoSplitConfig, key: str) -> torch.Generator:
    """The 'random' selector's generator for layer `key` (its name in the model get_peft_model was given): seeded with
    config.seed plus a per-layer offset that is the same in every process (Python's hash() is salted)."""
    import zlib

    return torch.Generator().manual_seed(config.seed + zlib.crc32(key.encode()) % (2**31))
