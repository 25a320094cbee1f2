"""NullSpaceLoRA layers: a base linear layer (plain, Conv1D or bitsandbytes-quantised) plus per-adapter factors.

Naming follows PEFT: `nullspace_A` is the down projection (PEFT's `lora_A`, the released scripts' `BLinear`),
`nullspace_B` the up projection (`lora_B`, their `ALinear`). In split mode the frozen initial factors live in
`nullspace_A0`/`nullspace_B0` (buffers, saved with the adapter).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from .._sharded import full, write_whole
from .._tuners import DeltaMergeMixin, InitializedFlag, init_layer_shapes


class NullSpaceLoraLayer(InitializedFlag, BaseTunerLayer):
    adapter_layer_names = ("nullspace_A", "nullspace_B")
    other_param_names = ("nullspace_A0", "nullspace_B0", "r", "scaling", "mode", "nullspace_dropout")
    # InitializedFlag: set by set_nullspace_basis (what initialize_nullspace_lora writes through) or a load
    initialized_attr = "nullspace_initialized"
    method_name = "NullSpaceLoRA"
    initialize_call = ("peft_ext.initialize_nullspace_lora(model, calib_dataloader, adapter_name={name!r}) (or with "
                       "stats=ActivationStats.load(path))")
    unsaved = "its A is zero, so the saved adapter would change nothing"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.mode: dict[str, str] = {}
        self.nullspace_initialized: dict[str, bool] = {}  # see InitializedFlag
        self.nullspace_A = nn.ModuleDict({})
        self.nullspace_B = nn.ModuleDict({})
        self.nullspace_dropout = nn.ModuleDict({})
        self.nullspace_A0 = BufferDict({}, persistent=True)
        self.nullspace_B0 = BufferDict({}, persistent=True)
        init_layer_shapes(self, "NullSpaceLoRA", kwargs)

    def update_layer(self, adapter_name: str, r: int, scaling: float, mode: str, dropout: float, name: str = "") -> None:
        if r > self.in_features:
            raise ValueError(
                f"NullSpaceLoraConfig.r={r} is larger than the input dimension {self.in_features} of layer "
                f"{name or type(self.get_base_layer()).__name__}: the null space of a {self.in_features}-dim input has "
                f"at most {self.in_features} directions. Choose r <= {self.in_features} (usually far smaller), or "
                "exclude this layer with exclude_modules."
            )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.mode[adapter_name] = mode
        self.set_initialized(adapter_name, False)  # fresh zero factors (also when a name is re-created)
        self.nullspace_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A stays zero until initialize_nullspace_lora writes the null-space basis; B starts (and in v1/v2 stays) 0.
        self.nullspace_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.nullspace_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        nn.init.zeros_(self.nullspace_A[adapter_name].weight)
        nn.init.zeros_(self.nullspace_B[adapter_name].weight)
        if mode == "split":
            self.nullspace_A0[adapter_name] = torch.zeros(r, self.in_features)
            self.nullspace_B0[adapter_name] = torch.zeros(self.out_features, r)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if mode == "v2":
            # Declared, not just set: PEFT re-applies this after set_adapter / from_pretrained(is_trainable=True).
            frozen = dict(self.frozen_peft_weight_names)
            frozen[adapter_name] = ("nullspace_A",)
            self.frozen_peft_weight_names = frozen
        self.set_adapter(self.active_adapters)

    # ------------------------------------------------------------------ initialisation
    def _initialized_in(self, state_dict: dict, prefix: str, adapter_name: str) -> bool | None:
        """An adapter whose A came with a loaded state dict is initialised iff that A is non-zero, so adapters saved by
        any version load as initialised (the file format is unchanged), while a saved, never-initialised adapter still
        refuses to train."""
        loaded = state_dict.get(f"{prefix}nullspace_A.{adapter_name}.weight")
        if not isinstance(loaded, torch.Tensor) or loaded.device.type == "meta":
            return None
        # whole (an FSDP2 shard may hold no rows, or only zero rows): every rank decides alike
        return bool(full(loaded.detach()).abs().amax() > 0)

    @torch.no_grad()
    def set_nullspace_basis(self, adapter_name: str, basis: torch.Tensor) -> None:
        """Write the (in_features, r) orthonormal basis V: A = V^T; B = 0, or in split mode B = B0 = W V / s."""
        a = self.nullspace_A[adapter_name].weight
        b = self.nullspace_B[adapter_name].weight
        v = basis.to(device=a.device, dtype=torch.float64)
        # FSDP2 (DTensor A, B): rank 0's whole value is cut into every rank's rows (a collective, see _sharded)
        write_whole(a, v.T)
        if self.mode[adapter_name] == "split":
            # under FSDP2 W is gathered whole (full_tensor), on every rank: the split mode reads W, v1/v2 never do
            w = transpose(full(self.get_base_weight()), self.fan_in_fan_out).to(v.device, torch.float64)
            b0 = (w @ v) / self.scaling[adapter_name]
            write_whole(b, b0)
            self.nullspace_A0[adapter_name] = full(a).detach().clone()  # buffers are not sharded: whole, as written
            self.nullspace_B0[adapter_name] = full(b).detach().clone()
        else:
            b.zero_()
        self.set_initialized(adapter_name)

    # ------------------------------------------------------------------ math
    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with delta W = scaling * B @ A exactly: rank r, or 2r in split mode ([B, -B0] @ [A; A0])."""
        a = self.nullspace_A[adapter_name].weight
        b = self.nullspace_B[adapter_name].weight
        if self.mode[adapter_name] == "split":
            a = torch.cat([a, self.nullspace_A0[adapter_name].to(a.dtype)], dim=0)
            b = torch.cat([b, -self.nullspace_B0[adapter_name].to(b.dtype)], dim=1)
        return a, b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta of the layer's weight (in the base layer's layout) that this adapter adds."""
        a, b = self.lora_factors(adapter_name)
        cast = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
        if cast:  # half-precision matmuls are slow on CPU
            a, b = a.float(), b.float()
        delta = transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter_name]
        return delta.to(self.nullspace_A[adapter_name].weight.dtype) if cast else delta


class Linear(DeltaMergeMixin, nn.Module, NullSpaceLoraLayer):
    """NullSpaceLoRA around nn.Linear, transformers' Conv1D, or a bitsandbytes Linear4bit/Linear8bitLt."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        scaling: float,
        mode: str,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        NullSpaceLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, scaling, mode, dropout, name=name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Here, not on NullSpaceLoraLayer: nn.Module precedes it in the bases. Every load through
        # nn.Module.load_state_dict ends here: PeftModel.from_pretrained / load_adapter (set_peft_model_state_dict,
        # also with low_cpu_mem_usage) and a state dict loaded by hand. Writers that bypass it (accelerate's
        # set_module_tensor_to_device, a copy_ into the weight) leave the flag as it was.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.mark_loaded(state_dict, prefix)

    def _adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.nullspace_A[name]
        if self.training:  # an uninitialised adapter is a zero update: inference may run it, training may not
            self.require_initialized(name)
        h = self.nullspace_dropout[name](x.to(a.weight.dtype))
        delta = self.nullspace_B[name](a(h))
        if self.mode[name] == "split":
            # s (B A - B0 A0) x: the base keeps W - W P without W being rewritten.
            delta = delta - (h @ self.nullspace_A0[name].T.to(h.dtype)) @ self.nullspace_B0[name].T.to(h.dtype)
        return delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "nullspace." + super().__repr__()
