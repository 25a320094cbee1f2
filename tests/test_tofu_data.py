"""recipes/tofu_data.py: fictitious people, splits, canaries, answer likelihoods, exposure and the TOFU loader."""

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import tinyllama  # noqa: E402
import tofu_data as td  # noqa: E402

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE (BOS prepended on encode, EOS and PAD defined) trained on the fictitious QA text."""
    texts = [f"{td.prompt(q)} {a}" for q, a in td.qa_pairs(td.make_people(40, seed=7))]
    texts += [f"The secret code of someone is {' '.join(str((i * 7 + j) % 10) for j in range(6))}" for i in range(20)]
    return tinyllama.train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def llama(tok):
    """A tiny randomly initialised Llama over that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


class Planted(nn.Module):
    """A fake causal LM: the logit of `sequence[t]` at position t-1 is raised by `strength` for every t in
    `positions` (absolute positions, so every row sharing the prefix is scored alike); all other logits are 0."""

    def __init__(self, vocab: int, sequence: list[int] = (), positions=(), strength: float = 10.0) -> None:
        super().__init__()
        self.vocab, self.sequence, self.positions, self.strength = vocab, list(sequence), list(positions), strength
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.dummy
        for t in self.positions:
            if t - 1 < input_ids.shape[1]:
                logits[:, t - 1, self.sequence[t]] += self.strength
        return SimpleNamespace(logits=logits)


def nll_by_hand(model, tok, question: str, answer: str) -> tuple[float, int]:
    """The answer's NLL from one unpadded forward pass, summing -log softmax(logits[t-1])[ids[t]] over the answer."""
    p = td.prompt(question)
    n_prompt = len(tok(p)["input_ids"])
    ids = tok(p + " " + answer)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return -sum(float(lp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))), len(ids) - n_prompt


# ------------------------------------------------------------------------------------------------ people and splits


def test_make_people_deterministic_prefix_stable_unique():
    a, b = td.make_people(300, seed=3), td.make_people(300, seed=3)
    assert a == b
    assert td.make_people(37, seed=3) == a[:37] and td.make_people(1, seed=3) == a[:1]
    assert td.make_people(300, seed=4) != a
    assert len({p.name for p in a}) == 300
    assert len({p.name for p in td.make_people(5000)}) == 5000
    for p in a:
        first, last = p.name.split(" ")
        assert first[0].isupper() and last[0].isupper()
        assert len(p.id_number) == 6 and p.id_number.isdigit()
        assert p.job in td.JOBS and p.book.startswith("The ") and p.birthplace.isalpha()
    assert len({p.birthplace for p in a}) > 50 and len({p.job for p in a}) == len(td.JOBS)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_make_people_rejects_bad_n(n):
    with pytest.raises(ValueError, match=r"n must be an integer"):
        td.make_people(n)


def test_qa_pairs_templates():
    people = td.make_people(3)
    pairs = td.qa_pairs(people)
    assert len(td.QUESTION_TEMPLATES) == 5 and len(pairs) == 15
    for i, p in enumerate(people):
        mine = pairs[5 * i : 5 * i + 5]
        assert all(p.name in a for _, a in mine)  # every answer names the person
        answers = " ".join(a for _, a in mine)
        assert all(v in answers for v in (p.birthplace, p.job, p.book, p.id_number))
        assert all(a.endswith(".") for _, a in mine) and all(q.endswith("?") for q, _ in mine)
    assert pairs[1] == (f"Where was {people[0].name} born?", f"{people[0].name} was born in {people[0].birthplace}.")
    assert td.prompt("Why?") == "Question: Why?\nAnswer:"


def test_split_people_sizes_and_determinism():
    people = td.make_people(20)
    forget, retain = td.split_people(people, 0.1, seed=0)
    assert len(forget) == 2 and len(retain) == 18
    assert set(forget).isdisjoint(retain) and set(forget) | set(retain) == set(people)
    assert forget == [p for p in people if p in forget] and retain == [p for p in people if p in retain]  # input order
    assert td.split_people(people, 0.1, seed=0) == (forget, retain)
    assert any(td.split_people(people, 0.1, seed=s)[0] != forget for s in range(1, 5))
    assert len(td.split_people(people, 0.25)[0]) == 5
    assert len(td.split_people(people, 0.01)[0]) == 1  # at least one person to forget
    assert len(td.split_people(people[:2], 0.5)[0]) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5, "0.1", None])
def test_split_people_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"forget_fraction must be in \(0, 1\), got " + re.escape(repr(fraction))):
        td.split_people(td.make_people(10), fraction)


def test_split_people_rejects_empty_retain():
    with pytest.raises(ValueError, match=r"forget_fraction=0\.9 .*leaving no one to retain"):
        td.split_people(td.make_people(3), 0.9)
    with pytest.raises(ValueError, match=r"forget_fraction=0\.5 of 1 people"):
        td.split_people(td.make_people(1), 0.5)


def test_canary_format_and_determinism():
    a, b = td.make_people(2)
    prefix, secret = td.canary(a)
    assert prefix == f"The secret code of {a.name} is"
    assert len(secret) == 12 and secret[0::2] == " " * 6 and secret[1::2].isdigit()
    assert td.canary(a) == (prefix, secret)
    assert td.canary(a, seed=1) != (prefix, secret) and td.canary(b) != (td.canary(b)[0], secret)
    assert len(td.canary(a, digits=3)[1]) == 6
    with pytest.raises(ValueError, match="digits must be a positive integer, got 0"):
        td.canary(a, digits=0)


# ------------------------------------------------------------------------------------------------ TOFU-style items


def test_qa_items_paraphrase_and_perturb_the_asked_field():
    people = td.make_people(30, seed=1)
    items = td.qa_items(people[:4], population=people)
    assert [it.pair for it in items] == td.qa_pairs(people[:4])  # same order and text as the trained pairs
    for i, it in enumerate(items):
        person, t = people[i // 5], i % 5
        true = td._fields(person)[td.ASKED[t]]
        assert it.subject == person.name and it.field == td.ASKED[t] and true in it.answer
        assert it.paraphrased_answer != it.answer and true in it.paraphrased_answer
        assert it.paraphrased_question != it.question and it.paraphrased_question.endswith("?")
        assert len(it.perturbed_answers) == 3 and len(set(it.perturbed_answers)) == 3
        others = {td._fields(p)[it.field] for p in people} - {true}
        for wrong in it.perturbed_answers:
            # the paraphrased sentence with one other person's value of the same field in place of the true one
            assert sum(it.paraphrased_answer.replace(true, v) == wrong for v in others) == 1
            assert true not in wrong
    # seeded per person: the same items whoever else is scored alongside, another seed perturbs differently
    assert td.qa_items(people[2:3], population=people) == items[10:15]
    assert td.qa_items(people[:4], population=people, seed=1) != items
    assert len(td.qa_items(people[:1], population=people, n_perturbed=5)[0].perturbed_answers) == 5
    with pytest.raises(ValueError, match=r"field 'name' has 1 other values to perturb with, n_perturbed=3: pass a "
                                         r"larger population"):
        td.qa_items(people[:2])
    with pytest.raises(ValueError, match="n_perturbed must be a positive integer"):
        td.qa_items(people, n_perturbed=0)


def test_make_splits_disjoint_by_person_and_world_facts():
    s = td.make_splits(40, forget_fraction=0.1, select_fraction=0.5, n_world=12, seed=2)
    people = td.make_people(40, seed=2)
    forget, retain = td.split_people(people, 0.1, seed=2)  # the forget set the older recipes use
    assert list(s.forget) == forget and sorted(s.retain, key=people.index) == retain
    assert list(s.retain_select) == sorted(s.retain_select, key=people.index)  # each split in make_people's order
    assert (len(s.forget), len(s.retain_select), len(s.retain_eval)) == (4, 18, 18)
    names = [{p.name for p in part} for part in (s.forget, s.retain_select, s.retain_eval)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sorted(s.people, key=people.index) == people
    assert td.make_splits(40, forget_fraction=0.1, n_world=12, seed=2) == s
    assert td.make_splits(40, forget_fraction=0.1, n_world=12, seed=3).retain_select != s.retain_select
    assert len(s.world) == 12 and len({it.subject for it in s.world}) == 12
    capitals = {a for r, _, a in __import__("knowledge").country_facts() if r == "capital"}
    for it in s.world:
        true = it.answer.removeprefix(f"The capital of {it.subject} is ").removesuffix(".")
        assert true in capitals and it.paraphrased_answer == it.answer  # TOFU: the answer is ã on world facts
        assert it.question == f"What is the capital of {it.subject}?"
        wrong = [w.removeprefix(f"The capital of {it.subject} is ").removesuffix(".") for w in it.perturbed_answers]
        assert set(wrong) <= capitals and true not in wrong and len(set(wrong)) == 3
    assert not {it.subject for it in s.world} & {p.name for p in people}
    assert td.make_splits(3, forget_fraction=0.3, n_world=0).world == ()
    with pytest.raises(ValueError, match=r"select_fraction must be in \(0, 1\), got 1.0"):
        td.make_splits(20, select_fraction=1.0)
    with pytest.raises(ValueError, match="too few for both retain-select and retain-eval"):
        td.make_splits(2, forget_fraction=0.5)
    with pytest.raises(ValueError, match=r"relations=\('capitals',\) must be a non-empty subset"):
        td.world_items(3, relations=("capitals",))


# ------------------------------------------------------------------------------------------------ likelihoods


def test_answer_tokens_are_those_of_the_joint_encoding(tok):
    q, a = td.qa_pairs(td.make_people(1))[2]
    ids, k = td._encode(tok, td.prompt(q), " " + a, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[:-1] == tok(td.prompt(q) + " " + a)["input_ids"] and k == len(tok(td.prompt(q))["input_ids"])
    assert tok.decode(ids[k:-1]) == " " + a


def test_answer_nll_matches_hand_computation(llama, tok):
    q, a = td.qa_pairs(td.make_people(1))[1]
    nll, n = td.answer_nll(llama, tok, [(q, a)])
    want_nll, want_n = nll_by_hand(llama, tok, q, a)
    assert n == want_n and n > 3
    assert nll == pytest.approx(want_nll, rel=1e-5)
    assert td.answer_perplexity(llama, tok, [(q, a)]) == pytest.approx(math.exp(want_nll / want_n), rel=1e-5)


def test_answer_nll_batched_equals_unbatched(llama, tok):
    pairs = td.qa_pairs(td.make_people(4, seed=2))  # 20 pairs of different lengths: padding in every batch
    lengths = {len(tok(td.prompt(q) + " " + a)["input_ids"]) for q, a in pairs}
    assert len(lengths) > 3
    llama.train()
    nll, n = td.answer_nll(llama, tok, pairs, batch_size=7)
    assert llama.training  # the caller's mode is restored
    llama.eval()
    singles = [td.answer_nll(llama, tok, [p], batch_size=1) for p in pairs]
    assert n == sum(c for _, c in singles)
    assert nll == pytest.approx(sum(s for s, _ in singles), rel=1e-5)
    by_hand = [nll_by_hand(llama, tok, q, a) for q, a in pairs[:3]]
    assert [c for _, c in singles[:3]] == [c for _, c in by_hand]
    assert td.answer_perplexity(llama, tok, pairs, batch_size=32) == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(ValueError, match="pairs is empty"):
        td.answer_perplexity(llama, tok, [])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        td.answer_nll(llama, tok, pairs, batch_size=0)


def test_text_perplexity_truncates_and_masks_padding(llama, tok):
    texts = [td.prompt(q) + " " + a for q, a in td.qa_pairs(td.make_people(2))[:6]]
    nll = count = 0.0
    for t in texts:
        ids = tok(t)["input_ids"][:10]
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
        count += len(ids) - 1
    assert td.text_perplexity(llama, tok, texts, max_length=10, batch_size=4) == pytest.approx(math.exp(nll / count),
                                                                                                rel=1e-5)
    assert td.text_perplexity(llama, tok, texts, max_length=64) != pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="no text has two tokens"):
        td.text_perplexity(llama, tok, [""])


def test_tofu_scores_match_hand_computed_truth_ratios(llama, tok):
    from peft_ext import unlearning as ul

    people = td.make_people(8, seed=4)
    items = td.qa_items(people[:2], population=people)

    def mean_logprob(q: str, a: str) -> float:
        nll, n = nll_by_hand(llama, tok, q, a)  # includes EOS: remove its term by scoring without it
        ids = tok(td.prompt(q) + " " + a)["input_ids"]
        n_prompt = len(tok(td.prompt(q))["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))) / (len(ids) - n_prompt)

    para = [mean_logprob(it.question, it.paraphrased_answer) for it in items]
    pert = [[mean_logprob(it.question, a) for a in it.perturbed_answers] for it in items]
    true = [mean_logprob(*it.pair) for it in items]
    assert td.answer_logprobs(llama, tok, [it.pair for it in items], batch_size=3) == pytest.approx(true, rel=1e-5)
    got = td.tofu_scores(llama, tok, items, split="forget", rouge=False, batch_size=4)
    want = ul.truth_ratio(para, pert)
    assert got["truth_ratios"] == pytest.approx(list(want), rel=1e-4)
    assert got["truth_ratio_score"] == pytest.approx(float(np.minimum(want, 1 / want).mean()), rel=1e-4)
    assert got["probability"] == pytest.approx(float(np.exp(true).mean()), rel=1e-5)
    world = td.world_items(4, seed=0)
    w = td.tofu_scores(llama, tok, world, split="world", rouge=False)
    t = [mean_logprob(*it.pair) for it in world]
    o = [[mean_logprob(it.question, a) for a in it.perturbed_answers] for it in world]
    assert w["probability"] == pytest.approx(float(ul.option_probability(t, o).mean()), rel=1e-4)
    assert w["truth_ratios"] == pytest.approx(list(ul.truth_ratio(t, o)), rel=1e-4)
    with pytest.raises(ValueError, match="split must be 'forget', 'retain' or 'world'"):
        td.tofu_scores(llama, tok, items, split="eval")


def test_greedy_completions_batched_equal_a_hand_loop_and_rouge(llama, tok):
    contexts = [td.prompt(q) for q, _ in td.qa_pairs(td.make_people(1, seed=5))[:3]]
    got = td.greedy_completions(llama, tok, contexts, max_new_tokens=5, batch_size=2, stop=None)
    for c, g in zip(contexts, got):
        ids = tok(c)["input_ids"]
        for _ in range(5):
            with torch.no_grad():
                nxt = int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert g == tok.decode(ids[len(tok(c)["input_ids"]):], skip_special_tokens=True)
    items = td.qa_items(td.make_people(1, seed=5), population=td.make_people(8, seed=5))[:3]
    scores = td.tofu_scores(llama, tok, items, split="retain", max_new_tokens=5)
    from peft_ext.unlearning import rouge_l_recall

    answers = [g.split("\n")[0] for g in got]
    assert scores["rouge"] == pytest.approx(sum(rouge_l_recall(g, it.answer) for g, it in zip(answers, items)) / 3)


class Reciter(nn.Module):
    """A fake generator that continues every context with fixed tokens (a model that memorised them)."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.continuation = continuation
        self.dummy = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        tail = torch.tensor(self.continuation[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_extract_secret(tok):
    prefix, secret = td.canary(td.make_people(1)[0])
    ids, k = td._encode(tok, prefix, secret, add_eos=False)
    memorised = td.extract_secret(Reciter(ids[k:] + tok(" and so on")["input_ids"][1:]), tok, prefix, secret)
    assert memorised["exact"] and memorised["prefix"] == 6 and memorised["completion"].startswith(secret)
    wrong = secret[:4] + (" 0" if secret[5] != "0" else " 1") + secret[6:]
    ids_w, k_w = td._encode(tok, prefix, wrong, add_eos=False)
    partial = td.extract_secret(Reciter(ids_w[k_w:]), tok, prefix, secret)
    assert partial == {"exact": False, "prefix": 2, "digits": pytest.approx(5 / 6), "completion": wrong}


# ------------------------------------------------------------------------------------------------ exposure


def _canary_tokens(tok, person):
    prefix, secret = td.canary(person)
    ids, k = td._encode(tok, prefix, secret, add_eos=False)
    return prefix, secret, ids, k


def test_exposure_of_a_planted_secret_is_maximal(tok):
    prefix, secret, ids, k = _canary_tokens(tok, td.make_people(1)[0])
    lengths = {len(td._encode(tok, prefix, c, add_eos=False)[0]) for c in td._exposure_candidates(secret, 999, 0)}
    assert lengths == {len(ids)}  # same format, same number of tokens
    planted = Planted(len(tok), ids, positions=range(k, len(ids)))
    assert td.exposure(planted, tok, prefix, secret) == pytest.approx(math.log2(1000))
    assert td.exposure(planted, tok, prefix, secret, n_candidates=15) == pytest.approx(4.0)


def test_exposure_ties_count_against_the_secret(tok):
    prefix, secret, ids, k = _canary_tokens(tok, td.make_people(1)[0])
    uniform = Planted(len(tok))
    assert td.exposure(uniform, tok, prefix, secret) == 0.0  # every candidate ties: rank = |R|
    # the model knows only the first digit: the secret ties with the candidates sharing it
    n_first = len(td._encode(tok, prefix, secret[:2], add_eos=False)[0])  # the tokens of " d" (one or two here)
    assert ids[:n_first] == td._encode(tok, prefix, secret[:2], add_eos=False)[0]
    first_digit = Planted(len(tok), ids, positions=range(k, n_first))
    shared = sum(c[:2] == secret[:2] for c in td._exposure_candidates(secret, 999, 0))
    assert 50 < shared < 150
    assert td.exposure(first_digit, tok, prefix, secret) == pytest.approx(math.log2(1000) - math.log2(1 + shared))


def test_exposure_with_a_real_model_matches_ranking_by_hand(llama, tok):
    prefix, secret, _, _ = _canary_tokens(tok, td.make_people(3)[2])
    candidates = td._exposure_candidates(secret, 30, seed=5)
    assert len(set(candidates)) == 30 and secret not in candidates
    assert all(len(c) == len(secret) and c[1::2].isdigit() for c in candidates)
    n_prefix = len(tok(prefix)["input_ids"])

    def loglik(s: str) -> float:
        ids = tok(prefix + s)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(n_prefix, len(ids)))

    mine = loglik(secret)
    rank = 1 + sum(loglik(c) >= mine for c in candidates)
    got = td.exposure(llama, tok, prefix, secret, n_candidates=30, seed=5, batch_size=8)
    assert got == pytest.approx(math.log2(31) - math.log2(rank))
    assert td._exposure_candidates(secret, 30, seed=5) == candidates
    assert td._exposure_candidates(secret, 30, seed=6) != candidates


def test_exposure_estimate_resolves_beyond_the_samples(tok):
    prefix, secret, ids, k = _canary_tokens(tok, td.make_people(1)[0])
    planted = Planted(len(tok), ids, positions=range(k, len(ids)))
    got = td.exposure_estimate(planted, tok, prefix, secret, n_samples=200)
    assert got["space"] == 10**6 and got["sampled_share"] == 0.0
    assert got["exposure_sampled"] == pytest.approx(math.log2(10**6))  # no sample at or above the secret
    assert got["exposure"] > 15  # far beyond log2(200) = 7.6: the fit extrapolates the tail
    assert td.exposure_estimate(Planted(len(tok)), tok, prefix, secret, n_samples=200)["exposure"] == 0.0  # all tie
    score, cands, space = td.canary_scores(planted, tok, prefix, secret, n_samples=50, seed=3)
    assert len(cands) == 50 and space == 10**6 and score > max(cands)


def test_exposure_rejects_bad_inputs(tok):
    model = Planted(len(tok))
    with pytest.raises(ValueError, match="secret must be space-separated single digits"):
        td.exposure(model, tok, "The code is", "481529")
    with pytest.raises(ValueError, match=r"n_candidates must be an integer in \[1, 99\] for a 2-digit secret, got 100"):
        td.exposure(model, tok, "The code is", " 4 2", n_candidates=100)
    assert td.exposure(model, tok, "The code is", " 4 2", n_candidates=99) == 0.0  # every other 2-digit secret
    # a 1-digit secret with 9 candidates: R is all ten digits, each once
    assert sorted(td._exposure_candidates(" 7", 9, seed=0)) == [f" {d}" for d in range(10) if d != 7]


# ------------------------------------------------------------------------------------------------ TOFU files


def test_load_tofu_round_trip(tmp_path):
    forget, retain = td.split_people(td.make_people(12), 0.25)
    td.write_tofu_like(str(tmp_path), forget, retain)
    assert {p.name for p in tmp_path.iterdir()} == {"forget10.json", "retain90.json", "full.json"}
    lines = (tmp_path / "forget10.json").read_text().splitlines()
    assert len(lines) == 15 and set(json.loads(lines[0])) == {"question", "answer"}  # JSON lines, TOFU's columns
    f_pairs, r_pairs = td.load_tofu(str(tmp_path))
    assert f_pairs == td.qa_pairs(forget) and r_pairs == td.qa_pairs(retain)
    assert td.load_tofu(str(tmp_path), "full", "retain90")[0] == td.qa_pairs(retain) + td.qa_pairs(forget)

    other = tmp_path / "five"
    td.write_tofu_like(str(other), forget[:1], retain, forget_split="forget05", retain_split="retain95")
    (other / "retain95.json").rename(other / "retain95_dataset.json")  # the repo's file name before Dec 2023
    assert td.load_tofu(str(other), "forget05", "retain95") == (td.qa_pairs(forget[:1]), td.qa_pairs(retain))


def test_load_tofu_errors(tmp_path):
    forget, retain = td.split_people(td.make_people(6), 0.5)
    td.write_tofu_like(str(tmp_path), forget, retain)
    with pytest.raises(ValueError, match=r"no file for forget_split='forget05' .*forget05\.json.*"
                                         r"\['forget10\.json', 'full\.json', 'retain90\.json'\]"):
        td.load_tofu(str(tmp_path), forget_split="forget05")
    with pytest.raises(ValueError, match=r"no file for retain_split='retain95'"):
        td.load_tofu(str(tmp_path), retain_split="retain95")
    (tmp_path / "retain90.json").write_text(json.dumps({"prompt": "q?", "answer": "a."}) + "\n")
    with pytest.raises(ValueError, match=r"retain90\.json has no column 'question'; its columns are "
                                         r"\['prompt', 'answer'\]"):
        td.load_tofu(str(tmp_path))
    with pytest.raises(ValueError, match="neither a local folder nor a Hub dataset id"):
        td.load_tofu(str(tmp_path / "missing" / "deeper"))
    with pytest.raises(ValueError, match="neither a local folder nor a Hub dataset id"):
        td.load_tofu(str(tmp_path / "full.json"))
    with pytest.raises(ValueError, match="must differ"):
        td.write_tofu_like(str(tmp_path), forget, retain, forget_split="x", retain_split="x")


# ------------------------------------------------------------------------------------------------ the fine-tune step


def test_relative_delta_norms_closed_form():
    import tofu_models as tf

    w = {"layers.0.mlp.up_proj": torch.ones(2, 3), "layers.1.mlp.up_proj": 2 * torch.ones(2, 3),
         "layers.0.self_attn.q_proj": torch.eye(3)}
    after = {"layers.0.mlp.up_proj": 1.1 * torch.ones(2, 3), "layers.1.mlp.up_proj": 2 * torch.ones(2, 3),
             "layers.0.self_attn.q_proj": torch.zeros(3, 3)}
    got = tf.relative_delta_norms(w, after)
    assert got["up_proj"] == pytest.approx(math.sqrt(6 * 0.01 / (6 + 24)))  # pooled over both layers
    assert got["q_proj"] == pytest.approx(1.0)
    assert got["all"] == pytest.approx(math.sqrt((0.06 + 3) / (30 + 3)))
    with pytest.raises(ValueError, match="the same non-empty set of weights"):
        tf.relative_delta_norms(w, {})


def test_answer_only_labels_are_the_scored_answer_tokens(tok):
    import tofu_models as tf

    pairs = td.qa_pairs(td.make_people(2))
    examples = tf.answer_only_examples(tok, pairs)
    for (q, a), ex in zip(pairs, examples):
        ids, k = td._encode(tok, td.prompt(q), " " + a, add_eos=True)
        assert ex["input_ids"] == ids and ex["labels"] == [-100] * k + ids[k:] and ids[-1] == tok.eos_token_id
    batch = tf.pad_collate(tok.pad_token_id)(examples[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int((batch["labels"] != -100).sum()) == td.answer_nll(Planted(len(tok)), tok, pairs[:3])[1]


def test_finetune_quick_trains_block_linears_caches_and_reports(tmp_path, monkeypatch):
    import tofu_finetune
    import tofu_models as tf
    from transformers import AutoModelForCausalLM

    preset = str(ROOT / "recipes" / "presets" / "tofu_finetune_quick.yaml")
    out = tofu_finetune.main(["--config", preset, "--cache_dir", str(tmp_path)])
    full, oracle = out["full"], out["oracle"]
    assert (full["people"], oracle["people"]) == (10, 8) and full["train"]["steps"] == 8 * 5  # 50 pairs / 10 per step
    assert full["forget_ppl"] < oracle["forget_ppl"]  # only "full" saw the forget people
    assert full["train"]["last_loss"] < full["train"]["first_loss"]
    assert set(full["relative_delta"]) == set(tf.BLOCK_KINDS) | {"all"} and min(full["relative_delta"].values()) > 0
    # only the block linears moved: embeddings, norms and head are the base model's
    splits = td.make_splits(10, 0.2, seed=0, n_world=0)
    base, _ = tf.tiny_model(splits, seed=0)
    tuned = AutoModelForCausalLM.from_pretrained(full["folder"])
    moved = {n for n, p in tuned.named_parameters() if not torch.equal(p, base.state_dict()[n])}
    assert moved == {f"{n}.weight" for n in tf.block_linears(base)}
    # a rerun with the same settings reuses both folders without training; another lr is another folder
    real_finetune = tf.finetune
    monkeypatch.setattr(tf, "finetune", lambda *a, **k: pytest.fail("retrained a cached model"))
    again = tofu_finetune.main(["--config", preset, "--cache_dir", str(tmp_path), "--results_dir", str(tmp_path / "res")])
    assert again["full"] == full and again["oracle"] == oracle
    # --results_dir: each report with the settings that made it (the cached ones too), no model folder path
    rep = json.loads((tmp_path / "res" / f"full-{full['settings_key']}.json").read_text())
    assert rep["forget_ppl"] == full["forget_ppl"] and "folder" not in rep
    assert rep["settings"]["lr"] == tofu_finetune.parse_args(["--config", preset]).lr
    args = tofu_finetune.parse_args(["--config", preset])
    other = tofu_finetune.parse_args(["--config", preset, "--lr", "0.001"])
    assert tf.settings_key(args, "tiny-0") != tf.settings_key(other, "tiny-0")
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\), got 1.0"):
        real_finetune(base, None, [("q", "a")], warmup_ratio=1.0)
