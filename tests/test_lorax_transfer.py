"""recipes/lorax_transfer.py: the statistics against closed forms (recovery, its bootstrap, the phi filter, the
'recovers down to phi' rule), flags refused with one-line errors, and one --quick end-to-end run on the real MiniLM
with an identical target (noise 0) beside real ones, resumed after a unit is lost. On the identical target the
transfers must give back the source adapter exactly, so the same test predictions as training on that target."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import lorax_transfer as lt  # noqa: E402

# ------------------------------------------------------------------------------------------------ closed forms


def test_recovery_closed_form():
    assert lt.recovery(0.8, 0.6, 0.7) == pytest.approx(2.0)
    assert lt.recovery(0.65, 0.6, 0.7) == pytest.approx(0.5)
    assert lt.recovery(0.6, 0.6, 0.7) == 0.0
    assert math.isnan(lt.recovery(0.9, 0.6, 0.6))  # no gain from training on the target: nothing to recover
    assert math.isnan(lt.recovery(0.9, 0.6, 0.5))


def test_recovery_ci_ratio_of_means_and_its_extremes():
    none = [0, 0, 0, 0, 1, 1, 1, 1]
    trained = [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]]  # gains 4/8 and 3/8
    same = lt.recovery_ci(trained, trained, none, 200)
    assert same["mean"] == 1.0 and same["lo"] == 1.0 and same["hi"] == 1.0 and same["resolved"]
    zero = lt.recovery_ci([none, none], trained, none, 200)
    assert zero["mean"] == 0.0 and zero["lo"] == 0.0 and zero["hi"] == 0.0
    half = [[1, 1, 0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1, 1]]  # gains 2/8 and 1/8: (2 + 1) / (4 + 3)
    r = lt.recovery_ci(half, trained, none, 500)
    assert r["mean"] == pytest.approx(3 / 7)
    assert r["per_seed"] == pytest.approx([0.5, 1 / 3])
    assert r["lo"] <= 3 / 7 <= r["hi"] and r["gain"]["mean"] == pytest.approx(7 / 16)
    # a ceiling that does not beat no adapter: unresolved, never a number
    flat = lt.recovery_ci([none, none], [none, none], none, 100)
    assert not flat["resolved"] and math.isnan(flat["lo"]) and math.isnan(flat["mean"])


def test_recovery_difference_is_paired_and_zero_for_identical_arms():
    none = [0, 0, 0, 0, 1, 1, 1, 1]
    trained = [[1, 1, 1, 1, 1, 1, 1, 1]]
    half = [[1, 1, 0, 0, 1, 1, 1, 1]]
    d = lt.recovery_difference_ci(trained, trained, half, trained, none, 300)
    assert d["mean"] == pytest.approx(0.5) and d["lo"] <= 0.5 <= d["hi"]
    z = lt.recovery_difference_ci(half, trained, half, trained, none, 300)
    assert (z["mean"], z["lo"], z["hi"]) == (0.0, 0.0, 0.0)


def test_phi_filter_keeps_layers_at_or_above_the_threshold_on_both_sides():
    assert lt.phi_filter_keeps([0.95, 0.95, 0.85, 0.9], [0.95, 0.8, 0.95, 0.9], 0.9) == [True, False, False, True]
    assert lt.phi_filter_keeps([0.1], [0.1], 0.0) == [True]


def test_recovers_down_to_walks_from_the_closest_target():
    r = lambda m, lo: {"mean": m, "lo": lo}  # noqa: E731
    pts = [(0.99, r(1.0, 0.95)), (0.90, r(0.95, 0.80)), (0.97, r(0.97, 0.92)), (0.8, r(0.5, 0.3))]
    d = lt.recovers_down_to(pts, 0.9)
    assert d["ci"] == 0.97 and d["first_fail_ci"] == 0.90
    assert d["point"] == 0.90 and d["first_fail_point"] == 0.8
    none = lt.recovers_down_to([(0.99, r(0.5, math.nan))], 0.9)
    assert none["ci"] is None and none["first_fail_ci"] == 0.99


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("peak, grid, tried, chosen, interior", [
    (3e-3, [1e-3, 3e-3, 1e-2], [1e-3, 3e-3, 1e-2], 3e-3, True),  # interior at once: no extension
    (1e-1, [1e-3, 3e-3, 1e-2], [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 1e-1, False),  # two steps up, still at the edge
    (3e-4, [1e-3, 3e-3, 1e-2], [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], 3e-4, True),  # two steps down: 3e-4 is interior
])
def test_pick_lr_extends_a_grid_whose_best_is_an_edge(monkeypatch, peak, grid, tried, chosen, interior):
    import math as m

    calls = []

    def fake_unit(run, kind, seed, lr):
        calls.append(lr)
        return {"val": {"accuracy": -abs(m.log10(lr) - m.log10(peak))}}  # a single peak at `peak` in log-LR

    monkeypatch.setattr(lt, "source_unit", fake_unit)
    run = type("R", (), {"args": lt.Args(lorax_lr_grid=grid, lr_extensions=2)})()
    got = lt.pick_lr(run, "lorax")
    assert sorted(calls) == sorted(tried) and got["lr"] == chosen
    assert sorted(got["extended"]) == [x for x in tried if x not in grid] and got["interior"] is interior


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "dora"], "--kinds got ['dora']"),
    (["--seeds", "0", "0"], "--seeds got [0, 0]"),
    (["--r", "0"], "--r must be an integer >= 1, got 0"),
    (["--noise_levels", "-0.1"], "--noise_levels got [-0.1]"),
    (["--simcse_steps", "0"], "--simcse_steps got [0]"),
    (["--lr_grid", "0"], "--lr_grid got [0.0]"),
    (["--phi_threshold", "1.5"], "--phi_threshold must be in [0, 1], got 1.5"),
    (["--simcse_batch_size", "1"], "--simcse_batch_size must be >= 2"),
    (["--k", "500"], "--k 500 exceeds"),
    (["--task", "mnist"], "invalid choice: 'mnist'"),
    (["--config", "/nonexistent.yaml"], "--config '/nonexistent.yaml' cannot be read"),
])
def test_bad_flags_are_refused_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        lt.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_a_preset_without_targets_is_refused(tmp_path, capsys):
    preset = tmp_path / "none.yaml"
    preset.write_text("simcse_steps: []\nnoise_levels: []\n")
    with pytest.raises(SystemExit):
        lt.parse_args(["--config", str(preset)])
    assert "no targets: give --simcse_steps" in capsys.readouterr().err
    preset.write_text("lr: 0.1\n")
    with pytest.raises(SystemExit):
        lt.parse_args(["--config", str(preset)])
    assert "unknown keys ['lr']" in capsys.readouterr().err


def test_quick_preset_and_explicit_flags_win():
    a = lt.parse_args(["--quick", "--seeds", "3", "--output_dir", "x"])
    assert a.task == "stdlib" and a.k == 16 and a.seeds == [3] and a.output_dir == "x"
    d = lt.parse_args([])
    assert d.seeds == [0, 1, 2, 3, 4] and d.simcse_steps == [100, 1000, 3000] and d.task == "library"


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_quick_run_identical_target_closed_form_resume_and_files(tmp_path, minilm_path):
    out = tmp_path / "out"
    argv = ["--quick", "--noise_levels", "0", "0.2", "--simcse_steps", "2", "--seeds", "0",
            "--phi_threshold", "0.97", "--output_dir", str(out), "--results_copy", str(tmp_path / "copy.json")]
    res = lt.main(argv)
    assert sorted(os.listdir(out)) == ["recovery_vs_phi.png", "results.json", "results.md",
                                       [d for d in os.listdir(out) if d.startswith("runs-")][0], "targets"]
    def key(rs):
        return [(r["target"], r["kind"], r["transfer"], r["seed"], r["accuracy"], r["recovery"]) for r in rs]
    assert key(json.loads((tmp_path / "copy.json").read_text())["records"]) == key(res["records"])
    assert sorted(os.listdir(out / "targets")) == ["noise-0", "noise-0.2", "simcse-2"]

    run_dir = out / [d for d in os.listdir(out) if d.startswith("runs-")][0]
    unit = lambda name, s: json.loads((run_dir / f"unit__{name}__s{s}.json").read_text())  # noqa: E731
    # identical target: every exact transfer reproduces the source adapter, whose predictions equal training on
    # that target with the same seed (same base, same data order, same initialisation)
    for s in (0,):
        u = unit("noise-0", s)["kinds"]
        src = {k: json.loads((run_dir / f"source__{k}__lr{res['lr'][k]['lr']:g}__s{s}.json").read_text())
               for k in lt.KINDS}
        for kind, transfers in (("lorax", ("paper", "copy", "phi-filter")), ("lora", ("carry", "copy"))):
            assert u[kind]["trained"]["correct"] == src[kind]["test"]["correct"], kind
            for tr in transfers:
                assert u[kind][tr]["correct"] == u[kind]["trained"]["correct"], (kind, tr)
                assert u[kind][tr]["energy_kept"] == pytest.approx(1.0, abs=1e-5), (kind, tr)
        assert u["lorax"]["phi-filter"]["same_as"] == "paper"  # phi = 1 everywhere: nothing dropped
        assert u["lora"]["eq3"]["energy_kept"] < 0.99  # Eq. 3 alone drops what lies outside the subspace
    geo = res["targets"]["noise-0"]["geometry"]
    assert geo["phi"] == pytest.approx(1.0, abs=1e-6) and geo["change_max"] == 0.0
    # the phi filter drops exactly the layers whose min(phi_U, phi_V) is below the threshold (closed form)
    far = res["targets"]["noise-0.2"]["geometry"]["layers"]
    keep = lt.phi_filter_keeps([r["phi_u"] for r in far.values()], [r["phi_v"] for r in far.values()], 0.97)
    assert 0 < keep.count(False) < len(keep), "the threshold must drop some layers and keep some for this check"
    for s in (0,):
        assert unit("noise-0.2", s)["kinds"]["lorax"]["phi-filter"]["dropped"] == keep.count(False)
    # records: one per target, kind, transfer (and the ceiling) and seed, with phi and recovery
    n_rows = 3 * 1 * (len(lt.TRANSFERS["lorax"]) + len(lt.TRANSFERS["lora"]) + 2)
    assert len(res["records"]) == n_rows
    rec = res["records"][0]
    assert set(rec) >= {"target", "phi", "kind", "transfer", "seed", "accuracy", "recovery"}
    md = (out / "results.md").read_text()
    assert "### Recovery of the trained-on-target gain" in md and "### Verdicts (computed)" in md
    assert "φ_U / φ_V per layer" in md

    # resume: a lost unit is recomputed, the finished ones are read back untouched
    lost = run_dir / "unit__noise-0.2__s0.json"
    kept = run_dir / "unit__simcse-2__s0.json"
    before = kept.stat().st_mtime_ns
    lost_text = lost.read_text()
    lost.unlink()
    again = lt.main(argv + ["--no_plots"])
    assert kept.stat().st_mtime_ns == before and lost.exists()
    assert json.loads(lost.read_text())["kinds"]["lora"]["copy"]["correct"] == \
        json.loads(lost_text)["kinds"]["lora"]["copy"]["correct"]
    assert len(again["records"]) == n_rows


@pytest.mark.slow
def test_lorax_adapter_has_no_complement_so_carry_equals_eq3(tmp_path, minilm_path):
    """An update inside the source's top-k subspaces: M_U = P_t P_s + Q_t Q_s acts on it as P_t, so the complement
    carry changes nothing (why the recipe does not evaluate it for the LoRA-X adapter)."""
    import torch
    from transformers import AutoModel

    from peft_ext.lorax import transfer

    a = lt.parse_args(["--quick", "--output_dir", str(tmp_path)])
    source = AutoModel.from_pretrained(minilm_path)
    lt.set_name(source, minilm_path)
    model = lt.classifier("lorax", source, a, 0, torch.randn(6, 384))
    with torch.no_grad():  # a LoRA-X update: shift the trained singular values
        for name, p in model.encoder.named_parameters():
            if "subspace_C" in name:
                p.add_(torch.randn_like(p))
    lt.save_adapter("lorax", model, str(tmp_path / "ad"))
    target = lt.build_noise(source, 0.3, 0)
    got = {}
    for carry in (True, False):
        tensors, _, report = transfer(str(tmp_path / "ad"), minilm_path, target, subspace_rank=a.k, cache=False,
                                      progress=False, method="lorax", carry_complement=carry, target_name="t")
        got[carry] = tensors
        assert report.summary["energy_kept"] < 0.999  # the target moved: Eq. 3 really projects
    for key in got[True]:
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            dw = {c: got[c][key].double() @ got[c][a_key].double() for c in got}
            assert torch.allclose(dw[True], dw[False], atol=1e-5 * dw[False].abs().max().item()), key
