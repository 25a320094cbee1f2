"""Answer perplexity: exp(total answer NLL / total answer tokens), token-weighted over question/answer pairs."""

import datasets
import evaluate

from peft_ext.unlearning import answer_perplexity

_DESCRIPTION = """Token-weighted perplexity of answers given their questions, from each answer's summed negative
log-likelihood in nats and its token count (e.g. recipes/tofu_data.answer_nll per pair). TOFU's fine-tuned models reach
~1.0-1.1 on the data they were trained on; a retain-only oracle ~8-12 on the forget set."""
_KWARGS_DESCRIPTION = """
Args:
    nll (`list[float]`): summed negative log-likelihood (nats) of each answer's tokens.
    tokens (`list[int]`): number of scored tokens of each answer.
Returns:
    perplexity (`float`): exp(sum(nll) / sum(tokens)).
Example:
    >>> m = evaluate.load(peft_ext.metrics.metric_path("answer_perplexity"))
    >>> m.compute(nll=[2.0, 4.0], tokens=[3, 3])["perplexity"]   # exp(1)
    2.718281828459045
"""
_CITATION = """@article{maini2024tofu, title={TOFU: A Task of Fictitious Unlearning for LLMs},
author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
journal={arXiv:2401.06121}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, tokens):
        return {"perplexity": answer_perplexity(nll, tokens)}
