"""The Monte-Carlo ELBO (llada_xp/likelihood.py) against a slow implementation written here from the paper's formula
(same draws), against the exact expectation (unbiasedness), on the demo model (right answers rank first), and its
promises: seeded, order-independent, inputs checked, the greedy check equal to the sampler's one-token-per-step
decode."""

import math
import random
import statistics
import string
import time
from fractions import Fraction
from itertools import combinations

import pytest
import torch

from llada_xp.config import ModelConfig, SamplerConfig
from llada_xp.demo import task
from llada_xp.likelihood import ELBO, is_greedy, log_likelihood, log_likelihoods, mask_counts
from llada_xp.loading import load_model
from llada_xp.sampler import Request, Sampler, SpecialIds
from tests import tiny


def ids_of(m) -> SpecialIds:
    v = tiny.tokenizer().get_vocab()
    return SpecialIds(mask=m.config.mask_token_id, eos=m.config.eos_token_id, eot=v["<|eot_id|>"],
                      pad=m.config.pad_token_id)


@pytest.fixture(scope="module")
def flat():
    return tiny.model(seed=21)


@pytest.fixture(scope="module")
def sharp():
    return tiny.model(seed=22, sharpen=30.0)  # context matters: CE varies with the mask


def random_pair(rng: random.Random, P: int, L: int) -> tuple[list[int], list[int]]:
    words = range(len(tiny.WORDS))  # ordinary tokens only (never the mask id)
    return [rng.choice(words) for _ in range(P)], [rng.choice(words) for _ in range(L)]


# ---------------------------------------------------------------- the paper's formula, slowly


@torch.inference_mode()
def row_logits(model, x: list[int], P: int, cfg: float, mask_id: int) -> torch.Tensor:
    """Logits [P + L, V] of one sequence, one forward per copy (no batching, no logits slice)."""
    cond = model(torch.tensor([x])).logits[0]
    if cfg == 0:
        return cond
    un = model(torch.tensor([[mask_id] * P + x[P:]])).logits[0]
    return un + (cfg + 1) * (cond - un)


def masked_loss(model, prompt, answer, masked: list[int], cfg: float, mask_id: int) -> float:
    """(L / l) * sum over masked answer positions of -log p(true token): one Monte-Carlo sample of eq. 6."""
    P, L = len(prompt), len(answer)
    x = prompt + [mask_id if j in masked else t for j, t in enumerate(answer)]
    logits = row_logits(model, x, P, cfg, mask_id)
    ce = sum(float(torch.logsumexp(logits[P + j], 0) - logits[P + j, answer[j]]) for j in masked)
    return ce * L / len(masked)


def slow_elbo(model, mask_id, prompt, answer, mc_num, b, cfg, seed) -> float:
    """Draw order of likelihood.py's docstring: per mini-batch k, then one randperm per row."""
    g = torch.Generator().manual_seed(seed)
    L, losses = len(answer), []
    for _ in range(mc_num // b):
        k = int(torch.randint(1, L + 1, (1,), generator=g))
        for i in range(b):
            l = (math.floor(k + Fraction(i * L, b) + Fraction(1, 2)) - 1) % L + 1  # round half up, wrap into 1..L
            perm = torch.randperm(L, generator=g).tolist()
            losses.append(masked_loss(model, prompt, answer, [j for j in range(L) if perm[j] < l], cfg, mask_id))
    return -sum(losses) / len(losses)


@pytest.mark.parametrize("P,L,mc,b,cfg", [
    (3, 1, 4, 1, 0.0), (5, 4, 6, 2, 0.0), (2, 7, 8, 8, 0.0), (6, 9, 6, 3, 0.5), (4, 5, 4, 4, 2.0), (1, 3, 3, 1, 1.0),
    (7, 3, 8, 8, 0.0),  # batch larger than the answer: counts repeat
])
def test_estimator_equals_slow_formula_with_same_draws(sharp, P, L, mc, b, cfg):
    prompt, answer = random_pair(random.Random(P * 100 + L), P, L)
    ids = ids_of(sharp)
    for seed in (0, 7):
        got = log_likelihood(sharp, ids, prompt, answer, ELBO(mc_num=mc, batch_size=b, cfg_scale=cfg, seed=seed))
        want = slow_elbo(sharp, ids.mask, prompt, answer, mc, b, cfg, seed)
        assert abs(got - want) < 1e-9, (got, want)


def test_single_token_answer_is_exact_log_prob(flat):
    """L = 1: one mask, ratio 1: the estimate is log p(a | p, [mask]) with no noise (the MMLU setting, mc_num 1)."""
    ids, prompt, answer = ids_of(flat), [3, 4, 5], [7]
    with torch.inference_mode():
        logp = torch.log_softmax(flat(torch.tensor([prompt + [ids.mask]])).logits[0, -1], -1)[7].item()
    for seed in (0, 1):
        assert abs(log_likelihood(flat, ids, prompt, answer, ELBO(mc_num=1, batch_size=1, seed=seed)) - logp) < 1e-12


# ---------------------------------------------------------------- unbiasedness


def test_every_row_mask_count_is_uniform_over_the_offset():
    """Stratification keeps each row's l uniform on 1..L (what makes the estimator unbiased), for any L and b."""
    for L in range(1, 13):
        for b in range(1, 11):
            rows = list(zip(*(mask_counts(k, L, b) for k in range(1, L + 1))))
            assert all(sorted(r) == list(range(1, L + 1)) for r in rows), (L, b)
    assert mask_counts(3, 8, 4) == [3, 5, 7, 1]  # evenly spaced, random offset, wrapped
    assert mask_counts(1, 3, 2) == [1, 3]  # the reference's half-to-even gives [1, 2] here (see the docstring)


def exact_elbo(model, mask_id, prompt, answer, cfg) -> float:
    """E_l E_mask of the sample loss, exhaustively: mean over l = 1..L of the mean over all C(L, l) masks."""
    L = len(answer)
    per_l = [statistics.fmean(masked_loss(model, prompt, answer, list(S), cfg, mask_id)
                              for S in combinations(range(L), l)) for l in range(1, L + 1)]
    return -statistics.fmean(per_l)


@pytest.mark.parametrize("L,b,cfg", [(3, 2, 0.0), (4, 1, 0.0), (4, 3, 0.5)])
def test_estimator_mean_is_the_exact_expectation(sharp, L, b, cfg):
    ids = ids_of(sharp)
    prompt, answer = random_pair(random.Random(L * 10 + b), 3, L)
    exact = exact_elbo(sharp, ids.mask, prompt, answer, cfg)
    draws = [log_likelihood(sharp, ids, prompt, answer, ELBO(mc_num=b, batch_size=b, cfg_scale=cfg, seed=s))
             for s in range(400)]  # one mini-batch per seed: independent draws
    mean, se = statistics.fmean(draws), statistics.stdev(draws) / math.sqrt(len(draws))
    assert se > 0 and abs(mean - exact) < 3 * se, (mean, exact, se)


# ---------------------------------------------------------------- promises


def test_seeded_and_order_independent(flat):
    ids, rng = ids_of(flat), random.Random(5)
    pairs = [random_pair(rng, rng.randint(1, 6), rng.randint(1, 8)) for _ in range(6)]
    st = ELBO(mc_num=8, batch_size=4, cfg_scale=0.5, seed=3)
    one_by_one = [log_likelihood(flat, ids, p, a, st) for p, a in pairs]
    assert log_likelihoods(flat, ids, pairs, st) == one_by_one
    assert log_likelihoods(flat, ids, pairs[::-1], st) == one_by_one[::-1]
    g = torch.Generator().manual_seed(3)
    assert log_likelihood(flat, ids, *pairs[0], st, generator=g) == one_by_one[0]
    assert log_likelihood(flat, ids, *pairs[0], ELBO(mc_num=8, batch_size=4, cfg_scale=0.5, seed=4)) != one_by_one[0]


def test_draws_nothing_from_the_global_generator(flat):
    ids = ids_of(flat)
    state = torch.get_rng_state()
    log_likelihood(flat, ids, [1, 2], [3, 4, 5], ELBO(mc_num=4, batch_size=2))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("make,match", [
    (lambda: ELBO(mc_num=10, batch_size=4), "multiple of batch_size"),
    (lambda: ELBO(mc_num=0, batch_size=1), "mc_num"),
    (lambda: ELBO(batch_size=0), "batch_size"),
    (lambda: ELBO(cfg_scale=-0.5), "cfg_scale"),
    (lambda: ELBO(cfg_scale=float("nan")), "cfg_scale"),
])
def test_bad_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("prompt,answer,match", [
    ([], [1], "prompt is empty"),
    ([1], [], "answer is empty"),
    ([1] * 250, [2] * 7, "max_sequence_length"),
    ([1], [2, "MASK"], "mask id"),
])
def test_bad_pairs_are_named(flat, prompt, answer, match):
    ids = ids_of(flat)
    answer = [ids.mask if t == "MASK" else t for t in answer]
    for call in (lambda: log_likelihood(flat, ids, prompt, answer, ELBO(mc_num=1, batch_size=1)),
                 lambda: log_likelihoods(flat, ids, [([1], [2]), (prompt, answer)], ELBO(mc_num=1, batch_size=1)),
                 lambda: is_greedy(flat, ids, prompt, answer)):
        with pytest.raises(ValueError, match=match):
            call()


def test_greedy_check_agrees_with_the_sampler_one_token_per_step(sharp):
    """The sampler's reference mode (one block, steps = columns, quota 1, no cache) decodes the same canvas."""
    ids, rng, checked = ids_of(sharp), random.Random(9), 0
    for n in range(12):
        prompt, _ = random_pair(rng, rng.randint(1, 6), 1)
        L = rng.randint(1, 8)
        cfg = 0.5 if n % 3 == 0 else 0.0
        st = SamplerConfig(gen_length=L, block_length=L, steps=L, threshold=None, cache="none", early_stop=False,
                           cfg_scale=cfg)
        res = Sampler(sharp, ids).generate([Request(prompt, st)])[0]
        if res.finish_reason != "length":  # a stop token cut the answer: the canvas is not all in res.tokens
            continue
        checked += 1
        assert is_greedy(sharp, ids, prompt, res.tokens, cfg_scale=cfg)
        wrong = list(res.tokens)
        wrong[rng.randrange(L)] = next(t for t in range(len(tiny.WORDS)) if t not in res.tokens)
        assert not is_greedy(sharp, ids, prompt, wrong, cfg_scale=cfg)
    assert checked >= 6


# ---------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo():
    loaded = load_model(ModelConfig())
    return loaded.model, loaded.tokenizer, loaded.info.ids


def chat_prompt(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def continuation(tok, ids: SpecialIds, text: str) -> list[int]:
    """The answer as the demo model was trained on it (demo/train.py): its tokens, then <|eot_id|>."""
    return tok.encode(text, add_special_tokens=False) + [ids.eot]


def wrong_answers(ex: task.Example, rng: random.Random, n: int = 3) -> list[str]:
    """Same skill, perturbed: arithmetic → a nearby wrong result; sorting → two neighbours swapped or an item
    replaced by one not in the list (same length, same format)."""
    if ex.skill in ("add", "subtract"):
        head, r = ex.answer.rsplit(" ", 1)
        return [f"{head} {int(r) + d}" for d in rng.sample([1, -1, 2, -2, 10, -10], n)]
    items, out = ex.answer.split(", "), set()
    while len(out) < n:
        xs, i = list(items), rng.randrange(len(items) - 1)
        spare = [c for c in (string.digits if xs[i].isdigit() else string.ascii_lowercase) if c not in items]
        if spare and rng.random() < 0.5:
            xs[i] = rng.choice(spare)
        else:
            xs[i], xs[i + 1] = xs[i + 1], xs[i]
        out.add(", ".join(xs))
    return sorted(out)


def test_demo_elbo_ranks_the_right_answer_first(demo, record_property):
    model, tok, ids = demo
    rng, st = random.Random(0), ELBO(mc_num=16, batch_size=16)
    wins, t0, pairs_done = 0, time.perf_counter(), 0
    for ex in task.examples(50, seed=task.HELD_OUT_SEED):
        prompt = chat_prompt(tok, ex.prompt)
        answers = [ex.answer] + wrong_answers(ex, rng)
        scores = log_likelihoods(model, ids, [(prompt, continuation(tok, ids, a)) for a in answers], st)
        wins += scores[0] > max(scores[1:])
        pairs_done += len(answers)
    dt = time.perf_counter() - t0
    record_property("demo_ranking_accuracy", wins / 50)
    record_property("forwards_per_s", pairs_done * st.mc_num // st.batch_size / dt)
    assert wins >= 45, f"right answer first on {wins}/50"


def test_demo_right_answers_are_greedy_and_wrong_ones_not(demo):
    model, tok, ids = demo
    rng, right, wrong = random.Random(1), 0, 0
    exs = task.examples(10, seed=task.HELD_OUT_SEED + 1)
    for ex in exs:
        prompt = chat_prompt(tok, ex.prompt)
        right += is_greedy(model, ids, prompt, continuation(tok, ids, ex.answer))
        wrong += is_greedy(model, ids, prompt, continuation(tok, ids, wrong_answers(ex, rng, 1)[0]))
    assert right >= 8 and wrong == 0, (right, wrong)
