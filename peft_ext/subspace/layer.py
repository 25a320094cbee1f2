"""SubspaceLoRA layers: a base linear layer (plain, Conv1D or bitsandbytes-quantised) plus, per adapter, the frozen
top-k singular vectors of its weight and a trainable core.

Per adapter: buffers `subspace_U` (out, k), `subspace_V` (in, k) and `subspace_C0` ((k, k), or (k,) for a diagonal
core: the top-k singular values) are saved with the adapter; `subspace_C` (same shape as C0) is trained from C0;
with `train_residual`, `subspace_R_delta` (out, in) is trained from 0. U, V and R_delta are always in the (out, in)
convention, also for GPT-2's Conv1D, whose weight is stored (in, out).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from .._tuners import DeltaMergeMixin, InitializedFlag, KeepAdapterDtype, init_layer_shapes
from ..linalg import top_k_svd


class SubspaceLoraLayer(InitializedFlag, KeepAdapterDtype, BaseTunerLayer):
    """Adds ``U (C - C0) V^T x`` (and, with `train_residual`, the residual update) to the base layer's output.

    Everything the adapter owns stays in the dtype of its SVD (float32, float64 for float64 weights), also on a
    half-precision base: the trained change ``C - C0`` is small next to the singular values in C, and rounding C to
    bfloat16 would quantise that change with the ulp of the singular values. `_move_adapter_to_device_of_base_layer`
    therefore moves the adapter's tensors to the base layer's device without casting them (PEFT's version also casts
    to the base dtype, e.g. after a `low_cpu_mem_usage` load).
    """

    adapter_layer_names = ("subspace_C", "subspace_R_delta")
    # Only the tensor containers: export.py filters checkpoint keys by these names, so the plain per-adapter dicts
    # (k, core, train_residual, scaling) are not listed (a module called `k` would collide); `delete_adapter` drops them.
    other_param_names = ("subspace_U", "subspace_V", "subspace_C0")
    # InitializedFlag: the SVD runs in get_peft_model / add_adapter (from W alone, as PEFT's PiSSA); an adapter created
    # without the weights (on the meta device: low_cpu_mem_usage) is a placeholder until a checkpoint fills it
    initialized_attr = "subspace_initialized"
    method_name = "SubspaceLoRA"
    not_ready = "has no SVD yet (it was created without the base weights, e.g. with low_cpu_mem_usage=True)"
    initialize_call = ("peft.get_peft_model(model, SubspaceLoraConfig(...)) or model.add_adapter({name!r}, config) on a "
                       "model whose weights are loaded (the SVD runs there)")
    unsaved = "its U, V and C0 are zero placeholders, so the saved adapter would change nothing"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.k: dict[str, int] = {}
        self.core: dict[str, str] = {}
        self.train_residual: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.subspace_initialized: dict[str, bool] = {}  # see InitializedFlag
        self.subspace_C = nn.ParameterDict({})
        self.subspace_R_delta = nn.ParameterDict({})
        self.subspace_U = BufferDict({}, persistent=True)
        self.subspace_V = BufferDict({}, persistent=True)
        self.subspace_C0 = BufferDict({}, persistent=True)
        init_layer_shapes(self, "SubspaceLoRA", kwargs)

    def update_layer(
        self,
        adapter_name: str,
        k: int,
        core: str,
        train_residual: bool,
        exact_max_dim: int = 512,
        niter: int = 4,
        seed: int = 0,
        name: str = "",
    ) -> None:
        out_f, in_f = self.out_features, self.in_features
        if k > min(out_f, in_f):
            raise ValueError(
                f"SubspaceLoraConfig.k={k} is larger than min(out, in) = {min(out_f, in_f)} for layer "
                f"{name or type(self.get_base_layer()).__name__} with weight shape (out, in) = ({out_f}, {in_f}): it "
                f"has at most {min(out_f, in_f)} singular directions. Choose k <= {min(out_f, in_f)} or exclude this "
                "layer with exclude_modules."
            )
        self.k[adapter_name] = k
        self.core[adapter_name] = core
        self.train_residual[adapter_name] = train_residual
        self.scaling[adapter_name] = 1.0
        c_shape = (k, k) if core == "full" else (k,)

        # Under low_cpu_mem_usage PEFT creates adapter parameters on the meta device and loads them (and our buffers)
        # from the checkpoint afterwards; a meta base weight has nothing to decompose either. Skip the SVD then.
        self.subspace_C[adapter_name] = nn.Parameter(torch.zeros(c_shape))
        weight = self.get_base_layer().weight
        skip = self.subspace_C[adapter_name].device.type == "meta" or weight.device.type == "meta"
        if skip:
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            u = torch.zeros(out_f, k, dtype=dtype, device=weight.device)
            v = torch.zeros(in_f, k, dtype=dtype, device=weight.device)
            s = torch.zeros(k, dtype=dtype, device=weight.device)
        else:
            u, s, v = self._top_k(k, exact_max_dim, niter, seed, name)
        c0 = s if core == "diag" else torch.diag(s)
        self.subspace_U[adapter_name] = u.contiguous()
        self.subspace_V[adapter_name] = v.contiguous()
        self.subspace_C0[adapter_name] = c0.clone()
        if not skip:
            self.subspace_C[adapter_name] = nn.Parameter(c0.clone())
        if train_residual:
            self.subspace_R_delta[adapter_name] = nn.Parameter(torch.zeros(out_f, in_f, dtype=u.dtype, device=u.device))
        self.set_initialized(adapter_name, not skip)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def _top_k(
        self, k: int, exact_max_dim: int, niter: int, seed: int, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k SVD of the (dequantised) base weight in (out, in) layout: float32 (float64 for float64 weights),
        on the weight's device; exact up to `exact_max_dim`, randomized above."""
        try:
            weight = self.get_base_weight()
        except TypeError as e:  # forward-only quantisation backends (GPTQ, ...) cannot dequantise
            raise TypeError(f"SubspaceLoRA needs the weight of layer {name!r} for its SVD: {e}") from e
        w = transpose(weight, self.fan_in_fan_out)
        try:
            return top_k_svd(
                w, k, exact_max_dim=exact_max_dim, niter=niter, generator=torch.Generator().manual_seed(seed)
            )
        except ValueError as e:
            raise ValueError(f"SubspaceLoRA cannot decompose the weight of layer {name!r}: {e}") from e

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for attr in (self.k, self.core, self.train_residual, self.scaling):
            attr.pop(adapter_name, None)

    def _initialized_in(self, state_dict: dict, prefix: str, adapter_name: str) -> bool | None:
        """A loaded U (orthonormal columns when it came from an SVD) is initial values iff it is non-zero."""
        loaded = state_dict.get(f"{prefix}subspace_U.{adapter_name}")
        if not isinstance(loaded, torch.Tensor) or loaded.device.type == "meta":
            return None
        return bool(loaded.detach().abs().amax() > 0)

    # ------------------------------------------------------------------ math
    def _basis(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, V, C - C0) in the dtype of C."""
        c = self.subspace_C[adapter_name]
        u = self.subspace_U[adapter_name].to(c.dtype)
        v = self.subspace_V[adapter_name].to(c.dtype)
        return u, v, c - self.subspace_C0[adapter_name].to(c.dtype)

    def _effective_residual(self, adapter_name: str) -> torch.Tensor:
        """(I - U U^T) R_delta (I - V V^T): the part of R_delta that acts, in (out, in) layout."""
        r = self.subspace_R_delta[adapter_name]
        u = self.subspace_U[adapter_name].to(r.dtype)
        v = self.subspace_V[adapter_name].to(r.dtype)
        r = r - u @ (u.T @ r)
        return r - (r @ v) @ v.T

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with delta W = scaling * B @ A exactly: A = (C - C0) V^T (k, in), B = U (out, k), scaling 1.

        Refused with `train_residual`: the residual update is a dense (out, in) matrix, not rank k.
        """
        if self.train_residual[adapter_name]:
            raise ValueError(
                f"SubspaceLoRA adapter {adapter_name!r} trains the residual (train_residual=True): its update is a "
                "dense (out, in) matrix, so no low-rank LoRA reproduces it exactly and export_to_lora refuses it. Use "
                "model.merge_and_unload() to bake it into the weights instead."
            )
        return self._low_rank(adapter_name)

    def _low_rank(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) = ((C - C0) V^T, U) of the in-subspace update."""
        u, v, d = self._basis(adapter_name)
        a = d[:, None] * v.T if self.core[adapter_name] == "diag" else d @ v.T
        return a, u

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta of the layer's weight (in the base layer's layout) that this adapter adds, in the adapter's dtype."""
        self.require_initialized(adapter_name)
        a, u = self._low_rank(adapter_name)
        delta = u @ a
        if adapter_name in self.subspace_R_delta:
            delta = delta + self._effective_residual(adapter_name)
        return transpose(delta, self.fan_in_fan_out) * self.scaling[adapter_name]

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """x @ delta W^T without forming delta W, `x` already in the adapter's dtype."""
        u, v, d = self._basis(adapter_name)
        xv = x @ v  # (..., k)
        z = xv * d if self.core[adapter_name] == "diag" else xv @ d.T
        out = z @ u.T
        if adapter_name in self.subspace_R_delta:
            # x (I - V V^T) R^T (I - U U^T): autograd gives R_delta the gradient (I - U U^T) G (I - V V^T), so the
            # residual never acts inside span(U) x span(V) (which C owns), whatever the optimiser does to the step.
            y = (x - xv @ v.T) @ self.subspace_R_delta[adapter_name].T
            out = out + (y - (y @ u) @ u.T)
        return out


class Linear(DeltaMergeMixin, nn.Module, SubspaceLoraLayer):
    """SubspaceLoRA around nn.Linear, transformers' Conv1D, or a bitsandbytes Linear4bit/Linear8bitLt.

    The base weight is never rewritten (except by an explicit `merge`): W = R + U C0 V^T holds implicitly, and the
    layer computes ``base_layer(x) + x V (C - C0)^T U^T`` (diagonal core: ``((x V) * (c - c0)) U^T``). With
    `train_residual` it also adds ``x (I - V V^T) R_delta^T (I - U U^T)``, a dense trainable (out, in) matrix: the
    adapter is then as large as the layer.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        k: int,
        core: str = "full",
        train_residual: bool = False,
        exact_max_dim: int = 512,
        niter: int = 4,
        seed: int = 0,
        fan_in_fan_out: bool = False,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SubspaceLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, k, core, train_residual, exact_max_dim=exact_max_dim, niter=niter, seed=seed, name=name
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Here, not on SubspaceLoraLayer: nn.Module precedes it in the bases (as in NullSpaceLoRA's Linear).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.mark_loaded(state_dict, prefix)

    def _adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.require_initialized(name)
        return self._adapter_output(name, x.to(self.subspace_C[name].dtype))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # PEFT's own (SVD-based) conversion works from get_delta_weight, also with a trained residual.
        return True

    def __repr__(self) -> str:
        return "subspace." + super().__repr__()
