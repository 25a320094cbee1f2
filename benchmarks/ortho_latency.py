"""OrthoSplit forward latency and memory: base stream + sparse ortho stream vs the dense layer and model, on CPU.

Run from the repository root:

    .venv/bin/python benchmarks/ortho_latency.py                  # ~2 min on 2 cores, 1 torch thread
    .venv/bin/python benchmarks/ortho_latency.py --quick          # seconds: one small layer, a tiny model
    .venv/bin/python benchmarks/ortho_latency.py --threads 2 --json runs/benchmarks/ortho_latency.json

Everything is float32 on CPU under `torch.inference_mode`, with ONE torch thread by default (`--threads N` to change
it; one thread keeps timings sane on a small machine that other jobs share). Splits come from `peft.get_peft_model`
with `OrthoSplitConfig(base_kind='int8', selector='magnitude', values_dtype='float16')` (the defaults): the base stream
is per-row round-to-nearest int8, but the layer HOLDS IT DEQUANTISED as a float32 tensor, so the base matmul costs what
a dense one costs (no int8 kernel runs); the ortho stream is stored as float16 values + int32 indices and run as a
float32 CSR matrix (layout='csr') or folded into a cached dense B + alpha * O (layout='fused').

Parts:

  (1) layer    one nn.Linear (default init, with bias) per `--sizes` (out x in), `--densities` and `--tokens` (rows of
               the input). Variants, timed interleaved in one loop (the order reversed every other round, so drift and
               cache effects hit all alike): dense = the original nn.Linear; base = F.linear with the alpha=0 layer's
               own dequantised base tensor + bias (what alpha=0 computes, without the wrapper); the OrthoSplit layer at
               alpha=0 and alpha=1 in each layout (a separate instance per layout and alpha, so no timed call pays a
               cache rebuild); CSR mm = torch.sparse.mm(CSR O, x^T)^T alone (the layer's sparse term).
  (2) alternatives  at `--alt-densities`: other ways to compute the alpha=1 forward B x + alpha O x + bias from the
               same tensors (each checked against the layer's output), as ratios to dense, with the extra memory each
               holds besides the base stream. Clear losers (over 1.8x dense at a first look) get 3 rounds of their own,
               paired with dense, instead of the group's time budget (marked ~).
  (3) model    a LlamaForCausalLM built in-process from a small config (random init, nothing downloaded), every linear
               layer but lm_head split at `--model-density`: unsplit model, the base stream merged into plain weights
               (`merge_and_unload()` at alpha=0: base alone), and the split model at alpha 0 / 1 in both layouts.
  (4) memory   per layer and for the model: bytes from `peft_ext.ortho_report` (stored sparse stream, packed base
               stream as a deployment would hold it, the dense weight) vs the bytes the split layer actually holds at
               run time (unique tensor storages: the original W that PEFT keeps in base_layer, the dequantised base,
               the CSR or fused caches, the stored values/indices), after a forward at alpha=1.

Ratios are medians over the timed rounds of per-round ratios (each pair measured back to back), after warm-up rounds;
each group gets `--group-seconds` of timed rounds (at least `--min-rounds`). Targets (from the issue): alpha=0 <= 1.05x
the base stream alone (every size, density, token count); alpha=1 at 1% density <= 1.3x dense on 1024x4096-sized
layers. Verdicts are computed from the numbers below them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # calibration.py's helpers, recipes/ and peft_ext from this checkout
from calibration import OtherLoad  # noqa: E402
from recipes.common import write_json  # noqa: E402

ALPHA0_TARGET = 1.05  # alpha=0 / base stream alone
ALPHA1_TARGET = 1.3  # alpha=1 / dense, at TARGET_DENSITY on layers with >= TARGET_NUMEL entries
TARGET_DENSITY = 0.01
TARGET_NUMEL = 1024 * 4096
ADAPTER = "default"
SLOW_ALT = 1.8  # alternatives slower than this x dense at a first look are timed apart, SLOW_ROUNDS rounds only
SLOW_ROUNDS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds: one 384x1536 layer at 1%%, 32 tokens, a tiny model")
    p.add_argument("--sizes", default=None, help="comma list of OUTxIN (default 4096x1024,1024x4096,1536x384,384x1536)")
    p.add_argument("--tokens", default=None, help="comma list of token counts (input rows) (default 128,512)")
    p.add_argument("--densities", default=None, help="comma list of ortho densities (default 0.001,0.01,0.05)")
    p.add_argument("--alt-densities", default=None, help="densities at which the alternatives run (default 0.01)")
    p.add_argument("--base-kind", default="int8", help="OrthoSplitConfig.base_kind (a simulated one: int8, int4, nf4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--group-seconds", type=float, default=None,
                   help="timed seconds per group (default 1.0, quick 0.05)")
    p.add_argument("--min-rounds", type=int, default=None, help="timed rounds per group at least (default 9, quick 3)")
    p.add_argument("--max-rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per group first (default 2, quick 1)")
    p.add_argument("--model-tokens", default=None, help="comma list of sequence lengths, batch 1 (default 128,512)")
    p.add_argument("--model-density", type=float, default=TARGET_DENSITY)
    p.add_argument("--model-hidden", type=int, default=None, help="Llama hidden size (default 384, quick 64)")
    p.add_argument("--model-layers", type=int, default=None, help="Llama decoder layers (default 4, quick 2)")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-alternatives", action="store_true")
    p.add_argument("--idle-wait", type=float, default=0.0, help="seconds to wait (in all) for an idle machine before "
                   "the timed parts (default 0: a shared machine is rarely idle; the other load is printed instead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in
               (a.sizes or ("384x1536" if q else "4096x1024,1024x4096,1536x384,384x1536")).split(",")]
    a.tokens = [int(t) for t in (a.tokens or ("32" if q else "128,512")).split(",")]
    a.densities = [float(d) for d in (a.densities or ("0.01" if q else "0.001,0.01,0.05")).split(",")]
    a.alt_densities = [float(d) for d in (a.alt_densities or "0.01").split(",")]
    a.group_seconds = a.group_seconds if a.group_seconds is not None else (0.05 if q else 1.0)
    a.min_rounds = a.min_rounds or (3 if q else 9)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.model_tokens = [int(t) for t in (a.model_tokens or ("32" if q else "128,512")).split(",")]
    a.model_hidden = a.model_hidden or (64 if q else 384)
    a.model_layers = a.model_layers or (2 if q else 4)
    return a


# ----------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], args: argparse.Namespace, budget: float | None = None,
                min_rounds: int | None = None, warmup: int | None = None) -> dict[str, list[float]]:
    """Per-call seconds of every variant: warm-up rounds, then rounds A B C .. / .. C B A until the time budget
    (`--group-seconds`), at least `--min-rounds` and at most `--max-rounds` of them."""
    names = list(fns)
    budget = args.group_seconds if budget is None else budget
    min_rounds = args.min_rounds if min_rounds is None else min_rounds
    warmup = args.warmup if warmup is None else warmup
    t0 = time.perf_counter()
    for _ in range(warmup):
        for n in names:
            fns[n]()
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    rounds = min(args.max_rounds, max(min_rounds, math.ceil(budget / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def one_shot(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of t_a / t_b (the two measured within the same round)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def med_ms(times: dict[str, list[float]], name: str) -> float:
    return 1e3 * statistics.median(times[name])


# ----------------------------------------------------------------------------------------------- building
class One(nn.Module):
    def __init__(self, out_f: int, in_f: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def split(model: nn.Module, targets, density: float, layout: str, base_kind: str):
    """A PeftModel with OrthoSplit on `targets` (the model is modified in place: pass a copy)."""
    import peft_ext
    from peft import get_peft_model

    cfg = peft_ext.OrthoSplitConfig(target_modules=targets, density=density, layout=layout, base_kind=base_kind)
    return get_peft_model(model, cfg).eval()


def with_alpha(model, alpha: float):
    import peft_ext

    peft_ext.set_ortho_alpha(model, alpha)
    return model


def csr_of(layer) -> torch.Tensor:
    """The CSR matrix the layer's csr path multiplies with (its own cache when it has one)."""
    if hasattr(layer, "_csr"):
        return layer._csr(ADAPTER, torch.float32)
    rows, cols = _rows_cols(layer)
    crow = torch.zeros(layer.out_features + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=layer.out_features), 0)
    return torch.sparse_csr_tensor(crow, cols, layer.ortho_values[ADAPTER].detach().float(),
                                   size=(layer.out_features, layer.in_features))


def _rows_cols(layer) -> tuple[torch.Tensor, torch.Tensor]:
    index = layer.ortho_index[ADAPTER].long()
    return index // layer.in_features, index % layer.in_features


# ----------------------------------------------------------------------------------------------- memory
def _parts(t: torch.Tensor) -> list[torch.Tensor]:
    if t.layout == torch.sparse_csr:
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    return [t]


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once; sparse: all components)."""
    seen: dict[int, int] = {}
    for t in tensors:
        for p in _parts(t):
            s = p.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def cache_tensors(layer) -> list[torch.Tensor]:
    """Tensors in the layer's run-time caches (dequantised base, CSR, fused weight, a bitsandbytes module's)."""
    out = []
    for cache in getattr(layer, "_ortho_cache", {}).values():
        for v in cache.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, nn.Module):
                out += list(v.parameters()) + list(v.buffers())
    return out


def held_bytes(module: nn.Module) -> int:
    """Everything `module` holds at run time: parameters, buffers and the OrthoSplit caches, each storage once."""
    from peft_ext import OrthoSplitLayer

    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        if isinstance(m, OrthoSplitLayer):
            tensors += cache_tensors(m)
    return unique_bytes(tensors)


def layer_memory(csr_layer, fused_layer, report_row: dict) -> dict:
    """Bytes of one split layer: stored (ortho_report) vs held at run time (after an alpha=1 forward)."""
    w = csr_layer.get_base_layer().weight
    base = csr_layer.effective_weight(ADAPTER, 0.0)  # the cached dequantised base tensor itself at alpha=0
    return {
        "dense_bytes": report_row["dense_bytes"],
        "sparse_bytes": report_row["sparse_bytes"],
        "base_bytes_packed": report_row["base_bytes_packed"],
        "packed_total_bytes": report_row["sparse_bytes"] + report_row["base_bytes_packed"],
        "original_weight_bytes": unique_bytes([w]),
        "dequantised_base_bytes": unique_bytes([base]),
        "csr_cache_bytes": unique_bytes([csr_of(csr_layer)]),
        "held_csr_bytes": held_bytes(csr_layer),
        "held_fused_bytes": held_bytes(fused_layer),
    }


# ----------------------------------------------------------------------------------------------- (1) + (2) layers
def alternatives(layer, x: torch.Tensor, alpha: float) -> dict[str, tuple[Callable[[], torch.Tensor], int]]:
    """{name: (function computing the alpha=`alpha` forward, extra bytes it holds besides the base stream)}."""
    out_f, in_f = layer.out_features, layer.in_features
    base = layer.effective_weight(ADAPTER, 0.0)
    bias = layer.get_base_layer().bias
    vals = layer.ortho_values[ADAPTER].detach().float()
    rows, cols = _rows_cols(layer)
    nnz = vals.numel()
    csr = csr_of(layer)
    csr32 = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), size=csr.shape)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (out_f, in_f)).coalesce()
    ot_csr = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (in_f, out_f)).coalesce().to_sparse_csr()
    used_r, used_c = rows.unique(), cols.unique()
    block = layer.dense_ortho(ADAPTER).float()[used_r][:, used_c].contiguous()
    fused = layer.effective_weight(ADAPTER, alpha).float().contiguous()
    avals = alpha * vals
    bias_col = bias[:, None] if bias is not None else torch.zeros(out_f, 1)
    csr_b = unique_bytes([csr])

    def lin():
        return F.linear(x, base, bias)

    return {
        "csr, y + a*(.)  [layer now]": (lambda: lin() + alpha * torch.sparse.mm(csr, x.T).T, csr_b),
        "csr, y.add_(., alpha=a)": (lambda: lin().add_(torch.sparse.mm(csr, x.T).T, alpha=alpha), csr_b),
        "csr int32 idx, add_": (lambda: lin().add_(torch.sparse.mm(csr32, x.T).T, alpha=alpha), unique_bytes([csr32])),
        "csr, x^T contiguous, add_": (lambda: lin().add_(torch.sparse.mm(csr, x.T.contiguous()).T, alpha=alpha),
                                      csr_b),
        "sparse.addmm(y^T, csr, x^T)": (
            lambda: torch.sparse.addmm(lin().T, csr, x.T, alpha=alpha).T.contiguous(), csr_b),
        "transposed: addmm(b, B, x^T) + sparse.addmm": (
            lambda: torch.sparse.addmm(torch.addmm(bias_col, base, x.T), csr, x.T, alpha=alpha).T.contiguous(), csr_b),
        "coo, add_": (lambda: lin().add_(torch.sparse.mm(coo, x.T).T, alpha=alpha), unique_bytes([coo])),
        "x @ CSR(O^T), add_": (lambda: lin().add_(x @ ot_csr, alpha=alpha), unique_bytes([ot_csr])),
        "gather x[:, cols] + index_add_ [train path]": (
            lambda: lin().index_add_(1, rows, x[:, cols] * avals), nnz * (8 + 8 + 4)),
        "gather x^T[cols] + index_add_ (rows)": (
            lambda: lin().add_(torch.zeros(out_f, x.shape[0]).index_add_(0, rows, x.T[cols] * avals[:, None]).T),
            nnz * (8 + 8 + 4)),
        "dense block of used rows x cols": (
            lambda: lin().index_add_(1, used_r, F.linear(x[:, used_c], block), alpha=alpha),
            unique_bytes([block, used_r, used_c])),
        "fused dense B + aO (layout=fused)": (lambda: F.linear(x, fused, bias), unique_bytes([fused])),
    }


def layer_group(out_f: int, in_f: int, density: float, args: argparse.Namespace) -> dict:
    """All timings of one layer size at one density (every token count), plus its memory."""
    import peft_ext

    torch.manual_seed(args.seed)
    plain = One(out_f, in_f).eval()
    csr_model = split(copy.deepcopy(plain), ["lin"], density, "csr", args.base_kind)
    fused_model = split(copy.deepcopy(plain), ["lin"], density, "fused", args.base_kind)
    models = {  # one instance per layout and alpha: no timed call pays for a cache rebuild
        ("csr", 0.0): with_alpha(copy.deepcopy(csr_model), 0.0), ("csr", 1.0): csr_model,
        ("fused", 0.0): with_alpha(copy.deepcopy(fused_model), 0.0), ("fused", 1.0): fused_model,
    }
    layers = {k: m.base_model.model.lin for k, m in models.items()}
    dense = layers[("csr", 1.0)].get_base_layer()  # the original nn.Linear, its weight untouched
    rows, cols = _rows_cols(layers[("csr", 1.0)])
    pattern = {"rows_used": rows.unique().numel() / out_f, "cols_used": cols.unique().numel() / in_f,
               "max_row_nnz": int(torch.bincount(rows, minlength=out_f).max())}
    out = {"size": [out_f, in_f], "density": density, "pattern": pattern, "runs": []}
    with torch.inference_mode():
        # each alpha=0 instance is compared with F.linear on ITS OWN base tensor: two equal float32 tensors at
        # different addresses can time several % apart, which would swamp the wrapper's overhead
        base_csr = layers[("csr", 0.0)].effective_weight(ADAPTER, 0.0)
        base_fused = layers[("fused", 0.0)].effective_weight(ADAPTER, 0.0)
        bias = dense.bias
        csr = csr_of(layers[("csr", 1.0)])
        for n_tok in args.tokens:
            x = torch.randn(n_tok, in_f)
            fns = {
                "dense": lambda: dense(x),
                "base_csr": lambda: F.linear(x, base_csr, bias),
                "base_fused": lambda: F.linear(x, base_fused, bias),
                "csr_a0": lambda: layers[("csr", 0.0)](x),
                "csr_a1": lambda: layers[("csr", 1.0)](x),
                "fused_a0": lambda: layers[("fused", 0.0)](x),
                "fused_a1": lambda: layers[("fused", 1.0)](x),
                "csr_mm": lambda: torch.sparse.mm(csr, x.T).T,
            }
            alts, slow = {}, {}
            if not args.skip_alternatives and any(math.isclose(density, d) for d in args.alt_densities):
                alts = alternatives(layers[("csr", 1.0)], x, 1.0)
                ref = layers[("csr", 1.0)](x)
                scale = float(ref.abs().max())
                errors = {k: float((f() - ref).abs().max()) / scale for k, (f, _) in alts.items()}
                # a variant over SLOW_ALT x dense in a first look is a clear loser: it gets a few rounds of its own
                # (paired with dense) instead of eating the time budget of the variants that decide the verdicts
                look = {k: min(one_shot(f), one_shot(f)) for k, (f, _) in alts.items()}
                t_dense = min(one_shot(fns["dense"]) for _ in range(2))
                slow = {k for k, v in look.items() if v > SLOW_ALT * t_dense}
                fns.update({f"alt:{k}": f for k, (f, _) in alts.items() if k not in slow})
            load = OtherLoad()
            t = interleaved(fns, args)
            if slow:
                t_slow = interleaved({"dense": fns["dense"], **{f"alt:{k}": alts[k][0] for k in slow}}, args,
                                     budget=0.0, min_rounds=SLOW_ROUNDS, warmup=0)
            run = {
                "tokens": n_tok, "rounds": len(t["dense"]), "other_load_cores": load.cores(),
                "ms": {k: med_ms(t, k) for k in t},
                "base/dense": paired(t, "base_csr", "dense"),
                "csr_a0/base": paired(t, "csr_a0", "base_csr"), "csr_a1/dense": paired(t, "csr_a1", "dense"),
                "fused_a0/base": paired(t, "fused_a0", "base_fused"), "fused_a1/dense": paired(t, "fused_a1", "dense"),
                "csr_mm/dense": paired(t, "csr_mm", "dense"),
            }
            if alts:
                run["alternatives"] = {
                    k: {"ratio_to_dense": paired(t_slow if k in slow else t, f"alt:{k}", "dense"), "extra_bytes": b,
                        "rel_error": errors[k], "timed_apart": k in slow,
                        "rounds": len(t_slow["dense"]) if k in slow else run["rounds"]}
                    for k, (_, b) in alts.items()}
                run["alternatives"]["csr layer (as timed above)"] = {
                    "ratio_to_dense": run["csr_a1/dense"], "extra_bytes": unique_bytes([csr]), "rel_error": 0.0,
                    "timed_apart": False, "rounds": run["rounds"]}
            out["runs"].append(run)
        # one alpha switch of the fused layout: its dense B + alpha O is rebuilt on the next forward
        x = torch.randn(args.tokens[0], in_f)
        switch = []
        for a in (0.5, 1.0, 0.5, 1.0, 0.5):
            peft_ext.set_ortho_alpha(models[("fused", 1.0)], a)
            t0 = time.perf_counter()
            layers[("fused", 1.0)](x)
            switch.append(time.perf_counter() - t0)
        peft_ext.set_ortho_alpha(models[("fused", 1.0)], 1.0)
        layers[("fused", 1.0)](x)
        out["fused_switch_ms"] = 1e3 * statistics.median(switch)
        out["fused_steady_ms"] = out["runs"][0]["ms"]["fused_a1"]
        row = peft_ext.ortho_report(models[("csr", 1.0)])[0]
        out["memory"] = layer_memory(layers[("csr", 1.0)], layers[("fused", 1.0)], row)
        out["nnz"] = row["nnz"]
    return out


# ----------------------------------------------------------------------------------------------- (3) model
def model_part(args: argparse.Namespace) -> dict:
    import peft_ext
    from peft_ext.ortho import ortho_layers
    from transformers import LlamaConfig, LlamaForCausalLM

    h = args.model_hidden
    heads = max(1, h // 64)
    cfg = LlamaConfig(vocab_size=2048 if not args.quick else 256, hidden_size=h, intermediate_size=4 * h,
                      num_hidden_layers=args.model_layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(args.model_tokens))
    torch.manual_seed(args.seed)
    plain = LlamaForCausalLM(cfg).eval()
    d = args.model_density
    csr_model = split(copy.deepcopy(plain), "all-linear", d, "csr", args.base_kind)
    fused_model = split(copy.deepcopy(plain), "all-linear", d, "fused", args.base_kind)
    merged = with_alpha(copy.deepcopy(csr_model), 0.0).merge_and_unload().eval()  # base stream as plain weights
    models = {"unsplit": plain, "base_merged": merged,
              "csr_a0": with_alpha(copy.deepcopy(csr_model), 0.0), "csr_a1": csr_model,
              "fused_a0": with_alpha(copy.deepcopy(fused_model), 0.0), "fused_a1": fused_model}
    report = peft_ext.ortho_report(csr_model)
    out = {"config": {"hidden": h, "intermediate": 4 * h, "layers": args.model_layers, "heads": heads,
                      "vocab": cfg.vocab_size, "attn": getattr(plain.config, "_attn_implementation", None)},
           "density": d, "split_layers": len(report), "shapes": sorted({tuple(r["shape"]) for r in report}),
           "runs": []}
    with torch.inference_mode():
        for n_tok in args.model_tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, n_tok), generator=torch.Generator().manual_seed(args.seed))
            fns = {k: (lambda m=m: m(input_ids=ids, use_cache=False)) for k, m in models.items()}
            ref = models["csr_a1"](input_ids=ids, use_cache=False).logits
            err = float((models["fused_a1"](input_ids=ids, use_cache=False).logits - ref).abs().max())
            load = OtherLoad()
            t = interleaved(fns, args)
            out["runs"].append({
                "tokens": n_tok, "rounds": len(t["unsplit"]), "other_load_cores": load.cores(),
                "ms": {k: med_ms(t, k) for k in t},
                "base_merged/unsplit": paired(t, "base_merged", "unsplit"),
                "csr_a0/base_merged": paired(t, "csr_a0", "base_merged"),
                "csr_a1/unsplit": paired(t, "csr_a1", "unsplit"),
                "fused_a0/base_merged": paired(t, "fused_a0", "base_merged"),
                "fused_a1/unsplit": paired(t, "fused_a1", "unsplit"),
                "fused_vs_csr_max_abs_logit_diff": err,
            })
    split_params = unique_bytes([m.get_base_layer().weight for _, m in ortho_layers(csr_model)])
    out["memory"] = {
        "unsplit_bytes": held_bytes(plain),
        "split_layers_dense_bytes": sum(r["dense_bytes"] for r in report),
        "sparse_bytes": sum(r["sparse_bytes"] for r in report),
        "base_bytes_packed": sum(r["base_bytes_packed"] for r in report),
        "packed_model_bytes": held_bytes(plain) - split_params + sum(r["sparse_bytes"] + r["base_bytes_packed"]
                                                                     for r in report),
        "held_csr_bytes": held_bytes(csr_model),
        "held_fused_bytes": held_bytes(fused_model),
    }
    return out


# ----------------------------------------------------------------------------------------------- verdicts
def _where(r: dict, g: dict) -> str:
    return f"{g['size'][0]}x{g['size'][1]}, {r['tokens']} tokens, {100 * g['density']:g}%"


def verdicts(layer_groups: list[dict]) -> list[dict]:
    """The two targets, judged per layout on every measurement they cover."""
    out = []
    for layout in ("csr", "fused"):
        vals = [(r[f"{layout}_a0/base"], _where(r, g)) for g in layer_groups for r in g["runs"]]
        out.append(_judge(f"alpha=0 <= {ALPHA0_TARGET}x base stream alone, layout={layout}", ALPHA0_TARGET, vals,
                          "all sizes, densities and token counts"))
    for layout in ("csr", "fused"):
        vals = [(r[f"{layout}_a1/dense"], _where(r, g)) for g in layer_groups for r in g["runs"]
                if math.isclose(g["density"], TARGET_DENSITY) and g["size"][0] * g["size"][1] >= TARGET_NUMEL]
        out.append(_judge(f"alpha=1 at 1% <= {ALPHA1_TARGET}x dense on 1024x4096-sized layers, layout={layout}",
                          ALPHA1_TARGET, vals, "out x in >= 1024*4096"))
    return out


def _judge(name: str, bound: float, vals: list[tuple[float, str]], scope: str) -> dict:
    if not vals:
        return {"target": name, "met": None, "line": f"{name}: not measured (no {scope} in this run)"}
    worst, where = max(vals)
    over = sum(v > bound for v, _ in vals)
    met = over == 0
    tail = (f"met (worst {worst:.3f}x at {where}; {len(vals)} measurements)" if met else
            f"MISSED by {100 * (worst / bound - 1):.1f}% (worst {worst:.3f}x at {where}; {over} of {len(vals)} over)")
    return {"target": name, "met": met, "worst": worst, "where": where, "over": over, "count": len(vals),
            "line": f"{name}: {tail}"}


def best_alternatives(layer_groups: list[dict]) -> list[dict]:
    """Per size and token count at the alternative densities: the fastest way overall and the fastest lean one
    (holding less than half a dense weight besides the base stream)."""
    out = []
    for g in layer_groups:
        dense_bytes = g["memory"]["dense_bytes"]
        for r in g["runs"]:
            alts = {k: v for k, v in r.get("alternatives", {}).items() if v["rel_error"] < 1e-4}
            if not alts:
                continue
            lean = {k: v for k, v in alts.items() if v["extra_bytes"] < dense_bytes / 2}
            best = min(alts, key=lambda k: alts[k]["ratio_to_dense"])
            best_lean = min(lean, key=lambda k: lean[k]["ratio_to_dense"]) if lean else None
            out.append({"size": g["size"], "density": g["density"], "tokens": r["tokens"], "best": best,
                        "best_ratio": alts[best]["ratio_to_dense"], "best_lean": best_lean,
                        "best_lean_ratio": lean[best_lean]["ratio_to_dense"] if best_lean else None,
                        "layer_now": r["csr_a1/dense"]})
    return out


# ----------------------------------------------------------------------------------------------- reporting
def _mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def report(res: dict, args: argparse.Namespace, machine: str) -> None:
    print(f"machine: {machine}")
    print(f"settings: {torch.get_num_threads()} torch thread(s) (torch.set_num_threads; --threads N), float32 CPU, "
          f"torch.inference_mode; base_kind={args.base_kind} held DEQUANTISED in float32 (the base matmul is a dense "
          "float32 one), selector=magnitude, ortho values float16 -> float32 CSR; nn.Linear default init with bias; "
          f"ratios = median per-round ratio over interleaved rounds (>= {args.min_rounds}, ~{args.group_seconds:g} s "
          f"per group) after {args.warmup} warm-up round(s)" + (", QUICK sizes" if args.quick else ""))
    print()
    groups = res["layers"]
    print("(1) layer forward latency (x: tokens x in), ratios per variant; dense = original nn.Linear; base = "
          "F.linear(x, the a0 layer's own dequantised base tensor, bias)")
    print(f"  {'out x in':<10} {'tok':>4} {'dens':>5} {'dense ms':>9} {'base/':>6} {'csr a0/':>8} {'csr a1/':>8} "
          f"{'fus a0/':>8} {'fus a1/':>8} {'CSR mm/':>8} {'rounds':>6} {'other':>6}")
    print(f"  {'':<10} {'':>4} {'':>5} {'':>9} {'dense':>6} {'base':>8} {'dense':>8} {'base':>8} {'dense':>8} "
          f"{'dense':>8} {'':>6} {'load':>6}")
    for g in groups:
        for r in g["runs"]:
            print(f"  {g['size'][0]:>4}x{g['size'][1]:<5} {r['tokens']:>4} {100 * g['density']:>4g}% "
                  f"{r['ms']['dense']:>9.3f} {r['base/dense']:>6.3f} {r['csr_a0/base']:>8.3f} "
                  f"{r['csr_a1/dense']:>8.3f} {r['fused_a0/base']:>8.3f} {r['fused_a1/dense']:>8.3f} "
                  f"{r['csr_mm/dense']:>8.3f} {r['rounds']:>6} {r['other_load_cores']:>6.2f}")
    print("  other load = CPU cores other processes kept busy while the group was timed")
    null = [r["base/dense"] for g in groups for r in g["runs"]]
    print(f"  noise floor: base/dense does equal arithmetic on two equal-sized tensors (dense also pays nn.Linear's "
          f"module call); over {len(null)} groups it spans {min(null):.3f} .. {max(null):.3f}, so differences of that "
          "size are noise, not the layout")
    print()
    for v in res["verdicts"]:
        print(f"  target {v['line']}")
    small = [(g, r) for g in groups for r in g["runs"]
             if math.isclose(g["density"], TARGET_DENSITY) and g["size"][0] * g["size"][1] < TARGET_NUMEL]
    if small:
        print("  small layers (no target; the issue asks for a better layout or an honest figure), alpha=1 at 1% / "
              "dense: " + "; ".join(f"{g['size'][0]}x{g['size'][1]} {r['tokens']} tok: csr {r['csr_a1/dense']:.3f}x, "
                                    f"fused {r['fused_a1/dense']:.3f}x" for g, r in small))
    print()
    alt_runs = [(g, r) for g in groups for r in g["runs"] if "alternatives" in r]
    if alt_runs:
        print("(2) alternatives for the alpha=1 forward (B x + O x + bias from the same tensors), time / dense; extra "
              "MB = held besides the base stream (at the first column's size); every output checked against the "
              "layer's")
        cols = [f"{g['size'][0]}x{g['size'][1]}/{r['tokens']}" for g, r in alt_runs]
        names = list(alt_runs[0][1]["alternatives"])
        print(f"  {'variant':<44} {'extra MB':>9} " + " ".join(f"{c:>14}" for c in cols))
        for n in names:
            cells = []
            for _, r in alt_runs:
                a = r["alternatives"][n]
                mark = "!" if a["rel_error"] >= 1e-4 else ("~" if a["timed_apart"] else " ")
                cells.append(f"{a['ratio_to_dense']:>13.3f}{mark}")
            extra = alt_runs[0][1]["alternatives"][n]["extra_bytes"]
            print(f"  {n:<44} {_mb(extra):>9} " + " ".join(cells))
        print(f"  ~ = over {SLOW_ALT}x dense at a first look: timed apart in {SLOW_ROUNDS} rounds with dense only")
        wrong = sorted({n for _, r in alt_runs for n, a in r["alternatives"].items() if a["rel_error"] >= 1e-4})
        if wrong:
            print(f"  ! = output differs from the layer's (relative error >= 1e-4): {', '.join(wrong)}")
        for b in res["best"]:
            lean = (f"fastest lean (< half a dense weight extra): {b['best_lean']} {b['best_lean_ratio']:.3f}x"
                    if b["best_lean"] else "no lean variant")
            print(f"  {b['size'][0]}x{b['size'][1]}, {b['tokens']} tok, {100 * b['density']:g}%: fastest {b['best']} "
                  f"{b['best_ratio']:.3f}x; {lean}; layer now (csr) {b['layer_now']:.3f}x")
        print()
    if "model" in res:
        m = res["model"]
        c = m["config"]
        print(f"(3) model: LlamaForCausalLM, random init, hidden {c['hidden']}, intermediate {c['intermediate']}, "
              f"{c['layers']} layers, {c['heads']} heads, vocab {c['vocab']}, attention {c['attn']}, batch 1; "
              f"{m['split_layers']} linear layers (all but lm_head) split at {100 * m['density']:g}%, shapes "
              f"{', '.join(f'{s[0]}x{s[1]}' for s in m['shapes'])}; base merged = merge_and_unload() at alpha=0")
        print(f"  {'tokens':>6} {'unsplit ms':>11} {'base merged/':>13} {'csr a0/':>12} {'csr a1/':>9} "
              f"{'fused a0/':>12} {'fused a1/':>9} {'rounds':>6} {'other':>6}")
        print(f"  {'':>6} {'':>11} {'unsplit':>13} {'base merged':>12} {'unsplit':>9} {'base merged':>12} "
              f"{'unsplit':>9} {'':>6} {'load':>6}")
        for r in m["runs"]:
            print(f"  {r['tokens']:>6} {r['ms']['unsplit']:>11.3f} {r['base_merged/unsplit']:>13.3f} "
                  f"{r['csr_a0/base_merged']:>12.3f} {r['csr_a1/unsplit']:>9.3f} {r['fused_a0/base_merged']:>12.3f} "
                  f"{r['fused_a1/unsplit']:>9.3f} {r['rounds']:>6} {r['other_load_cores']:>6.2f}")
        print()
    print("(4) memory, MB (float32 weights). stored = ortho_report: packed base stream (int codes + scales, what a "
          "deployment would hold) + sparse stream (float16 values + indices). held = what the split layer holds at run "
          "time after an alpha=1 forward: the original W that PEFT keeps in base_layer + the DEQUANTISED float32 base "
          "(the simulated base is not packed in memory) + the csr cache (int32 crow/col, float32 values), or instead "
          "of base and cache the fused dense B + alpha*O + the stored values/indices + bias")
    print(f"  {'out x in':<10} {'dens':>5} {'dense':>7} {'packed base':>12} {'sparse':>7} {'stored/':>8} "
          f"{'held csr':>9} {'/dense':>7} {'held fused':>11} {'/dense':>7} {'fused switch':>13}")
    for g in groups:
        mm = g["memory"]
        d = mm["dense_bytes"]
        print(f"  {g['size'][0]:>4}x{g['size'][1]:<5} {100 * g['density']:>4g}% {_mb(d):>7} "
              f"{_mb(mm['base_bytes_packed']):>12} {_mb(mm['sparse_bytes']):>7} {mm['packed_total_bytes'] / d:>7.3f}x "
              f"{_mb(mm['held_csr_bytes']):>9} {mm['held_csr_bytes'] / d:>6.2f}x {_mb(mm['held_fused_bytes']):>11} "
              f"{mm['held_fused_bytes'] / d:>6.2f}x {g['fused_switch_ms']:>8.2f} ms")
    print("  stored/ = stored / dense; fused switch = first forward after an alpha change (the fused weight is "
          f"rebuilt; a steady fused forward at {args.tokens[0]} tokens is the dense ms above)")
    if "model" in res:
        mm = res["model"]["memory"]
        u = mm["unsplit_bytes"]
        print(f"  model: unsplit {_mb(u)}; stored (unsplit parts + packed base + sparse) "
              f"{_mb(mm['packed_model_bytes'])} "
              f"({mm['packed_model_bytes'] / u:.3f}x); held csr {_mb(mm['held_csr_bytes'])} "
              f"({mm['held_csr_bytes'] / u:.2f}x); held fused {_mb(mm['held_fused_bytes'])} "
              f"({mm['held_fused_bytes'] / u:.2f}x)")
    free = (os.cpu_count() or 1) - torch.get_num_threads()
    runs = [r for g in groups for r in g["runs"]] + (res["model"]["runs"] if "model" in res else [])
    contended = sum(r["other_load_cores"] > free + 0.25 for r in runs)
    shared = sum(0.25 < r["other_load_cores"] <= free + 0.25 for r in runs)
    if contended:
        print(f"WARNING: other processes wanted more than the {free} core(s) this run left free during {contended} of "
              f"{len(runs)} timed groups: those timings are inflated; rerun on a quieter machine before trusting them.")
    if shared:
        print(f"NOTE: other processes kept the free core(s) busy during {shared} of {len(runs)} timed groups (no "
              "contention for ours, but shared cache and memory bandwidth add noise; see the noise floor above).")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's "CSR support is in beta" notices
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers, via get_peft_model
    from recipes.common import machine

    if args.idle_wait > 0:
        from monitor_overhead import IdleWaiter

        IdleWaiter(args.idle_wait).wait("the layer timings")
    res: dict = {"layers": []}
    for out_f, in_f in args.sizes:
        for d in args.densities:
            t0 = time.perf_counter()
            res["layers"].append(layer_group(out_f, in_f, d, args))
            print(f"layer {out_f}x{in_f} at {100 * d:g}%: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
    res["verdicts"] = verdicts(res["layers"])
    res["best"] = best_alternatives(res["layers"])
    if not args.skip_model:
        t0 = time.perf_counter()
        res["model"] = model_part(args)
        print(f"model: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report(res, args, machine())
    print(printed.getvalue(), end="")
    payload = {"machine": machine(), "args": {k: v for k, v in vars(args).items()}, "results": res,
               "targets": {"alpha0_over_base": ALPHA0_TARGET, "alpha1_over_dense": ALPHA1_TARGET,
                           "density": TARGET_DENSITY, "min_numel": TARGET_NUMEL},
               "met": {v["target"]: v["met"] for v in res["verdicts"]}, "printed": printed.getvalue()}
    if args.json:
        write_json(args.json, payload, indent=2)
    return payload


if __name__ == "__main__":
    main()
