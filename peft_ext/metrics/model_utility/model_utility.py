"""TOFU's model utility: the harmonic mean of probability, ROUGE-L and truth-ratio score on each evaluation set."""

import datasets
import evaluate

from peft_ext.unlearning import model_utility

_DESCRIPTION = """The harmonic mean of named metrics in [0, 1]: in TOFU the probability, ROUGE-L recall and truth-ratio
score (max(0, 1 - R)) on the retain, real-authors and world-facts sets (9 numbers); any zero gives zero. Names must be
distinct."""
_KWARGS_DESCRIPTION = """
Args:
    names (`list[str]`): e.g. "retain_probability", "world_rouge".
    values (`list[float]`): the metric values, each in [0, 1].
Returns:
    model_utility (`float`).
Example:
    >>> m = evaluate.load(peft_ext.metrics.metric_path("model_utility"))
    >>> m.compute(names=["a", "b"], values=[0.5, 1.0])["model_utility"]   # 2 / (2 + 1)
    0.6666666666666666
"""
_CITATION = """@article{maini2024tofu, title={TOFU: A Task of Fictitious Unlearning for LLMs},
author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
journal={arXiv:2401.06121}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ModelUtility(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"names": datasets.Value("string"), "values": datasets.Value("float64")}),
        )

    def _compute(self, names, values):
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"model_utility: names must be distinct, got {dup} more than once: pass each metric once")
        return {"model_utility": model_utility(dict(zip(names, values)))}
