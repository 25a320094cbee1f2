"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how far above random the secret ranks."""

import datasets
import evaluate

from peft_ext.unlearning import exposure_sampled, exposure_skewnorm

_DESCRIPTION = """Exposure = log2|R| - log2 rank(secret) within the secret's whole format R (|R| = 10^6 for six digits).
The rank is estimated from the scores (log-likelihood of the secret after the canary's prefix) of candidates drawn
uniformly from R: method="skewnorm" (default) fits a skew-normal to them and takes -log2 P(score >= secret's), Carlini
et al.'s extrapolation, which resolves beyond log2(#candidates); method="sampled" uses the share of candidates at or
above the secret (ties against it), which saturates near log2(#candidates). Both are capped at log2|R|; a secret the
model never saw scores ~1/ln 2 = 1.44 on average."""
_KWARGS_DESCRIPTION = """
Args:
    secret_score (`list[float]`): the secret's log-likelihood, per canary.
    candidate_scores (`list[list[float]]`): the sampled candidates' log-likelihoods, per canary.
    space (`list[int]`): |R|, per canary (e.g. 10**6).
    method (`str`): "skewnorm" (default) or "sampled".
Returns:
    exposure (`float`, mean over canaries), exposures (`list[float]`).
"""
_CITATION = """@inproceedings{carlini2019secret, title={The Secret Sharer: Evaluating and Testing Unintended Memorization
in Neural Networks}, author={Carlini, Nicholas and Liu, Chang and Erlingsson, {\\'U}lfar and Kos, Jernej and Song, Dawn},
booktitle={USENIX Security}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CanaryExposure(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"secret_score": datasets.Value("float64"),
                                        "candidate_scores": datasets.Sequence(datasets.Value("float64")),
                                        "space": datasets.Value("int64")}),
        )

    def _compute(self, secret_score, candidate_scores, space, method="skewnorm"):
        if method == "skewnorm":
            out = [exposure_skewnorm(s, c, int(n))["exposure"] for s, c, n in zip(secret_score, candidate_scores, space)]
        elif method == "sampled":
            out = [exposure_sampled(s, c, int(n)) for s, c, n in zip(secret_score, candidate_scores, space)]
        else:
            raise ValueError(f"canary_exposure: method must be 'skewnorm' or 'sampled', got {method!r}")
        return {"exposure": sum(out) / len(out), "exposures": out}
