"""OrthoSplit on a CUDA GPU: bitsandbytes base streams checked against their closed forms, and real-scale latency.

    python benchmarks/ortho_cuda.py [--json runs/benchmarks/ortho_cuda.json] [--quick]

Part 1 (correctness, on the GPU): the pure-torch NF4 base equals bitsandbytes' CUDA quantize/dequantize (no double
quantisation); with base_kind='bnb_nf4' / 'bnb_int8' a layer at alpha=0 equals x @ deq(B)^T + bias and at alpha=1
adds O x; merge_and_unload at alpha=0 equals the alpha=0 forward.
Part 2 (latency of the split layer itself, bf16, CUDA events, median of repeats, variants interleaved): Llama-7B-sized layers at densities
0.1%, 1%, 5%: OrthoSplit at alpha=0 and alpha=1 (csr and fused layouts) against the dense F.linear and against the
base stream alone; and bnb_nf4 at alpha=0 and 1 against a plain bitsandbytes Linear4bit. Needs CUDA; exits otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_ext  # noqa: E402
from peft_ext import OrthoSplitConfig  # noqa: E402
from peft_ext.ortho.quant import nf4_blockwise  # noqa: E402


class One(nn.Module):
    def __init__(self, out_f: int, in_f: int, dtype, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(in_f, out_f, bias=True, dtype=dtype)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
            self.proj.bias.copy_(torch.randn(out_f, generator=g) * 0.01)

    def forward(self, x):
        return self.proj(x)


def split(out_f, in_f, dtype, **cfg):
    from peft import get_peft_model

    model = One(out_f, in_f, dtype).cuda().eval()
    return get_peft_model(model, OrthoSplitConfig(target_modules=["proj"], **cfg)).eval()


def correctness(log) -> dict:
    import bitsandbytes as bnb

    out = {}
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0)).cuda() / 64
    q, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    diff = (nf4_blockwise(w) - bnb.functional.dequantize_4bit(q, st)).abs()
    out["nf4_sim_vs_bnb_cuda_max_abs"] = float(diff.max())
    out["nf4_sim_vs_bnb_cuda_entries_differing"] = int((diff > 0).sum())
    x = torch.randn(4, 16, 4096, device="cuda", dtype=torch.bfloat16)
    for kind in ("bnb_nf4", "bnb_int8", "int8", "nf4"):
        m = split(1024, 4096, torch.bfloat16, base_kind=kind, density=0.01)
        layer = m.base_model.model.proj
        s = layer._streams("default")
        base = s["base"].float()
        o = layer.dense_ortho("default").float()
        bias = layer.get_base_layer().bias.float()
        with torch.no_grad():
            y1 = layer(x).float()
            with peft_ext.ortho_alpha(m, 0.0):
                y0 = layer(x).float()
                merged = m.merge_and_unload()
                ym = merged.proj(x).float()
        ref0 = x.float() @ base.T + bias
        ref1 = x.float() @ (base + o).T + bias
        scale = ref1.abs().mean()
        out[kind] = {
            "alpha0_rel_err": float((y0 - ref0).abs().mean() / scale),
            "alpha1_rel_err": float((y1 - ref1).abs().mean() / scale),
            "merged_alpha0_vs_forward_rel": float((ym - y0).abs().mean() / scale),
            "base_module": type(s["module"]).__name__ if s["module"] is not None else None,
        }
        log(f"  {kind:9s} base module {out[kind]['base_module']}: |alpha0 - x deq(B)^T| / |y| = "
            f"{out[kind]['alpha0_rel_err']:.2e}, |alpha1 - x (B+O)^T| / |y| = {out[kind]['alpha1_rel_err']:.2e}, "
            f"merged vs alpha0 {out[kind]['merged_alpha0_vs_forward_rel']:.2e}")
    log(f"  NF4 (pure torch) vs bitsandbytes CUDA quantize/dequantize_4bit: max |diff| = {out['nf4_sim_vs_bnb_cuda_max_abs']:.2e}, "
        f"{out['nf4_sim_vs_bnb_cuda_entries_differing']} of {w.numel()} entries differ")
    return out


def timed(fns: dict, x, repeats: int) -> dict:
    """Median milliseconds of each function, interleaved (ABCABC...) so clock drift hits all alike."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            for _ in range(3):
                f(x)
        torch.cuda.synchronize()
        for _ in range(repeats):
            for k, f in fns.items():
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f(x)
                b.record()
                torch.cuda.synchronize()
                times[k].append(a.elapsed_time(b))
    return {k: statistics.median(v) for k, v in times.items()}


def latency(shapes, densities, tokens: int, repeats: int, log) -> list[dict]:
    import bitsandbytes as bnb

    rows = []
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        for density in densities:
            fns = {}
            dense = One(out_f, in_f, torch.bfloat16).cuda().eval()
            fns["dense"] = dense.proj
            bias = dense.proj.bias

            def layer(a, **cfg):
                """The split layer itself (no PeftModel wrapper), alpha set once outside the timing."""
                m = split(out_f, in_f, torch.bfloat16, density=density, **cfg)
                peft_ext.set_ortho_alpha(m, a)
                return m.base_model.model.proj

            csr0 = layer(0.0, base_kind="int8")
            base = csr0._streams("default")["base"]
            fns["base alone"] = lambda t, b=base, c=bias: F.linear(t, b, c)
            fns["csr a=0"], fns["csr a=1"] = csr0, layer(1.0, base_kind="int8")
            fns["fused a=1"] = layer(1.0, base_kind="int8", layout="fused")
            plain4 = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
            plain4.weight = bnb.nn.Params4bit(dense.proj.weight.detach().float().cpu(), requires_grad=False, quant_type="nf4")
            plain4.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            plain4 = plain4.cuda()
            fns["bnb4 plain"] = plain4
            fns["bnb4 a=0"], fns["bnb4 a=1"] = layer(0.0, base_kind="bnb_nf4"), layer(1.0, base_kind="bnb_nf4")
            t = timed(fns, x, repeats)
            row = {"shape": [out_f, in_f], "density": density, "tokens": tokens, "ms": t,
                   "csr_a0_vs_base": t["csr a=0"] / t["base alone"], "csr_a1_vs_dense": t["csr a=1"] / t["dense"],
                   "fused_a1_vs_dense": t["fused a=1"] / t["dense"], "bnb4_a0_vs_plain": t["bnb4 a=0"] / t["bnb4 plain"],
                   "bnb4_a1_vs_plain": t["bnb4 a=1"] / t["bnb4 plain"]}
            rows.append(row)
            log(f"  {out_f:>5}x{in_f:<5} {density:6.1%}  dense {t['dense']:.3f} ms | csr a=0 / base alone "
                f"{row['csr_a0_vs_base']:.3f}x | csr a=1 / dense {row['csr_a1_vs_dense']:.2f}x | fused a=1 / dense "
                f"{row['fused_a1_vs_dense']:.2f}x | bnb4 a=0 / plain bnb4 {row['bnb4_a0_vs_plain']:.3f}x, a=1 "
                f"{row['bnb4_a1_vs_plain']:.2f}x")
            del fns, plain4, dense, csr0
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per forward (enough that the GPU, not Python, is timed)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/ortho_cuda.py needs a CUDA GPU (the CPU figures come from benchmarks/ortho_latency.py)")
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = torch.cuda.get_device_name(0)
    import bitsandbytes as bnb

    log(f"Device: {dev}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    log("Correctness on CUDA (bf16 activations, 1024x4096 layer, density 1%):")
    checks = correctness(log)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    densities = [0.01] if args.quick else [0.001, 0.01, 0.05]
    log(f"Latency, bf16, {args.tokens} tokens, median of {args.repeats} (int8 base for csr/fused, NF4 for bnb4):")
    rows = latency(shapes, densities, args.tokens if not args.quick else 1024, 5 if args.quick else args.repeats, log)
    result = {"device": dev, "torch": torch.__version__, "checks": checks, "latency": rows, "printed": "\n".join(lines)}
    if args.json:
        from recipes.common import write_json

        write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    main()
