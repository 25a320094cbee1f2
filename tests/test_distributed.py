"""Two real processes (gloo on CPU) must give the statistics one process gets from all the data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_ext import ActivationStats

WORKER = Path(__file__).with_name("dist_stats_worker.py")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    two = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", str(WORKER), str(tmp_path / "two.safetensors")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = ActivationStats.load(tmp_path / "one.safetensors"), ActivationStats.load(tmp_path / "two.safetensors")
    assert s1.metadata["world_size_seen"] == 1 and s2.metadata["world_size_seen"] == 2
    assert s2.metadata["local_batches"] == 2  # each process really saw half of the 4 batches
    assert s1.layers == s2.layers and s1.aliases == s2.aliases and s1.tokens == s2.tokens
    for name in s1.layers:
        c1, c2 = s1.covariance(name), s2.covariance(name)
        assert float(torch.linalg.norm(c1 - c2) / torch.linalg.norm(c1)) <= 1e-6, name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_spectral_monitor_under_ddp_logs_identical_values_computed_once(tmp_path):
    import json

    worker = Path(__file__).with_name("dist_monitor_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent.parent)}
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    run = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29519", str(worker), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["logged"] == r1["logged"] and [e["step"] for e in r0["logged"]] == [2, 4]
    # 6 matrices (2 blocks x qkv, fc1, fc2): each decomposed on exactly one rank
    assert not set(r0["decomposed_here"]) & set(r1["decomposed_here"])
    assert len(r0["decomposed_here"]) + len(r1["decomposed_here"]) == 6
    assert sum(k.endswith("/sigma_max") for k in r0["logged"][0]) == 6
