"""NullSpaceCalibrationCallback: calibrate NullSpaceLoRA adapters at the start of `trainer.train()`.

    from trl import SFTConfig, SFTTrainer
    from peft_ext import NullSpaceLoraConfig
    from trainer_ext import NullSpaceCalibrationCallback

    calibrate = NullSpaceCalibrationCallback(calib_rows, max_batches=32)   # tokenized rows of *task* data
    trainer = SFTTrainer(model=base, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                         peft_config=NullSpaceLoraConfig(r=16, target_modules="all-linear"), callbacks=[calibrate])
    trainer.train()          # calibrates first (rank 0 shows progress and prints the report), then trains
    calibrate.report         # the NullSpaceReport (None when calibration was skipped)

At `on_train_begin` the callback runs `peft_ext.initialize_nullspace_lora` on the model the Trainer trains (also the
PeftModel that `SFTTrainer(peft_config=...)` builds itself). The Trainer has created the optimizer by then
(`_prepare_for_training` runs before `on_train_begin`): the initialisation writes into the existing parameters in
place (`copy_`), so the optimizer holds the calibrated tensors, and Adam's state is still empty.

`calibration_data` is one of:

* a `torch.utils.data.DataLoader` (used as it is; under several processes it is sharded like the Trainer's own
  unless it already is: a `DistributedSampler`, or a loader accelerate has prepared, such as
  `trainer.get_train_dataloader()`);
* a dataset of rows (`datasets.Dataset`/`IterableDataset` or a torch `Dataset`), batched by the Trainer's own data
  collator (`per_device_train_batch_size` rows, or `batch_size=`) with the columns the training data keeps. Rows
  must be what that collator takes: tokenized like the training data (`input_ids` ...); raw text works only where
  the training data is raw as well and the collator tokenizes (`remove_unused_columns=False`). With `SFTTrainer`,
  tokenize it as the trainer does, or pass part of `trainer.train_dataset` (which the trainer has tokenized);
* any other iterable of batches (dicts of tensors, as a collator yields, or tensors of input ids), e.g. a list.

Several processes (DDP under `accelerate launch`/`torchrun`): each rank feeds its own share (rows or batches
round-robin: rank r takes r, r + N, ...; a DataLoader through accelerate's sharding) and the statistics are
all-reduced, so N processes compute the basis one process computes from all the data. Rank 0's basis is then
broadcast, so every replica holds the very same frozen A. Progress and the report are shown on the main process
only. `max_batches` counts the batches of one rank. FSDP2 (accelerate's `fsdp_version: 2`, or `fully_shard` by hand
after `get_peft_model`) works the same way: the statistics are all-reduced and rank 0's basis is written into every
rank's shards of A and B. DeepSpeed ZeRO-3 is refused: calibrate before the trainer wraps the model
(`initialize_nullspace_lora(model, data)` first).

The statistics come from the forward pass the Trainer runs: under mixed precision (`bf16=True`, which `SFTConfig`
sets by default) accelerate has wrapped the model's forward in autocast before `on_train_begin`, so the layers'
inputs are bf16-rounded, as they are in training (measured on the tiny 1-layer Llama of the tests: up_proj's
projector moved by 2.3e-4 at most per entry against a float32 calibration, q/v_proj not at all, their inputs
coming straight from the embedding). For float32 statistics, calibrate before building the trainer
(`model = get_peft_model(base, config)`, `initialize_nullspace_lora(model, data)`, then the trainer with that
model, without `peft_config` and without this callback).

Resuming: a checkpoint's adapter is loaded before `on_train_begin` and loads as initialised (its A is non-zero), so
the callback skips calibration; a second `trainer.train()` skips it too.

SFT and the spectral tools together: TRL's `SFTConfig` and our `SpectralTrainingArguments` combine as one dataclass,
with `SFTConfig` first so its defaults (learning rate, logging steps, activation checkpointing, ...) stay in force,
and `SpectralTrainer` combines with `SFTTrainer` the same way (checked with trl 1.16, transformers 5.24):

    @dataclass
    class SpectralSFTConfig(SFTConfig, SpectralTrainingArguments):   # SFTConfig FIRST: in the other order the
        pass                                                         # TrainingArguments defaults come back silently

    class SpectralSFTTrainer(SpectralTrainer, SFTTrainer):
        pass

    args = SpectralSFTConfig(output_dir="out", max_length=512, spec_monitor=True, spec_every=50)
    SpectralSFTTrainer(model=base, args=args, train_dataset=ds, peft_config=NullSpaceLoraConfig(...),
                       callbacks=[NullSpaceCalibrationCallback(calib_rows)]).train()

`HfArgumentParser(SpectralSFTConfig)` parses both sets of flags (`--max-length 512 --spec-monitor`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from peft_ext.nullspace.initialize import (
    NullSpaceReport,
    _active_adapter,
    initialize_nullspace_lora,
    nullspace_layers,
    warn_flagged_layers,
)

from .callbacks import AttachableCallback, collective_group, emit_log

logger = logging.getLogger(__name__)


class NullSpaceCalibrationCallback(AttachableCallback):
    """Calibrate the model's NullSpaceLoRA adapter at `on_train_begin` (see the module docstring).

    Args:
        calibration_data: a DataLoader, a dataset of rows the Trainer's collator batches, or an iterable of batches.
        max_batches: at most this many calibration batches per process (None: all).
        heldout: held-out data for the verification, in the same forms; None holds out every `heldout_every`-th
            calibration batch (as `initialize_nullspace_lora` does).
        heldout_every: see `initialize_nullspace_lora`.
        batch_size: rows per batch for a dataset of rows (default: the Trainer's `per_device_train_batch_size`).
        data_collator: batches rows of a dataset (default: the collator of the Trainer's training data loader).
        adapter_name: the adapter to calibrate (default: the active one).
        dtype: accumulation dtype of the statistics (float64 keeps the small eigenvalues the method needs).
        progress: a progress bar on the main process (also off when `args.disable_tqdm`), and the report printed there.
        warn: warn (once, on the main process) when the verification flags layers.

    After training starts, `report` holds the `NullSpaceReport` (None when calibration was skipped: the adapter was
    already initialised, e.g. resumed from a checkpoint) and `skipped` says which. A summary (`nullspace/layers`,
    `nullspace/flagged_layers`, the worst held-out ratio ...) goes into `state.log_history` at step 0; bind the
    callback with `.attach(trainer)` to send it to the `report_to` backends as well.
    """

    def __init__(
        self,
        calibration_data: Any,
        *,
        max_batches: int | None = None,
        heldout: Any = None,
        heldout_every: int = 10,
        batch_size: int | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        adapter_name: str | None = None,
        dtype: torch.dtype = torch.float64,
        progress: bool = True,
        warn: bool = True,
    ) -> None:
        _check_data("calibration_data", calibration_data)
        if heldout is not None:
            _check_data("heldout", heldout)
        for name, value in (("max_batches", max_batches), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"NullSpaceCalibrationCallback {name} must be a positive integer or None, got "
                                 f"{value!r}")
        if isinstance(heldout_every, bool) or not isinstance(heldout_every, int) or heldout_every < 2:
            raise ValueError(f"NullSpaceCalibrationCallback heldout_every must be an integer >= 2 (every k-th batch "
                             f"is held out), got {heldout_every!r}")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"NullSpaceCalibrationCallback dtype must be torch.float64 or torch.float32, got {dtype}")
        if data_collator is not None and not callable(data_collator):
            raise TypeError(f"NullSpaceCalibrationCallback data_collator must be callable (rows -> batch), got a "
                            f"{type(data_collator).__name__}")
        self.calibration_data = calibration_data
        self.heldout = heldout
        self.max_batches, self.heldout_every, self.batch_size = max_batches, heldout_every, batch_size
        self.data_collator, self.adapter_name, self.dtype = data_collator, adapter_name, dtype
        self.progress, self.warn = progress, warn
        self.report: NullSpaceReport | None = None
        self.skipped: str | None = None  # why calibration was skipped, when it was

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("NullSpaceCalibrationCallback got no model in on_train_begin: add it to a "
                             "transformers Trainer (callbacks=[...] or trainer.add_callback)")
        adapter = self.adapter_name or _active_adapter(model)
        layers = nullspace_layers(model, adapter)
        if not layers:
            raise ValueError(
                f"NullSpaceCalibrationCallback: {type(model).__name__} has no NullSpaceLoRA layers for adapter "
                f"{adapter!r}; build the model with get_peft_model(base, NullSpaceLoraConfig(...)) or pass "
                "peft_config=NullSpaceLoraConfig(...) to the trainer"
            )
        done = [n for n, layer in layers.items() if layer.is_initialized(adapter)]
        if len(done) == len(layers):
            self.skipped = (f"adapter {adapter!r} is already initialised (loaded from a checkpoint or calibrated "
                            f"before), at step {state.global_step}")
            self.report = None
            if state.is_world_process_zero:
                logger.info("NullSpaceCalibrationCallback: calibration skipped: %s", self.skipped)
            return control
        if done:
            raise ValueError(
                f"NullSpaceCalibrationCallback: adapter {adapter!r} is initialised in {len(done)} of {len(layers)} "
                f"layers (e.g. {done[0]!r}), so it is neither fresh nor loaded whole; recreate the adapter, or call "
                "initialize_nullspace_lora(model, data, reinitialize=True) yourself before training"
            )
        _refuse_sharded_parameters(layers, adapter)
        rank, world = collective_group()
        main = state.is_world_process_zero
        collator = self.data_collator or getattr(train_dataloader, "collate_fn", None)
        seed = args.data_seed if getattr(args, "data_seed", None) is not None else args.seed
        batch_size = self.batch_size or args.per_device_train_batch_size
        train_columns = _columns(getattr(train_dataloader, "dataset", None))
        data = shard_batches(self.calibration_data, rank, world, batch_size=batch_size, collator=collator,
                             train_columns=train_columns, seed=seed, field="calibration_data")
        heldout = None if self.heldout is None else shard_batches(
            self.heldout, rank, world, batch_size=batch_size, collator=collator, train_columns=train_columns,
            seed=seed, field="heldout")
        progress = self.progress and main and not getattr(args, "disable_tqdm", False)
        report = initialize_nullspace_lora(
            model, data, heldout_dataloader=heldout, heldout_every=self.heldout_every, adapter_name=adapter,
            max_batches=self.max_batches, dtype=self.dtype, progress=progress, warn=False,
        )
        if world > 1 and not _sharded(layers, adapter):  # FSDP2 shards got rank 0's values from the call itself
            _broadcast_adapter(layers, adapter)
        self.report, self.skipped = report, None
        if main:
            if self.warn:
                warn_flagged_layers(report)
            if progress:
                print(report)
            logger.info("NullSpaceCalibrationCallback: %d layers calibrated, %d flagged", len(report.layers),
                        sum(1 for lr in report.layers if lr.flags))
        return emit_log(self, args, state, control, report_summary(report))


def report_summary(report: NullSpaceReport) -> dict[str, float]:
    """A few numbers of the report for `report_to` (the whole table is `print(report)` / `report.to_json()`)."""
    worst = lambda key: max((getattr(lr, key) for lr in report.layers), default=0.0)  # noqa: E731
    return {
        "nullspace/layers": float(len(report.layers)),
        "nullspace/flagged_layers": float(sum(1 for lr in report.layers if lr.flags)),
        "nullspace/heldout_ratio_max": float(worst("heldout_ratio")),
        "nullspace/init_output_ratio_max": float(worst("init_output_ratio")),
        "nullspace/tail_energy_max": float(worst("tail_energy")),
        "nullspace/tokens_min": float(min((lr.tokens for lr in report.layers), default=0)),
    }


# ------------------------------------------------------------------------------------------------------ the data
def _is_rows(data: Any) -> bool:
    """A dataset of rows (to be collated), as opposed to a DataLoader or an iterable of ready batches."""
    if isinstance(data, DataLoader):
        return False
    if isinstance(data, torch.utils.data.Dataset):
        return True
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a transformers dependency in practice
        return False
    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def _check_data(field: str, data: Any) -> None:
    dict_types = (Mapping,)
    try:
        import datasets

        dict_types = (Mapping, datasets.DatasetDict, datasets.IterableDatasetDict)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, dict_types):
        raise TypeError(f"NullSpaceCalibrationCallback {field} is a {type(data).__name__}, not data: pass one "
                        "split (e.g. ds['train']), a DataLoader, or a list of batches")
    if not _is_rows(data) and (data is None or isinstance(data, (str, bytes)) or torch.is_tensor(data)
                               or not isinstance(data, Iterable)):
        raise TypeError(
            f"NullSpaceCalibrationCallback {field} must be a DataLoader, a dataset of tokenized rows, or an iterable "
            f"of batches (dicts of tensors, or tensors of input ids), got {type(data).__name__}"
            + ("; wrap a single batch in a list: [batch]" if torch.is_tensor(data) else "")
        )
    size = None
    try:
        size = len(data)
    except TypeError:
        pass
    if size == 0:
        raise ValueError(f"NullSpaceCalibrationCallback {field} is empty: pass calibration rows or batches")


def _keys(row: Any) -> list[str] | str:
    return sorted(map(str, row)) if isinstance(row, Mapping) else type(row).__name__


def _columns(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if isinstance(names, list) else None


def shard_batches(data: Any, rank: int, world: int, *, batch_size: int, collator: Callable | None,
                  train_columns: list[str] | None = None, seed: int = 0, field: str = "calibration_data") -> Iterable:
    """This process's batches of `data` (see the module docstring); with `world == 1` all of them."""
    if isinstance(data, DataLoader):
        return _shard_loader(data, rank, world, seed)
    if _is_rows(data):
        return _RowBatches(data, rank, world, batch_size, collator, train_columns, field)
    return data if world == 1 else _RoundRobin(data, rank, world)


def _shard_loader(loader: DataLoader, rank: int, world: int, seed: int) -> DataLoader:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard, prepare_data_loader
    from torch.utils.data.distributed import DistributedSampler

    already = isinstance(loader, (DataLoaderShard, DataLoaderDispatcher)) or isinstance(
        getattr(loader, "sampler", None), DistributedSampler)
    if world == 1 or already:
        return loader
    # even_batches=False: accelerate would otherwise repeat rows to even out the shards, counting them twice; the
    # seedable sampler gives every rank the same shuffled order, so the shards are disjoint
    return prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False,
                               even_batches=False, use_seedable_sampler=True, data_seed=seed)


class _RoundRobin:
    """Batches rank, rank + world, ... of an iterable of batches."""

    def __init__(self, data: Iterable, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self):
        return itertools.islice(iter(self.data), self.rank, None, self.world)

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.data) - self.rank) / self.world))  # TypeError without a length: tqdm copes


class _RowBatches:
    """Rows rank, rank + world, ... of a dataset, `batch_size` at a time, through the Trainer's collator."""

    def __init__(self, rows: Any, rank: int, world: int, batch_size: int, collator: Callable | None,
                 train_columns: list[str] | None, field: str) -> None:
        columns = _columns(rows)
        if collator is None:
            raise ValueError(f"NullSpaceCalibrationCallback {field} is a dataset of rows, but there is no data "
                             "collator to batch them (the trainer has no training data loader): pass "
                             "data_collator=..., or a DataLoader / list of batches")
        if columns is not None and train_columns is not None:
            if "input_ids" in train_columns and "input_ids" not in columns:
                raise ValueError(
                    f"NullSpaceCalibrationCallback {field} has columns {columns}, but the training batches are built "
                    f"from tokenized rows ({train_columns}): tokenize the calibration data as the training data was "
                    "(ds.map(lambda b: tokenizer(b['text']), batched=True); with SFTTrainer, rows of "
                    "trainer.train_dataset are already tokenized), or pass a DataLoader / list of batches"
                )
            keep = [c for c in columns if c in train_columns]
            if not keep:
                raise ValueError(f"NullSpaceCalibrationCallback {field} shares no column with the training data "
                                 f"({columns} vs {train_columns}); pass rows shaped like the training rows")
            if keep != columns:  # as the Trainer's _remove_unused_columns does for its own rows
                rows = rows.select_columns(keep)
        self.rows, self.rank, self.world, self.batch_size = rows, rank, world, batch_size
        self.collator, self.columns, self.field = collator, columns, field

    def _my_rows(self) -> Iterator[Any]:
        try:
            n = len(self.rows)
        except TypeError:  # an iterable dataset
            return itertools.islice(iter(self.rows), self.rank, None, self.world)
        return (self.rows[i] for i in range(self.rank, n, self.world))

    def __len__(self) -> int:
        n = len(self.rows)  # TypeError for an iterable dataset: no total for the progress bar
        return math.ceil(max(0, math.ceil((n - self.rank) / self.world)) / self.batch_size)

    def __iter__(self):
        rows = self._my_rows()
        while chunk := list(itertools.islice(rows, self.batch_size)):
            try:
                batch = self.collator(chunk)
            except Exception as e:
                raise ValueError(
                    f"NullSpaceCalibrationCallback {self.field}: the data collator ({type(self.collator).__name__}) "
                    f"could not batch its rows (columns {self.columns or _keys(chunk[0])}): "
                    f"{type(e).__name__}: {e}. Pass rows shaped like the training rows (tokenized), or a DataLoader "
                    "/ list of batches"
                ) from e
            yield batch


# ------------------------------------------------------------------------------------------------ distributed
def _refuse_sharded_parameters(layers: dict, adapter: str) -> None:
    """FSDP2 (DTensor parameters) is calibrated in place (initialize_nullspace_lora writes rank 0's basis into every
    rank's shards); DeepSpeed ZeRO-3 partitions are refused."""
    weight = next(iter(layers.values())).nullspace_A[adapter].weight
    if hasattr(weight, "ds_id"):
        raise ValueError(
            "NullSpaceCalibrationCallback: the adapter's parameters are partitioned by DeepSpeed ZeRO-3, and a "
            "null-space basis is written into whole matrices; calibrate before the trainer wraps the model: "
            "initialize_nullspace_lora(model, calib_dataloader) (every rank, its own shard), then build the trainer"
        )


def _sharded(layers: dict, adapter: str) -> bool:
    from peft_ext._sharded import is_dtensor

    return any(is_dtensor(layer.nullspace_A[adapter].weight) for layer in layers.values())


@torch.no_grad()
def _broadcast_adapter(layers: dict, adapter: str) -> None:
    """Give every rank rank 0's calibrated factors. The all-reduced statistics are the same on every rank, but an
    eigendecomposition on different hardware may differ in its last bits or in the signs of its vectors, and a frozen
    A that differs between DDP replicas would never be reconciled by gradient averaging."""
    from peft_ext.stats import _collective_device

    device = _collective_device()
    for layer in layers.values():
        tensors = [layer.nullspace_A[adapter].weight, layer.nullspace_B[adapter].weight]
        for buffers in (layer.nullspace_A0, layer.nullspace_B0):
            if adapter in buffers:
                tensors.append(buffers[adapter])
        for t in tensors:
            buf = t.detach().to(device)
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))
