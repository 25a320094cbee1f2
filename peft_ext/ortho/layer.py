"""OrthoSplit layers: a dense base stream B and a sparse ortho stream O with a run-time knob alpha.

``y = B x + alpha * O x + bias``. What is saved per adapter (prefix ``ortho_``): `ortho_index` (flat row-major indices
of the mask in the (out, in) layout, sorted, int32 when they fit), `ortho_values` (O on the mask, saved in
`values_dtype`, float16 by default) and, when reference weights defined the residual, `ortho_anchor` (the reference
values on the mask, float32). The base stream itself is not saved: it is rebuilt deterministically from the base
layer's weight, ``B = Q(W with the mask set to the anchor)``, so a saved adapter is as small as its sparse stream. The
original weight W stays in the base layer (PEFT's contract: disabling the adapter or `unload()` gives the original
model back); `merge_and_unload()` at alpha=0 bakes the base stream into the weights and drops everything the ortho
stream held.

At run time the values follow PEFT's rule for adapter weights: float32 with `autocast_adapter_dtype=True` (PEFT's
default) on float32 and half-precision models alike, the model's dtype with `autocast_adapter_dtype=False`. FSDP1
flattens a module's parameters into one buffer and refuses mixed dtypes, and the values sit beside the weights: a
float32 model shards as it is, a half-precision one with `autocast_adapter_dtype=False` (as for LoRA). The tuner casts
frozen values to `values_dtype` only when PEFT saves the adapter (`OrthoSplitModel._get_adapter_state_dict`), so a
saved adapter stays small and a float32 model loads it back to the bit.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from peft.tuners.tuners_utils import check_adapters_to_merge

from .._checks import check_finite, check_number
from .._sharded import is_dtensor
from .._tuners import InitializedFlag, KeepAdapterDtype, init_layer_shapes
from ..bnb_cpu import check_4bit_dequantize, import_bitsandbytes, keep_4bit_layout
from .quant import BITSANDBYTES, quantize
from .select import entry_count

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_alpha(alpha: Any, field: str = "alpha") -> float:
    """`alpha` as a float, or a ValueError naming the value (bools, strings, NaN and infinities are refused)."""
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and torch.isfinite(alpha).item():
        return float(alpha.item())
    return check_number(alpha, field, why="0 drops the ortho stream, 1 restores it")


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def bnb_base(target: torch.Tensor, kind: str, compute_dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A bitsandbytes Linear4bit (NF4) / Linear8bitLt holding `target` (out, in), and its dequantised weight."""
    bnb = import_bitsandbytes(f"OrthoSplitConfig.base_kind={kind!r}",
                              instead="base_kind='nf4' or 'int8' simulate the same rounding in pure torch")

    out_f, in_f = target.shape
    device = target.device
    w = target.detach().to("cpu", torch.float32).contiguous()
    if kind == "bnb_nf4":
        module = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        module = module.to(device)
        # the module must compute with exactly `deq` on every CPU: no bfloat16 repack, no wrongly dequantised shapes
        keep_4bit_layout(module)
        check_4bit_dequantize(module, f"OrthoSplit base stream ({out_f}x{in_f})")
        deq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    elif kind == "bnb_int8":
        module = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        module = module.to(device)
        deq = module.weight.data.float() * (module.weight.SCB.float()[:, None] / 127.0)
    else:
        raise ValueError(f"not a bitsandbytes base kind: {kind!r}; choose one of {BITSANDBYTES}")
    return module.requires_grad_(False), deq.to(device, target.dtype).reshape(out_f, in_f)


def base_stream(target: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[Optional[nn.Module], torch.Tensor]:
    """(bitsandbytes module or None, dequantised base in `dtype`) of a base-stream target (out, in).

    Quantisation runs in float32 (float64 stays float64) whatever the weight's dtype, and the result is cast to the
    weight's dtype once: the split and the rebuild on load both go through here, so they agree to the bit.
    """
    work = target if target.dtype == torch.float64 else target.float()
    if kind in BITSANDBYTES:
        module, base = bnb_base(work, kind, dtype if dtype != torch.float64 else torch.float32)
        return module, base.to(dtype)
    return None, quantize(work, kind).to(dtype)


class _Caches(dict):
    """Run-time caches, rebuilt on demand: a deep copy starts empty (torch cannot deep-copy a CSR tensor)."""

    def __deepcopy__(self, memo) -> "_Caches":
        return _Caches()


def _version(t: torch.Tensor) -> int:
    """In-place-change counter of a tensor (inference tensors have none and never change in place)."""
    return -1 if t.is_inference() else t._version


SPLIT_BEFORE_SHARDING = ("split it before fully_shard / accelerator.prepare (initialize_orthosplit right after "
                         "get_peft_model)")

MERGE_ONE_PER_LAYER = (
    "each OrthoSplit adapter replaces the layer's whole weight, so only one can be merged into a layer; merge adapters "
    "that sit on different layers (adapter_names=[...]), or call unmerge_adapter() first"
)


def _sparse_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the sparse product for input `x`: x's own, but float32 for float16/bfloat16 inputs off CUDA. CPU's
    sparse CSR kernels have no half-precision versions ("addmm_out_sparse_csr_impl_mkl not implemented for 'BFloat16'"),
    and the index_add of the trainable path would sum many entries per output in half precision."""
    if x.dtype in (torch.float16, torch.bfloat16) and not x.is_cuda:
        return torch.float32
    return x.dtype


class OrthoSplitLayer(InitializedFlag, KeepAdapterDtype, BaseTunerLayer):
    """Holds the saved sparse stream per adapter and caches what is rebuilt from it (base stream, CSR, fused weight)."""

    adapter_layer_names = ("ortho_values",)
    other_param_names = ("ortho_index", "ortho_anchor")
    # InitializedFlag: split at creation when the selector needs W alone (magnitude, relative, random without
    # reference weights); otherwise a placeholder until initialize_orthosplit (or a checkpoint) fills it
    initialized_attr = "ortho_initialized"
    method_name = "OrthoSplit"
    not_ready = "has no split yet (its selector or reference weights need data)"
    initialize_call = ("peft_ext.initialize_orthosplit(model, adapter_name={name!r}, ...) with what its selector needs "
                       "(reference=, stats=, fisher=, forget= and retain=), or build it in one call with "
                       "peft_ext.orthosplit(model, config, ...)")
    unsaved = "its sparse stream is a placeholder (no mask, no values), so the saved adapter would hold no split"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.base_kind: dict[str, str] = {}
        self.layout: dict[str, str] = {}
        self.ortho_alpha: dict[str, float] = {}
        self.ortho_initialized: dict[str, bool] = {}  # see InitializedFlag
        self.scaling: dict[str, float] = {}  # always 1: alpha is OrthoSplit's knob (kept for PEFT's generic code)
        self.ortho_values = nn.ParameterDict({})
        self.ortho_index = BufferDict({}, persistent=True)
        self.ortho_anchor = BufferDict({}, persistent=True)
        self._ortho_cache: dict[str, dict[str, Any]] = _Caches()
        init_layer_shapes(self, "OrthoSplit", kwargs)

    # ---------------------------------------------------------------- set-up
    def update_layer(
        self,
        adapter_name: str,
        base_kind: str,
        density: float,
        layout: str,
        values_dtype: str,
        train_ortho: bool,
        uses_reference: bool,
        split: Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        """Add an adapter; `split` = (index, anchor or None, values) from `split_weight`, else placeholders that
        `write_split` (initialize_orthosplit) or a checkpoint load fills (the adapter refuses to run until then)."""
        numel = self.out_features * self.in_features
        k = entry_count(density, numel)
        device = self._weight_device()
        held = self.held_dtype(VALUE_DTYPES[values_dtype])
        if split is None:
            index = torch.zeros(k, dtype=index_dtype(numel), device=device)
            anchor = torch.zeros(k if uses_reference else 0, dtype=torch.float32, device=device)
            values = torch.zeros(k, dtype=held, device=device)
        else:
            index, anchor, values = split
            anchor = torch.zeros(0, dtype=torch.float32, device=device) if anchor is None else anchor
            values = values.to(held)  # exact: `held` holds every value of the saved dtype
        self.base_kind[adapter_name] = base_kind
        self.layout[adapter_name] = layout
        self.ortho_alpha.setdefault(adapter_name, 1.0)
        self.set_initialized(adapter_name, split is not None)
        self.scaling[adapter_name] = 1.0
        self.ortho_index[adapter_name] = index
        self.ortho_anchor[adapter_name] = anchor
        self.ortho_values[adapter_name] = nn.Parameter(values, requires_grad=train_ortho)
        self._ortho_cache.pop(adapter_name, None)
        # PEFT's own switch for adapter weights that must stay frozen through set_adapter / enable_adapters:
        # the ortho values train only with train_ortho.
        self.frozen_peft_weight_names = dict(self.frozen_peft_weight_names)
        if train_ortho:
            self.frozen_peft_weight_names.pop(adapter_name, None)
        else:
            self.frozen_peft_weight_names[adapter_name] = ("ortho_values",)
        self.set_adapter(self.active_adapters)

    def _weight_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None else torch.device("cpu")

    def model_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in (a quantised weight's storage dtype says nothing about that)."""
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if self.quantization_backend is not None or weight is None or not weight.is_floating_point():
            compute = getattr(base, "compute_dtype", None)
            return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32
        return weight.dtype

    def held_dtype(self, saved_dtype: torch.dtype) -> torch.dtype:
        """The dtype new values are created in: the smallest one that holds both the saved values exactly and the
        model's dtype (the model's own for float32 models). PEFT's autocast then upcasts half precision to float32;
        without it the tuner casts them to the model's dtype (OrthoSplitModel._cast_adapter_dtype)."""
        return torch.promote_types(self.model_dtype(), saved_dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for attr in (self.base_kind, self.layout, self.ortho_alpha, self.scaling, self._ortho_cache):
            attr.pop(adapter_name, None)

    # ---------------------------------------------------------------- alpha
    def check_alpha_change(self, adapter_name: str, alpha: float) -> None:
        """Refuse to change the alpha of an adapter that is merged into the weights."""
        if self.merged and adapter_name in self.merged_adapters and alpha != self.ortho_alpha[adapter_name]:
            raise ValueError(
                f"OrthoSplit adapter {adapter_name!r} is merged into the weights at alpha={self.ortho_alpha[adapter_name]}; "
                "call model.unmerge_adapter() before changing alpha (or merge again afterwards)"
            )

    def set_alpha(self, adapter_name: str, alpha: float) -> None:
        alpha = check_alpha(alpha)
        self.check_alpha_change(adapter_name, alpha)
        self.ortho_alpha[adapter_name] = alpha

    # ---------------------------------------------------------------- streams
    def original_weight(self) -> torch.Tensor:
        """The base layer's weight W in (out, in) layout (dequantised if the base layer is quantised)."""
        return transpose(self.get_base_weight(), self.fan_in_fan_out)

    def _initialized_in(self, state_dict: dict, prefix: str, adapter_name: str) -> Optional[bool]:
        """A loaded mask is a split iff its indices are strictly increasing (top-k entries, sorted): the all-zero index
        of a placeholder is not."""
        index = state_dict.get(f"{prefix}ortho_index.{adapter_name}")
        if not isinstance(index, torch.Tensor) or index.device.type == "meta":
            return None
        return bool((index[1:] > index[:-1]).all())

    @torch.no_grad()
    def write_split(self, adapter_name: str, split: tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]) -> None:
        """Fill the adapter with `split` = (index, anchor or None, values) from `split_weight`, in place: the values
        keep their Parameter (dtype, device, requires_grad, and any optimizer that holds it). The anchor is replaced
        when its size changes (reference weights given to an adapter created without them)."""
        index, anchor, values = split
        held = self.ortho_values[adapter_name]
        if is_dtensor(held):
            raise ValueError(f"OrthoSplit adapter {adapter_name!r} is sharded (FSDP2): {SPLIT_BEFORE_SHARDING}")
        if index.shape != self.ortho_index[adapter_name].shape or values.shape != held.shape:
            raise ValueError(
                f"a split of {index.numel()} entries does not fit OrthoSplit adapter {adapter_name!r}, which holds "
                f"{held.numel()}: it was created with another density"
            )
        self.ortho_index[adapter_name].copy_(index)
        anchor = torch.zeros(0, dtype=torch.float32) if anchor is None else anchor.float()
        if anchor.shape == self.ortho_anchor[adapter_name].shape:
            self.ortho_anchor[adapter_name].copy_(anchor)
        else:
            self.ortho_anchor[adapter_name] = anchor.to(self.ortho_index[adapter_name].device)
        held.copy_(values.to(held.dtype))
        self._ortho_cache.pop(adapter_name, None)
        self.set_initialized(adapter_name)

    def _streams(self, name: str, need_base: bool = True) -> dict[str, Any]:
        """The adapter's run-time cache; with `need_base` it holds the base stream (bitsandbytes module and/or the
        dequantised weight), rebuilt when the weight, mask or anchor changed."""
        self.require_initialized(name)
        index, anchor = self.ortho_index[name], self.ortho_anchor[name]
        weight = self.get_base_layer().weight
        key = (weight.data_ptr(), _version(weight), index.data_ptr(), _version(index), anchor.data_ptr(), _version(anchor),
               weight.device)
        cache = self._ortho_cache.get(name)
        if cache is None or cache.get("key") != key:
            cache = {"key": key}
            self._ortho_cache[name] = cache
        if need_base and "base" not in cache:
            with torch.no_grad():
                w = self.original_weight()
                target = w.detach().clone(memory_format=torch.contiguous_format)
                if anchor.numel():
                    target.view(-1)[index.long()] = anchor.to(target.dtype)
                cache["module"], cache["base"] = base_stream(target, self.base_kind[name], w.dtype)
        return cache

    def _csr(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """O as a sparse CSR (out, in) matrix in `dtype`, cached until the values change."""
        cache = self._streams(name)
        values = self.ortho_values[name]
        key = (values.data_ptr(), _version(values), dtype)
        if cache.get("csr_key") != key:
            index = self.ortho_index[name].long()
            rows, cols = index // self.in_features, index % self.in_features
            small = index.numel() < 2**31 and self.in_features < 2**31
            idx_dtype = torch.int32 if small else torch.int64  # a third less cache, same speed (measured)
            crow = torch.zeros(self.out_features + 1, dtype=idx_dtype, device=index.device)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.out_features), 0)
            cols = cols.to(idx_dtype)
            with warnings.catch_warnings():  # "CSR support is in beta" / "invariant checks disabled", once per build
                warnings.simplefilter("ignore", UserWarning)
                cache["csr"] = torch.sparse_csr_tensor(
                    crow, cols, values.detach().to(dtype), size=(self.out_features, self.in_features)
                )
            cache["csr_key"] = key
        return cache["csr"]

    def dense_ortho(self, name: str) -> torch.Tensor:
        """O scattered into a dense (out, in) matrix (float32 or the weight's dtype)."""
        values = self.ortho_values[name]
        dtype = self.get_base_layer().weight.dtype if self.get_base_layer().weight.is_floating_point() else torch.float32
        dense = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=values.device)
        dense = dense.index_put((self.ortho_index[name].long(),), values.to(dtype))
        return dense.view(self.out_features, self.in_features)

    def effective_weight(self, name: str, alpha: Optional[float] = None) -> torch.Tensor:
        """B + alpha * O in (out, in) layout: the weight the layer acts with."""
        alpha = self.ortho_alpha[name] if alpha is None else check_alpha(alpha)
        base = self._streams(name)["base"]
        return base + alpha * self.dense_ortho(name).to(base.dtype) if alpha != 0 else base

    def _fused(self, name: str) -> torch.Tensor:
        """B + alpha * O for the current alpha. The fused layout then drops its copy of B (rebuilt from W when alpha
        changes, tens of ms for a 4096x4096 layer), so it holds W and one dense weight, like the csr layout."""
        cache = self._streams(name, need_base=False)
        values = self.ortho_values[name]
        key = (self.ortho_alpha[name], values.data_ptr(), _version(values))
        if cache.get("fused_key") != key:
            cache.pop("fused", None)
            cache["fused"] = self.effective_weight(name).detach()
            cache["fused_key"] = key
            cache.pop("base", None)
            cache.pop("module", None)
        return cache["fused"]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(B + alpha * O) - W in the base layer's layout: merging it makes the weight the layer's effective weight."""
        w = self.original_weight()
        return transpose(self.effective_weight(adapter_name).to(w.dtype) - w, self.fan_in_fan_out)

    def drop_caches(self) -> None:
        """Free the rebuilt base streams and caches (they are rebuilt on the next forward)."""
        self._ortho_cache.clear()


class Linear(nn.Module, OrthoSplitLayer):
    """OrthoSplit around nn.Linear, transformers' Conv1D, or a bitsandbytes layer (whose dequantised weight is W)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        fan_in_fan_out: bool = False,
        split: Optional[tuple] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        keys = ("base_kind", "density", "layout", "values_dtype", "train_ortho", "uses_reference")
        layer_kwargs = {k: kwargs.pop(k) for k in keys}
        OrthoSplitLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, split=split, **layer_kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Here, not on OrthoSplitLayer: nn.Module precedes it in the bases. A loaded split is ready to run.
        loaded = [n for n in self.ortho_index if f"{prefix}ortho_index.{n}" in state_dict]
        # Saved values come in values_dtype; bring them to the dtype they are held in before the ParameterDict loads
        # them (torch reads its entries from this dict after this call). A plain load would cast them anyway, but
        # load_state_dict(assign=True), PEFT's low_cpu_mem_usage path, would install them in the saved dtype.
        for n, held in self.ortho_values.items():
            key = f"{prefix}ortho_values.{n}"
            if key in state_dict and state_dict[key].dtype != held.dtype:
                state_dict[key] = state_dict[key].to(held.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for n in loaded:
            self._ortho_cache.pop(n, None)
        self.mark_loaded(state_dict, prefix)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write B + alpha * O into the base layer's weight (the original is kept aside for `unmerge`).

        PEFT passes every layer the same `adapter_names`; this layer merges those it holds and skips the others."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [n for n in adapter_names if n in self.ortho_values]
        if not names:
            return
        conflict = self.merge_conflict(names)
        if conflict:
            raise ValueError(f"this OrthoSplit layer would take adapters {conflict}: {MERGE_ONE_PER_LAYER}")
        if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
            raise TypeError(f"cannot merge into a {self.quantization_backend.backend_name} base layer")
        name = names[0]
        weight = self.get_base_weight()
        new = transpose(self.effective_weight(name).detach(), self.fan_in_fan_out).to(weight.dtype)
        if safe_merge:
            check_finite(new, f"the merged weight of adapter {name!r}", why="the adapter is broken")
        self._unmerged = weight.detach().clone()
        self.set_base_weight(new)
        self.merged_adapters.append(name)

    def merge_conflict(self, adapter_names: list[str]) -> list[str]:
        """The adapters this layer would hold merged after merging `adapter_names`, when that is more than one (a
        refused merge), else []. Each OrthoSplit adapter replaces the layer's whole weight, so a layer takes one;
        several adapters on disjoint layers merge together."""
        new = [n for n in adapter_names if n in self.ortho_values and n not in self.merged_adapters]
        after = list(self.merged_adapters) + new
        return after if new and len(after) > 1 else []

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.merged_adapters.clear()
        self.set_base_weight(self._unmerged)
        del self._unmerged

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.ortho_values]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) > 1:
            raise ValueError(
                f"OrthoSplit adapters {names} are all active, but each one replaces the whole weight: activate one "
                "with model.set_adapter(name)"
            )
        return self._split_forward(names[0], x)

    def _split_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        alpha = self.ortho_alpha[name]
        bias = getattr(self.get_base_layer(), "bias", None)
        values = self.ortho_values[name]
        train_values = values.requires_grad and torch.is_grad_enabled()
        if self.layout[name] == "fused" and not train_values:
            w = self._fused(name)
            y = F.linear(x.to(w.dtype) if x.dtype != w.dtype else x, w, bias)
            return y.to(x.dtype) if y.dtype != x.dtype else y
        streams = self._streams(name)
        base = streams["base"]
        x_c = x.to(base.dtype) if x.dtype != base.dtype else x
        if streams["module"] is None and alpha != 0 and not train_values and _sparse_dtype(x_c) == x_c.dtype:
            # One pass in the transposed layout: y^T = B x^T + bias, then y^T += alpha O x^T in place (sparse.addmm),
            # so the sparse product needs no transposed temporary (measured 1.15 -> 1.01x dense on 4096x1024).
            x2 = x_c.reshape(-1, self.in_features)
            # cuSPARSE is ~12x faster with a contiguous x^T (H100, 4096x4096 at 1%: 25x -> 2x a dense matmul)
            xt = x2.T.contiguous() if x2.is_cuda else x2.T
            y_t = torch.addmm(bias[:, None], base, xt) if bias is not None else base @ xt
            y_t = torch.sparse.addmm(y_t, self._csr(name, x2.dtype), xt, alpha=alpha)
            y = y_t.T.contiguous().reshape(*x.shape[:-1], self.out_features)
        else:
            if streams["module"] is not None:
                y = streams["module"](x_c).to(base.dtype)
                y = y + bias if bias is not None else y
            else:
                y = F.linear(x_c, base, bias)
            if alpha != 0:
                o = self._ortho_output(name, x_c, train_values)  # float32 for half inputs off CUDA
                y = y.to(o.dtype) + alpha * o  # summed in o's dtype, rounded to x's dtype once below
        return y.to(x.dtype) if y.dtype != x.dtype else y

    def _ortho_output(self, name: str, x: torch.Tensor, train_values: bool) -> torch.Tensor:
        """x @ O^T without forming O densely: CSR matmul, or a gather/index_add that autograd can differentiate.
        Computed in `_sparse_dtype(x)`, which is float32 for float16/bfloat16 inputs off CUDA."""
        x2 = x.reshape(-1, self.in_features)
        x2 = x2.to(_sparse_dtype(x2))
        if train_values:
            index = self.ortho_index[name].long()
            rows, cols = index // self.in_features, index % self.in_features
            contrib = x2[:, cols] * self.ortho_values[name].to(x2.dtype)
            y2 = torch.zeros(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device).index_add(1, rows, contrib)
        else:
            xt = x2.T.contiguous() if x2.is_cuda else x2.T  # see _split_forward
            y2 = torch.sparse.mm(self._csr(name, x2.dtype), xt).T
        return y2.reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return "ortho." + super().__repr__()
