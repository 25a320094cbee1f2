"""SpectralMonitorCallback: watch the top-k singular subspaces of chosen matrices while a Trainer runs.

Every `every` optimizer updates, for each matched matrix W (a dense weight, or an adapter branch measured as its
effective delta W = s B A), a top-k SVD warm-started from the previous check gives

    spec/<mod>/sigma_max, spec/<mod>/sv1..k, spec/<mod>/delta_sv_rel,
    spec/<mod>/cos_u1..k, spec/<mod>/cos_v1..k, spec/<mod>/cos_{u,v}_{max,mean}   (principal cosines vs last check)

and, for dense weights, how much of the gradient and of the optimizer's momentum lies in that subspace:

    spec/<mod>/grad_energy, spec/<mod>/grad_energy_vs_chance, spec/<mod>/momentum_energy, .../momentum_energy_vs_chance

Where the numbers come from is dictated by the Trainer: gradients exist only in `on_pre_optimizer_step`
(before the step; they are zeroed right after it) and Adam's moments are updated in `on_optimizer_step`. The values
are emitted from `on_step_end` as their own entry of `state.log_history` and through the `on_log` of every other
callback (the `report_to` integrations among them), at the step they describe, but not through `trainer.log`:
that would reset `control.should_log` and the Trainer would skip its own loss/grad_norm/learning_rate log at that
step, and trainers that override `log` (TRL's) would fold their pending metrics into ours. The console gets one short
line per check instead of the full dict. The callback only observes: it never changes the model, the optimizer or the
loop.

A matrix whose weight, gradient or optimizer moment holds NaN/Inf at a check is skipped for that check (one warning
per check names every skipped matrix): nothing is logged for it and its tracker stays as it was after its last
logged check, so the next finite check compares against that one. Training goes on, as it would without the monitor.

Distributed (DDP): the matrices are identical on every rank, so the targets are split round-robin across ranks,
each rank computes its share, and the results are all-gathered: every rank logs the same numbers, each matrix is
decomposed once.

FSDP2 (`fully_shard`, accelerate's `fsdp_version: 2`, the Trainer's `fsdp` with it): weights, gradients and Adam's
moments are DTensors whose rows are split across ranks. Every rank takes part in every such matrix, in target
order, with the same collectives (no rank-dependent branch, hence no deadlock): the top-k SVD runs block-wise
(`spectral.sharded_top_k_svd`: local products, all-reduced (b, l) sketches, a tall-skinny QR whose R factors are
all-gathered, then only the k columns of U or V), the energies contract each block with its rows of U or V and
all-reduce a (k, k) core (`spectral.sharded_projection_energy`), and the NaN/Inf test is agreed by one all-reduce of
flags per hook, so all ranks skip the same matrices. A LoRA branch's factors are gathered whole (`full_tensor()`,
(out + in) r numbers, the adapter's own size) and its delta W is never formed. A DTensor layout other than one
sharded tensor dim (e.g. Partial) is gathered with `full_tensor()` on every rank. Rank 0's values are the ones
every rank logs, so they are identical by construction; they equal a one-process run's up to round-off
(tests/test_fsdp2_monitor.py, with `fully_shard` on CPU and the Trainer's hook order: the Trainer's own FSDP path
needs GPUs). FSDP1 (FlatParameter shards, flattened 1-D) is refused: use `fsdp_version: 2`.

DeepSpeed (decided from accelerate 1.15's `DeepSpeedEngineWrapper.backward` and transformers' Trainer loop): under the
Trainer every ZeRO stage runs `engine.step()` (clip, optimizer step, zero_grad) inside `accelerator.backward`, and the
`optimizer.step()` between `on_pre_optimizer_step` and `on_optimizer_step` is a no-op (`DeepSpeedOptimizerWrapper`).
So, from a callback: gradients are already consumed and zeroed ('grad' is refused: no callback event ever sees them);
Adam's moments live in DeepSpeed's flat fp32 partitions, not in `optimizer.state[param]` ('momentum' is refused: they
are reachable only through `deepspeed.utils.safe_get_full_optimizer_state`, a ZeRO collective not wired here for want
of a DeepSpeed install to test it); under ZeRO-3 each weight is an empty placeholder outside
`deepspeed.zero.GatheredParameters` (refused: a gather is a collective every rank would have to enter for every
target). What works is `track=("weight",)` under ZeRO stages 0-2, whose weights are whole on every rank as under DDP;
a check then sees the weights after the step it is logged at (without DeepSpeed, before it), and says so once in
the log.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from peft_ext._checks import all_finite
from peft_ext.files import atomic_file
from peft_ext.plots import save_png

from .spectral import (
    ShardedMatrix,
    SubspaceTracker,
    all_finite_everywhere,
    chance_energy,
    projection_energy,
    sharded_projection_energy,
)
from .targets import Target, find_targets, split_patterns

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
STATE_FILE = "spectral_monitor_rank{rank}.safetensors"


def collective_group() -> tuple[int, int]:
    """(rank, world size) of the process group that collectives (all_gather, all_reduce, broadcast) span:
    torch.distributed's when it is up, else (0, 1). For work that is split across processes and then reduced, so
    the split matches the reduction. Asked of torch.distributed, not of a default `accelerate.PartialState()`, which
    under some launches reports 1 process while the gloo group is up (DESIGN.md section 4). Inside Trainer events,
    who writes and logs comes from the Trainer itself (`state.is_world_process_zero`, `args.process_index`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


CONSOLE_CALLBACKS = (ProgressCallback, PrinterCallback)


def emit_log(callback: TrainerCallback, args, state, control, values: dict[str, float],
             console_callbacks: tuple = CONSOLE_CALLBACKS):
    """Record `values` as the Trainer's `log` would (a `log_history` entry, then every other callback's `on_log`),
    except that `control.should_log` is left alone and the console printers are skipped. `callback.trainer` (set by
    its `attach`) gives the callback handler; unbound, only `log_history` gets the entry.

    Calling `trainer.log` from a callback was the bug this avoids: the callback handler's `on_log` resets `should_log`,
    which DefaultFlowCallback had just set for this step, so the Trainer skipped its own loss/grad_norm/learning_rate
    log whenever our values fell on a logging step. Going around `trainer.log` also keeps trainers that override it
    (TRL's fold their averaged metrics into whatever is logged and reset them) from spending their metrics on our
    entry. A separate entry at the same step, rather than merging into the Trainer's dict, works whether or not the
    Trainer logs at this step, and needs no override of `log`."""
    logs = dict(values)
    if state.epoch is not None:
        logs["epoch"] = state.epoch
    state.log_history.append({**logs, "step": state.global_step})
    trainer = getattr(callback, "trainer", None)
    if trainer is None:
        return control
    handler = trainer.callback_handler
    should_log = control.should_log
    for other in handler.callbacks:
        if other is callback or isinstance(other, console_callbacks):
            continue
        # the same arguments as CallbackHandler.call_event passes, so integrations see what they expect
        result = other.on_log(
            args, state, control, logs=logs, model=handler.model, processing_class=handler.processing_class,
            optimizer=handler.optimizer, lr_scheduler=handler.lr_scheduler,
            train_dataloader=handler.train_dataloader, eval_dataloader=handler.eval_dataloader,
        )
        if result is not None:
            control = result
    control.should_log = should_log  # a callback's on_log may reset it, as the handler does; the Trainer's log is due
    return control


class AttachableCallback(TrainerCallback):
    """A callback that emits its own values through `emit_log`, which needs the trainer's callback handler."""

    trainer = None

    def attach(self, trainer):
        """Bind to `trainer` (adding the callback if it is not there yet) so values reach its callbacks' `on_log`,
        i.e. the `report_to` backends. Returns the callback."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self


class SpectralMonitorCallback(AttachableCallback):
    """Log spectral metrics of chosen matrices every `every` optimizer updates (see the module docstring).

    With a plain `Trainer`, bind it so its values reach the `report_to` backends (every callback's `on_log`):
    `SpectralMonitorCallback(...).attach(trainer)`. Unbound, it still records to `state.log_history`, this module's
    logger (one line per check) and its own files. `SpectralTrainer` binds it for you.
    """

    # The Trainer's console printers: they would print every value of a check (kilobytes), so they get one summary
    # line per check instead (`_print`). Add a class here if your own console callback should be skipped as well.
    console_callbacks: tuple[type, ...] = (ProgressCallback, PrinterCallback)

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
        track = tuple(split_patterns(track, "spec_track"))
        unknown = set(track) - {"weight", "grad", "momentum"}
        if unknown or "weight" not in track:
            raise ValueError(f"spec_track must include 'weight' and may add 'grad', 'momentum'; got {track}")
        self.patterns = split_patterns(targets, "spec_targets")  # "q_proj,v_proj" as --spec-targets splits it
        self.every, self.topk, self.track = every, topk, track
        # exact SVD only for small matrices: at min dim 128 it is already 3-4x the randomized cost, and at ViT-S sizes
        # (384) ~10x (benchmarks/monitor_overhead.py); more `niter` where spectra are flat (e.g. fresh initialisation)
        self.output_dir, self.plots, self.exact_max_dim, self.niter, self.seed = output_dir, plots, exact_max_dim, niter, seed
        self.trainer = None
        self.targets: list[Target] = []
        self.trackers: dict[str, SubspaceTracker] = {}
        self.records: list[dict[str, float]] = []
        self._pending: dict[str, dict[str, float]] = {}  # this check's values, per matrix, until on_step_end
        self._skipped: dict[str, str] = {}  # matrices skipped at this check -> what was not finite
        self._before: dict[str, dict] = {}  # tracker states before this check's update, to roll a skip back
        self._measured_here: list[Target] = []
        self._split: set[str] = set()  # matrices held as DTensor shards (FSDP2): every rank measures them together

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_deepspeed(args, model)
        fsdp1 = [type(m).__name__ for m in model.modules() if type(m).__name__ == "FullyShardedDataParallel"]
        if fsdp1 or "FlatParameter" in {type(p).__name__ for p in model.parameters()}:
            raise RuntimeError(
                "SpectralMonitorCallback cannot read FSDP1 (FullyShardedDataParallel) weights: they are flattened into "
                "1-D FlatParameter shards, so no rank holds a matrix block. Use FSDP2 (fsdp_config "
                "{'fsdp_version': 2}, or torch.distributed.fsdp.fully_shard), whose DTensor row shards are supported."
            )
        self.targets = find_targets(model, self.patterns)
        too_small = [f"{t.name} {t.shape}" for t in self.targets if self.topk > min(t.shape)]
        if too_small:
            raise ValueError(
                f"spec_topk={self.topk} is larger than the smaller dimension of {too_small[:4]}; "
                "choose a smaller spec_topk or other spec_targets"
            )
        rank, world = args.process_index, args.world_size
        # split matrices (DTensor) are measured by every rank together; whole ones round-robin, one rank each
        self._split = {t.name for t in self.targets if _has_dtensor(t.matrix())}
        whole = [t for t in self.targets if t.name not in self._split]
        here = {t.name for j, t in enumerate(whole) if j % world == rank} | self._split
        self._measured_here = [t for t in self.targets if t.name in here]  # the targets this rank measures
        self.trackers = {
            t.name: SubspaceTracker(self.topk, exact_max_dim=self.exact_max_dim, niter=self.niter, seed=self.seed + i)
            for i, t in enumerate(self.targets)
            if t in self._measured_here
        }
        if state.global_step > 0:
            self._restore(args, state)
        logger.info("spectral monitor: %d matrices every %d updates (top-%d)", len(self.targets), self.every, self.topk)

    def _check_deepspeed(self, args, model) -> None:
        """The DeepSpeed decision of the module docstring: refuse what no callback can see, allow weight-only
        monitoring under ZeRO stages 0-2."""
        stage = _deepspeed_stage(args, self.trainer, model)
        if stage is None:
            return
        reasons = []
        if stage >= 3:
            reasons.append("ZeRO-3 partitions every weight (outside deepspeed.zero.GatheredParameters a parameter is an "
                           "empty placeholder), so there is no matrix to decompose")
        if "grad" in self.track:
            reasons.append("track includes 'grad', but engine.step() (clip, step, zero_grad) runs inside "
                           "accelerator.backward, so gradients are consumed and zeroed before any callback event")
        if "momentum" in self.track:
            reasons.append("track includes 'momentum', but Adam's moments live in DeepSpeed's flat fp32 partitions, not "
                           "in optimizer.state[param]")
        if reasons:
            raise RuntimeError(
                f"SpectralMonitorCallback under DeepSpeed ZeRO stage {stage}: " + "; ".join(reasons) + ". Use "
                "spec_track=['weight'] with ZeRO stage 0-2 (weights are whole on every rank), or FSDP2 or DDP, under "
                "which weights, gradients and moments are all monitored."
            )
        logger.warning("spectral monitor under DeepSpeed ZeRO stage %d: only the weights are tracked, and a check sees "
                       "them after the optimizer step it is logged at (DeepSpeed steps inside backward)", stage)

    def _due(self, state) -> bool:
        # on_pre_optimizer_step / on_optimizer_step run before global_step is incremented for this update
        return (state.global_step + 1) % self.every == 0

    # ------------------------------------------------------------------ measurements
    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._due(state):
            return
        self._pending, self._skipped, self._before = {}, {}, {}
        # every rank builds the split matrices in target order (a LoRA pair's full_tensor() is a collective)
        inputs = {}
        for t in self._measured_here:
            grad = t.param.grad if t.param is not None and "grad" in self.track else None
            if grad is not None and t.transposed:
                grad = grad.T
            inputs[t.name] = (_local_view(t.matrix()), _local_view(grad))
        finite = self._agree({(name, what): all_finite(_local_part(x)) for name, pair in inputs.items()
                              for what, x in zip(("weight", "gradient"), pair) if x is not None},
                             {name: pair[0] for name, pair in inputs.items()})
        for t in self._measured_here:
            m, grad = inputs[t.name]
            bad = [what for what in ("weight", "gradient") if not finite.get((t.name, what), True)]
            if bad:
                self._skipped[t.name] = " and ".join(bad)
                continue
            tracker = self.trackers[t.name]
            # taken before the update so that a check skipped later (a non-finite moment, or non-finite metrics from
            # finite inputs) leaves the tracker exactly as after its last logged check: cosines stay "vs the last
            # logged check", and the warm start is never a NaN basis. A copy of u, s, v (k columns): cheap next to
            # the SVD itself
            self._before[t.name] = tracker.state_dict()
            metrics = tracker.update(m if isinstance(m, (tuple, ShardedMatrix)) else m.float())
            if not all(map(math.isfinite, metrics.values())):
                self._skip(t.name, "decomposition")
                continue
            self._pending[t.name] = {f"spec/{t.name}/{k}": v for k, v in metrics.items()}
            if grad is not None:
                self._pending[t.name].update(self._energy(t, "grad", grad, tracker))

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._due(state) or "momentum" not in self.track or optimizer is None:
            return
        opt_state = getattr(optimizer, "state", {})
        moments = {}
        for t in self._measured_here:
            if t.param is None or t.name not in self._pending:  # the same on every rank for a split matrix
                continue
            moment = opt_state.get(t.param, {}).get("exp_avg", opt_state.get(t.param, {}).get("momentum_buffer"))
            if moment is not None:
                moments[t.name] = _local_view(moment.T if t.transposed else moment)
        finite = self._agree({(name, "moment"): all_finite(_local_part(x)) for name, x in moments.items()}, moments)
        for t in self._measured_here:
            if t.name not in moments:
                continue
            if not finite[(t.name, "moment")]:
                self._skip(t.name, "optimizer moment")
                continue
            self._pending[t.name].update(self._energy(t, "momentum", moments[t.name], self.trackers[t.name]))

    def _skip(self, name: str, what: str) -> None:
        """Drop `name` from this check and roll its tracker back to the state before this check's update."""
        self._pending.pop(name, None)
        self.trackers[name].load_state_dict(self._before.pop(name))
        self._skipped[name] = what

    def _agree(self, flags: dict[tuple[str, str], bool], like: dict[str, Any]) -> dict[tuple[str, str], bool]:
        """Finiteness flags, those of split matrices agreed across ranks by one all-reduce (each rank only sees its
        block), so every rank skips the same matrices and runs the same collectives. Every rank calls this at the
        same points: the split keys are the same everywhere. `like` (matrices by name) gives the device the flags are
        reduced on (NCCL reduces only CUDA tensors)."""
        split = [key for key in flags if key[0] in self._split]
        if split:
            x = like[split[0][0]]
            x = x[0] if isinstance(x, tuple) else x
            device = (x.local if isinstance(x, ShardedMatrix) else x).device
            flags.update(zip(split, all_finite_everywhere([flags[key] for key in split], device=device)))
        return flags

    def _energy(self, t: Target, kind: str, g: "torch.Tensor | ShardedMatrix", tracker: SubspaceTracker) -> dict[str, float]:
        """`g` is already (out, in): transposed for a Conv1D by the caller."""
        if isinstance(g, ShardedMatrix):
            p = sharded_projection_energy(g, tracker.u, tracker.v)
        else:
            g = g.float()
            p = projection_energy(g, tracker.u, tracker.v)
        chance = chance_energy(tuple(g.shape), tracker.u.shape[1], tracker.v.shape[1])
        return {f"spec/{t.name}/{kind}_energy": p, f"spec/{t.name}/{kind}_energy_vs_chance": p / chance}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every != 0:
            return
        values, skipped = self._gather({k: v for part in self._pending.values() for k, v in part.items()}, self._skipped)
        self._pending, self._skipped, self._before = {}, {}, {}
        if not values and not skipped:  # no measurement this step (e.g. the first step after a resume)
            return
        if skipped and state.is_world_process_zero:
            logger.warning(
                "spectral monitor, step %d: skipped %d of %d matrices whose values are not finite (nothing logged for "
                "them at this check; their next finite check compares against their last logged one): %s",
                state.global_step, len(skipped), len(self.targets), ", ".join(f"{n} ({w})" for n, w in skipped.items()),
            )
        if values:
            self.records.append({"step": state.global_step, **values})
            control = self._emit(args, state, control, values)
        self._print(state, self._summary(state.global_step, values, skipped))
        return control

    def _emit(self, args, state, control, values: dict[str, float]):
        return emit_log(self, args, state, control, values, self.console_callbacks)

    def _summary(self, step: int, values: dict[str, float], skipped: dict[str, str]) -> str:
        """One console line per check; the full set goes to the trackers, log_history and spectral.json/csv."""
        def pick(suffix: str) -> list[float]:
            return [v for k, v in values.items() if k.endswith(suffix)]

        sigma, cos_u, cos_v = pick("/sigma_max"), pick("/cos_u_mean"), pick("/cos_v_mean")
        parts = [f"spectral check, step {step}: {len(sigma)}/{len(self.targets)} matrices"]
        if sigma:
            parts.append(f"sigma_max {min(sigma):.4g}..{max(sigma):.4g}")
        if cos_u:  # absent at a matrix's first check: there is nothing to compare with yet
            parts.append(f"mean cos u {sum(cos_u) / len(cos_u):.3f} v {sum(cos_v) / len(cos_v):.3f}")
        if skipped:
            parts.append(f"{len(skipped)} skipped (not finite)")
        return ", ".join(parts)

    def _print(self, state, line: str) -> None:
        """Where the Trainer prints its own logs: through the tqdm bar (ProgressCallback), with print (PrinterCallback,
        when disable_tqdm), or, when neither is registered (unbound, or the user removed them), to this logger."""
        if not state.is_world_process_zero:
            return
        callbacks = self.trainer.callback_handler.callbacks if self.trainer is not None else []
        bars = [c.training_bar for c in callbacks if isinstance(c, ProgressCallback) and c.training_bar is not None]
        if bars:
            bars[0].write(line)  # tqdm.write keeps the progress bar intact
        elif any(isinstance(c, PrinterCallback) for c in callbacks):
            print(line)
        else:
            logger.info(line)

    def _gather(self, values: dict[str, float], skipped: dict[str, str]) -> tuple[dict[str, float], dict[str, str]]:
        """Merge every rank's share, in target order, so all ranks log identical dicts (and rank 0 warns for all)."""
        rank, world = collective_group()
        if world > 1:
            if rank != 0:  # split matrices were measured by every rank: rank 0's values are the ones logged
                values = {k: v for k, v in values.items() if k.split("/")[1] not in self._split}
                skipped = {k: v for k, v in skipped.items() if k not in self._split}
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, (values, skipped))
            values = {k: v for part, _ in parts for k, v in part.items()}
            skipped = {k: v for _, part in parts for k, v in part.items()}
        order = {t.name: i for i, t in enumerate(self.targets)}
        values = dict(sorted(values.items(), key=lambda kv: order.get(kv[0].split("/")[1], 0)))  # stable: keeps key order
        skipped = dict(sorted(skipped.items(), key=lambda kv: order.get(kv[0], 0)))
        return values, skipped

    # ------------------------------------------------------------------ checkpoint / resume
    def on_save(self, args, state, control, **kwargs):
        rank = args.process_index
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
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
        # complete-or-absent: transformers has already written trainer_state.json, so a kill here would otherwise
        # leave a checkpoint counted as complete with a half-written monitor state
        with atomic_file(os.path.join(folder, STATE_FILE.format(rank=rank)), field="checkpoint") as tmp:
            save_file(tensors, tmp, metadata=meta)
        if state.is_world_process_zero:
            with atomic_file(os.path.join(folder, "spectral_records.json"), field="checkpoint") as tmp, open(tmp, "w") as f:
                json.dump(self.records, f)

    def _restore(self, args, state) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, STATE_FILE.format(rank=args.process_index))
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
        if not state.is_world_process_zero or not self.records:
            return
        out = self.output_dir or os.path.join(args.output_dir, "spectral")
        os.makedirs(out, exist_ok=True)
        write_records(self.records, out)
        if self.plots:
            plot_records(self.records, [t.name for t in self.targets], out)


def _has_dtensor(x: Any) -> bool:
    if isinstance(x, (tuple, list)):
        return any(_has_dtensor(y) for y in x)
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _local_view(x: Any) -> Any:
    """A DTensor as this rank's `ShardedMatrix` block, or gathered whole (`full_tensor()`, a collective every rank
    runs) when it is a LoRA factor or has a layout other than one sharded dim; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, (tuple, list)):
        return tuple(y.full_tensor() if isinstance(y, DTensor) else y for y in x)
    if isinstance(x, DTensor):
        return ShardedMatrix.from_dtensor(x.detach()) or x.detach().full_tensor()
    return x


def _local_part(x: Any) -> Any:
    return x.local if isinstance(x, ShardedMatrix) else x


def _deepspeed_stage(args, trainer, model) -> int | None:
    """The ZeRO stage when this run uses DeepSpeed (Trainer arguments, the accelerator's plugin, a DeepSpeedEngine,
    or ZeRO-3 partitioned parameters in a hand-written loop), else None."""
    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None:
        return int(plugin.zero_stage)
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        return 3
    config = getattr(args, "deepspeed", None)
    engine = "DeepSpeedEngine" in {type(m).__name__ for m in (model, getattr(trainer, "model_wrapped", None))}
    if not config and not engine and str(getattr(accelerator, "distributed_type", "")).upper().find("DEEPSPEED") < 0:
        return None
    if isinstance(config, str) and os.path.isfile(config):
        with open(config) as f:
            config = json.load(f)
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if stage is None or stage == "auto":
        raise RuntimeError(
            f"SpectralMonitorCallback runs under DeepSpeed but cannot tell its ZeRO stage from deepspeed={config!r}; "
            "pass the config as a dict or a JSON file with zero_optimization.stage set, or monitor without DeepSpeed"
        )
    return int(stage)


def write_records(records: list[dict[str, float]], out_dir: str) -> None:
    """All logged values as spectral.json and spectral.csv (one row per check, one column per metric)."""
    with atomic_file(os.path.join(out_dir, "spectral.json"), field="output_dir") as tmp, open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    columns = ["step"] + sorted({k for r in records for k in r if k != "step"})
    with atomic_file(os.path.join(out_dir, "spectral.csv"), field="output_dir") as tmp, open(tmp, "w", newline="") as f:
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
    save_png(fig, path, dpi=120)
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
    save_png(fig, path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written
