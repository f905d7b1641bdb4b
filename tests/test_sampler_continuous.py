"""Continuous batching: a row's tokens and NFE do not depend on when it joins the running set, nor on who else runs."""

import random
from dataclasses import replace
from typing import Callable, Optional

import pytest

from llada_xp.config import SamplerConfig
from llada_xp.sampler import Finished, Request, RunningSet, Sampler, Tokens, shared_key
from tests import tiny
from tests.test_sampler import random_settings

ids_of = tiny.ids_of


@pytest.fixture(scope="module")
def sharp():
    return tiny.model(seed=12, sharpen=60.0)


@pytest.fixture(scope="module")
def eosy():
    return tiny.model(seed=13, sharpen=60.0, eos_boost=1.2)


def alone(model, req: Request):
    return Sampler(model, ids_of(model)).generate([Request(list(req.prompt), req.settings)])[0]


def drive(model, plan: list[tuple[Request, Callable[[RunningSet, int], bool]]],
          abort_when: Optional[dict[int, Callable[[RunningSet, int], bool]]] = None, decode=None):
    """Run a schedule: row k joins at the first step where plan[k]'s predicate (running set, step) holds, and is
    aborted where abort_when[k] holds. Returns (results by row, events)."""
    results, events = {}, []
    abort_when = abort_when or {}

    def on_event(e):
        events.append(e)
        if isinstance(e, Finished):
            results[e.index] = e.result

    rs = Sampler(model, ids_of(model), decode=decode).running(on_event)
    waiting, step = dict(enumerate(plan)), 0
    while waiting or rs:
        for k, (req, when) in list(waiting.items()):
            if when(rs, step):
                rs.add(req, k)
                del waiting[k]
        for k, when in abort_when.items():
            if when(rs, step):
                plan[k][0].abort()
        if rs:
            rs.step()
        step += 1
        assert step < 10_000
    return [results[k] for k in range(len(plan))], events


def at_step(n):
    return lambda rs, step: step >= n


def after_blocks(key, blocks):
    """When row `key` has started block `blocks` (and has taken a step there when blocks > 0), or has finished."""
    def when(rs, step):
        row = next((r for r in rs.rows if r.key == key), None)
        started = any(r.key == key for r in rs.rows + rs.joining) or step > 0
        return started and (row is None or row.b > blocks or (row.b == blocks and row.step > 0))
    return when


RULES = {"quota": dict(threshold=None, factor=None), "threshold": dict(threshold=0.9, factor=None),
         "factor": dict(threshold=None, factor=1.0)}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_row_is_the_same_alone_together_or_joining_after_blocks(sharp, cache, rule, remasking, temperature):
    rng = random.Random(f"{cache}{rule}{remasking}{temperature}")
    target = SamplerConfig(gen_length=12, block_length=4, steps=rng.choice([6, 12]), cache=cache, remasking=remasking,
                           temperature=temperature, seed=7, early_stop=False, **RULES[rule])
    prompt = [rng.randrange(40) for _ in range(5)]
    want = alone(sharp, Request(prompt, target))
    for scenario in ("together", 0, 1, 2):
        # the others: other prompt lengths, gen_length, steps, block_length, cache, rule, cfg, EOS options
        others = [Request([rng.randrange(40) for _ in range(rng.randint(1, 9))],
                          random_settings(rng, gen_length=16, early_stop=rng.random() < 0.5)) for _ in range(2)]
        when = at_step(0) if scenario == "together" else after_blocks(0, scenario)
        plan = [(others[0], at_step(0)), (Request(prompt, target), when), (others[1], after_blocks(0, 1))]
        res, _ = drive(sharp, plan)
        got = res[1]
        assert got.tokens == want.tokens and got.finish_reason == want.finish_reason, scenario
        assert got.stats.nfe == want.stats.nfe and got.stats.blocks == want.stats.blocks, scenario
        for req, r in zip(others, (res[0], res[2])):
            a = alone(sharp, req)
            assert (r.tokens, r.stats.nfe) == (a.tokens, a.stats.nfe), (scenario, req.settings)


def test_nothing_has_to_be_shared_now(sharp):
    """block_length, cache, cfg, the EOS options and early_stop differ per row in one running set."""
    assert shared_key(SamplerConfig(block_length=4, cache="none")) == shared_key(SamplerConfig(block_length=8))
    rng = random.Random(1)
    reqs = [Request([rng.randrange(40) for _ in range(rng.randint(1, 9))],
                    random_settings(rng, cache=c, block_length=bl, cfg_scale=cfg))
            for c, bl, cfg in [("none", 4, 0.0), ("prefix", 8, 0.5), ("dual", 2, 0.0), ("dual", 8, 1.0),
                               ("prefix", 3, 0.0)]]
    res = Sampler(sharp, ids_of(sharp)).generate(reqs)
    for req, r in zip(reqs, res):
        a = alone(sharp, req)
        assert (r.tokens, r.stats.nfe) == (a.tokens, a.stats.nfe), req.settings


def test_a_running_set_takes_one_forward_per_kind_of_row(sharp):
    """Same-kind rows share one forward per step; a block start beside mid-block rows costs one more forward."""
    st = SamplerConfig(gen_length=8, block_length=4, steps=8, cache="dual", threshold=None, early_stop=False)
    rs = Sampler(sharp, ids_of(sharp)).running()
    for k in range(3):
        rs.add(Request([1, 2, 3 + k], st), k)
    while rs:
        rs.step()
    assert rs.forwards == 8  # three rows in lockstep: 8 steps, one forward each
    late = []
    rs = Sampler(sharp, ids_of(sharp)).running(late.append)
    rs.add(Request([1, 2, 3], st), 0)
    rs.step()
    rs.add(Request([4, 5], st), 1)  # joins mid-block: its block start and the other's dual step in one step
    while rs:
        rs.step()
    # 9 steps; where one row starts a block (full forward) while the other is mid-block (dual forward), 2 forwards:
    # steps 1 and 5 (the late row's block starts) and 4 (the first row's second block)
    assert rs.forwards == 9 + 3
    assert [e.result.stats.nfe for e in late if isinstance(e, Finished)] == [8, 8]


def test_abort_mid_block_ends_that_row_and_the_others_run_on(sharp):
    st = SamplerConfig(gen_length=16, block_length=8, steps=16, cache="dual", threshold=None, early_stop=False)
    reqs = [Request([1, 2, 3], st), Request([4, 5], st), Request([6], replace(st, cache="prefix"))]
    plan = [(reqs[0], at_step(0)), (reqs[1], at_step(0)), (reqs[2], at_step(3))]
    res, events = drive(sharp, plan, abort_when={1: at_step(3)})  # row 1 in the middle of its first block
    assert res[1].finish_reason == "abort" and res[1].stats.nfe == 3
    assert res[1].tokens == alone(sharp, reqs[1]).tokens[:len(res[1].tokens)]
    streamed = [t for e in events if isinstance(e, Tokens) and e.index == 1 for t in e.tokens]
    assert streamed == res[1].tokens
    for k in (0, 2):
        a = alone(sharp, reqs[k])
        assert (res[k].tokens, res[k].stats.nfe) == (a.tokens, a.stats.nfe)


def test_row_stopping_early_leaves_while_others_continue(eosy):
    rng = random.Random(4)
    early = 0
    for trial in range(6):
        reqs = [Request([rng.randrange(40) for _ in range(rng.randint(1, 6))],
                        random_settings(rng, gen_length=20, block_length=4, early_stop=True)) for _ in range(3)]
        plan = [(reqs[0], at_step(0)), (reqs[1], at_step(0)), (reqs[2], at_step(2))]
        res, events = drive(eosy, plan)
        finished = [e.index for e in events if isinstance(e, Finished)]
        for req, r in zip(reqs, res):
            a = alone(eosy, req)
            assert (r.tokens, r.finish_reason, r.stats.nfe) == (a.tokens, a.finish_reason, a.stats.nfe)
        early += max(r.stats.nfe for r in res) > min(r.stats.nfe for r in res) and finished[0] != 2
    assert early >= 2, "no schedule where a row left before the others"


@pytest.mark.parametrize("schedules", [12, pytest.param(100, marks=pytest.mark.slow)])
def test_random_join_and_leave_schedules_equal_alone(sharp, eosy, schedules):
    """A property test: random schedules (joins at random steps, random aborts) against the rows alone (100 of them
    take about 30 s on a shared CPU: slow; 12 in the quick loop)."""
    rng = random.Random(2024 + schedules)
    memo = {}
    for trial in range(schedules):
        m = eosy if trial % 2 else sharp
        n = rng.randint(2, 5)
        reqs = [Request([rng.randrange(40) for _ in range(rng.randint(1, 8))],
                        random_settings(rng, early_stop=rng.random() < 0.5)) for _ in range(n)]
        plan = [(r, at_step(0 if k == 0 else rng.randint(0, 12))) for k, r in enumerate(reqs)]
        aborts = {k: at_step(rng.randint(0, 10)) for k in range(n) if rng.random() < 0.15}
        res, _ = drive(m, plan, abort_when=aborts)
        for k, (req, r) in enumerate(zip(reqs, res)):
            key = (id(m), tuple(req.prompt), repr(req.settings))
            if key not in memo:
                memo[key] = alone(m, replace(req, aborted=False))
            a = memo[key]
            if r.finish_reason == "abort":
                assert k in aborts and r.tokens == a.tokens[:len(r.tokens)] and r.stats.nfe <= a.stats.nfe
            else:
                assert (r.tokens, r.finish_reason, r.stats.nfe) == (a.tokens, a.finish_reason, a.stats.nfe), \
                    (trial, k, req.settings)
