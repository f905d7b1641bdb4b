"""The engine's schedulers on a tiny model, in-process: continuous admission mid-batch vs static batches."""

import asyncio

import pytest
from prometheus_client import generate_latest

from llada_xp.config import SamplerConfig
from llada_xp.engine import Engine, Failed
from llada_xp.sampler import Finished, Request, Sampler
from llada_xp.server import Metrics
from tests import tiny

LONG = SamplerConfig(gen_length=96, block_length=8, steps=96, cache="dual", threshold=None, early_stop=False)
SHORT = SamplerConfig(gen_length=8, block_length=8, steps=8, cache="dual", threshold=None, early_stop=False)


@pytest.fixture(scope="module")
def model():
    return tiny.model(seed=12, sharpen=60.0)


async def _finish(job):
    out = {}
    while len(out) < len(job.requests):
        i, ev = await job.events.get()
        if isinstance(ev, (Finished, Failed)):
            out[i] = ev
    return [out[i] for i in range(len(out))]


def run_long_then_short(model, scheduler: str):
    """A long request, then a short one submitted while it decodes: (finish order, short result, engine, waits)."""
    waits = []

    async def main():
        eng = Engine(Sampler(model, tiny.ids_of(model)), max_batch_size=4, batch_window_s=0, scheduler=scheduler,
                     on_admit=lambda w, mid: waits.append((w, mid))).start()
        order = []
        try:
            long = eng.submit([Request([1, 2, 3], LONG)], tokens=False)
            while eng.running == 0:
                await asyncio.sleep(0.001)
            short = eng.submit([Request([4, 5], SHORT)], tokens=False)

            async def done(name, job):
                res = await _finish(job)
                order.append(name)
                return res[0]
            _, s = await asyncio.gather(done("long", long), done("short", short))
        finally:
            eng.stop()
        return order, s.result, eng

    order, short, eng = asyncio.run(main())
    return order, short, eng, waits


def test_continuous_admits_a_row_while_others_run_and_it_finishes_first(model):
    order, short, eng, waits = run_long_then_short(model, "continuous")
    assert order == ["short", "long"]
    assert eng.admitted_mid_batch == 1 and [mid for _, mid in waits] == [False, True]
    alone = Sampler(model, tiny.ids_of(model)).generate([Request([4, 5], SHORT)])[0]
    assert short.tokens == alone.tokens and short.stats.nfe == alone.stats.nfe


def test_static_scheduler_keeps_the_old_behaviour(model):
    order, short, eng, waits = run_long_then_short(model, "static")
    assert order == ["long", "short"] and eng.admitted_mid_batch == 0
    assert [mid for _, mid in waits] == [False, False] and waits[1][0] > waits[0][0]


def test_a_row_too_long_for_the_model_fails_alone(model):
    async def main():
        eng = Engine(Sampler(model, tiny.ids_of(model)), max_batch_size=4).start()
        try:
            job = eng.submit([Request([1] * 250, SHORT), Request([1, 2], SHORT)], tokens=False)
            return await _finish(job)
        finally:
            eng.stop()

    bad, good = asyncio.run(main())
    assert isinstance(bad, Failed) and "max_sequence_length" in str(bad.error)
    assert isinstance(good, Finished) and good.result.finish_reason == "length"


def test_metrics_count_mid_batch_admissions_and_queue_wait():
    m = Metrics(lambda: None)
    m.admitted(0.03, True)
    m.admitted(0.2, False)
    text = generate_latest(m.registry).decode()
    assert "llada_xp_rows_admitted_mid_batch_total 1.0" in text
    assert "llada_xp_queue_wait_seconds_count 2.0" in text
    assert 'llada_xp_queue_wait_seconds_bucket{le="0.05"} 1.0' in text
