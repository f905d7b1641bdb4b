"""The sampler against the slow reference in tests/reference_sampler.py, plus its own promises."""

import random
from dataclasses import replace

import pytest
import torch

from llada_xp.config import SamplerConfig
from llada_xp.sampler import Finished, Request, Sampler, Tokens, block_steps, factor_count, quota
from tests import reference_sampler as ref
from tests import tiny


ids_of = tiny.ids_of


# Every test of flat / sharp runs on LLaDA-8B's architecture and on a grouped-query (2 query heads per KV head) model
# with tied embeddings (iLLaDA's shape): the KV cache then holds n_kv_heads heads. Sharpening the tied model's logits
# 60x leaves no randomness at all (its hidden states stay close to the mask's embedding): it gets 8x.
ARCHS = {"mha": dict(sharpen=60.0), "gqa_tied": dict(n_kv_heads=2, weight_tying=True, sharpen=8.0)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    return ARCHS[request.param]


@pytest.fixture(scope="module")
def flat(arch):
    return tiny.model(seed=11, **dict(arch, sharpen=1.0))  # random weights: near-uniform confidences


@pytest.fixture(scope="module")
def sharp(arch):
    return tiny.model(seed=12, **arch)  # peaked confidences: threshold/factor commit several per step


@pytest.fixture(scope="module")
def eosy():
    return tiny.model(seed=13, sharpen=60.0, eos_boost=1.2)  # answers of mixed length: EOS comes early


def random_settings(rng: random.Random, **over) -> SamplerConfig:
    gen = rng.choice([6, 8, 12, 16, 20])
    bl = rng.choice([2, 4, 8, gen, 5])
    st = SamplerConfig(
        gen_length=gen, block_length=bl, steps=rng.randint(1, gen + 3),
        temperature=rng.choice([0.0, 0.0, 0.7, 1.3]), cfg_scale=rng.choice([0.0, 0.0, 0.5]),
        remasking=rng.choice(["low_confidence", "low_confidence", "random"]),
        cache=rng.choice(["none", "prefix", "dual"]),
        threshold=rng.choice([None, 0.3, 0.9]), factor=rng.choice([None, None, 0.5, 2.0]),
        seed=rng.randint(0, 10_000), logits_eos_inf=rng.random() < 0.15,
        confidence_eos_eot_inf=rng.random() < 0.15, early_stop=False)
    return replace(st, **over)


def run_one(model, prompt, st):
    return Sampler(model, ids_of(model)).generate([Request(prompt, st)])[0]


# ---------------------------------------------------------------- rules


def test_quota_spreads_remainder_over_first_steps():
    assert quota(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    assert quota(3, 5) == [1, 1, 1, 0, 0]


def test_block_steps_equal_reference_when_preconditions_hold_and_spread_otherwise():
    assert block_steps(128, 128, 32) == [32] * 4
    assert block_steps(64, 256, 32) == [8] * 8
    assert block_steps(64, 150, 64) == [27, 27, 10]  # shorter last block gets fewer steps
    assert block_steps(3, 80, 32) == [1, 1, 1]
    assert block_steps(1, 80, 32) == [1, 1, 1]  # at least one step per block
    assert block_steps(500, 10, 4) == [4, 4, 2]  # never more steps than columns


@pytest.mark.parametrize("conf,expected", [
    ([0.99, 0.5, 0.1], {0.5: 1, 1.0: 1, 2.0: 3}),
    ([0.99, 0.9, 0.8, 0.7], {0.5: 2, 1.0: 4, 2.0: 4}),
    ([0.99, 0.1], {0.5: 2, 1.0: 2, 2.0: 2}),
    ([0.3], {0.5: 1, 1.0: 1, 2.0: 1}),
])
def test_factor_rule_matches_worked_examples(conf, expected):
    for f, k in expected.items():
        c = torch.tensor([conf + [float("-inf")] * 2], dtype=torch.float64)
        got = factor_count(c, torch.tensor([len(conf)]), torch.tensor([f], dtype=torch.float64))
        assert int(got) == k, (conf, f)


def test_threshold_always_commits_one_token(flat):
    st = SamplerConfig(gen_length=8, block_length=8, steps=8, cache="none", threshold=1.0, early_stop=False)
    r = run_one(flat, [1, 2, 3], st)
    assert r.stats.nfe == 8 and r.stats.committed == 8


# ---------------------------------------------------------------- exactness


def test_no_cache_quota_equals_llada_generate(flat, sharp):
    rng = random.Random(0)
    for i in range(24):
        m = flat if i % 2 else sharp
        bl = rng.choice([4, 8, 16])
        nb = 16 // bl
        st = SamplerConfig(gen_length=16, block_length=bl, steps=nb * rng.randint(1, bl), cache="none",
                           threshold=None, factor=None, temperature=rng.choice([0.0, 0.9]),
                           remasking=rng.choice(["low_confidence", "random"]), cfg_scale=rng.choice([0.0, 1.0]),
                           seed=i, early_stop=False)
        prompt = [rng.randrange(40) for _ in range(rng.randint(1, 7))]
        want, nfe = ref.generate(m, prompt, st, ids_of(m), mode="llada")
        got = run_one(m, prompt, st)
        assert got.tokens == ref.cut(want, ids_of(m).stops), (i, st)
        assert got.stats.nfe == nfe == st.steps


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_fast_dllm_mode_equals_reference_tokens_and_nfe(flat, sharp, cache):
    rng = random.Random(hash(cache) % 1000)
    multi = 0
    for i in range(30):
        m = sharp if i % 3 else flat
        st = random_settings(rng, cache=cache)
        prompt = [rng.randrange(40) for _ in range(rng.randint(1, 8))]
        want, nfe = ref.generate(m, prompt, st, ids_of(m))
        got = run_one(m, prompt, st)
        assert got.tokens == ref.cut(want, ids_of(m).stops), (i, st)
        assert got.stats.nfe == nfe, (i, st)
        multi += (st.threshold is not None or st.factor is not None) and got.stats.committed > got.stats.nfe
    assert multi >= 3  # the threshold/factor paths really committed several tokens per step


@pytest.fixture(scope="module")
def demo():
    """The bundled demo model and held-out demo prompts: a trained model's real confidences."""
    from llada_xp.config import ModelConfig
    from llada_xp.demo.check import prompt_ids
    from llada_xp.demo.task import HELD_OUT_SEED, examples
    from llada_xp.loading import load_model

    loaded = load_model(ModelConfig(source="demo"))
    prompts = [prompt_ids(loaded.tokenizer, e.prompt) for e in examples(12, HELD_OUT_SEED)]
    return loaded.model, loaded.info.ids, prompts


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_demo_model_threshold_and_factor_paths_equal_reference(demo, cache):
    """On the trained demo model the parallel rules commit many tokens per forward, and still match the reference."""
    model, ids, prompts = demo
    sampler = Sampler(model, ids)
    committed = nfe = 0
    for i, prompt in enumerate(prompts):
        rule = dict(threshold=0.9, factor=None) if i % 2 else dict(threshold=None, factor=1.0)
        st = SamplerConfig(gen_length=48, block_length=16, steps=48, cache=cache, early_stop=False, **rule)
        want, want_nfe = ref.generate(model, prompt, st, ids)
        got = sampler.generate([Request(prompt, st)])[0]
        assert got.tokens == ref.cut(want, ids.stops), (i, st)
        assert got.stats.nfe == want_nfe, (i, st)
        committed, nfe = committed + got.stats.committed, nfe + got.stats.nfe
    assert committed / nfe >= 2, f"only {committed / nfe:.2f} tokens per forward: the demo model is not confident"


def test_batched_equals_single_row_in_every_mode(flat, sharp):
    rng = random.Random(7)
    for trial in range(12):
        m = sharp if trial % 2 else flat
        shared = dict(block_length=rng.choice([4, 8]), cache=["none", "prefix", "dual"][trial % 3],
                      cfg_scale=rng.choice([0.0, 0.5]), early_stop=rng.choice([True, False]),
                      logits_eos_inf=False, confidence_eos_eot_inf=rng.random() < 0.3)
        reqs = []
        for _ in range(rng.randint(2, 5)):
            st = replace(random_settings(rng), **shared)
            reqs.append(Request([rng.randrange(40) for _ in range(rng.randint(1, 9))], st))
        batch = Sampler(m, ids_of(m)).generate(reqs)
        for req, got in zip(reqs, batch):
            alone = run_one(m, req.prompt, req.settings)
            assert got.tokens == alone.tokens and got.finish_reason == alone.finish_reason, (trial, req)
            assert got.stats.nfe >= alone.stats.nfe


def test_same_seed_same_tokens_whatever_the_batch_at_any_temperature(sharp):
    st = SamplerConfig(gen_length=12, block_length=4, steps=12, temperature=1.0, seed=42, cache="dual")
    alone = run_one(sharp, [3, 4, 5], st)
    others = [Request([7, 8], replace(st, seed=s)) for s in (1, 2)]
    got = Sampler(sharp, ids_of(sharp)).generate([others[0], Request([3, 4, 5], st), others[1]])[1]
    assert got.tokens == alone.tokens
    others = {tuple(run_one(sharp, [3, 4, 5], replace(st, seed=s)).tokens) for s in range(43, 47)}
    assert len(others | {tuple(alone.tokens)}) > 1  # the seed matters: sampling really draws


def test_early_stop_changes_no_text_and_lowers_nfe(eosy):
    lowered = 0
    rng = random.Random(3)
    for i in range(20):
        st = random_settings(rng, gen_length=20, block_length=4)
        prompt = [rng.randrange(40) for _ in range(3)]
        off = run_one(eosy, prompt, st)
        on = run_one(eosy, prompt, replace(st, early_stop=True))
        assert on.tokens == off.tokens and on.finish_reason == off.finish_reason
        assert on.stats.nfe <= off.stats.nfe
        lowered += on.stats.nfe < off.stats.nfe
    assert lowered >= 3, "no case where early stop saved forwards: the test model never emits EOS early"


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("gen,bl,steps", [(150, 64, 64), (80, 32, 128), (7, 3, 2), (5, 32, 1), (9, 2, 100)])
def test_any_lengths_and_steps_work_and_never_exceed_gen_length(flat, gen, bl, steps):
    st = SamplerConfig(gen_length=gen, block_length=bl, steps=steps, cache="dual", threshold=None,
                       logits_eos_inf=True, confidence_eos_eot_inf=True, early_stop=False)
    r = run_one(flat, [1, 2], st)
    assert len(r.tokens) <= gen and ids_of(flat).mask not in r.tokens
    assert r.stats.blocks == -(-gen // bl)


def test_streamed_tokens_are_the_answer_and_stop_at_eos(sharp):
    rng = random.Random(5)
    shared = dict(block_length=4, cache="dual", early_stop=True, cfg_scale=0.0, logits_eos_inf=False,
                  confidence_eos_eot_inf=False)
    reqs = [Request([rng.randrange(40) for _ in range(4)], random_settings(rng, **shared)) for _ in range(4)]
    events = []
    res = Sampler(sharp, ids_of(sharp)).generate(reqs, events.append)
    for i, r in enumerate(res):
        streamed = [t for e in events if isinstance(e, Tokens) and e.index == i for t in e.tokens]
        assert streamed == r.tokens
        fin = [e for e in events if isinstance(e, Finished) and e.index == i]
        assert len(fin) == 1 and fin[0].result is r
        assert events.index(fin[0]) > max((k for k, e in enumerate(events) if getattr(e, "index", -1) == i
                                           and isinstance(e, Tokens)), default=-1)


def test_stop_token_id_ends_the_answer(sharp):
    st = SamplerConfig(gen_length=16, block_length=4, steps=16, cache="none", threshold=None, early_stop=False)
    full = run_one(sharp, [5, 6, 7], st)
    assert len(full.tokens) >= 3
    stop = full.tokens[2]
    first = full.tokens.index(stop)
    r = run_one(sharp, [5, 6, 7], replace(st, stop_token_ids=[stop]))
    assert r.tokens == full.tokens[:first] and r.finish_reason == "stop" and r.stop == stop


def test_stop_string_cuts_text_and_finishes_row(sharp):
    tok = tiny.tokenizer()
    st = SamplerConfig(gen_length=16, block_length=4, steps=16, cache="dual", threshold=None, early_stop=False)
    sp = Sampler(sharp, ids_of(sharp), decode=tok.decode)
    full = sp.generate([Request([5, 6, 7], st)])[0]
    words = full.text.split()
    assert len(words) >= 3
    needle = words[2]
    r = sp.generate([Request([5, 6, 7], replace(st, stop=[needle]))])[0]
    assert r.finish_reason == "stop" and r.stop == needle
    assert r.text == full.text[:full.text.find(needle)]
    assert r.stats.nfe <= full.stats.nfe


def test_abort_ends_one_row_and_others_continue(sharp):
    st = SamplerConfig(gen_length=16, block_length=4, steps=16, cache="dual", threshold=None, early_stop=False)
    a, b = Request([1, 2, 3], st), Request([4, 5], st)

    def on_event(e):
        if isinstance(e, Tokens) and e.index == 0:
            a.abort()

    res = Sampler(sharp, ids_of(sharp)).generate([a, b], on_event)
    assert res[0].finish_reason == "abort" and res[0].stats.nfe < res[1].stats.nfe
    assert res[1].tokens == run_one(sharp, [4, 5], st).tokens


@pytest.mark.parametrize("field,value", [("gen_length", 0), ("steps", 0), ("block_length", -1),
                                         ("temperature", -0.1), ("remasking", "top"), ("cache", "triple"),
                                         ("threshold", 1.5), ("factor", 0.0), ("cfg_scale", -1.0)])
def test_invalid_settings_name_the_field(flat, field, value):
    with pytest.raises(ValueError, match=field):
        run_one(flat, [1], replace(SamplerConfig(), **{field: value}))


def test_prompt_beyond_max_length_is_rejected(flat):
    with pytest.raises(ValueError, match="max_sequence_length"):
        run_one(flat, [1] * 250, SamplerConfig(gen_length=16))
