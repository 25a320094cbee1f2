"""recipes/ortho_unlearn.py end to end on its --quick configuration, on fictitious people and on TOFU-shaped files."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

import ortho_unlearn  # noqa: E402
import tofu_data  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_quick_run_writes_table_json_and_plot(tmp_path, cache_dir):
    out = tmp_path / "out"
    results = ortho_unlearn.main(["--quick", "--cache-dir", cache_dir, "--out", str(out),
                                  "--selectors", "magnitude,contrastive,random,obs,fisher,relative"])
    assert sorted(os.listdir(out)) == ["alpha_sweep.png", "results.json", "results.md", "tradeoff.png"]
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["reference"]) == {"base", "finetuned", "oracle"}
    labels = [r["label"] for r in saved["rows"]]
    # every selector with the reference, plus the prior attempt's no-reference control
    assert len(labels) == 7 and labels[-1] == "int8 / magnitude / 5.00% (no ref: RTN residual)"
    for row in saved["rows"]:
        assert set(row["alphas"]) == {"0.0", "1.0"}
        a0 = row["alphas"]["0.0"]
        assert a0["forget_ppl"] > 0 and a0["retain_ppl"] > 0 and a0["general_ppl"] > 0
        assert 0 <= a0["forget_exposure"] <= 4.33  # log2(20) with --candidates 19
        assert set(row["verdicts"]) >= {"forget_ppl>=0.5*oracle", "retain_ppl<=1.5*finetuned", "general_ppl<=1.1*base",
                                        "exposure<=oracle+1"}
        assert row["sparse_bytes"] > 0 and row["dense_bytes"] > row["sparse_bytes"]
    assert "| base / selector / density |" in (out / "results.md").read_text()
    assert results["markdown"].startswith("Machine:")
    # no reference: at alpha=0 the model is the plain RTN copy, i.e. the ortho stream held only rounding residuals
    no_ref = saved["rows"][-1]
    assert no_ref["sparse_bytes"] < saved["rows"][0]["sparse_bytes"]  # no anchors stored
    assert "Closest configuration" in results["markdown"]
    # the report rebuilds from the JSON alone, identically
    again = ortho_unlearn.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "again"), "--no-plots"])
    assert again["markdown"] == results["markdown"]
    assert (tmp_path / "again" / "results.md").read_text() == (out / "results.md").read_text()


def test_tofu_shaped_local_files(tmp_path, cache_dir):
    people = tofu_data.make_people(6, seed=3)
    tofu_dir = tmp_path / "tofu"
    tofu_data.write_tofu_like(str(tofu_dir), people[:2], people[2:])
    out = tmp_path / "out"
    results = ortho_unlearn.main(["--quick", "--cache-dir", cache_dir, "--out", str(out), "--dataset", str(tofu_dir),
                                  "--selectors", "contrastive", "--no-plots"])
    assert results["data"] == {"forget_pairs": 10, "retain_pairs": 20, "forget_canaries": 0, "retain_canaries": 0}
    assert results["rows"][0]["alphas"]["0.0"]["forget_exposure"] is None
    assert "forget exp." not in results["markdown"]
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]


@pytest.mark.parametrize("argv,message", [
    (["--densities", "1.5"], "--densities value 1.5 is out of range"),
    (["--alphas", "0.5,1"], "--alphas must include 0 and 1"),
    (["--selectors", "hessian"], "--selectors got ['hessian']"),
    (["--base-kinds", "int3"], "--base-kinds got ['int3']"),
    (["--forget-fraction", "1"], "--forget-fraction must be in (0, 1)"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        ortho_unlearn.main(argv + ["--out", str(tmp_path / "never")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
