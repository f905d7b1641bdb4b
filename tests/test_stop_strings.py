"""Stop strings under every cache mode x transfer rule, with the string before, inside and after the block that
holds EoT — on the trained demo model, whose threshold/factor decoding commits a whole block (answer, stop string
and EoT) in one step. Streamed text (TextStream over the sampler's Tokens events) must equal the final text."""

from dataclasses import replace

import pytest

from llada_xp.config import ModelConfig, SamplerConfig
from llada_xp.loading import load_model
from llada_xp.protocol import TextStream
from llada_xp.sampler import Finished, Request, Sampler, Tokens

RULES = {"quota": dict(threshold=None), "threshold": dict(threshold=0.9), "factor": dict(threshold=None, factor=1.0)}
PROMPT = "Sort: q 3 k a 8 x m 1 c"  # answer "1, 3, 8, a, c, k, m, q, x": EoT in the 3rd block of 8


@pytest.fixture(scope="module")
def demo():
    loaded = load_model(ModelConfig())
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):  # transformers 5 returns a BatchEncoding
        prompt = prompt["input_ids"]
    return Sampler(loaded.model, loaded.info.ids, decode=tok.decode), list(prompt)


def run(sampler: Sampler, prompt: list[int], st: SamplerConfig):
    events = []
    res = sampler.generate([Request(prompt, st)], events.append)[0]
    stream = TextStream(sampler.decode, st.stop)
    text = "".join(stream.push(e.tokens) for e in events if isinstance(e, Tokens))
    text += stream.finish(next(e for e in events if isinstance(e, Finished)).result.text)
    return res, text


def needle_at(decode, tokens: list[int], j: int, span: int = 1) -> str:
    """A stop string that starts with token j's text, covers `span` tokens and first occurs there."""
    text, start = decode(tokens), len(decode(tokens[:j]))
    for k in range(len(decode(tokens[:j + span])) - start, len(text) - start + 1):
        w = text[start:start + k]
        if w.strip() and text.find(w) == start:
            return w
    raise AssertionError(f"no unique needle at token {j} of {text!r}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_stop_string_ends_the_answer_wherever_it_falls(demo, cache, rule):
    sampler, prompt = demo
    bl = 8
    st = SamplerConfig(gen_length=48, block_length=bl, steps=48, cache=cache, **RULES[rule])
    full, _ = run(sampler, prompt, st)
    eot = len(full.tokens)  # EoT's column: the answer is cut before it
    assert full.finish_reason == "stop" and full.text == "1, 3, 8, a, c, k, m, q, x", full
    eb = eot // bl  # the block holding EoT
    assert eb >= 2 and eot % bl >= 1, "the case table below needs two blocks before EoT's, and a token before EoT"
    if rule != "quota":
        assert full.stats.nfe < eot, "parallel decoding should commit several tokens per step here"
    cases = {
        "block before EoT's": needle_at(sampler.decode, full.tokens, (eb - 1) * bl + 1),
        "straddles into EoT's block": needle_at(sampler.decode, full.tokens, eb * bl - 1, span=2),
        "inside EoT's block": needle_at(sampler.decode, full.tokens, eb * bl),
        "first token": needle_at(sampler.decode, full.tokens, 0),
    }
    for where, needle in cases.items():
        res, streamed = run(sampler, prompt, replace(st, stop=["never", needle]))
        want = full.text[:full.text.find(needle)]
        assert (res.text, res.finish_reason, res.stop) == (want, "stop", needle), where
        assert streamed == want, where
        assert sampler.decode(res.tokens).startswith(want + needle), where  # tokens end with the stop string
    # after EoT's block (never generated): the answer ends at EoT, untouched
    res, streamed = run(sampler, prompt, replace(st, stop=["zz"]))
    assert (res.text, res.finish_reason, streamed) == (full.text, "stop", full.text)
    assert res.tokens == full.tokens and res.stop == full.stop


def test_stop_string_also_ends_answers_without_early_stop(demo):
    sampler, prompt = demo
    st = SamplerConfig(gen_length=48, block_length=32, steps=48, cache="dual", threshold=0.9, early_stop=False)
    res, streamed = run(sampler, prompt, replace(st, stop=[", k"]))
    assert (res.text, streamed, res.finish_reason) == ("1, 3, 8, a, c", "1, 3, 8, a, c", "stop")


@pytest.mark.slow
def test_server_defaults_honour_stop_streaming_and_not():
    """The reported case: serve.py's defaults (dual cache, threshold 0.9) commit "42 + 7 = 49" and EoT together."""
    from tests.test_server import Live

    srv = Live(ModelConfig(), SamplerConfig()).wait_ready()
    try:
        client = srv.client()
        msgs = [{"role": "user", "content": "Add: 42 + 7"}]
        full = client.chat.completions.create(model="llada-xp-demo", messages=msgs)
        assert full.choices[0].message.content == "42 + 7 = 49"
        got = client.chat.completions.create(model="llada-xp-demo", messages=msgs, stop=["="])
        assert (got.choices[0].message.content, got.choices[0].finish_reason) == ("42 + 7 ", "stop")
        chunks = client.chat.completions.create(model="llada-xp-demo", messages=msgs, stop=["="], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "42 + 7 "
    finally:
        srv.stop()
