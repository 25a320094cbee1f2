"""Spectral monitoring overhead under FSDP2: 2 processes (gloo on CPU, NCCL on GPUs), `fully_shard` per block.

Run from the repository root (it launches itself under torchrun):

    .venv/bin/python benchmarks/monitor_fsdp2.py --json results/monitor_fsdp2_cpu.json
    .venv/bin/python benchmarks/monitor_fsdp2.py --steps 40 --every 10 --depth 2      # quicker

Model: the recipes' timm-named ViT (`zoo.ViT`) at `--width` (384: ViT-S) and `--depth`, `--image-size` images, each
block and then the root wrapped with `fully_shard`, AdamW. One process per rank, each on half the global batch; the
loop calls the monitor's hooks where transformers.Trainer calls them (the Trainer's FSDP integration refuses CPU).
Monitor: SpectralMonitorCallback(targets=attn.qkv, attn.proj, mlp.fc1, mlp.fc2, topk=8, track=weight+grad+momentum,
exact_max_dim 128), every `--every` updates: the weights, gradients and moments are DTensor row shards, measured
without gathering them (spectral.sharded_top_k_svd / sharded_projection_energy).

Printed side by side, from the same launch: seconds per update without and with the monitor (runs alternate
none/monitor `--rounds` times, medians), their ratio, the time spent inside the monitor's hooks per check, and the
projected overhead at `--every`. The machine is named (recipes.common.machine()) with the load average around the
timed part: on a busy machine the figures are contaminated, and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "recipes")]
import zoo  # noqa: E402  (the recipes' timm-named ViT)
from recipes.common import machine, machine_info, write_json  # noqa: E402

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer updates per timed run")
    p.add_argument("--every", type=int, default=10, help="monitor interval (checks every N updates)")
    p.add_argument("--rounds", type=int, default=3, help="alternating none/monitor runs; medians are reported")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=384, help="embedding width (MLP 4x, heads = width // 64)")
    p.add_argument("--image-size", type=int, default=32, help="32 -> 2x2 patches + cls = 5 tokens (CPU-feasible)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (each of the 2 ranks takes half)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_worker", metavar="DIR", help=argparse.SUPPRESS)  # internal: one rank, writes DIR/rank<r>.json
    return p.parse_args(argv)


def train(args, rank: int, world: int, every: int, device: torch.device) -> dict:
    """`args.steps` updates of a fully_shard-ed ViT; every=0: no monitor. Returns wall time per update (after one
    warm-up update) and the time inside the monitor's hooks."""
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    from trainer_ext import SpectralMonitorCallback

    model = zoo.ViT(image_size=args.image_size, patch=16, in_chans=3, dim=args.width, depth=args.depth,
                    heads=max(1, args.width // 64), mlp_ratio=4.0, num_classes=10, seed=0).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(rank)
    half = args.batch_size // world
    x = torch.randn(half, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 10, (half,), generator=g).to(device)
    hooks = SimpleNamespace(pre=lambda *a, **k: None, post=lambda *a, **k: None, end=lambda *a, **k: None)
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = rank == 0
    targs = SimpleNamespace(process_index=rank, world_size=world, output_dir="unused", deepspeed=None, fsdp=None)
    monitor = None
    if every:
        monitor = SpectralMonitorCallback(targets=TARGETS, every=every, topk=args.topk, plots=False)
        monitor.on_train_begin(targs, state, control, model=model)
        hooks = SimpleNamespace(pre=monitor.on_pre_optimizer_step, post=monitor.on_optimizer_step, end=monitor.on_step_end)
    inside = 0.0
    t_start = None
    for step in range(1 + args.steps):
        if step == 1:  # the first update (allocations, thread pools) is not timed
            torch.distributed.barrier()
            t_start = time.perf_counter()
            inside = 0.0
        model(x, y)["loss"].backward()
        t0 = time.perf_counter()
        hooks.pre(targs, state, control)
        inside += time.perf_counter() - t0
        opt.step()
        t0 = time.perf_counter()
        hooks.post(targs, state, control, optimizer=opt)
        inside += time.perf_counter() - t0
        opt.zero_grad()
        state.global_step += 1
        t0 = time.perf_counter()
        hooks.end(targs, state, control)
        inside += time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch.distributed.barrier()
    wall = time.perf_counter() - t_start
    checks = sum(1 for s in range(2, args.steps + 2) if s % every == 0) if every else 0
    return {"every": every, "s_per_update": wall / args.steps, "monitor_s": inside, "checks": checks,
            "matrices": len(monitor.targets) if monitor else 0,
            "logged_checks": len(monitor.records) if monitor else 0}


def worker(args) -> None:
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    load_before = os.getloadavg()
    runs = []
    for _ in range(args.rounds):
        runs.append(train(args, rank, world, 0, device))
        runs.append(train(args, rank, world, args.every, device))
    out = {"rank": rank, "world": world, "runs": runs, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "machine": machine_info()}
    write_json(os.path.join(args._worker, f"rank{rank}.json"), out)
    torch.distributed.destroy_process_group()


def summarize(args, ranks: list[dict]) -> dict:
    r0 = ranks[0]
    none = [r["s_per_update"] for r in r0["runs"] if r["every"] == 0]
    mon = [r for r in r0["runs"] if r["every"]]
    t_none, t_mon = statistics.median(none), statistics.median(r["s_per_update"] for r in mon)
    per_check = statistics.median(r["monitor_s"] / max(r["checks"], 1) for r in mon)
    return {
        "machine": r0["machine"], "machine_line": machine(r0["machine"]),
        "processes": r0["world"], "fsdp": "fully_shard per ViT block + root (DTensor Shard(0))",
        "model": {"depth": args.depth, "width": args.width, "image_size": args.image_size,
                  "global_batch": args.batch_size, "monitored_matrices": mon[0]["matrices"]},
        "monitor": {"every": args.every, "topk": args.topk, "track": ["weight", "grad", "momentum"],
                    "exact_max_dim": 128},
        "steps_per_run": args.steps, "rounds": args.rounds,
        "s_per_update_none": none, "s_per_update_monitor": [r["s_per_update"] for r in mon],
        "median_s_per_update_none": t_none, "median_s_per_update_monitor": t_mon,
        "ratio_monitor_over_none": t_mon / t_none,
        "monitor_s_per_check": per_check,
        "hook_overhead_pct": 100.0 * per_check / (args.every * t_none),
        "loadavg_before": r0["loadavg_before"], "loadavg_after": r0["loadavg_after"],
        "busy_machine": max(r0["loadavg_before"][0], r0["loadavg_after"][0]) > 0.5 * (os.cpu_count() or 1),
        "ranks_agree_on_checks": len({json.dumps([r["logged_checks"] for r in x["runs"]]) for x in ranks}) == 1,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--_worker", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, env=env, check=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.nproc)]
    res = summarize(args, ranks)
    print(f"machine: {res['machine_line']}; load average {res['loadavg_before'][0]:.1f} before, "
          f"{res['loadavg_after'][0]:.1f} after" + (" (BUSY: timings contaminated)" if res["busy_machine"] else ""))
    print(f"FSDP2, {res['processes']} processes, ViT depth {args.depth} width {args.width}, "
          f"{res['model']['monitored_matrices']} monitored matrices, top-{args.topk}, every {args.every} updates")
    print(f"{'':24}{'no monitor':>14}{'monitor':>14}{'ratio':>10}")
    print(f"{'s per update (median)':24}{res['median_s_per_update_none']:>14.4f}{res['median_s_per_update_monitor']:>14.4f}"
          f"{res['ratio_monitor_over_none']:>10.3f}")
    print(f"monitor hooks: {res['monitor_s_per_check']:.4f} s per check = {res['hook_overhead_pct']:.1f}% of "
          f"{args.every} updates")
    if args.json:
        write_json(args.json, res, indent=1)


if __name__ == "__main__":
    main()
