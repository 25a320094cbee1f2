"""Unlearning metrics as small pure functions: TOFU's (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for
LLMs") truth ratio, forget quality and model utility, answer perplexity, and canary exposure and extraction (Carlini
et al. 2019, "The Secret Sharer"). They take numbers a model produced (log-probabilities, token counts, generated
text), never a model; `peft_ext/metrics/<name>/` wraps each as an `evaluate` module.

Our reading of TOFU (paper section 2.5 and its reference code, which open-unlearning follows):
- Probability on the forget/retain sets: P(a|q)^(1/|a|), the length-normalised likelihood of the answer, averaged over
  questions. On real-world facts: that of the true answer divided by its sum with the perturbed answers' (the answer
  among options), averaged.
- Truth ratio of one question: R = mean over perturbed answers a' of P(a'|q)^(1/|a'|), divided by P(ã|q)^(1/|ã|) with
  ã the paraphrased answer (on real-world facts the answer itself). The paper writes the arithmetic mean; the reference
  code averages the per-token losses, i.e. takes the geometric mean of the normalised probabilities, and the published
  numbers (and the issue's anchors) come from that code: `aggregate="geometric"` is the default, "arithmetic" gives the
  paper's formula. Reported as mean(max(0, 1 - R)) on retain/real-world sets (higher = prefers the truth) and
  mean(min(R, 1/R)) on the forget set.
- Forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the per-question truth ratios of the
  unlearned model and of the retain-only oracle on the forget set (two-sided, exact, as scipy.stats.ks_2samp's default
  for samples up to 10,000). KS is invariant to a monotone map applied to both samples, so R or 1/R give one p-value.
- Model utility: the harmonic mean of probability, ROUGE-L recall and truth-ratio score on each of the retain,
  real-authors and world-facts sets (9 numbers in TOFU); any zero makes it zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np


def _floats(values, field: str, finite: bool = True) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{field} must be a sequence of numbers, got {values!r:.80}") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{field} must be a non-empty 1-D sequence of numbers, got shape {a.shape}")
    if finite and not np.isfinite(a).all():
        raise ValueError(f"{field} holds a non-finite value ({a[~np.isfinite(a)][0]!r}): pass finite numbers")
    return a


# ------------------------------------------------------------------------------------------------ likelihoods


def answer_perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float:
    """exp(sum nll / sum tokens): the token-weighted perplexity of answers, from each answer's summed negative
    log-likelihood (nats) and token count."""
    nll_a, tok_a = _floats(nll, "nll"), _floats(tokens, "tokens")
    if nll_a.shape != tok_a.shape:
        raise ValueError(f"nll and tokens must have one entry per answer, got {nll_a.size} and {tok_a.size}")
    if (tok_a < 1).any() or (tok_a != np.round(tok_a)).any():
        raise ValueError(f"tokens must be positive integers, got {tok_a[(tok_a < 1) | (tok_a != np.round(tok_a))][0]!r}")
    return math.exp(float(nll_a.sum() / tok_a.sum()))


def normalised_probability(logprob: Sequence[float]) -> np.ndarray:
    """P(a|q)^(1/|a|) per answer from its mean log-probability per token (log P(a|q) / |a|)."""
    return np.exp(_floats(logprob, "logprob"))


def option_probability(true_logprob: Sequence[float], option_logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """Per question, the true answer's normalised probability divided by its sum with every option's (TOFU's
    probability on real authors / world facts); inputs are mean log-probabilities per token."""
    t = _floats(true_logprob, "true_logprob")
    o = np.asarray(option_logprobs, dtype=np.float64)
    if o.ndim != 2 or o.shape[0] != t.size or o.shape[1] == 0:
        raise ValueError(f"option_logprobs must be one non-empty row of options per question ({t.size} questions), "
                         f"got shape {o.shape}")
    both = np.concatenate([t[:, None], o], axis=1)
    both = both - both.max(axis=1, keepdims=True)  # the ratio is shift-invariant; no underflow to 0/0
    p = np.exp(both)
    return p[:, 0] / p.sum(axis=1)


# ------------------------------------------------------------------------------------------------ truth ratio


def truth_ratio(paraphrased_logprob: Sequence[float], perturbed_logprobs: Sequence[Sequence[float]],
                aggregate: str = "geometric") -> np.ndarray:
    """R per question: (mean over perturbed a' of P(a'|q)^(1/|a'|)) / P(ã|q)^(1/|ã|), from mean log-probabilities per
    token; `aggregate` "geometric" (TOFU's code: the mean of the log-probabilities) or "arithmetic" (the paper)."""
    para = _floats(paraphrased_logprob, "paraphrased_logprob")
    pert = np.asarray(perturbed_logprobs, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != para.size or pert.shape[1] == 0:
        raise ValueError(f"perturbed_logprobs must be one non-empty row of perturbed answers per question "
                         f"({para.size} questions), got shape {pert.shape}")
    if not np.isfinite(pert).all():
        raise ValueError("perturbed_logprobs holds a non-finite value: pass finite log-probabilities")
    if aggregate == "geometric":
        mean_pert = pert.mean(axis=1)
    elif aggregate == "arithmetic":
        top = pert.max(axis=1)
        mean_pert = top + np.log(np.exp(pert - top[:, None]).mean(axis=1))
    else:
        raise ValueError(f"aggregate must be 'geometric' (TOFU's code) or 'arithmetic' (the paper), got {aggregate!r}")
    return np.exp(mean_pert - para)


def truth_ratio_score(ratios: Sequence[float], split: str) -> float:
    """TOFU's reported truth-ratio statistic: mean(min(R, 1/R)) on the forget set, mean(max(0, 1 - R)) elsewhere."""
    r = _floats(ratios, "ratios")
    if (r <= 0).any():
        raise ValueError(f"ratios must be positive (ratios of probabilities), got {r[r <= 0][0]!r}")
    if split == "forget":
        return float(np.minimum(r, 1 / r).mean())
    if split == "retain":
        return float(np.maximum(0.0, 1 - r).mean())
    raise ValueError(f"split must be 'forget' or 'retain' (retain, real authors, world facts), got {split!r}")


# ------------------------------------------------------------------------------------------------ forget quality


def ks_statistic(x: Sequence[float], y: Sequence[float]) -> float:
    """sup |F_x - F_y| of the two empirical CDFs (ties handled as scipy.stats.ks_2samp does)."""
    a, b = np.sort(_floats(x, "x")), np.sort(_floats(y, "y"))
    both = np.concatenate([a, b])
    diff = np.searchsorted(a, both, side="right") / a.size - np.searchsorted(b, both, side="right") / b.size
    return float(np.abs(diff).max())


def ks_pvalue_exact(n: int, m: int, d: float) -> float:
    """P(D >= d) for the two-sided two-sample KS statistic of samples of sizes n and m under the null (continuous
    data): the share of the C(n+m, n) monotone lattice paths from (0, 0) to (n, m) that touch a cell with
    |i/n - j/m| >= d. Computed as the probability that a uniformly random path first steps out, summed over the
    boundary (positive terms: p-values far below 1e-16 keep their relative precision, unlike 1 - P(inside)),
    anti-diagonal by anti-diagonal (O(n m) time, O(min(n, m)) memory)."""
    for field, v in (("n", n), ("m", m)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"ks_pvalue_exact: {field} must be a positive integer sample size, got {v!r}")
    g = math.gcd(n, m)
    h = int(round(d * (n // g) * m))  # d in units of 1/lcm(n, m), as scipy rounds it
    if h <= 0:
        return 1.0
    # cell (i, j) is outside when |i*m - j*n| / g >= h
    outside_total = 0.0
    prev = np.array([1.0])  # P(at (i, s - i) and never outside so far), i = lo..hi of the previous diagonal
    prev_lo = 0
    for s in range(1, n + m + 1):
        lo, hi = max(0, s - m), min(n, s)
        i = np.arange(lo, hi + 1)
        cur = np.zeros(i.size)
        # from (i - 1, s - i) by a step in n (probability (n - i + 1) / (n + m - s + 1)), and from (i, s - 1 - i)
        # by a step in m (probability (m - (s - 1 - i)) / (n + m - s + 1))
        left = n + m - s + 1
        k = i - 1 - prev_lo  # index of (i - 1) in prev
        ok = (k >= 0) & (k < prev.size)
        cur[ok] += prev[k[ok]] * (n - i[ok] + 1) / left
        k = i - prev_lo
        ok = (k >= 0) & (k < prev.size)
        cur[ok] += prev[k[ok]] * (m - (s - 1 - i[ok])) / left
        out = np.abs(i * m - (s - i) * n) // g >= h
        outside_total += float(cur[out].sum())
        cur[out] = 0.0
        prev, prev_lo = cur, lo
    return min(1.0, outside_total)


def ks_2samp(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(statistic, p-value) of the two-sided two-sample KS test, exact (scipy.stats.ks_2samp's method for samples up
    to 10,000; here at every size)."""
    d = ks_statistic(x, y)
    return d, ks_pvalue_exact(len(x), len(y), d)


def forget_quality(truth_ratios: Sequence[float], oracle_truth_ratios: Sequence[float]) -> float:
    """TOFU's forget quality: the KS p-value between the unlearned model's and the retain-only oracle's per-question
    truth ratios on the forget set (1: indistinguishable from the oracle; TOFU's fine-tuned Llama-2-7b: 4e-25)."""
    return ks_2samp(_floats(truth_ratios, "truth_ratios"), _floats(oracle_truth_ratios, "oracle_truth_ratios"))[1]


# ------------------------------------------------------------------------------------------------ utility


def _words(text: str) -> list[str]:
    # rouge_score's default tokenizer: lower case, anything but [a-z0-9] is a separator (no stemming here)
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: the longest common word subsequence over the reference's length in words (TOFU scores the
    generated answer against the true one this way; rouge_score's tokenisation, without its Porter stemmer)."""
    p, r = _words(prediction), _words(reference)
    if not r:
        raise ValueError(f"rouge_l_recall: reference={reference!r} has no words to recall")
    row = [0] * (len(p) + 1)
    for rw in r:
        diag = 0
        for j, pw in enumerate(p, 1):
            diag, row[j] = row[j], diag + 1 if rw == pw else max(row[j], row[j - 1])
    return row[-1] / len(r)


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum(1 / v) of non-negative numbers; 0 when any is 0 (as scipy.stats.hmean)."""
    v = _floats(values, "values")
    if (v < 0).any():
        raise ValueError(f"harmonic_mean: values must be >= 0, got {v[v < 0][0]!r}")
    if (v == 0).any():
        return 0.0
    return float(v.size / (1.0 / v).sum())


def model_utility(metrics: Mapping[str, float]) -> float:
    """TOFU's model utility: the harmonic mean of the named metrics (probability, ROUGE-L, truth-ratio score per
    evaluation set; each in [0, 1])."""
    if not metrics:
        raise ValueError("model_utility: metrics is empty; pass {name: value} for every set's probability, ROUGE and "
                         "truth-ratio score")
    for name, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"model_utility: metrics[{name!r}] must be a number in [0, 1], got {v!r}")
    return harmonic_mean([float(v) for v in metrics.values()])


# ------------------------------------------------------------------------------------------------ canaries


def exposure_from_rank(rank: float, space: float) -> float:
    """log2(space) - log2(rank) (Carlini et al.): 0 for the last of `space` candidates, log2(space) for the first."""
    if not 1 <= rank <= space:
        raise ValueError(f"exposure_from_rank: rank must be in [1, space={space}], got {rank!r}")
    return math.log2(space) - math.log2(rank)


def exposure_sampled(secret_score: float, candidate_scores: Sequence[float], space: int) -> float:
    """Exposure with the rank in the whole space estimated from uniformly sampled candidates: rank = 1 + (space - 1)
    * (share of candidates scoring >= the secret; ties count against it). Higher score = more likely. Resolves at
    most log2(space) - log2(1 + (space - 1) / n) bits from n candidates (~log2 n)."""
    c = _floats(candidate_scores, "candidate_scores")
    if not isinstance(space, int) or space <= c.size:
        raise ValueError(f"exposure_sampled: space must be an integer above the {c.size} sampled candidates (the "
                         f"size of the secret's format's whole set), got {space!r}")
    share = float((c >= secret_score).mean())
    return exposure_from_rank(1 + (space - 1) * share, space)


def exposure_skewnorm(secret_score: float, candidate_scores: Sequence[float], space: int) -> dict:
    """Carlini et al.'s extrapolated exposure: fit a skew-normal to the sampled candidates' scores (maximum
    likelihood, scipy) and take -log2 P(score >= secret's) under it, capped at log2(space) (the secret is at best
    first). Unlike the sampled rank it resolves beyond log2(n candidates), at the price of the fit's error: from 2000
    samples of a known skew-normal, a 16-bit secret came out within 0.6 bit (shape 0) and within 2.5 bits (shape -4,
    a short upper tail), 5 draws each. Returns the exposure, the fitted (shape, loc, scale) and the share of samples
    at or above the secret for comparison."""
    from scipy.stats import skewnorm

    c = _floats(candidate_scores, "candidate_scores")
    if c.size < 20:
        raise ValueError(f"exposure_skewnorm: candidate_scores has {c.size} scores; a skew-normal fit needs >= 20 "
                         "(Carlini et al. use thousands): sample more candidates")
    if not isinstance(space, int) or space < 2:
        raise ValueError(f"exposure_skewnorm: space must be an integer >= 2, got {space!r}")
    if float(c.std()) == 0.0:  # a model indifferent to the secret: every candidate ties
        tail = 1.0 if secret_score <= c[0] else 0.0
    else:
        shape, loc, scale = skewnorm.fit(c)
        tail = float(skewnorm.sf(secret_score, shape, loc, scale))
    cap = math.log2(space)
    bits = cap if tail <= 0 else min(cap, -math.log2(tail))
    fit = {} if float(c.std()) == 0.0 else {"shape": float(shape), "loc": float(loc), "scale": float(scale)}
    return {"exposure": bits, "fit": fit, "sampled_share": float((c >= secret_score).mean())}


_DIGITS = re.compile(r"\d")


def extraction(completion: str, secret: str) -> dict:
    """Whether a greedy completion after the canary's prefix reproduces the secret: the secret's digits compared in
    order with the first digits of the completion (spacing ignored). `exact`: all of them; `prefix`: how many
    leading digits agree; `digits`: the share of positions that agree."""
    want = _DIGITS.findall(secret)
    if not want:
        raise ValueError(f"extraction: secret={secret!r} holds no digits; pass the canary's digit string")
    got = _DIGITS.findall(completion)[: len(want)]
    agree = [i < len(got) and got[i] == w for i, w in enumerate(want)]
    prefix = next((i for i, a in enumerate(agree) if not a), len(want))
    return {"exact": all(agree), "prefix": prefix, "digits": sum(agree) / len(want)}


# ------------------------------------------------------------------------------------------------ unlearning losses
# The baselines an unlearning method must beat (gradient ascent, GradDiff, NPO, task-vector negation), as pure functions
# of numbers a model produced (torch tensors, so that they carry gradients) or of state dicts.


def _seq_tensor(values, field: str):
    import torch

    t = values if torch.is_tensor(values) else torch.as_tensor(values, dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{field} must be a non-empty 1-D tensor (one value per sequence), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{field} must hold floating-point log-probabilities, got dtype {t.dtype}")
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"{field} holds a non-finite value: pass finite log-probabilities")
    return t


def npo_loss(policy_logp, reference_logp, beta: float):
    """Negative Preference Optimization (Zhang et al. 2024): (2 / beta) * mean softplus(beta * (logp_theta -
    logp_ref)) over forget sequences, with each sequence's log-probability summed over its answer tokens.

    It equals (2 / beta) log 2 where the model still matches the reference; as beta -> 0 its gradient tends to that of
    mean(logp_theta), i.e. gradient ascent on the forget NLL, while for beta > 0 a sequence that is already unlikely
    (logp_theta << logp_ref) stops pushing (its weight sigmoid(beta * (logp_theta - logp_ref)) -> 0): NPO's point."""
    import torch.nn.functional as F

    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"npo_loss: beta must be a finite number > 0 (NPO uses 0.1), got {beta!r}")
    pol = _seq_tensor(policy_logp, "policy_logp")
    ref = _seq_tensor(reference_logp, "reference_logp").detach().to(pol.device, pol.dtype)
    if pol.shape != ref.shape:
        raise ValueError(f"npo_loss: policy_logp and reference_logp need one value per sequence each, got "
                         f"{pol.numel()} and {ref.numel()}")
    return (2.0 / beta) * F.softplus(beta * (pol - ref)).mean()


def grad_diff_loss(forget_nll, retain_nll, retain_weight: float = 1.0):
    """GradDiff (Liu et al. 2022; TOFU's "grad_diff"): -forget_nll + retain_weight * retain_nll; minimising it ascends
    the forget loss and descends the retain loss. retain_weight 0 is plain gradient ascent."""
    if isinstance(retain_weight, bool) or not isinstance(retain_weight, (int, float)) \
            or not math.isfinite(retain_weight) or retain_weight < 0:
        raise ValueError(f"grad_diff_loss: retain_weight must be a finite number >= 0 (1: TOFU's), got {retain_weight!r}")
    for field, v in (("forget_nll", forget_nll), ("retain_nll", retain_nll)):
        if isinstance(v, bool) or not (hasattr(v, "shape") or isinstance(v, (int, float))) \
                or (hasattr(v, "shape") and tuple(v.shape) != ()):
            raise ValueError(f"grad_diff_loss: {field} must be a scalar loss (a 0-d tensor or a number), got {v!r:.80}")
    return -forget_nll + retain_weight * retain_nll


def task_vector_negation(finetuned: Mapping, forget_finetuned: Mapping, base: Mapping | None = None,
                         lam: float = 1.0) -> dict:
    """Task-vector negation (Ilharco et al. 2023, "Editing models with task arithmetic"), over state dicts:
    W - lam * dW_forget for every floating-point tensor, where dW_forget = forget_finetuned - (base if given, else
    finetuned), i.e. by default the delta of the model fine-tuned further on the forget set only (the unlearning
    baselines' use). Tensors that are not floating point, and keys only in `finetuned`, are returned unchanged;
    every key of forget_finetuned (and base) must be in finetuned with the same shape."""
    import torch

    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"task_vector_negation: lam must be a finite number (the scale of the negated delta), got {lam!r}")
    ref = finetuned if base is None else base
    for field, sd in (("forget_finetuned", forget_finetuned), ("base", ref)):
        missing = [k for k in sd if k not in finetuned]
        if missing:
            raise ValueError(f"task_vector_negation: {field} has keys finetuned lacks ({missing[:3]}): pass state dicts "
                             "of the same architecture")
        bad = [k for k in sd if tuple(sd[k].shape) != tuple(finetuned[k].shape)]
        if bad:
            raise ValueError(f"task_vector_negation: {field}[{bad[0]!r}] has shape {tuple(sd[bad[0]].shape)}, "
                             f"finetuned's is {tuple(finetuned[bad[0]].shape)}: pass state dicts of one architecture")
    out = {}
    for k, w in finetuned.items():
        if k in forget_finetuned and torch.is_floating_point(w) and (base is None or k in ref):
            delta = forget_finetuned[k].to(w.device, torch.float64) - ref[k].to(w.device, torch.float64)
            out[k] = (w.double() - lam * delta).to(w.dtype)
        else:
            out[k] = w
    return out
