"""Spectral monitoring overhead: SpectralMonitorCallback on a ViT-S/16-shaped model trained with transformers.Trainer.

Run from the repository root:

    .venv/bin/python benchmarks/monitor_overhead.py                        # defaults: ~6 min on 2 idle cores
    .venv/bin/python benchmarks/monitor_overhead.py --skip-4096 --json /tmp/monitor_overhead.json

Model: ViT-S/16 shapes with timm module names, written out below (`ViT`): patch embedding conv (`patch_embed.proj`),
cls token, position embedding, `--depth` blocks (default 12) of `norm1`, `attn.qkv` (384->1152), `attn.proj`
(384->384), `norm2`, `mlp.fc1` (384->1536), `mlp.fc2` (1536->384), 6 heads, then `norm` and a 10-class `head`
(CIFAR-10): 21.67M parameters at 224x224, float32. Data: random images and labels (the monitor's cost does not depend
on what is learned). Training: transformers.Trainer, AdamW (torch), constant LR, use_cpu=True, report_to="none",
save_strategy="no".
Monitor: `SpectralMonitorCallback(targets=attn.qkv, attn.proj, mlp.fc1, mlp.fc2 -> 48 matrices at depth 12, topk=8,
track=weight+grad+momentum, plots=False)`, attached with `.attach(trainer)`.

Parts, each in its own fresh process (one part's allocator caches or warm thread pools cannot flatter another):

  1. train-none, train-every<N>   end-to-end `trainer.train()` wall time at a CPU-feasible size (`--image-size`,
                                  `--batch-size`, `--steps`), without and with the monitor (its default
                                  exact_max_dim=128 unless `--exact-max-dim`); overhead = (t_monitor - t_none) / t_none.
                                  The time spent inside the monitor's hooks is also clocked, a less noisy estimate.
                                  A small-image step is cheap, so these percentages OVERSTATE the real overhead.
  2. real-step                    one training step at the real ViT-S setting (224x224 -> 197 tokens, batch 8):
                                  median of `--real-steps` Trainer steps after one warm-up step.
     micro                        one monitoring check (all matrices, weight SVD + grad + momentum energies, through
                                  the callback's own hooks) with exact_max_dim=512 (exact: every ViT-S matrix has
                                  min dim 384) and with exact_max_dim=0 (randomized, warm-started from the previous
                                  check's V); the cold first check is shown apart, the warm cost is the median of
                                  `--repeats` later checks, an AdamW step moving the weights between checks.
                                  Projected overhead at the real step = check / (every * real step).
  3. (micro)                      one top-k decomposition per distinct matrix shape, randomized (warm) vs full
                                  `torch.linalg.svd`, and a 4096x4096 matrix: top-16 randomized (warm) vs one full SVD.

Targets: <= 1% overhead at every=100, <= 5% at every=10.

Before each part the script waits until the machine is idle (system CPU < 15% for 10 consecutive 1 s samples). The
waits share one budget (`--idle-wait`, 180 s): once it is spent, parts start at once, and each part reports the CPU
cores other processes kept busy while it was timed, so a skewed timing is visible instead of silent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "recipes")]  # + trainer_ext, zoo
import zoo  # noqa: E402  (the recipes' timm-named ViT)
from calibration import OtherLoad  # noqa: E402  (same load meter as there)
from recipes.common import machine_info, write_json  # noqa: E402

TARGETS = {100: 1.0, 10: 5.0}  # every -> allowed overhead in %
MONITOR_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
TRACK = ("weight", "grad", "momentum")
NUM_CLASSES = 10
PATCH = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer updates per end-to-end run")
    p.add_argument("--image-size", type=int, default=64, help="end-to-end runs: image side (64 -> 4x4+1 = 17 tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="end-to-end runs")
    p.add_argument("--every", default="100,10", help="comma list of monitor intervals for the end-to-end runs")
    p.add_argument("--exact-max-dim", type=int, default=128, help="monitor setting of the end-to-end runs "
                   "(512 = the callback's default)")
    p.add_argument("--real-image-size", type=int, default=224)
    p.add_argument("--real-batch-size", type=int, default=8)
    p.add_argument("--real-steps", type=int, default=3, help="timed real steps (after one warm-up step)")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--width", type=int, default=384, help="embedding width (MLP 4x, heads = width // 64)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="warm checks / decompositions timed; the median is shown")
    p.add_argument("--big-dim", type=int, default=4096)
    p.add_argument("--big-topk", type=int, default=16)
    p.add_argument("--skip-4096", action="store_true", help="skip the big square matrix (its full SVD takes 10-50 s)")
    p.add_argument("--skip-real-step", action="store_true", help="skip the 224x224 step (no projected overheads)")
    p.add_argument("--idle-wait", type=float, default=180.0, help="total seconds to wait for an idle machine")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_worker", help=argparse.SUPPRESS)  # internal: run one part, write JSON to --json
    return p.parse_args(argv)


def every_list(args: argparse.Namespace) -> list[int]:
    return [int(e) for e in args.every.split(",") if e.strip()]


# ----------------------------------------------------------------------------------------------- the model
def ViT(image_size: int = 224, depth: int = 12, dim: int = 384, num_classes: int = NUM_CLASSES) -> nn.Module:
    """ViT-S/16-shaped model with timm's module names (blocks.{i}.attn.qkv, ...): the recipes' `zoo.ViT`."""
    return zoo.ViT(image_size=image_size, patch=PATCH, in_chans=3, dim=dim, depth=depth, heads=max(1, dim // 64),
                   mlp_ratio=4.0, num_classes=num_classes, seed=0)


class RandomImages(torch.utils.data.Dataset):
    """`length` items cycling over a pool of fixed random images with random labels."""

    def __init__(self, length: int, image_size: int, pool: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.length = length
        self.x = torch.randn(pool, 3, image_size, image_size, generator=g)
        self.y = torch.randint(0, NUM_CLASSES, (pool,), generator=g)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i % len(self.x)], "labels": self.y[i % len(self.y)]}


def vit_params_at_224(depth: int, dim: int) -> int:
    return sum(p.numel() for p in ViT(224, depth, dim).parameters())


# ----------------------------------------------------------------------------------------------- workers
def make_trainer(args: argparse.Namespace, out_dir: str, image_size: int, batch_size: int, steps: int):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-4,
        weight_decay=0.05, optim="adamw_torch", lr_scheduler_type="constant", use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, remove_unused_columns=False,
        dataloader_drop_last=True,
    )
    model = ViT(image_size, args.depth, args.width)
    return Trainer(model=model, args=targs, train_dataset=RandomImages(steps * batch_size, image_size))


def clock_hooks(monitor) -> dict:
    """Wrap the monitor's per-step hooks so the time spent inside them is summed (the Trainer looks them up by name
    on the instance, so the wrappers are what it calls)."""
    spent = {"s": 0.0}
    for name in ("on_pre_optimizer_step", "on_optimizer_step", "on_step_end"):
        fn = getattr(monitor, name)

        def timed(*a, _fn=fn, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent["s"] += time.perf_counter() - t0

        setattr(monitor, name, timed)
    return spent


def train_worker(args: argparse.Namespace, every: int) -> dict:
    """One end-to-end `trainer.train()`; every=0 means no monitor."""
    from trainer_ext import SpectralMonitorCallback

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(args, out, args.image_size, args.batch_size, args.steps)
        monitor, spent = None, {"s": 0.0}
        if every:
            monitor = SpectralMonitorCallback(targets=MONITOR_TARGETS, every=every, topk=args.topk, track=TRACK,
                                              plots=False, exact_max_dim=args.exact_max_dim).attach(trainer)
            spent = clock_hooks(monitor)
        load = OtherLoad()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # PrinterCallback prints every log dict: keep them quiet
            trainer.train()
        wall = time.perf_counter() - t0
        other = load.cores()
    return {"every": every, "wall_s": wall, "monitor_s": spent["s"], "checks": len(monitor.records) if monitor else 0,
            "matrices": len(monitor.targets) if monitor else 0, "steps": trainer.state.global_step,
            "other_load_cores": other}


def real_step_worker(args: argparse.Namespace) -> dict:
    """Trainer steps at the real image size: durations between consecutive on_step_end (whole steps, data included)."""
    from transformers import TrainerCallback

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(args, out, args.real_image_size, args.real_batch_size, 1 + args.real_steps)
        trainer.add_callback(Clock())
        load = OtherLoad()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        other = load.cores()
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return {"warmup_s": steps[0], "times_s": steps[1:], "median_s": statistics.median(steps[1:]),
            "tokens": (args.real_image_size // PATCH) ** 2 + 1, "other_load_cores": other}


def check_costs(args: argparse.Namespace) -> dict:
    """One monitoring check through the callback's hooks, exactly as inside a Trainer step, for both paths."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from trainer_ext import SpectralMonitorCallback

    model = ViT(args.image_size, args.depth, args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(2, 3, args.image_size, args.image_size, generator=g)
    model(batch, torch.tensor([0, 1]))["loss"].backward()  # gradients stay in .grad: the checks read them
    opt.step()  # exp_avg exists from here on
    fake_args = SimpleNamespace(deepspeed=None, fsdp=None, output_dir=tempfile.gettempdir(), process_index=0, world_size=1)
    out = {}
    for mode, emd in (("exact", 512), ("randomized", 0)):
        mon = SpectralMonitorCallback(targets=MONITOR_TARGETS, every=1, topk=args.topk, track=TRACK, plots=False,
                                      exact_max_dim=emd)
        state, control = TrainerState(), TrainerControl()
        mon.on_train_begin(fake_args, state, control, model=model)
        times = []
        load = OtherLoad()
        for i in range(1 + args.repeats):
            opt.step()  # not timed: the weights and moments move between checks, as in training
            state.global_step = i
            t0 = time.perf_counter()
            mon.on_pre_optimizer_step(fake_args, state, control, model=model, optimizer=opt)
            mon.on_optimizer_step(fake_args, state, control, model=model, optimizer=opt)
            state.global_step = i + 1
            mon.on_step_end(fake_args, state, control, model=model, optimizer=opt)
            times.append(time.perf_counter() - t0)
        out[mode] = {"exact_max_dim": emd, "cold_s": times[0], "times_s": times[1:],
                     "median_s": statistics.median(times[1:]), "matrices": len(mon.targets),
                     "other_load_cores": load.cores()}
    return out


def shape_costs(args: argparse.Namespace) -> dict:
    """One top-k decomposition per distinct shape: randomized warm-started vs full torch.linalg.svd (and of m.T)."""
    from trainer_ext.spectral import top_k_svd

    def median_time(fn, n):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    w = args.width
    shapes = {"attn.qkv": (3 * w, w), "attn.proj": (w, w), "mlp.fc1": (4 * w, w), "mlp.fc2": (w, 4 * w)}
    gen = torch.Generator().manual_seed(0)
    torch.linalg.svd(torch.randn(64, 64, generator=gen))  # LAPACK / thread pool start-up, charged to nobody
    load = OtherLoad()
    out = {"shapes": {}}
    for name, shape in shapes.items():
        m = torch.randn(*shape, generator=gen) * 0.02
        rg = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        _, _, v = top_k_svd(m, args.topk, exact_max_dim=0, generator=rg)
        cold = time.perf_counter() - t0
        state = {"v": v}

        def warm():
            state["v"] = top_k_svd(m, args.topk, warm_start=state["v"], exact_max_dim=0, generator=rg)[2]

        torch.linalg.svd(m, full_matrices=False)  # first call of this shape: workspace queries, not in the median
        out["shapes"][name] = {
            "shape": list(shape), "randomized_cold_s": cold, "randomized_s": median_time(warm, args.repeats),
            "full_s": median_time(lambda: torch.linalg.svd(m, full_matrices=False), args.repeats),
            "full_transposed_s": median_time(lambda: torch.linalg.svd(m.T, full_matrices=False), args.repeats),
        }
    if not args.skip_4096:
        n, k = args.big_dim, args.big_topk
        m = torch.randn(n, n, generator=gen) / n**0.5
        rg = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        _, _, v = top_k_svd(m, k, exact_max_dim=0, generator=rg)
        cold = time.perf_counter() - t0
        state = {"v": v}

        def warm_big():
            state["v"] = top_k_svd(m, k, warm_start=state["v"], exact_max_dim=0, generator=rg)[2]

        rand = median_time(warm_big, args.repeats)
        t0 = time.perf_counter()
        torch.linalg.svd(m, full_matrices=False)
        full = time.perf_counter() - t0
        out["big"] = {"shape": [n, n], "topk": k, "randomized_cold_s": cold, "randomized_s": rand, "full_s": full}
    out["other_load_cores"] = load.cores()
    return out


def micro_worker(args: argparse.Namespace) -> dict:
    return {"check": check_costs(args), "decompositions": shape_costs(args)}


def worker(args: argparse.Namespace) -> dict:
    part = args._worker
    if part.startswith("train-"):
        return train_worker(args, 0 if part == "train-none" else int(part[len("train-every"):]))
    if part == "real-step":
        return real_step_worker(args)
    if part == "micro":
        return micro_worker(args)
    raise SystemExit(f"unknown worker {part!r}")


# ----------------------------------------------------------------------------------------------- orchestration
class IdleWaiter:
    """Waits until system CPU < `threshold` % for `quiet` consecutive 1 s samples, within a budget shared by all
    waits of the run; returns what it saw so the report can say whether a part started on a busy machine."""

    def __init__(self, budget_s: float, threshold: float = 15.0, quiet: int = 10) -> None:
        self.left, self.threshold, self.quiet = budget_s, threshold, quiet

    def wait(self, part: str) -> dict:
        t_start = time.monotonic()
        samples: list[float] = []
        calm = 0
        psutil.cpu_percent(None)
        while self.left > 0:
            samples.append(psutil.cpu_percent(interval=1.0))
            self.left -= 1.0
            calm = calm + 1 if samples[-1] < self.threshold else 0
            if calm >= self.quiet:
                return {"idle": True, "waited_s": time.monotonic() - t_start, "cpu_pct": statistics.mean(samples[-10:])}
        if not samples:  # budget spent (or --idle-wait 0): one short look, then go
            samples.append(psutil.cpu_percent(interval=0.5))
        pct = statistics.mean(samples[-10:])
        if pct < self.threshold:
            return {"idle": True, "waited_s": time.monotonic() - t_start, "cpu_pct": pct}
        print(f"WARNING: machine not idle before {part} (system CPU {pct:.0f}% ~ {pct / 100 * psutil.cpu_count():.1f} "
              "cores busy; idle-wait budget spent): measuring anyway", file=sys.stderr, flush=True)
        return {"idle": False, "waited_s": time.monotonic() - t_start, "cpu_pct": pct}


WORKER_FLAGS = ("steps", "image_size", "batch_size", "every", "exact_max_dim", "real_image_size", "real_batch_size",
                "real_steps", "depth", "width", "topk", "repeats", "big_dim", "big_topk")


def run_part(part: str, args: argparse.Namespace, waiter: IdleWaiter) -> dict:
    """Re-invoke this script with the hidden --_worker flag in a fresh process; it writes its result to a temp file."""
    idle = waiter.wait(part)
    print(f"running {part} ...", file=sys.stderr, flush=True)
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", part, "--json", out]
    for flag in WORKER_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--skip-4096"] if args.skip_4096 else []
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"part {part!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            result = json.load(f)
        result["process_s"] = time.perf_counter() - t0
        result["idle_before"] = idle
        return result
    finally:
        os.remove(out)


# ----------------------------------------------------------------------------------------------- reporting
def verdict(pct: float, every: int) -> str:
    if every not in TARGETS:
        return "(no target for this interval)"
    bound = TARGETS[every]
    return f"target <= {bound:g}%: {'met' if pct <= bound else 'MISSED'}"


def summarize(res: dict, args: argparse.Namespace) -> dict:
    """Every derived number of the report (overheads in %, ratios), all from timings of this run."""
    s: dict = {"end_to_end": {}, "projected": {}, "ratios": {}}
    none = res["train-none"]
    step_small = none["wall_s"] / none["steps"]
    for e in every_list(args):
        r = res[f"train-every{e}"]
        s["end_to_end"][f"every={e}"] = {
            "overhead_pct": 100 * (r["wall_s"] - none["wall_s"]) / none["wall_s"],
            "in_monitor_pct": 100 * r["monitor_s"] / (r["wall_s"] - r["monitor_s"]),
            "checks": r["checks"], "monitor_s_per_check": r["monitor_s"] / max(r["checks"], 1)}
    check = res["micro"]["check"]
    s["ratios"]["check  exact / randomized (warm)"] = check["exact"]["median_s"] / check["randomized"]["median_s"]
    if "real-step" in res:
        real = res["real-step"]["median_s"]
        s["ratios"]["step  real (224, batch %d) / end-to-end (%d, batch %d)" % (
            args.real_batch_size, args.image_size, args.batch_size)] = real / step_small
        for mode in ("exact", "randomized"):
            for every in TARGETS:
                s["projected"][f"{mode} every={every}"] = 100 * check[mode]["median_s"] / (every * real)
    dec = res["micro"]["decompositions"]
    for name, d in dec["shapes"].items():
        s["ratios"]["%s %s  full svd / randomized" % (name, tuple(d["shape"]))] = d["full_s"] / d["randomized_s"]
    if "big" in dec:
        b = dec["big"]
        s["ratios"]["%dx%d  full svd / randomized top-%d" % (b["shape"][0], b["shape"][1], b["topk"])] = (
            b["full_s"] / b["randomized_s"])
    return s


def report(res: dict, s: dict, args: argparse.Namespace, machine: dict, params: int) -> None:
    check = res["micro"]["check"]
    n_mat = check["exact"]["matrices"]
    print(f"machine: processor={machine['processor']!r} ({machine['cpu_model']}), cpu_count={machine['cpu_count']}, "
          f"torch {machine['torch']}, torch threads={machine['torch_threads']}")
    print(f"model: ViT-S/16-shaped, timm names, depth {args.depth}, width {args.width}, {max(1, args.width // 64)} "
          f"heads, MLP {4 * args.width}, {NUM_CLASSES} classes: {params / 1e6:.2f}M params at 224x224; float32")
    print(f"monitor: {n_mat} matrices ({', '.join(MONITOR_TARGETS)}), top-{args.topk}, track {'+'.join(TRACK)}, "
          "plots=False")
    print()
    tokens = (args.image_size // PATCH) ** 2 + 1
    print(f"1. end-to-end trainer.train(), {args.steps} steps, {args.image_size}x{args.image_size} images ({tokens} "
          f"tokens), batch {args.batch_size}, AdamW; monitor exact_max_dim={args.exact_max_dim}; one run each, fresh "
          "process")
    print(f"{'variant':<11} {'wall s':>8} {'s/step':>7} {'checks':>6} {'in monitor s':>12} {'s/check':>8} "
          f"{'other load':>11}")
    for name in ["train-none"] + [f"train-every{e}" for e in every_list(args)]:
        r = res[name]
        label = "no monitor" if name == "train-none" else f"every={r['every']}"
        per_check = f"{r['monitor_s'] / r['checks']:8.2f}" if r["checks"] else f"{'-':>8}"
        print(f"{label:<11} {r['wall_s']:>8.1f} {r['wall_s'] / r['steps']:>7.3f} {r['checks']:>6} "
              f"{r['monitor_s']:>12.2f} {per_check} {r['other_load_cores']:>6.2f} cores")
    for key, e2e in s["end_to_end"].items():
        every = int(key.split("=")[1])
        pct = e2e["overhead_pct"]
        print(f"{'overhead end-to-end  ' + key:<44} {pct:7.2f} %   {verdict(pct, every)}"
              f"   (time in monitor hooks / rest of run: {e2e['in_monitor_pct']:.2f} %)")
    print(f"   A {tokens}-token step is far cheaper than a real 197-token ViT-S step, so these end-to-end percentages "
          "overstate the real overhead; see 2.")
    print()
    print(f"2. one check, all {n_mat} matrices (weight top-{args.topk} SVD + grad + momentum energies, through the "
          f"callback's hooks); warm = median of {args.repeats} later checks")
    print(f"{'path':<30} {'cold s':>8} {'warm s':>8} {'other load':>11}")
    for mode, label in (("exact", "exact (exact_max_dim=512)"), ("randomized", "randomized (exact_max_dim=0)")):
        c = check[mode]
        print(f"{label:<30} {c['cold_s']:>8.3f} {c['median_s']:>8.3f} {c['other_load_cores']:>6.2f} cores")
    if "real-step" in res:
        r = res["real-step"]
        print(f"real ViT-S training step ({args.real_image_size}x{args.real_image_size}, {r['tokens']} tokens, batch "
              f"{args.real_batch_size}): {r['median_s']:.3f} s (median of {len(r['times_s'])} after a "
              f"{r['warmup_s']:.3f} s warm-up step; other load {r['other_load_cores']:.2f} cores)")
        for key, pct in s["projected"].items():
            mode, every_s = key.split()
            print(f"{'projected overhead  ' + f'{mode:<10} ' + every_s:<44} {pct:7.2f} %   "
                  f"{verdict(pct, int(every_s.split('=')[1]))}   (check / (every x real step))")
    else:
        print("real step skipped (--skip-real-step): no projected overheads")
    print()
    dec = res["micro"]["decompositions"]
    print(f"3. one top-{args.topk} decomposition per distinct shape (Gaussian matrices); randomized = warm-started, "
          f"median of {args.repeats}; full = torch.linalg.svd(full_matrices=False), what the exact path runs")
    print(f"{'matrix':<10} {'shape':<13} {'randomized s':>12} {'full svd s':>11} {'full svd(m.T) s':>16}")
    for name, d in dec["shapes"].items():
        print(f"{name:<10} {str(tuple(d['shape'])):<13} {d['randomized_s']:>12.4f} {d['full_s']:>11.4f} "
              f"{d['full_transposed_s']:>16.4f}")
    if "big" in dec:
        b = dec["big"]
        print(f"{b['shape'][0]}x{b['shape'][1]}: randomized top-{b['topk']} warm {b['randomized_s']:.3f} s (cold "
              f"{b['randomized_cold_s']:.3f} s), full SVD (run once) {b['full_s']:.1f} s")
    else:
        print(f"{args.big_dim}x{args.big_dim}: skipped (--skip-4096)")
    print()
    for label, value in s["ratios"].items():
        print(f"{label:<55} {value:8.1f}x")
    print()
    print("other load = CPU cores that other processes kept busy while the part was timed.")
    waited = [f"{n} ({r['idle_before']['cpu_pct']:.0f}% CPU)" for n, r in res.items() if not r["idle_before"]["idle"]]
    if waited:
        print(f"WARNING: the machine was not idle before {', '.join(waited)} (idle-wait budget spent): measured "
              "anyway.")
    busy = [n for n, r in res.items() if other_load(r) > 0.1]
    if busy:
        print(f"WARNING: other processes were using CPU during {', '.join(busy)}: those timings are inflated; rerun on "
              "an idle machine before trusting the overheads.")


def other_load(r: dict) -> float:
    if "other_load_cores" in r:
        return r["other_load_cores"]
    return max(r["check"]["exact"]["other_load_cores"], r["check"]["randomized"]["other_load_cores"],
               r["decompositions"]["other_load_cores"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        result = worker(args)
        write_json(args.json, result)
        return
    waiter = IdleWaiter(args.idle_wait)
    parts = ["train-none"] + [f"train-every{e}" for e in every_list(args)] + ["micro"]
    parts += [] if args.skip_real_step else ["real-step"]
    results = {p: run_part(p, args, waiter) for p in parts}
    machine = machine_info()
    params = vit_params_at_224(args.depth, args.width)
    summary = summarize(results, args)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report(results, summary, args, machine, params)
    print(printed.getvalue(), end="")
    if args.json:
        payload = {"machine": machine, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "params_at_224": params, "results": results, "overhead_pct": summary["end_to_end"],
                   "projected_overhead_pct": summary["projected"], "ratios": summary["ratios"],
                   "targets_pct": {f"every={e}": b for e, b in TARGETS.items()}, "printed": printed.getvalue()}
        write_json(args.json, payload, indent=2)


if __name__ == "__main__":
    main()
