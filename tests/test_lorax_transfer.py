"""recipes/lorax_transfer.py end to end on tiny configurations (--quick): the real MiniLM as source, a SimCSE-continued
or noised copy as target, the files and table it writes, and a closed-form check of the whole pipeline: on a target
identical to the source, LoRA-X (with the complement carry) must give back the source adapter's delta W, so the
source adapter's predictions exactly."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import lorax_transfer  # noqa: E402

pytestmark = pytest.mark.slow

LABELS = [label for _, label in lorax_transfer.METHODS]
HEADER = "| method | nearest-centroid accuracy | agreement with source | energy kept | mean φ_U / φ_V |"


@pytest.fixture(autouse=True)
def _minilm(minilm_path):
    """Skip (like the other MiniLM tests) where the embedded model is not installed."""


def test_quick_run_writes_results_table_plot_and_adapters(tmp_path):
    out = tmp_path / "out"
    report = lorax_transfer.main(["--quick", "--output-dir", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["out"]  # written in a temporary folder, then renamed: nothing left over
    assert sorted(os.listdir(out)) == ["adapters", "results.json", "results.md", "target_base", "transfer.png"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["args"]["seed_list"] == [0, 1] and set(saved["per_seed"]) == {"0", "1"}

    md = (out / "results.md").read_text()
    assert HEADER in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line != HEADER]
    assert [row.split(" | ")[0][2:] for row in rows] == LABELS
    assert "Target base: the source continued with SimCSE" in md and "LoRA-X reached" in md
    assert "Time per stage:" in md

    for seed_results in report["per_seed"].values():
        assert set(seed_results) == {key for key, _ in lorax_transfer.METHODS}
        for r in seed_results.values():
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
        assert seed_results["source"]["agreement"] == 1.0
    for row in report["summary"].values():
        assert 0.0 <= row["accuracy"][0] <= 1.0 and row["seeds"] == 2
    # the converted rows carry their transfer reports: copy keeps all energy, phi in [0, 1]
    s = report["summary"]
    assert s["copy"]["energy_kept"][0] == pytest.approx(1.0)
    assert all(0.0 <= s[k]["mean_phi_u"][0] <= 1.0 for k in lorax_transfer.CONVERSIONS)

    # the continued-trained target moved, lies in the output folder, and the kept adapters point at it
    target = report["target"]
    assert target["kind"] == "continued" and target["weight_change"]["mean"] > 0
    assert target["path"] == str(out / "target_base") and (out / "target_base" / "model.safetensors").is_file()
    seed0 = out / "adapters" / "seed0"
    assert sorted(os.listdir(seed0)) == sorted(["source", "trained", *lorax_transfer.CONVERSIONS])
    for key in lorax_transfer.CONVERSIONS:
        cfg = json.loads((seed0 / key / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(out / "target_base")
        assert json.loads((seed0 / key / "lorax_report.json").read_text())["method"] == CONVERSION_METHOD[key]
    assert not (out / "adapters" / "seed1").exists()  # only the first seed's adapters are kept


CONVERSION_METHOD = {k: v["method"] for k, v in lorax_transfer.CONVERSIONS.items()}


def test_identical_target_gives_back_the_source_adapter_exactly(tmp_path):
    out = tmp_path / "out"
    report = lorax_transfer.main(["--quick", "--seeds", "0", "--target-kind", "noise", "--noise", "0",
                                  "--no-plots", "--output-dir", str(out)])
    assert report["target"]["weight_change"]["max"] == 0.0
    res = report["per_seed"][0]
    # non-vacuous: the source adapter changes the bare base's predictions
    assert res["source"]["pred"] != res["source-base"]["pred"]
    # M = P_t P_s + Q_t Q_s = I when the bases are equal: same delta W, same predictions, same accuracy
    for key in ("lorax", "copy", "trained"):
        assert res[key]["pred"] == res["source"]["pred"], key
        assert res[key]["accuracy"] == res["source"]["accuracy"] and res[key]["agreement"] == 1.0
    lx = res["lorax"]["report"]["summary"]
    assert lx["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert lx["mean_phi_u"] == pytest.approx(1.0, abs=1e-5) and lx["mean_phi_v"] == pytest.approx(1.0, abs=1e-5)
    assert res["none"]["pred"] == res["source-base"]["pred"]
    assert not (out / "transfer.png").exists()


def test_bad_flags_are_refused_with_the_flag_named(capsys):
    for argv, message in (
        (["--seeds", "0,a"], "--seeds must be comma-separated integers"),
        (["--r", "0"], "--r must be >= 1"),
        (["--noise", "-0.1"], "--noise must be >= 0"),
        (["--target-kind", "pruned"], "--target-kind: invalid choice"),
        (["--target-base", "some/model", "--target-kind", "noise"], "--target-base 'some/model' and --target-kind"),
        (["--per-class", "1"], "--per-class must be >= 2"),
    ):
        with pytest.raises(SystemExit):
            lorax_transfer.parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_unloadable_target_base_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(SystemExit, match="--target-base .* could not be loaded"):
        lorax_transfer.main(["--quick", "--target-base", str(tmp_path / "missing"), "--output-dir",
                             str(tmp_path / "out")])
    assert os.listdir(tmp_path) == []
