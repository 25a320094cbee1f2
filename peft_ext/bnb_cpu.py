"""bitsandbytes 4-bit layers on CPU: keep them exact, and refuse the shapes bitsandbytes gets wrong.

bitsandbytes (checked: 0.50.2) takes a different CPU path on processors with AVX-512-BF16 (Intel Xeon Sapphire Rapids
and later, AMD EPYC Zen 4 and later) than on older ones. On that path (measured on both an Intel Xeon with AMX and
an AMD EPYC with avx512_bf16):

1. `Linear4bit.forward` in eval mode without gradients *repacks its weight in place* into a kernel-specific layout
   (`_convert_weight_packed_for_cpu`) and rounds the block absmax to bfloat16. From then on the layer computes in
   bfloat16 (|Δy| ≈ 6e-3 on a 64x128 layer), `bitsandbytes.functional.dequantize_4bit` of its weight returns wrong
   values (|Δ| ≈ 0.18), a later training forward goes through `gemv_4bit`, which has no autograd kernel (the input
   gets no gradient, silently), and `state_dict()` unpacks the weight but keeps the rounded absmax, so the saved base
   differs from the loaded one: |Δ| ≈ 2e-4 with double-quantised scales, and without them (transformers' default,
   `bnb_4bit_use_double_quant=False`) the scales are written in the kernel's transposed order, so the saved weight
   is wrong (|Δ| = 0.20 on weights of |W| ≤ 0.37, 64x128). The repack also crashes for in_features < 64 or not a multiple of 64
   ("shape '[32, 0]' is invalid") and for out_features not a multiple of 32 ("N must be divisible by block_n").
2. Its native `dequantize_4bit` kernel gives wrong values for some weights whose in_features is not a multiple of
   the block size (e.g. 48x80 and 48x96 with blocks of 64: 47 of 48 rows wrong), while its own `quantize_4bit` (pure
   torch, the same on every CPU) uses blocks over the flattened weight. The forward pass uses that kernel, so such a
   layer computes with a wrong weight. Real models have in_features that are multiples of 64 and are not affected.

What peft-ext does about it:
- Every peft-ext tuner layer turns the repack off on the bitsandbytes Linear4bit it wraps (`keep_4bit_layout`), so
  the base stays bit-identical to what was loaded, computes in its compute dtype, and trains with correct gradients.
  The cost is bitsandbytes' bfloat16 CPU inference kernel, which is not used for these layers.
- Our own forward passes over a user's model (activation statistics, calibration) turn it off for their duration
  only (`bnb_cpu_repack_disabled`) and restore each layer's setting afterwards.
- A layer whose native dequantisation disagrees with the reference decoding (`check_4bit_dequantize`) is refused
  with the reason, instead of being adapted on top of a wrong weight.
- `disable_bnb_cpu_repack(model)` is the public form for models peft-ext does not wrap (a plain PEFT LoRA, the
  exported LoRA of one of our adapters) when they should compute the same numbers.

bitsandbytes is optional (the `quant` extra): nothing here imports it unless a model already holds one of its layers,
and a peft-ext path that builds bitsandbytes layers itself imports it through `import_bitsandbytes`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn


QUANT_EXTRA = "pip install 'peft-ext[quant]'"


def import_bitsandbytes(needed_by: str, instead: str = ""):
    """The bitsandbytes module, or an ImportError that names what needs it, the extra that installs it and `instead`
    (what works without it), in one line."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"{needed_by} needs bitsandbytes, which is not installed: {QUANT_EXTRA}"
                          + (f"; {instead}" if instead else "")) from e
    return bitsandbytes


def _bnb():
    """The bitsandbytes module if the process has imported it (a model with bitsandbytes layers implies it has)."""
    return sys.modules.get("bitsandbytes")


def is_linear4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_packed_for_cpu(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU repack of one Linear4bit (its absmax stays rounded to bfloat16: that part is lost)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, module.weight.quant_state)
    if not state.nested and state.absmax.dim() == 2:
        # bitsandbytes' inverse restores the absmax order only for double-quantised scales; plain ones stay in the
        # kernel's transposed (in/blocksize, out) bfloat16 layout, which every later dequantisation reads wrongly
        state.absmax = state.absmax.T.reshape(-1).float()
    module.weight.quant_state = state


def keep_4bit_layout(module: nn.Module, name: str = "") -> bool:
    """Turn bitsandbytes' in-place CPU repack off on one Linear4bit (see the module docstring); undo a repack that
    already happened, with a warning that its bfloat16-rounded block scales cannot be restored. Returns whether the
    module is a Linear4bit."""
    if not is_linear4bit(module):
        return False
    module.support_avx512bf16_for_cpu = False
    if _is_packed_for_cpu(module):
        _unpack(module)
        warnings.warn(
            f"bitsandbytes had already repacked the 4-bit weight of {name or type(module).__name__} for its CPU "
            "inference kernel (an eval-mode forward without gradients on a CPU with AVX-512-BF16), which rounds the "
            "block scales to bfloat16; peft-ext restored the standard layout, but the rounding stays. Reload the "
            "model and wrap it before running it in eval mode to keep the loaded weights exactly.",
            stacklevel=3,
        )
    return True


def disable_bnb_cpu_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes Linear4bit in `model` in its standard layout on CPU (no in-place repack, no bfloat16
    block scales); returns how many layers it set. Use it on models peft-ext does not wrap, e.g. a plain PEFT LoRA
    that should compute the same numbers as one of our adapters; peft-ext's own layers do it themselves."""
    return sum(keep_4bit_layout(m, n) for n, m in model.named_modules())


@contextlib.contextmanager
def bnb_cpu_repack_disabled(model: nn.Module) -> Iterator[None]:
    """For the duration of the block, bitsandbytes Linear4bit layers in `model` do not repack themselves on CPU; each
    layer's own setting is restored afterwards. Our forward passes over a user's model go through this, so that
    collecting statistics never changes the user's quantised weights."""
    saved = []
    if _bnb() is not None:
        for m in model.modules():
            if is_linear4bit(m) and not _is_packed_for_cpu(m):
                saved.append((m, getattr(m, "support_avx512bf16_for_cpu", False)))
                m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.support_avx512bf16_for_cpu = flag


def reference_dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """float32 weight of a 4-bit bitsandbytes tensor decoded in pure torch: two codes per byte (high nibble first), one
    absmax per `blocksize` consecutive entries of the flattened weight, as bitsandbytes' `quantize_4bit` wrote it."""
    from bitsandbytes.functional import dequantize_blockwise, get_4bit_type

    codes = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    flat = torch.stack((codes >> 4, codes & 0xF), dim=1).reshape(-1)
    n = 1
    for d in quant_state.shape:
        n *= int(d)
    code = get_4bit_type(quant_state.quant_type, device=packed.device).float()
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    absmax = absmax.float().reshape(-1)
    block = torch.arange(n, device=packed.device) // quant_state.blocksize
    return (code[flat[:n]] * absmax[block]).reshape(tuple(quant_state.shape))


def check_4bit_dequantize(module: nn.Module, name: str) -> None:
    """Refuse (ValueError) a Linear4bit on CPU whose bitsandbytes dequantisation disagrees with the reference decoding
    of its own codes (the AVX-512 kernel bug in the module docstring). Only weights whose in_features is not a
    multiple of the block size can be affected, so only those are checked (one dequantisation each)."""
    if not is_linear4bit(module) or module.weight.device.type != "cpu" or _is_packed_for_cpu(module):
        return
    state = getattr(module.weight, "quant_state", None)
    if state is None or len(state.shape) != 2 or int(state.shape[-1]) % state.blocksize == 0:
        return
    from bitsandbytes.functional import dequantize_4bit

    native = dequantize_4bit(module.weight.data, state).float()
    reference = reference_dequantize_4bit(module.weight.data, state)
    if not torch.allclose(native, reference, rtol=1e-3, atol=1e-6):
        err = (native - reference).abs().max().item()
        raise ValueError(
            f"layer {name!r}: bitsandbytes' CPU dequantisation of this 4-bit weight is wrong on this machine "
            f"(shape {tuple(int(s) for s in state.shape)}, in_features not a multiple of blocksize={state.blocksize}; "
            f"max |error| {err:.3g} against decoding its own codes), so the layer computes with a wrong weight. "
            "Run it on CUDA, quantise it with a blocksize that divides in_features, or leave it out of "
            "target_modules (see peft_ext/bnb_cpu.py)."
        )
