"""recipes/directional_lr.py end to end on tiny configurations: the offline tasks, and the --model/--dataset path on
a local transformers ViT and a local parquet file (the same code path a Hub id and a Hub data set take)."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import directional_lr  # noqa: E402
import zoo  # noqa: E402

pytestmark = pytest.mark.slow


def test_quick_run_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "out"
    report = directional_lr.main(["--quick", "--seeds", "0", "--runs", "B0,E4,B1,B2,#2-r4", "--output-dir", str(out)])
    assert sorted(os.listdir(out)) == ["curves.png", "results.json", "results.md", "sigma_max.png"]
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["summary"]) == {f"{t}/{r}" for t in ("digits", "planted") for r in ("B0", "E4", "B1", "B2", "#2-r4")}
    md = (out / "results.md").read_text()
    for column in ("| run | trainable | steps to 0.8 | steps to 0.9 | s to 0.8 | s to 0.9 | final top-1 (%) |",
                   "| run | trainable | steps to 0.6 | steps to 0.7 | s to 0.6 | s to 0.7 | final top-1 (%) |"):
        assert column in md
    for criterion in ("**Speed**", "**Final accuracy**", "**Stability**", "**Random subspace (B2) does not help**",
                      "**Directional (E4) beats global LR (B1)**"):
        assert md.count(criterion) == 2  # one verdict per task
    runs = {(r["task"], r["run"]): r for r in report["results"]}
    for r in runs.values():
        steps = [c["step"] for c in r["curve"]]
        assert steps == list(range(5, 41, 5)) and all(0 <= c["acc"] <= 1 for c in r["curve"])
        assert all(c["time"] > 0 for c in r["curve"]) and not r["diverged"]
    # E4 and B2 train the k x k cores on top of B0's parameters; the planted task knows its true subspaces
    n_targets = 4 * 2
    assert runs[("digits", "E4")]["trainable"] == runs[("digits", "B0")]["trainable"] + n_targets * 4 * 4
    assert 0 <= runs[("planted", "E4")]["extracted_planted_overlap"] <= 1
    mom = report["momentum"]["planted"]
    assert mom["p_chance"] < mom["p"] <= 1 and 0 <= mom["planted_u"] <= 1
    # the purely low-rank network (#2) trains: its branches were started off the W = 0 saddle
    assert runs[("digits", "#2-r4")]["curve"][-1]["sigma_max"] > 0
    # the report is a function of the raw per-run results: rebuilt from results.json it is the same
    rebuilt = directional_lr.main(["--from-json", str(out / "results.json"), "--no-plots",
                                   "--output-dir", str(tmp_path / "rebuilt")])
    assert rebuilt["markdown"] == md.rstrip("\n") and (tmp_path / "rebuilt" / "results.md").read_text() == md


def test_time_to_and_summary_closed_forms():
    curve = [{"step": 10, "time": 1.0, "acc": 0.5}, {"step": 20, "time": 2.0, "acc": 0.91}, {"step": 30, "time": 3.0, "acc": 0.97}]
    assert directional_lr.time_to(curve, 0.9) == (20, 2.0)
    assert directional_lr.time_to(curve, 0.95) == (30, 3.0)
    assert all(math.isnan(v) for v in directional_lr.time_to(curve, 0.99))
    assert directional_lr.mean_std([1.0, 3.0, math.nan]) == (2.0, pytest.approx(2 ** 0.5))


def test_planted_deltas_live_in_the_returned_subspaces():
    base = zoo.ViT(image_size=8, patch=2, dim=16, depth=1, heads=2, seed=0)
    teacher = zoo.ViT(image_size=8, patch=2, dim=16, depth=1, heads=2, seed=0)
    planted = zoo.plant_low_rank(teacher, rank=3, strength=2.0, generator=torch.Generator().manual_seed(0))
    assert set(planted) == set(zoo.linear_targets(base))
    for name, (u, v) in planted.items():
        delta = teacher.get_submodule(name).weight - base.get_submodule(name).weight
        assert torch.linalg.matrix_rank(delta).item() == 3
        torch.testing.assert_close(u @ (u.T @ delta @ v) @ v.T, delta, atol=1e-5, rtol=0)
        assert zoo.subspace_overlap(u, u) == pytest.approx(1.0)


def _local_vit_and_parquet(tmp_path):
    from datasets import Dataset
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=2)
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    g = torch.Generator().manual_seed(0)
    images, labels = [], []
    for i in range(48):
        label = i % 2
        px = (torch.rand(8, 8, 3, generator=g) * 80 + (150 if label else 20)).to(torch.uint8).numpy()
        images.append(Image.fromarray(px))
        labels.append(label)
    Dataset.from_dict({"image": images, "label": labels}).to_parquet(str(tmp_path / "images.parquet"))
    return str(tmp_path / "vit"), str(tmp_path / "images.parquet")


def test_model_and_dataset_flags_run_a_transformers_vit_on_local_files(tmp_path):
    model, dataset = _local_vit_and_parquet(tmp_path)
    out = tmp_path / "out"
    report = directional_lr.main(["--model", model, "--dataset", dataset, "--steps", "12", "--warmup-steps", "4",
                                  "--eval-every", "4", "--track-every", "4", "--k", "2", "--batch-size", "8",
                                  "--seeds", "0", "--runs", "B0,E4,#1-r4", "--levels", "0.6,0.9", "--no-plots",
                                  "--output-dir", str(out)])
    assert set(report["summary"]) == {"hf/B0", "hf/E4", "hf/#1-r4"}
    e4 = next(r for r in report["results"] if r["run"] == "E4")
    b0 = next(r for r in report["results"] if r["run"] == "B0")
    assert e4["trainable"] == b0["trainable"] + 6 * 2 * 2  # q, k, v, o, fc1, fc2 of the one layer, k=2
    assert (out / "results.md").exists() and not (out / "curves.png").exists()


def test_bad_flags_are_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        directional_lr.parse_args(["--runs", "B0,E5"])
    assert "unknown run(s) ['E5']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        directional_lr.parse_args(["--model", "x"])
    assert "--model and --dataset go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        directional_lr.parse_args(["--warmup-steps", "300", "--steps", "300"])
    assert "must be below --steps" in capsys.readouterr().err


def test_an_interrupted_run_resumes_from_its_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--quick", "--seeds", "0", "--tasks", "digits", "--runs", "B0,B2", "--no-plots", "--output-dir", str(out)]
    real, calls = directional_lr.run_one, []

    def failing(spec, *a, **kw):
        calls.append(spec.name)
        if spec.name == "B2":
            raise KeyboardInterrupt
        return real(spec, *a, **kw)

    monkeypatch.setattr(directional_lr, "run_one", failing)
    with pytest.raises(KeyboardInterrupt):
        directional_lr.main(argv)
    assert calls == ["B0", "B2"] and not out.exists()
    assert os.path.exists(directional_lr.partial_path(directional_lr.parse_args(argv)))
    monkeypatch.setattr(directional_lr, "run_one", lambda spec, *a, **kw: (calls.append(spec.name), real(spec, *a, **kw))[1])
    report = directional_lr.main(argv)
    assert calls == ["B0", "B2", "B2"]  # B0 was kept from the interrupted run
    assert {r["run"] for r in report["results"]} == {"B0", "B2"}
    assert not os.path.exists(directional_lr.partial_path(directional_lr.parse_args(argv)))
