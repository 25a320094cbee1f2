"""TOFU's truth ratio: how much more likely the (paraphrased) true answer is than perturbed wrong ones."""

import datasets
import evaluate

from peft_ext.unlearning import truth_ratio, truth_ratio_score

_DESCRIPTION = """Per question R = mean over perturbed answers a' of P(a'|q)^(1/|a'|) / P(ã|q)^(1/|ã|), ã the paraphrased
answer (the answer itself on world facts), from mean log-probabilities per answer token. The mean over perturbed answers
is geometric by default (TOFU's reference code and open-unlearning: the mean of per-token losses); `aggregate="arithmetic"`
gives the paper's formula. The score is TOFU's reported statistic: mean(min(R, 1/R)) with split="forget",
mean(max(0, 1 - R)) with split="retain" (retain, real authors, world facts)."""
_KWARGS_DESCRIPTION = """
Args:
    paraphrased_logprob (`list[float]`): log P(ã|q) / |ã| per question.
    perturbed_logprobs (`list[list[float]]`): log P(a'|q) / |a'| of each perturbed answer, per question.
    split (`str`): "forget" or "retain" (default), which score to report.
    aggregate (`str`): "geometric" (default) or "arithmetic".
Returns:
    truth_ratio_score (`float`), mean_truth_ratio (`float`), truth_ratios (`list[float]`, per question: the input of
    forget_quality).
Example:
    >>> m = evaluate.load(peft_ext.metrics.metric_path("truth_ratio"))
    >>> m.compute(paraphrased_logprob=[-1.0], perturbed_logprobs=[[-2.0, -3.0]])["truth_ratios"]   # exp(-2.5 + 1)
    [0.22313016014842982]
"""
_CITATION = """@article{maini2024tofu, title={TOFU: A Task of Fictitious Unlearning for LLMs},
author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
journal={arXiv:2401.06121}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TruthRatio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"paraphrased_logprob": datasets.Value("float64"),
                                        "perturbed_logprobs": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, paraphrased_logprob, perturbed_logprobs, split="retain", aggregate="geometric"):
        r = truth_ratio(paraphrased_logprob, perturbed_logprobs, aggregate=aggregate)
        return {"truth_ratio_score": truth_ratio_score(r, split), "mean_truth_ratio": float(r.mean()),
                "truth_ratios": [float(v) for v in r]}
