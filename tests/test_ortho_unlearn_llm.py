"""recipes/ortho_unlearn_llm.py: the tuning rule, the CI verdicts, the Fisher-ratio map, and the --quick run end to
end with its resume (a second invocation trains and scores nothing) and a refused bad flag."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import ortho_unlearn_llm as ou  # noqa: E402
import tofu_models  # noqa: E402

QUICK = str(ROOT / "recipes/presets/ortho_unlearn_llm_quick.yaml")


def test_tuning_rule_maximises_forget_quality_above_the_utility_floor():
    pts = [{"lr": 1, "fq": 0.9, "utility_select": 0.5}, {"lr": 2, "fq": 0.3, "utility_select": 0.96},
           {"lr": 3, "fq": 0.3, "utility_select": 0.99}, {"lr": 4, "fq": 0.1, "utility_select": 1.0}]
    best, kept = ou.pick_operating_point(pts, floor=0.95)
    assert (best["lr"], kept) == (3, True)  # the 0.9 point loses utility; between equal FQ, higher utility
    best, kept = ou.pick_operating_point(pts, floor=1.5)
    assert (best["lr"], kept) == (4, False)  # nobody keeps the floor: the least damaging point, flagged
    with pytest.raises(ValueError, match="no grid points"):
        ou.pick_operating_point([], 0.9)


def test_edge_extension_grows_past_an_edge_optimum_only():
    hps = [{"lr": 1e-5}, {"lr": 3e-5}, {"lr": 1e-4}]
    assert ou.edge_extension(hps, {"lr": 1e-4}, "graddiff") == {"lr": 3e-4}
    assert ou.edge_extension(hps, {"lr": 1e-5}, "ga") == {"lr": pytest.approx(3.33e-6)}
    assert ou.edge_extension(hps, {"lr": 3e-5}, "ga") is None
    npo = [{"lr": lr, "beta": b} for lr in (1e-5, 1e-4) for b in (0.1, 0.5)]
    assert ou.edge_extension(npo, {"lr": 1e-4, "beta": 0.5}, "npo") == {"lr": 3e-4, "beta": 0.5}
    tv = [{"lam": 0.5}, {"lam": 1.0}, {"lam": 2.0}]
    assert ou.edge_extension(tv, {"lam": 2.0}, "task_vector") == {"lam": 4.0}
    assert ou.edge_extension([{"lr": 1e-4}], {"lr": 1e-4}, "ga") is None  # one point has no edge to grow from


def test_tuned_grid_extends_until_the_optimum_is_inside(monkeypatch):
    """FQ rises with lr up to 9e-4 and falls after: the 3-point grid's optimum (1e-4) is on its edge, so the grid
    grows to 3e-4, then 9e-4 (edge again), and stops at --grid_extensions = 2 even though 9e-4 is still an edge."""
    done = {}
    monkeypatch.setattr(ou, "load_unit", lambda args, u: done.get(u["lr"]))
    monkeypatch.setattr(ou, "tuning_points", lambda args, arm, ref, rows: [
        {**r, "fq": -abs(r["lr"] - 9e-4), "utility_select": 1.0} for r in rows])
    monkeypatch.setattr(ou, "tuning_floor", lambda args, ref: 0.5)
    args = ou.parse_args(["--grid_extensions", "2"])
    ran = []
    got = ou.tuned_grid(args, "graddiff", {}, run=lambda hp: ran.append(hp["lr"]) or done.setdefault(hp["lr"], hp))
    assert [hp["lr"] for hp in got] == pytest.approx([1e-5, 3e-5, 1e-4, 3e-4, 9e-4])
    assert sorted(set(ran)) == pytest.approx([1e-5, 3e-5, 1e-4, 3e-4, 9e-4])
    # the report replays the same growth from the finished units, running nothing
    assert ou.tuned_grid(args, "graddiff", {}) == got
    assert [hp["lr"] for hp in ou.tuned_grid(ou.parse_args(["--grid_extensions", "0"]), "graddiff", {})] == \
        pytest.approx([1e-5, 3e-5, 1e-4])


def test_ci_verdict_needs_the_whole_interval():
    assert ou.ci_verdict((0.1, 0.06, 0.2), 0.05, above=True) == "met"
    assert ou.ci_verdict((0.04, 0.01, 0.049), 0.05, above=True) == "missed"
    assert ou.ci_verdict((0.06, 0.01, 0.2), 0.05, above=True) == "unresolved"
    assert ou.ci_verdict((1.0, 0.5, 1.5), 1.5, above=False) == "met"
    assert ou.ci_verdict((3.0, 2.0, 4.0), 1.5, above=False) == "missed"
    assert ou.ci_verdict((math.nan,) * 3, 1.5, above=False) == "unresolved"


def test_fisher_ratio_map_is_forget_over_retain():
    from peft_ext.ortho.saliency import EntrySaliency

    f = EntrySaliency(kind="fisher", maps={"w": torch.tensor([[2.0, 0.0, 1.0]])}, batches=1)
    r = EntrySaliency(kind="fisher", maps={"w": torch.tensor([[1.0, 1.0, 0.0]])}, batches=1)
    got = ou.fisher_ratio_maps(f, r, eps=1e-3).maps["w"]
    eps = 1e-3 * (2 / 3)
    assert got[0].tolist() == pytest.approx([2 / (1 + eps), 0.0, 1 / eps], rel=1e-6)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    base = tmp_path_factory.mktemp("ou_llm")
    argv = ["--config", QUICK, "--output_dir", str(base / "out"), "--cache_dir", str(base / "cache"),
            "--results_copy", str(base / "copy.json")]
    return base, argv, ou.main(argv)


def test_quick_run_scores_every_arm_and_writes_the_report(quick):
    base, _, res = quick
    out = base / "out"
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "plane.png"}
    assert json.loads((base / "copy.json").read_text())["rows"] == res["rows"]
    arms = {r["arm"] for r in res["rows"]}
    assert arms == set(ou.ARMS)
    for r in res["rows"]:  # the fields the issue asks for, per arm and seed
        for k in ("seed", "density", "base_kind", "alpha", "forget_quality", "model_utility", "truth_ratio",
                  "exposure", "extraction"):
            assert k in r
        assert 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["model_utility"] <= 1.0
    # the oracle against itself: KS p = 1; random and the baselines ran both seeds, deterministic selectors one
    assert res["reference"]["oracle"]["forget_quality"] == 1.0
    seeds = {(r["arm"], r["seed"]) for r in res["rows"]}
    assert {("random", 0), ("random", 1), ("npo", 0), ("npo", 1), ("contrastive", 0)} <= seeds
    assert ("contrastive", 1) not in seeds
    # alpha=1 with base none gives the fine-tuned weights back exactly: the fine-tuned model's numbers
    ft = res["reference"]["finetuned"]
    a1 = [r for r in res["rows"] if r["alpha"] == 1.0 and r["base_kind"] == "none"]
    assert a1 and all(r["forget_quality"] == pytest.approx(ft["forget_quality"], rel=1e-6) for r in a1)
    assert all(r["truth_ratio"] == pytest.approx(ft["truth_ratio"], abs=1e-5) for r in a1)
    # verdicts computed for every setting, from the listed outcomes
    for e in res["summary"]:
        assert set(e["verdicts"].values()) <= {"met", "missed", "unresolved", "vacuous"}
    # tuning read seed 0's grid only, and the operating point is one of its points
    for arm, t in res["tuning"].items():
        assert 2 <= len(t["grid"]) <= 2 + 2 and t["operating_point"] in [
            {k: p[k] for k in ("lr", "beta", "lam") if p.get(k) is not None} for p in t["grid"]]
    md = (base / "out" / "results.md").read_text()
    assert "Verdict (computed)" in md
    # the quantised base by itself (int8 in the quick preset): what it keeps of the delta, scored like an arm
    q = res["quantised"]["int8"]
    assert set(q["survival"]) == {"changed_share", "kept_norm", "aligned", "error_over_delta"}
    assert 0 < q["survival"]["changed_share"] <= 1 and "What a quantised base does" in md
    # our fourth check beside the issue's three, never counted among them
    assert all("retain_probability_at_least_95pct" in e["verdicts"] for e in res["summary"])
    assert res["thresholds"]["retain_probability"] == pytest.approx(
        0.95 * res["reference"]["finetuned"]["retain_probability"])


def test_second_invocation_trains_nothing_and_a_lost_unit_is_redone(quick, monkeypatch):
    base, argv, res = quick
    units = sorted(Path(ou.unit_dir(ou.parse_args(argv))).glob("*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in units}

    def refuse(*a, **k):
        raise AssertionError("a finished unit was recomputed")

    for mod, name in ((ou, "unlearn"), (ou, "ortho_split"), (ou, "score"), (tofu_models, "finetune")):
        monkeypatch.setattr(mod, name, refuse)
    again = ou.main(argv)
    assert again["rows"] == res["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in units} == before
    # a killed run: one unit missing is the only one redone
    monkeypatch.undo()
    lost = next(p for p in units if p.name.startswith("arm__ga__"))
    os.remove(lost)
    calls = []
    real = ou.score
    monkeypatch.setattr(ou, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    ou.main(argv)
    assert lost.exists() and len(calls) == 1


def test_an_orthosplit_only_process_scores_the_references_last(quick, monkeypatch):
    """Two processes split by --arms: the OrthoSplit-only one leaves the reference units to the baselines' process
    (which needs them first) and scores them itself only at its end, if they are still missing."""
    base, argv, _ = quick
    udir = Path(ou.unit_dir(ou.parse_args(argv)))
    for p in list(udir.glob("ref__*.json")) + list(udir.glob("*__random__*.json")):
        os.remove(p)
    order = []
    real = ou.save_unit
    monkeypatch.setattr(ou, "save_unit", lambda args, u, *a: order.append(u["arm"]) or real(args, u, *a))
    ou.run_all(ou.parse_args(argv + ["--arms", "random"]), lambda *a: None)
    # then the quantised-fine-tune references (this process runs OrthoSplit arms; the quick preset's int8)
    assert order and set(order[:-3]) == {"random"} and order[-3:] == ["finetuned", "oracle", "quant_int8"]


def test_bad_flag_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        ou.parse_args(["--densities", "0.01", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--densities/--sweep_density got 1.5: densities must be in (0, 1)" in err
    with pytest.raises(SystemExit):
        ou.parse_args(["--arms", "ga", "rmu"])
    assert "--arms got ['rmu']: choose from" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["ortho_unlearn_llm", "lorax_transfer", "nullspace_llm", "tofu_finetune"])
def test_recipe_help_prints(recipe, capsys):
    """`--help` of every recipe parsed through common.parse_with_preset prints and exits 0: argparse %-formats help
    text, and a literal "5%" or "%i" in a field's help used to crash it with a ValueError/TypeError."""
    import importlib

    module = importlib.import_module(recipe)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out
