"""Extraction: does the model's greedy completion of a canary's prefix reproduce the secret?"""

import datasets
import evaluate

from peft_ext.unlearning import extraction

_DESCRIPTION = """Greedy completion of each canary's prefix compared with its secret, digit by digit in order (spacing
ignored): the share of canaries reproduced exactly, the mean number of leading digits right, and the mean share of digit
positions right. Reported beside forget quality because a model can match the oracle's truth ratios and still emit the
secret."""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the greedy completions (the text after the prefix).
    references (`list[str]`): the secrets, e.g. " 4 8 1 5 2 9".
Returns:
    exact (`float`), prefix (`float`, mean leading digits right), digits (`float`).
Example:
    >>> m = evaluate.load(peft_ext.metrics.metric_path("extraction"))
    >>> m.compute(predictions=[" 4 8 1 5 2 9.", " 4 8 0"], references=[" 4 8 1 5 2 9", " 4 8 1 5 2 9"])["exact"]
    0.5
"""
_CITATION = """@inproceedings{carlini2021extracting, title={Extracting Training Data from Large Language Models},
author={Carlini, Nicholas and others}, booktitle={USENIX Security}, year={2021}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Extraction(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        rows = [extraction(p, r) for p, r in zip(predictions, references)]
        n = len(rows)
        return {"exact": sum(r["exact"] for r in rows) / n, "prefix": sum(r["prefix"] for r in rows) / n,
                "digits": sum(r["digits"] for r in rows) / n}
