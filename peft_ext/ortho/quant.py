"""Base-stream quantisers of OrthoSplit: small pure functions from a weight to its dequantised base stream.

Every function takes a weight in (out, in) layout and returns the dequantised tensor in the input's dtype, so
`W - quantize(W, kind)` is the quantisation residual the ortho stream may hold. All are deterministic: the same
weight gives the same base stream, which is what lets a saved adapter rebuild its base from the base model's weight.

- "none": the weight itself (full precision: the residual is zero, so only reference weights give the ortho stream
  anything to hold).
- "fp16" / "bf16": a cast and back.
- "int8" / "int4": round-to-nearest per output row with one uniform rule for every row: symmetric, scale =
  max|row| / qmax (qmax 127 or 7), zero rows get scale 1. (The prior attempt mixed a 95th-percentile and a 3-sigma
  clip row by row; the rows clipped differently were the ones that broke at alpha=0.)
- "nf4": the NF4 code book of QLoRA / bitsandbytes with absmax blocks of 64 consecutive entries (row-major), in pure
  torch, so it runs anywhere; `bnb_nf4` / `bnb_int8` use bitsandbytes' own kernels (see layer.py).
"""

from __future__ import annotations

import torch

SIMULATED = ("none", "fp16", "bf16", "int8", "int4", "nf4")
BITSANDBYTES = ("bnb_nf4", "bnb_int8")
BASE_KINDS = SIMULATED + BITSANDBYTES

# bitsandbytes.functional.get_4bit_type("nf4"): the 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def rtn_per_row(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest per row: q = round(w / s).clamp(-qmax, qmax), s = max|row| / qmax."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    scale = wf.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(wf / scale).clamp(-qmax, qmax) * scale).to(w.dtype)


def nf4_blockwise(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """NF4 with one absmax per block of `blocksize` consecutive entries of the flattened weight (as bitsandbytes)."""
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    # multiply by the reciprocal as bitsandbytes' kernels do (a division rounds differently next to a threshold)
    idx = torch.bucketize(blocks * (1.0 / safe), (code[1:] + code[:-1]) / 2)  # nearest code value
    out = (code[idx] * safe).view(-1)[: flat.numel()]
    return out.view_as(w).to(w.dtype)


def quantize(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Dequantised base stream of `w` (out, in) for a simulated base kind."""
    if kind == "none":
        return w.clone()
    if kind == "fp16":
        return w.to(torch.float16).to(w.dtype)
    if kind == "bf16":
        return w.to(torch.bfloat16).to(w.dtype)
    if kind == "int8":
        return rtn_per_row(w, 8)
    if kind == "int4":
        return rtn_per_row(w, 4)
    if kind == "nf4":
        return nf4_blockwise(w)
    raise ValueError(f"unknown simulated base kind {kind!r}; choose one of {SIMULATED}")


def delta_survival(before: torch.Tensor, after: torch.Tensor, kind: str) -> dict[str, float]:
    """What a base kind keeps of a fine-tuning delta `after - before` (one weight, (out, in)): sums over the weight's
    entries, so layers add up (`summarise_survival` turns them into shares).

    - changed: entries whose dequantised value differs between Q(after) and Q(before) (out of `entries`): a row
      (int8/int4) or block (nf4) whose absmax moved rescales every entry in it, so this is more than flipped codes;
    - delta_sq: ||after - before||^2; kept_sq: ||Q(after) - Q(before)||^2 (the delta as the quantised model sees it);
    - cross: <Q(after) - Q(before), after - before> (kept_sq = delta_sq = cross when nothing is lost);
    - error_sq: ||Q(after) - after||^2 (the quantisation error of the fine-tuned weight).
    A delta below half a quantisation step that crosses no rounding boundary changes nothing: kept_sq = 0.
    """
    if before.shape != after.shape:
        raise ValueError(f"delta_survival: before {tuple(before.shape)} and after {tuple(after.shape)} differ in "
                         "shape; pass the same weight before and after fine-tuning")
    b, a = before.float(), after.float()
    qb, qa = quantize(b, kind), quantize(a, kind)
    d, dq = a - b, qa - qb
    return {"entries": float(a.numel()), "changed": float((dq != 0).sum()), "delta_sq": float((d * d).sum()),
            "kept_sq": float((dq * dq).sum()), "cross": float((dq * d).sum()), "error_sq": float(((qa - a) ** 2).sum())}


def summarise_survival(parts: list[dict[str, float]]) -> dict[str, float]:
    """Shares over many weights of `delta_survival`'s sums: changed_share (entries whose code moved), kept_norm
    (||dQ|| / ||d||), aligned (the share of d that dQ carries: <dQ, d> / ||d||^2, 1 when kept exactly), and
    error_over_delta (||Q(after) - after|| / ||d||: quantisation noise in units of the delta)."""
    tot = {k: sum(p[k] for p in parts) for k in ("entries", "changed", "delta_sq", "kept_sq", "cross", "error_sq")}
    if tot["delta_sq"] <= 0:
        raise ValueError("summarise_survival: the weights did not change (||after - before|| = 0): no delta to keep")
    return {"changed_share": tot["changed"] / tot["entries"], "kept_norm": (tot["kept_sq"] / tot["delta_sq"]) ** 0.5,
            "aligned": tot["cross"] / tot["delta_sq"], "error_over_delta": (tot["error_sq"] / tot["delta_sq"]) ** 0.5}


def stored_bytes(kind: str, out_features: int, in_features: int, weight_bytes: int = 4) -> int:
    """Bytes the base stream needs when stored packed (codes + scales): what a deployment would hold.

    int8/int4 keep one float32 scale per row; NF4 one float32 absmax per 64 entries (bitsandbytes' double
    quantisation would shrink those further); "none" keeps the weight's own dtype (`weight_bytes` per entry).
    """
    n = out_features * in_features
    if kind == "none":
        return n * weight_bytes
    if kind in ("fp16", "bf16"):
        return 2 * n
    if kind in ("int8", "bnb_int8"):
        return n + 4 * out_features
    if kind == "int4":
        return (n + 1) // 2 + 4 * out_features
    if kind in ("nf4", "bnb_nf4"):
        return (n + 1) // 2 + 4 * ((n + 63) // 64)
    raise ValueError(f"unknown base kind {kind!r}; choose one of {BASE_KINDS}")
