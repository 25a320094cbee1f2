"""Helpers shared by peft-ext's tuner models."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers, check_adapters_to_merge
from peft.tuners._buffer_dict import BufferDict
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._checks import all_finite, check_finite
from ._sharded import refuse_sharded_base
from .bnb_cpu import check_4bit_dequantize, disable_bnb_cpu_repack


def planned_targets(tuner: BaseTuner, model: nn.Module, config) -> Iterator[tuple[str, nn.Module]]:
    """(name, base layer) of every module `inject_adapter` is about to adapt, before it changes anything.

    Tuners validate these in `_pre_injection_hook` and again in `_prepare_model`, because PeftModel.add_adapter /
    load_adapter call inject_adapter without the hook; 'all-linear' is expanded on a copy, as inject_adapter
    expands it only after the hook. Modules inside existing adapter layers are skipped. A bitsandbytes 4-bit layer
    whose CPU dequantisation is wrong on this machine is refused here (`bnb_cpu.check_4bit_dequantize`), for every
    tuner, before anything is replaced.
    """
    config = _maybe_include_all_linear_layers(copy.copy(config), model)
    inside_adapters = tuple(f"{key}." for key, m in model.named_modules() if key and isinstance(m, BaseTunerLayer))
    for key, module in model.named_modules():
        if not key or key.startswith(inside_adapters) or not tuner._check_target_module_exists(config, key):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        check_4bit_dequantize(base, key)
        refuse_sharded_base(base, key, type(config).__name__.removesuffix("Config"))  # injected after fully_shard
        yield key, base


class DeltaMergeMixin:
    """merge/unmerge and forward for tuner layers whose whole update is `get_delta_weight(adapter)` (in the base
    weight's layout). Goes through PEFT's get_base_weight/set_base_weight, so bitsandbytes bases merge by
    dequantising and requantising (as lossy as it is for LoRA). A layer supplies `_adapter_delta(name, x)`: the
    unscaled output of one adapter for the input `x`. List it before nn.Module in the bases, so that its `forward`
    is the one nn.Module finds."""

    def _has_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
            raise TypeError(f"cannot merge into a {self.quantization_backend.backend_name} base layer")
        for name in adapter_names:
            if not self._has_adapter(name):
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(name).detach()
            if safe_merge:
                weight = weight.clone() + delta.to(weight.dtype)
                check_finite(weight, f"the merged weight of adapter {name!r}", why="the adapter is broken")
            else:
                weight += delta.to(weight.dtype)
            self.set_base_weight(weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._has_adapter(name):
                weight = self.get_base_weight()
                weight -= self.get_delta_weight(name).detach().to(weight.dtype)
                self.set_base_weight(weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result, add_adapters = self._base_forward(x, *args, **kwargs)
        if not add_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if self._has_adapter(name):
                result = result + (self._adapter_delta(name, x) * self.scaling[name]).to(out_dtype)
        return result

    def _base_forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, bool]:
        """(base output, whether the adapters still have to be added to it)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs), False
        if self.merged:
            return self.base_layer(x, *args, **kwargs), False
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        return result, True


@dataclass
class TargetFields:
    """The target-selection fields every peft-ext config declares, as LoraConfig does (a base of each config, listed
    after PeftConfig); `_config_fields.check_shared_fields` checks their types, `validate_target_fields` the rest."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or suffixes) or a regex of the linear layers to adapt, e.g. "
                  "['query', 'key', 'value', 'dense'] or ['q_proj', 'v_proj'], or 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from target_modules."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapters that are trained and saved, e.g. a classifier head ['classifier']."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in LoraConfig)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers' or 'h'."}
    )


def validate_target_fields(config, cls_name: str) -> None:
    """The target-selection checks every peft-ext config shares (normalises lists to sets, as LoraConfig does)."""
    if config.target_modules is None:
        raise ValueError(
            f"{cls_name}.target_modules is required: name the linear layers to adapt, e.g. "
            "['query', 'key', 'value'] for BERT or ['q_proj', 'k_proj', 'v_proj', 'o_proj'] for Llama"
        )
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{cls_name}.layers_pattern needs layers_to_transform to be set as well")


def init_layer_shapes(layer: BaseTunerLayer, method: str, kwargs: dict) -> None:
    """The bookkeeping every peft-ext tuner layer's __init__ ends with: adapter state and the layer's in/out sizes."""
    from peft.tuners.tuners_utils import _get_in_out_features

    layer._disable_adapters = False
    layer.merged_adapters = []
    in_features, out_features = _get_in_out_features(layer.get_base_layer())
    if in_features is None or out_features is None:
        raise TypeError(f"{method} does not support layers of type {type(layer.get_base_layer()).__name__}")
    layer.in_features = in_features
    layer.out_features = out_features
    layer.kwargs = kwargs  # (bitsandbytes' CPU repack of a 4-bit base is switched off model-wide in _prepare_model)


def unsupported_linear_reason(layer: nn.Module, what_needs_the_weight: str) -> Optional[str]:
    """Why a tuner that reads the (dequantised) weight cannot adapt `layer`, or None if it can: nn.Linear, transformers'
    Conv1D and bitsandbytes linear layers qualify; forward-only quantisation backends (GPTQ, ...) do not."""
    backend = resolve_quantization_backend(layer)
    if isinstance(layer, (nn.Linear, Conv1D)) and backend is None:
        return None
    if backend is None or backend.layer_type != "linear":
        return (f"only nn.Linear, transformers' Conv1D and bitsandbytes Linear4bit/Linear8bitLt are supported, "
                f"not {type(layer).__name__}")
    if not backend.supports_merge:
        name = backend.backend_name or type(layer).__name__
        return f"{what_needs_the_weight} needs the dequantised weight, which {name} layers cannot give"
    return None


def install_layer(tuner: BaseTuner, parent: nn.Module, target_name: str, new_module: nn.Module, target: nn.Module,
                  adapter_name: str) -> None:
    """The end of every peft-ext tuner's `_create_and_replace`: freeze a layer whose adapter is not active, give it the
    replaced module's train/eval mode (a fresh nn.Module is in train mode even inside an eval model), swap it in."""
    if adapter_name not in tuner.active_adapters:
        new_module.requires_grad_(False)
    new_module.train(target.training)
    tuner._replace_module(parent, target_name, new_module, target)


class CheckTargetsFirst:
    """Mixin for BaseTuner subclasses: run `self._check_targets(model, config)` before inject_adapter replaces any
    layer, on every path. get_peft_model goes through `_pre_injection_hook`; PeftModel.add_adapter / load_adapter
    skip that hook but still call `_prepare_model` first. A bad config therefore leaves the model unchanged. A good
    one then turns bitsandbytes' in-place CPU repack off on the model's 4-bit layers (bnb_cpu.py)."""

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        self._check_targets(model, config)

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        self._check_targets(model, peft_config)
        # Every bitsandbytes 4-bit layer of the model, not only the adapted ones: a repacked layer that is not
        # adapted still drops the input gradient, so the adapters below it would train on wrong gradients.
        disable_bnb_cpu_repack(model)


class SafeMergeFirst:
    """Mixin for BaseTuner subclasses whose layers merge with DeltaMergeMixin: `safe_merge=True` checks every layer's
    merged weight for NaN/Inf before any layer merges. PEFT merges layer by layer, so the layer check alone refused at
    the first broken layer after merging the ones before it (merge_adapter), or after unloading them
    (merge_and_unload): a half-merged model. Costs one weight-sized temporary per layer, as the layer's own check."""

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_finite_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge and safe_merge:
            self._check_finite_merge(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    @torch.no_grad()
    def _check_finite_merge(self, adapter_names: Optional[list[str]]) -> None:
        broken = []
        for key, layer in self.model.named_modules():
            if not isinstance(layer, DeltaMergeMixin):
                continue
            names = layer.active_adapters if adapter_names is None else adapter_names
            names = [n for n in names if layer._has_adapter(n) and n not in layer.merged_adapters]
            if not names:
                continue
            weight = layer.get_base_weight().clone()
            for name in names:
                weight += layer.get_delta_weight(name).to(weight.dtype)
            if not all_finite(weight):
                broken.append(f"{key!r} (adapter(s) {names})")
        if broken:
            raise ValueError(
                f"safe_merge: NaNs/Infs in the merged weight of {len(broken)} layer(s): {', '.join(broken[:5])}"
                f"{' ...' if len(broken) > 5 else ''}; the adapter's tensors or the base weights are not finite. "
                "Nothing was merged: load an earlier checkpoint of the adapter"
            )


class KeepAdapterDtype:
    """Mixin for tuner layers (before BaseTunerLayer in the bases) whose adapter tensors keep their own dtype.

    PEFT's `_move_adapter_to_device_of_base_layer` also casts every float adapter tensor to the base layer's dtype,
    and re-wraps a cast Parameter as a new one with requires_grad=True. This version moves tensors to the base
    layer's device only, keeping dtype and requires_grad.
    """

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move this adapter's tensors to the base layer's device, keeping their dtype and requires_grad."""
        if device is None:
            device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
            if device is None:
                return
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if not isinstance(container, (nn.ParameterDict, BufferDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if item.device.type == "meta" or item.device == torch.device(device):
                continue
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(item.detach().to(device), requires_grad=item.requires_grad)
            else:
                container[adapter_name] = item.to(device)



class InitializedFlag:
    """Mixin for peft-ext tuner layers (before BaseTunerLayer in the bases): whether each adapter holds its initial
    values yet, the one "initialised" mechanism of every peft-ext tuner.

    `get_peft_model` creates an adapter; a data-driven tuner's `initialize_<method>(model, data, adapter_name=...)`
    fills it (SubspaceLoRA, initialised from W alone, does so inside `get_peft_model`). The flag is a plain bool per
    adapter, read in the forward: deciding it from the weights there (A != 0) would cost a device sync per layer per
    step on CUDA and a graph break under torch.compile. A loaded state dict decides it again from the loaded tensors
    (`mark_loaded`, which each Linear's `_load_from_state_dict` calls: nn.Module precedes this mixin in their bases).

    A layer class declares `initialized_attr` (its {adapter: bool} dict, created in its __init__), `method_name`,
    `initialize_call` (the call that initialises an adapter, formatted with `name`), `not_ready` (how a refusal says
    it is not initialised), `unsaved` (what saving one would write) and `_initialized_in` (the rule for a state dict).
    """

    initialized_attr: str
    method_name: str
    initialize_call: str
    not_ready: str = "is not initialised"
    unsaved: str = "the saved adapter would hold no initial values"

    def is_initialized(self, adapter_name: str) -> bool:
        """Whether `adapter_name` holds its initial values (written by its initialisation, or loaded)."""
        return getattr(self, self.initialized_attr).get(adapter_name, False)

    def set_initialized(self, adapter_name: str, value: bool = True) -> None:
        getattr(self, self.initialized_attr)[adapter_name] = bool(value)

    def initialize_hint(self, adapter_name: str) -> str:
        """The call that initialises `adapter_name`, for error messages."""
        return self.initialize_call.format(name=adapter_name)

    def require_initialized(self, adapter_name: str) -> None:
        """A one-line RuntimeError naming the initialising call, if `adapter_name` is not initialised."""
        if not self.is_initialized(adapter_name):
            raise RuntimeError(
                f"{self.method_name} adapter {adapter_name!r} {self.not_ready}: call "
                f"{self.initialize_hint(adapter_name)}, or load a saved, initialised adapter with "
                "PeftModel.from_pretrained / load_adapter"
            )

    def mark_loaded(self, state_dict: dict, prefix: str) -> None:
        """After `state_dict` was loaded into this layer: each adapter whose tensors came with it is initialised iff
        they hold initial values (`_initialized_in`). One check per load, not per step."""
        flags = getattr(self, self.initialized_attr)
        for name in list(flags):
            loaded = self._initialized_in(state_dict, prefix, name)
            if loaded is not None:
                flags[name] = loaded

    def _initialized_in(self, state_dict: dict, prefix: str, adapter_name: str) -> Optional[bool]:
        """Whether the tensors `state_dict` holds for `adapter_name` are initial values; None when it holds none."""
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        getattr(self, self.initialized_attr).pop(adapter_name, None)


class SaveInitializedOnly:
    """Mixin for BaseTuner subclasses whose layers carry an `InitializedFlag`: saving (save_pretrained, Trainer
    checkpoints, export) refuses an adapter that some layer holds uninitialised, naming the call that initialises it,
    instead of writing placeholders that would load as an adapter doing nothing (or nothing sensible)."""

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        pending = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, InitializedFlag) and adapter_name in getattr(m, m.initialized_attr)
                   and not m.is_initialized(adapter_name)]
        if pending:
            name, layer = pending[0]
            raise ValueError(
                f"{layer.method_name} adapter {adapter_name!r} was never initialised ({len(pending)} layer(s), e.g. "
                f"{name!r}): {layer.unsaved}. Call {layer.initialize_hint(adapter_name)} first; to save only other "
                "adapters, pass selected_adapters=[...]"
            )
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)


def active_adapter(model: nn.Module) -> str:
    """The one active adapter of a PEFT model, or a ValueError asking for adapter_name=."""
    active = getattr(model, "active_adapter", None)
    if isinstance(active, list):
        active = active[0] if len(active) == 1 else None
    if not isinstance(active, str):
        raise ValueError("cannot tell which adapter to initialise: pass adapter_name=")
    return active


def adapter_config(model: nn.Module, adapter_name: str, config_cls: type):
    """The PEFT config of `adapter_name` in `model`, which must be a `config_cls`."""
    configs = getattr(model, "peft_config", None)
    if not configs or adapter_name not in configs:
        raise ValueError(f"model has no PEFT adapter named {adapter_name!r}; create it with get_peft_model first")
    config = configs[adapter_name]
    if not isinstance(config, config_cls):
        raise ValueError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a {config_cls.__name__}")
    return config


class JsonReport:
    """`to_json` / `save_json` for the report dataclasses of the initialize_* calls (which define `to_dict`)."""

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str) -> None:
        """Write `to_json()` to `path`, complete or absent (a kill mid-write leaves the previous file)."""
        from .files import atomic_file

        with atomic_file(path, field="path") as tmp, open(tmp, "w") as f:
            f.write(self.to_json())


def text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned, a rule under the head."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


class LinearTargetsOnly:
    """Mixin for BaseTuner subclasses that adapt linear layers (not `target_parameters`): PEFT's `_create_and_replace`
    refuses a parameter target and hands every layer to `_replace_layer(config, adapter_name, target, target_name,
    parent, current_key)`, which adds the adapter to an existing layer of the tuner or installs a new one."""

    method_name: str  # e.g. "NullSpaceLoRA", for the refusal

    def _create_and_replace(self, config, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
                            current_key: str, parameter_name: Optional[str] = None) -> None:
        if parameter_name is not None:
            raise ValueError(f"{self.method_name} adapts linear layers (target_modules); target_parameters is not "
                             "supported: leave it unset")
        self._replace_layer(config, adapter_name, target, target_name, parent, current_key)
