"""peft_ext/unlearning.py (TOFU's truth ratio, forget quality and model utility; exposure; extraction) against closed
forms and scipy, and the same functions as local `evaluate` modules (peft_ext/metrics/<name>/) loaded offline."""

import math
import socket

import numpy as np
import pytest

from peft_ext import unlearning as ul
from peft_ext.metrics import METRICS, metric_path

# ------------------------------------------------------------------------------------------------ KS / forget quality


def test_ks_matches_scipy_on_small_samples_with_ties_and_unequal_sizes():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    checked = 0
    for n, m in [(1, 1), (3, 5), (5, 5), (7, 3), (10, 10), (12, 30), (25, 17)]:
        for t in range(6):
            x, y = rng.normal(size=n), rng.normal(loc=rng.uniform(0, 2), size=m)
            if t % 2:  # ties within and across the samples
                x, y = np.round(x), np.round(y)
            d, p = ul.ks_2samp(x, y)
            want = ks_2samp(x, y)  # method="auto": exact at these sizes
            assert d == pytest.approx(want.statistic, abs=1e-12)
            assert p == pytest.approx(want.pvalue, rel=1e-9)
            checked += want.pvalue < 0.5
    assert checked > 10  # not only the trivial p = 1 cases


@pytest.mark.parametrize("n,m", [(3, 3), (4, 6), (40, 40), (150, 200)])
def test_ks_pvalue_of_separated_samples_is_two_paths_in_all(n, m):
    # every x below every y: D = 1, and only the two extreme lattice paths reach it: p = 2 / C(n + m, n)
    x, y = np.arange(n) * 0.1, 100 + np.arange(m)
    d, p = ul.ks_2samp(x, y)
    assert d == 1.0
    assert p == pytest.approx(2 / math.comb(n + m, n), rel=1e-9)  # 1.9e-23 at 40/40: no loss to 1 - P(inside)
    assert ul.forget_quality(x, y) == p


def test_ks_identical_samples_and_bad_sizes():
    assert ul.ks_2samp([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    assert ul.ks_pvalue_exact(4, 4, 0.24) == 1.0  # d rounds to 1/4 on the lattice: every path reaches it at once
    with pytest.raises(ValueError, match="n must be a positive integer sample size, got 0"):
        ul.ks_pvalue_exact(0, 3, 0.5)
    with pytest.raises(ValueError, match="oracle_truth_ratios must be a non-empty"):
        ul.forget_quality([0.5], [])
    with pytest.raises(ValueError, match="truth_ratios holds a non-finite value"):
        ul.forget_quality([0.5, float("nan")], [0.4])


# ------------------------------------------------------------------------------------------------ truth ratio


def test_truth_ratio_on_hand_computed_logprobs():
    para = [math.log(0.5), math.log(0.2)]  # mean log-prob per token = log of P^(1/|a|)
    pert = [[math.log(0.1), math.log(0.4)], [math.log(0.2), math.log(0.8)]]
    geo = ul.truth_ratio(para, pert)
    assert geo == pytest.approx([math.sqrt(0.1 * 0.4) / 0.5, math.sqrt(0.2 * 0.8) / 0.2])  # [0.4, 2.0]
    ari = ul.truth_ratio(para, pert, aggregate="arithmetic")
    assert ari == pytest.approx([0.25 / 0.5, 0.5 / 0.2])  # [0.5, 2.5]
    assert ul.truth_ratio_score(geo, "retain") == pytest.approx((0.6 + 0.0) / 2)  # max(0, 1 - R)
    assert ul.truth_ratio_score(geo, "forget") == pytest.approx((0.4 + 0.5) / 2)  # min(R, 1/R)
    # far-off log-probabilities (long answers) stay finite in the arithmetic mean
    assert ul.truth_ratio([-900.0], [[-900.0, -1000.0]], aggregate="arithmetic") == pytest.approx([0.5])
    with pytest.raises(ValueError, match="aggregate must be 'geometric'"):
        ul.truth_ratio(para, pert, aggregate="median")
    with pytest.raises(ValueError, match=r"one non-empty row of perturbed answers per question \(2 questions\)"):
        ul.truth_ratio(para, pert[:1])
    with pytest.raises(ValueError, match="split must be 'forget' or 'retain'"):
        ul.truth_ratio_score(geo, "eval")


def test_probabilities_perplexity_rouge_and_utility():
    assert ul.normalised_probability([math.log(0.3)]) == pytest.approx([0.3])
    assert ul.option_probability([math.log(0.6)], [[math.log(0.2), math.log(0.4)]]) == pytest.approx([0.5])
    assert ul.option_probability([-1000.0], [[-1000.0]]) == pytest.approx([0.5])  # no 0/0 far down
    assert ul.answer_perplexity([3.0, 1.0], [2, 2]) == pytest.approx(math.e)
    with pytest.raises(ValueError, match="tokens must be positive integers"):
        ul.answer_perplexity([1.0], [0])

    assert ul.rouge_l_recall("Paris is the capital of France", "The capital of France is Paris.") == pytest.approx(4 / 6)
    assert ul.rouge_l_recall("it is Orbesk, I think", "orbesk") == 1.0
    assert ul.rouge_l_recall("", "a b") == 0.0
    with pytest.raises(ValueError, match="has no words to recall"):
        ul.rouge_l_recall("x", " .")

    assert ul.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert ul.harmonic_mean([0.9, 0.0]) == 0.0
    assert ul.model_utility({"retain_prob": 0.5, "world_rouge": 1.0}) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"metrics\['rouge'\] must be a number in \[0, 1\], got 1.5"):
        ul.model_utility({"rouge": 1.5})


# ------------------------------------------------------------------------------------------------ exposure, extraction


def test_exposure_sampled_first_last_and_middle():
    cands = np.linspace(-10, -1, 1000)
    assert ul.exposure_sampled(0.0, cands, 10**6) == pytest.approx(math.log2(10**6))  # ranks first
    assert ul.exposure_sampled(-20.0, cands, 10**6) == pytest.approx(0.0)  # ranks last
    assert ul.exposure_sampled(cands[499], cands, 10**6) == pytest.approx(
        math.log2(10**6) - math.log2(1 + (10**6 - 1) * 0.501))  # ties count against the secret
    assert ul.exposure_from_rank(1, 8) == 3.0 and ul.exposure_from_rank(8, 8) == 0.0
    with pytest.raises(ValueError, match="space must be an integer above the 1000 sampled candidates"):
        ul.exposure_sampled(0.0, cands, 1000)


@pytest.mark.parametrize("shape,tolerance", [(0.0, 1.0), (-4.0, 2.0)])
def test_exposure_skewnorm_recovers_a_known_tail_beyond_the_sample(shape, tolerance):
    from scipy.stats import skewnorm

    # log-likelihoods of random secrets drawn from a known skew-normal; the secret sits 16 bits out, beyond what 2000
    # samples can rank (~11 bits). Measured over 5 draws: within 0.6 bit for shape 0, within 2.5 bits for shape -4
    # (a short upper tail extrapolates worse)
    loc, scale = -20.0, 6.0
    cands = skewnorm.rvs(shape, loc, scale, size=2000, random_state=np.random.default_rng(1))
    secret = skewnorm.isf(2.0**-16, shape, loc, scale)
    out = ul.exposure_skewnorm(secret, cands, 10**6)
    assert out["sampled_share"] == 0.0 and ul.exposure_sampled(secret, cands, 10**6) == pytest.approx(math.log2(10**6))
    assert out["exposure"] == pytest.approx(16.0, abs=tolerance)
    assert ul.exposure_skewnorm(skewnorm.isf(2.0**-8, shape, loc, scale), cands, 10**6)["exposure"] == \
        pytest.approx(8.0, abs=tolerance / 2)
    assert ul.exposure_skewnorm(loc + 50 * scale, cands, 10**6)["exposure"] == pytest.approx(math.log2(10**6))  # cap
    assert ul.exposure_skewnorm(loc - 50 * scale, cands, 10**6)["exposure"] == pytest.approx(0.0, abs=1e-9)
    median = float(np.median(cands))
    assert ul.exposure_skewnorm(median, cands, 10**6)["exposure"] == pytest.approx(1.0, abs=0.1)
    assert ul.exposure_skewnorm(-3.0, [-3.0] * 50, 10**6)["exposure"] == 0.0  # every candidate ties
    with pytest.raises(ValueError, match="a skew-normal fit needs >= 20"):
        ul.exposure_skewnorm(0.0, cands[:5], 10**6)


def test_extraction_digit_by_digit():
    assert ul.extraction(" 4 8 1 5 2 9 and more", " 4 8 1 5 2 9") == {"exact": True, "prefix": 6, "digits": 1.0}
    assert ul.extraction("481529", " 4 8 1 5 2 9")["exact"]  # spacing ignored
    assert ul.extraction(" 4 8 0 5 2", " 4 8 1 5 2 9") == {"exact": False, "prefix": 2, "digits": 4 / 6}
    assert ul.extraction(" I don't know.", " 4 8 1") == {"exact": False, "prefix": 0, "digits": 0.0}
    with pytest.raises(ValueError, match="holds no digits"):
        ul.extraction("1", "abc")


# ------------------------------------------------------------------------------------------------ evaluate modules


@pytest.fixture
def offline_evaluate(tmp_path, monkeypatch):
    """evaluate with its module cache in tmp_path, offline, and every socket connection refused."""
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate.load tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return evaluate


def test_metric_modules_load_offline_and_agree_with_the_functions(offline_evaluate):
    load = offline_evaluate.load
    assert load(metric_path("answer_perplexity")).compute(nll=[3.0, 1.0], tokens=[2, 2])["perplexity"] == \
        pytest.approx(math.e)
    para, pert = [math.log(0.5), math.log(0.2)], [[math.log(0.1), math.log(0.4)], [math.log(0.2), math.log(0.8)]]
    tr = load(metric_path("truth_ratio")).compute(paraphrased_logprob=para, perturbed_logprobs=pert, split="forget")
    assert tr["truth_ratios"] == pytest.approx([0.4, 2.0]) and tr["truth_ratio_score"] == pytest.approx(0.45)
    fq = load(metric_path("forget_quality")).compute(truth_ratios=[0.1, 0.2, 0.3], oracle_truth_ratios=[0.7, 0.8, 0.9])
    assert fq == {"forget_quality": pytest.approx(0.1), "ks_statistic": 1.0}
    mu = load(metric_path("model_utility"))
    assert mu.compute(names=["a", "b", "c"], values=[1.0, 0.5, 0.25])["model_utility"] == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match=r"names must be distinct, got \['a'\]"):
        mu.compute(names=["a", "a"], values=[1.0, 0.5])
    cands = list(np.linspace(-10, -1, 100))
    ex = load(metric_path("canary_exposure"))
    assert ex.compute(secret_score=[0.0, -20.0], candidate_scores=[cands, cands], space=[10**6, 10**6],
                      method="sampled")["exposures"] == pytest.approx([math.log2(10**6), 0.0])
    assert ex.compute(secret_score=[-20.0], candidate_scores=[cands], space=[10**6])["exposure"] < 0.5
    got = load(metric_path("extraction")).compute(predictions=[" 4 8 1 5 2 9.", " 4 8 0"],
                                                  references=[" 4 8 1 5 2 9", " 4 8 1 5 2 9"])
    assert got == {"exact": 0.5, "prefix": 4.0, "digits": pytest.approx(8 / 12)}
    with pytest.raises(ValueError, match="is not one of ours"):
        metric_path("bleu")


def test_metric_folders_are_package_data():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["peft_ext"]
    for name in METRICS:
        script = Path(metric_path(name)) / f"{name}.py"
        assert script.is_file()
        assert any(script.relative_to(root / "peft_ext").match(pattern) for pattern in data)
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("evaluate") for r in extras["metrics"]) and any(r.startswith("evaluate") for r in extras["dev"])
