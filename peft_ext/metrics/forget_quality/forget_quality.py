"""TOFU's forget quality: the KS-test p-value between an unlearned model's and the retain-only oracle's truth ratios."""

import datasets
import evaluate

from peft_ext.unlearning import ks_2samp

_DESCRIPTION = """The p-value of the two-sided two-sample Kolmogorov-Smirnov test between the per-question truth ratios
of the unlearned model and of the oracle trained without the forget set, both on the forget set (exact, as
scipy.stats.ks_2samp computes it for samples up to 10,000, but summed over first exits so p-values far below 1e-16 keep
their precision). 1 = indistinguishable from the oracle. Both models are scored on the same forget questions, so the two
columns are paired by question here (the test itself ignores the pairing); for samples of different sizes call
peft_ext.unlearning.forget_quality."""
_KWARGS_DESCRIPTION = """
Args:
    truth_ratios (`list[float]`): the unlearned model's truth ratio per forget question.
    oracle_truth_ratios (`list[float]`): the retain-only oracle's, on the same questions.
Returns:
    forget_quality (`float`): the KS p-value; ks_statistic (`float`): sup |F - G|.
Example:
    >>> m = evaluate.load(peft_ext.metrics.metric_path("forget_quality"))
    >>> m.compute(truth_ratios=[0.1, 0.2, 0.3], oracle_truth_ratios=[0.7, 0.8, 0.9])["forget_quality"]   # 2 / C(6, 3)
    0.1
"""
_CITATION = """@article{maini2024tofu, title={TOFU: A Task of Fictitious Unlearning for LLMs},
author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
journal={arXiv:2401.06121}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForgetQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"truth_ratios": datasets.Value("float64"),
                                        "oracle_truth_ratios": datasets.Value("float64")}),
        )

    def _compute(self, truth_ratios, oracle_truth_ratios):
        d, p = ks_2samp(truth_ratios, oracle_truth_ratios)
        return {"forget_quality": p, "ks_statistic": d}
