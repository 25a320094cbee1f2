"""The README's main job, end to end on a tiny configuration."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))


@pytest.mark.slow
def test_tour_end_to_end(tmp_path, minilm_path):
    import tour

    out = tour.main(["--steps", "4", "--calib-texts", "48", "--eval-texts", "24", "--per-class", "10",
                     "--output-dir", str(tmp_path), "--quiet",
                     # any TrainingArguments / spectral flag passes through to SpectralTrainingArguments
                     "--spec-monitor", "--spec-every", "2", "--spec-topk", "2", "--spec-targets", "attn.qkv"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"lora", "nullspace_v2", "export_check"}
    for name in ("lora", "nullspace_v2"):
        assert {"task_accuracy", "embedding_drift", "hidden_drift", "trainable_params"} <= set(results["results"][name])
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| method | task accuracy | embedding drift (1-cos) | hidden-state drift |")
    check = out["results"]["export_check"]
    assert check["export_peft_type"] == "LORA" and check["export_max_diff"] < 1e-5 and check["reload_max_diff"] < 1e-6
    report = json.loads((tmp_path / "nullspace_report.json").read_text())
    assert len(report["layers"]) == 36
    # the tour's claim, even after a few steps: held-out general text moves less under NullSpaceLoRA
    assert out["results"]["nullspace_v2"]["embedding_drift"] < out["results"]["lora"]["embedding_drift"]
    assert (tmp_path / "nullspace_as_lora" / "adapter_model.safetensors").exists()
    monitored = json.loads((tmp_path / "trainer-lora" / "spectral" / "spectral.json").read_text())
    assert [r["step"] for r in monitored] == [2, 4]
    assert "spec/bert.encoder.layer.0.attention.self.query/cos_u_mean" in monitored[1]  # LoRA branch, as delta W
