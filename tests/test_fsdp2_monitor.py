"""SpectralMonitorCallback under FSDP2 (two gloo processes, `fully_shard` on CPU) and its DeepSpeed decision.

The Trainer's own FSDP integration refuses CPU ("Using fsdp only works in distributed training": accelerate enables
DistributedType.FSDP only for GPU-like devices), so the worker drives the callback through the Trainer's hook sequence
by hand over a `fully_shard`-wrapped model. One torchrun launch runs every check (tests/fsdp2_monitor_worker.py).

Tolerances: singular values are compared relatively (1e-5; measured ~1e-6), cosines, energies and relative
spectrum changes, which live in [0, 1] or near 0, absolutely (1e-5; measured ~1e-6): a relative test of a cosine
near 0 would judge float32's conditioning, not the sharding (the unsharded path on the same tensors differs as much).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer_ext import SpectralMonitorCallback

WORKER = Path(__file__).with_name("fsdp2_monitor_worker.py")
SCALE = re.compile(r"/(sigma_max|sv\d+)$")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def worst_gaps(records, reference):
    """Largest relative gap of singular values and absolute gap of everything else (vs_chance is energy / a constant,
    checked through the energy); the key sets must be equal check by check."""
    rel = absolute = 0.0
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for mine, ref in zip(records, reference):
        assert mine.keys() == ref.keys(), sorted(set(mine) ^ set(ref))
        for key, value in mine.items():
            if key == "step" or key.endswith("_vs_chance"):
                continue
            if SCALE.search(key):
                rel = max(rel, abs(value - ref[key]) / abs(ref[key]))
            else:
                absolute = max(absolute, abs(value - ref[key]))
    return rel, absolute


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sharded_functions_equal_the_unsharded_ones(ranks):
    f = ranks[0]["functions"]
    assert ranks[0]["world"] == 2 and f["cases"] == 80  # 5 shapes x 2 split dims x transposed or not x 2 paths x 2 calls
    assert f["worst"]["s"] <= 1e-5 and f["worst"]["energy"] <= 1e-4, f["worst"]
    assert f["worst"]["u"] <= 1e-5 and f["worst"]["v"] <= 1e-5, f["worst"]  # 1 - smallest principal cosine
    # rank 0 saw flag 2 false, rank 1 flag 3: both must agree that both are bad
    assert f["agreed_flags"] == ranks[1]["functions"]["agreed_flags"] == [True, False, False, True]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_monitor_on_fully_sharded_model_logs_the_one_process_values_on_every_rank(ranks):
    dense = ranks[0]["dense"]
    assert set(dense["placements"].values()) == {"(Shard(dim=0),)"}
    assert len(dense["split"]) == 8  # every monitored weight is a DTensor: measured by both ranks together
    for i in range(2):  # exact_max_dim 128 (exact path) and 0 (randomized path)
        logged = dense["fsdp2"][i]
        assert logged == ranks[1]["dense"]["fsdp2"][i]  # identical on every rank
        assert [r["step"] for r in logged] == [2, 4, 6]
        assert sum(k.endswith("/sigma_max") for k in logged[0]) == 8
        assert sum(k.endswith("/momentum_energy") for k in logged[1]) == 8
        # the NaN sat in rank 1's block only: both ranks skipped that matrix at that check, and nothing else
        assert not any(k.startswith("spec/blocks.0.mlp.fc2/") for k in logged[2])
        assert sum(k.endswith("/sigma_max") for k in logged[2]) == 7
        for reference in ("mirror", "reference"):  # same tensors unsharded; a separate unsharded run
            rel, absolute = worst_gaps(logged, dense[reference][i])
            assert rel <= 1e-5 and absolute <= 1e-5, (reference, i, rel, absolute)
    # rank 1 computed the same numbers it logged from rank 0 (its trackers hold its own results)
    s0, s1 = dense["tracker_s"], ranks[1]["dense"]["tracker_s"]
    assert s0.keys() == s1.keys() and all(torch.allclose(torch.tensor(s0[n]), torch.tensor(s1[n]), rtol=1e-6) for n in s0)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_monitor_on_fully_sharded_lora_gathers_only_the_factors(ranks):
    lora = ranks[0]["lora"]
    assert lora["split"] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    for i in range(2):
        assert lora["fsdp2"][i] == ranks[1]["lora"]["fsdp2"][i]
        assert sum(k.endswith("/sigma_max") for k in lora["fsdp2"][i][0]) == 4
        rel, absolute = worst_gaps(lora["fsdp2"][i], lora["mirror"][i])
        assert rel <= 1e-5 and absolute <= 1e-5, (i, rel, absolute)


# ------------------------------------------------------------------------------------------------ DeepSpeed


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(6, 5)


def begin(monitor, **args):
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(**{"deepspeed": None, "fsdp": None, "output_dir": "unused", "process_index": 0,
                              "world_size": 1, **args})
    model = args.__dict__.pop("model", None) or Tiny()
    monitor.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    return monitor


@pytest.mark.parametrize("stage, track, reasons", [
    (3, ("weight",), ["ZeRO-3 partitions every weight"]),
    (2, ("weight", "grad"), ["gradients are consumed and zeroed"]),
    (1, ("weight", "momentum"), ["flat fp32 partitions"]),
    (3, ("weight", "grad", "momentum"), ["ZeRO-3", "'grad'", "'momentum'"]),
])
def test_deepspeed_refusal_names_each_reason(stage, track, reasons):
    monitor = SpectralMonitorCallback(targets=["mlp.fc1"], topk=2, track=track)
    with pytest.raises(RuntimeError, match=f"DeepSpeed ZeRO stage {stage}") as err:
        begin(monitor, deepspeed={"zero_optimization": {"stage": stage}})
    for reason in reasons:
        assert reason in str(err.value)
    assert not monitor.targets  # refused before anything was set up


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_weight_only_monitoring_is_allowed_below_zero3(stage, tmp_path, caplog):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    with caplog.at_level("WARNING", logger="trainer_ext.callbacks"):
        monitor = begin(SpectralMonitorCallback(targets=["mlp.fc1"], topk=2, track=("weight",)), deepspeed=str(path))
    assert [t.name for t in monitor.targets] == ["mlp.fc1"]
    assert "after the optimizer step it is logged at" in caplog.text


def test_deepspeed_zero3_parameters_in_a_hand_written_loop_are_refused():
    model = Tiny()
    model.mlp.fc1.weight.ds_tensor = torch.zeros(0)  # what deepspeed.zero.Init leaves on a partitioned parameter
    with pytest.raises(RuntimeError, match="ZeRO stage 3"):
        begin(SpectralMonitorCallback(targets=["mlp.fc1"], topk=2, track=("weight",)), model=model)


def test_deepspeed_config_without_a_stage_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="zero_optimization.stage"):
        begin(SpectralMonitorCallback(targets=["mlp.fc1"], topk=2, track=("weight",)), deepspeed="missing.json")


def test_fsdp1_flat_parameters_are_refused():
    class FullyShardedDataParallel(nn.Module):  # the class name is what the callback checks
        def __init__(self):
            super().__init__()
            self.inner = Tiny()

    with pytest.raises(RuntimeError, match="FSDP1.*fsdp_version"):
        begin(SpectralMonitorCallback(targets=["mlp.fc1"], topk=2), model=FullyShardedDataParallel())
