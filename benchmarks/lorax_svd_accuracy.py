"""How accurate LoRA-X's randomized SVD is, per (oversample, niter): the measurement its defaults come from.

    .venv/bin/python benchmarks/lorax_svd_accuracy.py --json results/lorax_svd_accuracy.json   # ~2 min on 2 cores
    .venv/bin/python benchmarks/lorax_svd_accuracy.py --dim 512 --subspace-rank 16            # seconds

The weights and adapter of `benchmarks/lorax_speed.py` part (b) (Gaussian bulk + power-law head; the target adds 10%
fresh bulk; the adapter half inside the top-k subspaces). For each setting, the top-k SVDs of source and target are
computed by `peft_ext.linalg.top_k_svd` (randomized) and compared with the exact ones: the energy the transfer keeps
(||dW_t|| / ||dW_s||) without the complement carry (the top-subspace-only rule, which rests on the subspaces alone)
and with it (the default), the subspace similarity phi(U_rand, U_exact), and the time against the full SVD. Target
(issue 17): <= 1% energy difference at >= 20x the speed of the exact SVD.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lorax_speed import big_weights  # noqa: E402

from peft_ext.linalg import top_k_svd  # noqa: E402
from peft_ext.lorax import lora_norm2, project_factors  # noqa: E402
from peft_ext.lorax_options import TransferOptions  # noqa: E402
from recipes.common import machine, machine_info, write_json  # noqa: E402

GRID = ((8, 2), (8, 4), (16, 4), (8, 6), (16, 6), (32, 4), (16, 8), (64, 2), (64, 4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=4096, help="the square layer's size")
    p.add_argument("--subspace-rank", type=int, default=64, help="k")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def energy(b, a, bases, carry: bool) -> float:
    (us, _, vs), (ut, _, vt) = bases
    b2, a2 = project_factors(b, a, us, vs, ut, vt, carry_complement=carry)
    return (lora_norm2(b2, a2) / lora_norm2(b, a)) ** 0.5


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n, k = args.dim, args.subspace_rank
    ws, wt, b, a = big_weights(n, k, args.rank)
    torch.linalg.svd(torch.randn(64, 64))  # LAPACK start-up
    t0 = time.perf_counter()
    exact = [top_k_svd(w, k, exact_max_dim=n) for w in (ws, wt)]
    t_exact = time.perf_counter() - t0
    e_nc, e_c = energy(b, a, exact, False), energy(b, a, exact, True)
    rows = []
    for oversample, niter in GRID:
        t0 = time.perf_counter()
        rand = [top_k_svd(w, k, exact_max_dim=0, oversample=oversample, niter=niter,
                          generator=torch.Generator().manual_seed(0)) for w in (ws, wt)]
        seconds = time.perf_counter() - t0
        r_nc, r_c = energy(b, a, rand, False), energy(b, a, rand, True)
        rows.append({"oversample": oversample, "niter": niter, "seconds": seconds, "speedup": t_exact / seconds,
                     "no_carry_diff_pct": 100 * abs(r_nc - e_nc) / e_nc, "carry_diff_pct": 100 * abs(r_c - e_c) / e_c,
                     "phi_u": float((rand[0][0].T @ exact[0][0]).pow(2).sum() / k)})
    d = TransferOptions()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print(f"machine: {machine()}")
        print(f"one {n}x{n} layer pair, k={k}, LoRA rank {args.rank}; exact top-k SVDs (full SVD) of source and "
              f"target: {t_exact:.1f} s; energy kept exact: {e_nc:.4f} without carry, {e_c:.4f} with it")
        print()
        print(f"{'oversample':>10} {'niter':>5} {'seconds':>8} {'speedup':>8} {'no-carry diff %':>16} "
              f"{'carry diff %':>13} {'phi(U)':>7}")
        for r in rows:
            mark = "  <- default" if (r["oversample"], r["niter"]) == (d.oversample, d.niter) else ""
            print(f"{r['oversample']:>10} {r['niter']:>5} {r['seconds']:>8.2f} {r['speedup']:>7.1f}x "
                  f"{r['no_carry_diff_pct']:>16.2f} {r['carry_diff_pct']:>13.3f} {r['phi_u']:>7.4f}{mark}")
        ok = [r for r in rows if r["speedup"] >= 20 and max(r["no_carry_diff_pct"], r["carry_diff_pct"]) <= 1]
        print()
        print("settings meeting <= 1% energy difference (with and without carry) at >= 20x: "
              + (", ".join(f"oversample {r['oversample']} / niter {r['niter']}" for r in ok) or "none"))
    print(printed.getvalue(), end="")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "args": vars(args), "exact_seconds": t_exact,
                               "energy_exact": {"no_carry": e_nc, "carry": e_c}, "rows": rows,
                               "printed": printed.getvalue()}, indent=2)


if __name__ == "__main__":
    main()
