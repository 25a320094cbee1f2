"""What bitsandbytes' 4-bit layers compute on this CPU, measured against the float32 reference, with and without
peft-ext's guard (peft_ext/bnb_cpu.py). Evidence for the README, not a speed benchmark.

Run from the repository root:

    .venv/bin/python benchmarks/bnb_cpu_paths.py                                   # prints the findings
    .venv/bin/python benchmarks/bnb_cpu_paths.py --json results/bnb_cpu_paths.json  # what the README block shows

Every figure is a maximum absolute difference against the exact float32 answer (dequantised NF4 weight decoded in
pure torch from bitsandbytes' own codes, and x @ W^T with it), on seeded N(0, 1/in) weights:

  dequantize        bitsandbytes.functional.dequantize_4bit vs the reference decoding, per shape
  eval forward      a Linear4bit in eval mode without gradients, first call (this is when it may repack itself)
  after repack      dequantize_4bit of that layer's weight afterwards (what PEFT's merge/dequantise read)
  input gradient    a training forward after that eval forward: does the input get its gradient?
  state_dict        the dequantised weight after `state_dict()` (what save_pretrained writes), with and without
                    double-quantised scales (transformers' default is without)
  small shapes      whether the eval forward runs at all for in_features 32 / 80 and out_features 48
Each layer measurement is made twice: as bitsandbytes leaves the layer, and after `peft_ext.disable_bnb_cpu_repack`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # calibration.py's helpers and peft_ext from this checkout
from recipes.common import machine_info, write_json  # noqa: E402

import torch  # noqa: E402


def cpu_flags() -> list[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return []
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))


def linear4bit(in_f: int, out_f: int, double_quant: bool, seed: int = 0):
    import bitsandbytes as bnb

    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) / in_f**0.5
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                          compress_statistics=double_quant)
    m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
    return m.to("cpu")


def layer_findings(guard: bool, double_quant: bool, in_f: int = 128, out_f: int = 64) -> dict:
    import bitsandbytes.functional as F

    from peft_ext import disable_bnb_cpu_repack
    from peft_ext.bnb_cpu import reference_dequantize_4bit

    m = linear4bit(in_f, out_f, double_quant)
    if guard:
        disable_bnb_cpu_repack(m)
    w_ref = reference_dequantize_4bit(m.weight.data, m.weight.quant_state)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1))
    m.eval()
    with torch.no_grad():
        y = m(x)
    out = {"repacked": bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)),
           "eval_forward_err": (y - x @ w_ref.T).abs().max().item()}
    out["dequantize_after_err"] = (F.dequantize_4bit(m.weight.data, m.weight.quant_state) - w_ref).abs().max().item()
    m.train()
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "autograd kernel was not registered": the finding itself
        m(xg).sum().backward()
    out["input_gets_gradient"] = xg.grad is not None
    m.state_dict()
    out["state_dict_weight_err"] = (F.dequantize_4bit(m.weight.data, m.weight.quant_state) - w_ref).abs().max().item()
    out["max_abs_weight"] = w_ref.abs().max().item()
    return out


def dequantize_findings() -> list[dict]:
    import bitsandbytes.functional as F

    from peft_ext.bnb_cpu import reference_dequantize_4bit

    rows = []
    for shape in [(48, 80), (48, 96), (12, 8), (64, 576), (1536, 576), (576, 1536)]:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        diff = (F.dequantize_4bit(q, state) - reference_dequantize_4bit(q, state)).abs()
        rows.append({"shape": list(shape), "max_err": diff.max().item(),
                     "rows_wrong": int((diff.amax(dim=1) > 1e-6).sum()), "rows": shape[0]})
    return rows


def small_shape_findings(guard: bool) -> list[dict]:
    from peft_ext import disable_bnb_cpu_repack

    rows = []
    for in_f, out_f in [(32, 32), (80, 64), (64, 48)]:
        m = linear4bit(in_f, out_f, double_quant=False).eval()
        if guard:
            disable_bnb_cpu_repack(m)
        try:
            with torch.no_grad():
                m(torch.randn(3, in_f))
            rows.append({"in": in_f, "out": out_f, "runs": True, "error": ""})
        except Exception as exc:  # the crash is the finding
            rows.append({"in": in_f, "out": out_f, "runs": False, "error": f"{type(exc).__name__}: {exc}"[:80]})
    return rows


def report(res: dict) -> None:
    m = res["machine"]
    print(f"machine: {m['cpu_model']} ({m['cpu_count']} CPUs), flags {' '.join(res['cpu_flags'])}; torch {m['torch']} "
          f"(ATen CPU capability {res['aten_capability']}), bitsandbytes {res['bitsandbytes']} "
          f"(has_avx512bf16: {res['has_avx512bf16']})")
    print("\n1. dequantize_4bit vs decoding bitsandbytes' own codes (blocksize 64)")
    print(f"   {'shape (out, in)':>16}  {'max |err|':>10}  rows wrong")
    for r in res["dequantize"]:
        print(f"   {str(tuple(r['shape'])):>16}  {r['max_err']:10.3g}  {r['rows_wrong']}/{r['rows']}")
    print("\n2. one Linear4bit 64x128 (|W| <= {:.2f}): eval forward without gradients, then training, then state_dict()"
          .format(res["layers"][0]["max_abs_weight"]))
    print(f"   {'setting':<40} {'repacked':>8} {'eval fwd':>9} {'dequant':>9} {'input grad':>10} {'saved W':>9}")
    for r in res["layers"]:
        label = f"{'peft-ext guard' if r['guard'] else 'bitsandbytes as is'}, {'double-quant' if r['double_quant'] else 'plain scales'}"
        print(f"   {label:<40} {str(r['repacked']):>8} {r['eval_forward_err']:9.2g} {r['dequantize_after_err']:9.2g} "
              f"{str(r['input_gets_gradient']):>10} {r['state_dict_weight_err']:9.2g}")
    print("\n3. eval forward of small layers")
    for r in res["small_shapes"]:
        print(f"   in={r['in']:<3} out={r['out']:<3} {'peft-ext guard' if r['guard'] else 'bitsandbytes as is':<19} "
              f"{'runs' if r['runs'] else 'crashes: ' + r['error']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the findings and the printed report here")
    args = parser.parse_args(argv)
    import bitsandbytes
    import bitsandbytes.functional as F

    res = {"machine": machine_info(), "cpu_flags": cpu_flags(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
           "bitsandbytes": bitsandbytes.__version__, "has_avx512bf16": bool(F.has_avx512bf16()),
           "dequantize": dequantize_findings(),
           "layers": [dict(guard=g, double_quant=d, **layer_findings(g, d)) for g in (False, True) for d in (False, True)],
           "small_shapes": [dict(guard=g, **r) for g in (False, True) for r in small_shape_findings(g)]}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report(res)
    print(printed.getvalue(), end="")
    if args.json:
        write_json(args.json, {**res, "printed": printed.getvalue()}, indent=2)


if __name__ == "__main__":
    main()
