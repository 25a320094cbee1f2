"""SpectralMonitorCallback: watch the top-k singular subspaces of chosen matrices while a Trainer runs.

Every `every` optimizer updates, for each matched matrix W (a dense weight, or an adapter branch measured as its
effective delta W = s B A), a top-k SVD warm-started from the previous check gives

    spec/<mod>/sigma_max, spec/<mod>/sv1..k, spec/<mod>/delta_sv_rel,
    spec/<mod>/cos_u1..k, spec/<mod>/cos_v1..k, spec/<mod>/cos_{u,v}_{max,mean}   (principal cosines vs last check)

and, for dense weights, how much of the gradient and of the optimizer's momentum lies in that subspace:

    spec/<mod>/grad_energy, spec/<mod>/grad_energy_vs_chance, spec/<mod>/momentum_energy, .../momentum_energy_vs_chance

Where the numbers come from is dictated by the Trainer: gradients exist only in `on_pre_optimizer_step`
(before the step; they are zeroed right after it) and Adam's moments are updated in `on_optimizer_step`. The values
are emitted with `trainer.log(...)` from `on_step_end`, so every `report_to` backend and `state.log_history` get
them at the step they describe. The callback only observes: it never changes the model, the optimizer or the loop.

Distributed (DDP): the matrices are identical on every rank, so the targets are split round-robin across ranks,
each rank computes its share, and the results are all-gathered: every rank logs the same numbers, each matrix is
decomposed once. FSDP (sharded parameters) and DeepSpeed (the step runs inside backward, callbacks see cleared
gradients) are refused with an explanation.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .spectral import SubspaceTracker, chance_energy, projection_energy
from .targets import Target, find_targets

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
STATE_FILE = "spectral_monitor_rank{rank}.safetensors"


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SpectralMonitorCallback(TrainerCallback):
    """Log spectral metrics of chosen matrices every `every` optimizer updates (see the module docstring).

    With a plain `Trainer`, bind it so its values reach the `report_to` backends:
    `SpectralMonitorCallback(...).attach(trainer)`. Unbound, it still records to `state.log_history`, the standard
    log and its own files. `SpectralTrainer` binds it for you.
    """

    def __init__(
        self,
        targets: Iterable[str] = DEFAULT_TARGETS,
        every: int = 100,
        topk: int = 8,
        track: Iterable[str] = ("weight", "grad", "momentum"),
        output_dir: str | None = None,
        plots: bool = True,
        exact_max_dim: int = 128,
        niter: int = 2,
        seed: int = 0,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"spec_every must be a positive integer (checks every N optimizer updates), got {every!r}")
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"spec_topk must be a positive integer, got {topk!r}")
        track = tuple(track)
        unknown = set(track) - {"weight", "grad", "momentum"}
        if unknown or "weight" not in track:
            raise ValueError(f"spec_track must include 'weight' and may add 'grad', 'momentum'; got {track}")
        self.patterns = [targets] if isinstance(targets, str) else list(targets)
        self.every, self.topk, self.track = every, topk, track
        # exact SVD only for small matrices: at min dim 128 it is already 3-4x the randomized cost, and at ViT-S sizes
        # (384) ~10x (benchmarks/monitor_overhead.py); more `niter` where spectra are flat (e.g. fresh initialisation)
        self.output_dir, self.plots, self.exact_max_dim, self.niter, self.seed = output_dir, plots, exact_max_dim, niter, seed
        self.trainer = None
        self.targets: list[Target] = []
        self.trackers: dict[str, SubspaceTracker] = {}
        self.records: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}
        self._mine: list[Target] = []

    def attach(self, trainer) -> "SpectralMonitorCallback":
        """Bind to `trainer` (adding the callback if it is not there yet) so values go through `trainer.log`."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(getattr(self.trainer, "accelerator", None), "distributed_type", "") == "DEEPSPEED":
            raise RuntimeError(
                "SpectralMonitorCallback cannot run under DeepSpeed: the optimizer step happens inside backward, so "
                "callbacks see cleared gradients and moments. Monitor a DDP or single-process run instead."
            )
        if getattr(args, "fsdp", None) or any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise RuntimeError(
                "SpectralMonitorCallback does not support FSDP yet: parameters are sharded across ranks and would have "
                "to be gathered for every check. Monitor a DDP or single-process run, or a non-sharded copy."
            )
        self.targets = find_targets(model, self.patterns)
        too_small = [f"{t.name} {t.shape}" for t in self.targets if self.topk > min(t.shape)]
        if too_small:
            raise ValueError(
                f"spec_topk={self.topk} is larger than the smaller dimension of {too_small[:4]}; "
                "choose a smaller spec_topk or other spec_targets"
            )
        rank, world = _dist()
        self._mine = [t for i, t in enumerate(self.targets) if i % world == rank]
        self.trackers = {
            t.name: SubspaceTracker(self.topk, exact_max_dim=self.exact_max_dim, niter=self.niter, seed=self.seed + i)
            for i, t in enumerate(self.targets)
            if t in self._mine
        }
        if state.global_step > 0:
            self._restore(args, state)
        logger.info("spectral monitor: %d matrices every %d updates (top-%d)", len(self.targets), self.every, self.topk)

    def _due(self, state) -> bool:
        # on_pre_optimizer_step / on_optimizer_step run before global_step is incremented for this update
        return (state.global_step + 1) % self.every == 0

    # ------------------------------------------------------------------ measurements
    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._due(state):
            return
        self._pending = {}
        for t in self._mine:
            tracker = self.trackers[t.name]
            m = t.matrix()
            metrics = tracker.update(m if isinstance(m, tuple) else m.float())
            out = {f"spec/{t.name}/{k}": v for k, v in metrics.items()}
            grad = t.param.grad if t.param is not None else None
            if "grad" in self.track and grad is not None:
                out.update(self._energy(t, "grad", grad, tracker))
            self._pending.update(out)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._due(state) or "momentum" not in self.track or optimizer is None:
            return
        opt_state = getattr(optimizer, "state", {})
        for t in self._mine:
            if t.param is None:
                continue
            moment = opt_state.get(t.param, {}).get("exp_avg", opt_state.get(t.param, {}).get("momentum_buffer"))
            if moment is not None:
                self._pending.update(self._energy(t, "momentum", moment, self.trackers[t.name]))

    def _energy(self, t: Target, kind: str, g: torch.Tensor, tracker: SubspaceTracker) -> dict[str, float]:
        g = (g.T if t.transposed else g).float()
        p = projection_energy(g, tracker.u, tracker.v)
        chance = chance_energy(tuple(g.shape), tracker.u.shape[1], tracker.v.shape[1])
        return {f"spec/{t.name}/{kind}_energy": p, f"spec/{t.name}/{kind}_energy_vs_chance": p / chance}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every != 0:
            return
        values = self._gather(self._pending)
        self._pending = {}
        if not values:
            return
        self.records.append({"step": state.global_step, **values})
        if self.trainer is not None:
            self.trainer.log(dict(values))
        else:
            state.log_history.append({**values, "step": state.global_step})
            logger.info("step %d: %s", state.global_step, {k: round(v, 6) for k, v in values.items()})

    def _gather(self, values: dict[str, float]) -> dict[str, float]:
        """Merge every rank's share, in target order, so all ranks log identical dicts."""
        rank, world = _dist()
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, values)
            merged = {k: v for part in parts for k, v in part.items()}
        else:
            merged = values
        order = {t.name: i for i, t in enumerate(self.targets)}
        return dict(sorted(merged.items(), key=lambda kv: order.get(kv[0].split("/")[1], 0)))  # stable: keeps key order

    # ------------------------------------------------------------------ checkpoint / resume
    def on_save(self, args, state, control, **kwargs):
        rank, _ = _dist()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {}
        for name, tracker in self.trackers.items():
            sd = tracker.state_dict()
            for key, value in sd.items():
                if torch.is_tensor(value):
                    tensors[f"{name}::{key}"] = value.contiguous().cpu()
                else:
                    meta[f"{name}::{key}"] = json.dumps(value)
        save_file(tensors, os.path.join(folder, STATE_FILE.format(rank=rank)), metadata=meta)
        if rank == 0:
            with open(os.path.join(folder, "spectral_records.json"), "w") as f:
                json.dump(self.records, f)

    def _restore(self, args, state) -> None:
        rank, _ = _dist()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            logger.warning("spectral monitor: no saved state in %s; the first check after resume has no cosines", folder)
            return
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        for name, tracker in self.trackers.items():
            sd = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
            sd.update({k.split("::", 1)[1]: json.loads(v) for k, v in meta.items() if k.split("::", 1)[0] == name})
            if sd:
                tracker.load_state_dict(sd)
        records = os.path.join(folder, "spectral_records.json")
        if os.path.isfile(records):
            with open(records) as f:
                self.records = json.load(f)

    # ------------------------------------------------------------------ end of training
    def on_train_end(self, args, state, control, **kwargs):
        rank, _ = _dist()
        if rank != 0 or not self.records:
            return
        out = self.output_dir or os.path.join(args.output_dir, "spectral")
        os.makedirs(out, exist_ok=True)
        write_records(self.records, out)
        if self.plots:
            plot_records(self.records, [t.name for t in self.targets], out)


def write_records(records: list[dict[str, float]], out_dir: str) -> None:
    """All logged values as spectral.json and spectral.csv (one row per check, one column per metric)."""
    with open(os.path.join(out_dir, "spectral.json"), "w") as f:
        json.dump(records, f, indent=1)
    columns = ["step"] + sorted({k for r in records for k in r if k != "step"})
    with open(os.path.join(out_dir, "spectral.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def plot_records(records: list[dict[str, float]], names: list[str], out_dir: str) -> list[str]:
    """sigma_max trajectories and a heat map of mean principal cosines (matrices x checks), as PNG files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the spectral plots (pip install matplotlib)")
        return []
    steps = [r["step"] for r in records]
    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        ys = [r.get(f"spec/{name}/sigma_max", float("nan")) for r in records]
        ax.plot(steps, ys, label=name, lw=1)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("σ_max")
    ax.set_title("σ_max of monitored matrices")
    if len(names) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "sigma_max.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    grid = [[r.get(f"spec/{n}/cos_u_mean", float("nan")) for r in records] for n in names]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(names) + 1)))
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ticks = list(range(0, len(steps), max(1, len(steps) // 12)))  # at most ~12 labels on long runs
    ax.set_xticks(ticks)
    ax.set_xticklabels([steps[i] for i in ticks], fontsize=6, rotation=90)
    ax.set_xlabel("optimizer update")
    ax.set_title("mean principal cosine of the top-k left subspace vs the previous check")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = os.path.join(out_dir, "principal_cosines.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written
