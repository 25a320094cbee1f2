"""The benchmark scripts still run and print their ratios (tiny workloads; the figures come from full runs)."""

import json
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
