"""The benchmark scripts still run and print their ratios (tiny workloads; the figures come from full runs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_calibration_benchmark_runs(tmp_path, minilm_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "calibration.py"), "--num-seqs", "4", "--seq-len", "32",
         "--batch-size", "2", "--repeats", "1", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "time  ours / floor" in out.stdout and "corda-cov / ours" in out.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["results"]) == {"floor", "ours", "ours+eigh", "corda-cov", "corda-full"}
    assert result["printed"].startswith("machine:")
    assert all(v["median_s"] > 0 for v in result["results"].values())


@pytest.mark.slow
def test_monitor_overhead_benchmark_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "monitor_overhead.py"), "--depth", "2", "--width", "64",
         "--steps", "4", "--every", "2", "--image-size", "32", "--batch-size", "2", "--repeats", "1", "--skip-4096",
         "--skip-real-step", "--idle-wait", "0",
         "--json", str(tmp_path / "m.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "overhead end-to-end  every=2" in out.stdout and "check  exact / randomized (warm)" in out.stdout
    assert "full svd / randomized" in out.stdout and "real step skipped" in out.stdout
    result = json.loads((tmp_path / "m.json").read_text())
    assert set(result["results"]) == {"train-none", "train-every2", "micro"}
    assert set(result) >= {"machine", "args", "overhead_pct", "projected_overhead_pct", "ratios", "printed"}
    assert result["results"]["train-every2"]["checks"] == 2 and result["overhead_pct"]["every=2"]["checks"] == 2
    assert result["printed"].startswith("machine:") and result["printed"] in out.stdout
    assert all(v["median_s"] > 0 for v in result["results"]["micro"]["check"].values())


@pytest.mark.slow
def test_lorax_speed_benchmark_runs(tmp_path, minilm_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lorax_speed.py"), "--quick", "--idle-wait", "0",
         "--json", str(tmp_path / "l.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "conversion exact / randomized" in out.stdout and "transferred energy" in out.stdout
    result = json.loads((tmp_path / "l.json").read_text())
    assert result["printed"].startswith("machine:") and result["printed"] in out.stdout


def test_ortho_latency_benchmark_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ortho_latency.py"), "--quick", "--json", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "target alpha=0 <= 1.05x base stream alone" in out.stdout and "(4) memory" in out.stdout
    result = json.loads((tmp_path / "o.json").read_text())
    assert set(result) >= {"machine", "args", "results", "targets", "met", "printed"}
    assert result["printed"].startswith("machine:") and result["printed"] in out.stdout
    res = result["results"]
    assert set(res) >= {"layers", "verdicts", "best", "model"} and len(res["verdicts"]) == 4
    ratios = [v for g in res["layers"] for r in g["runs"] for k, v in r.items() if "/" in k]
    ratios += [a["ratio_to_dense"] for g in res["layers"] for r in g["runs"] for a in r["alternatives"].values()]
    ratios += [v for r in res["model"]["runs"] for k, v in r.items() if "/" in k]
    assert len(ratios) > 20 and all(math.isfinite(v) and v > 0 for v in ratios)
    assert all(a["rel_error"] < 1e-4 for g in res["layers"] for r in g["runs"] for a in r["alternatives"].values())
    memory = res["layers"][0]["memory"]
    assert memory["held_csr_bytes"] > memory["dense_bytes"] > memory["packed_total_bytes"] > 0


@pytest.mark.parametrize("model", ["minilm", "llama-tiny"])
def test_nullspace_step_benchmark_runs(tmp_path, request, model):
    if model == "minilm":
        request.getfixturevalue("minilm_path")  # skips where the embedded MiniLM package is missing
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nullspace_step.py"), "--model", model, "--rounds", "2",
         "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--rank", "4", "--json", str(tmp_path / "n.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nullspace / lora " in out.stdout and "target <= 1.02x" in out.stdout
    result = json.loads((tmp_path / "n.json").read_text())
    assert set(result) >= {"machine", "args", "results", "target", "printed"}
    assert result["printed"].startswith("machine:") and result["printed"] in out.stdout
    res = result["results"]
    assert set(res["summary"]["variants"]) == {"lora", "nullspace", "lora-a-frozen", "lora-twin"}
    assert all(len(v["times_ms"]) == 2 and v["median_ms"] > 0 for v in res["summary"]["variants"].values())
    assert all(math.isfinite(r["median"]) and r["median"] > 0 for r in res["summary"]["ratios"].values())
    # same rank, same targets: v2 trains B only, i.e. what LoRA trains minus its A (= lora-a-frozen)
    trainable = res["trainable"]
    assert trainable["nullspace"] == trainable["lora-a-frozen"] and 0 < trainable["nullspace"] < trainable["lora"]
    # the training forward of an initialised NullSpaceLoRA reads no tensor value back to Python (a CUDA sync each)
    assert res["host_reads_per_forward"]["nullspace"] == res["host_reads_per_forward"]["lora"]
    assert res["syncs_per_step"]["nullspace"] is None  # counted on CUDA only


def test_forgetting_overhead_benchmark_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "forgetting_overhead.py"), "--model", "llama-tiny", "--rounds", "1",
         "--steps-per-round", "1", "--ref-texts", "2", "--ref-len", "32", "--batch-size", "2", "--seq-len", "16",
         "--json", str(tmp_path / "f.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "overhead at every=100" in out.stdout and out.stdout.startswith("machine:")
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["median_s"]["step"] > 0 and res["median_s"]["cache"] > 0 and res["median_s"]["disable_adapter"] > 0


def test_one_machine_description_for_recipes_and_benchmarks(tmp_path):
    """recipes.common.machine_info is what every benchmark records under "machine" (the keys of the committed
    results), and machine() is the one-line form of the same facts."""
    sys.path.insert(0, str(ROOT))
    from recipes.common import machine, machine_info, write_json

    info = machine_info()
    committed = json.loads((ROOT / "results" / "forgetting_overhead.json").read_text())["machine"]
    assert set(committed) <= set(info) <= set(committed) | {"gpu"}
    fake = {"processor": "x86_64", "cpu_model": "Some CPU", "cpu_count": 2, "torch": "2.13.0", "torch_threads": 1,
            "python": "3.12"}
    assert machine(fake) == "Some CPU, 2 CPU cores, 1 torch threads, torch 2.13.0"
    assert machine({**fake, "cpu_model": "", "gpu": "H200"}) == "x86_64, 2 CPU cores, 1 torch threads, GPU H200, torch 2.13.0"
    assert machine() == machine(info)
    write_json(str(tmp_path / "sub" / "r.json"), {"machine": info}, indent=2)
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"machine": info}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # no temporary left beside it


def test_lorax_svd_accuracy_benchmark_runs(tmp_path):
    """The table the randomized SVD's defaults come from: runs, and the closed facts hold (more power iterations
    never cost accuracy on the subspace; the default row is marked)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lorax_svd_accuracy.py"), "--dim", "256", "--subspace-rank", "8",
         "--rank", "4", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "s.json").read_text())
    rows = {(r["oversample"], r["niter"]): r for r in res["rows"]}
    assert rows[(8, 4)]["phi_u"] >= rows[(8, 2)]["phi_u"] - 1e-6 and rows[(64, 4)]["phi_u"] > 0.99
    assert "<- default" in res["printed"]
