"""Request validation and mapping to sampler settings, accounting, and streamed text (no server, no model)."""

import pytest
from pydantic import ValidationError

from llada_xp.config import SamplerConfig
from llada_xp.protocol import (APIError, ChatCompletionRequest, CompletionRequest, TextStream, completion_tokens,
                               param_name, usage)
from llada_xp.sampler import Result, Stats

MSG = [{"role": "user", "content": "hi"}]
SERVER = SamplerConfig(gen_length=128, block_length=32, steps=128, cache="dual", threshold=0.9, temperature=0.0)


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **kw})


def one(**kw) -> SamplerConfig:
    return chat(**kw).settings(SERVER)[0]


def test_omitted_fields_take_the_server_defaults():
    s = one()
    assert (s.gen_length, s.block_length, s.steps, s.cache, s.threshold, s.temperature, s.remasking) == \
        (128, 32, 128, "dual", 0.9, 0.0, "low_confidence")


def test_user_values_override_the_server_defaults():
    s = one(max_tokens=150, steps=64, block_length=64, temperature=0.5, cfg_scale=1.5, remasking="random",
            threshold=0.7, factor=2.0, stop="END", seed=7)
    assert (s.gen_length, s.steps, s.block_length, s.temperature, s.cfg_scale, s.remasking, s.threshold, s.factor,
            s.stop, s.seed) == (150, 64, 64, 0.5, 1.5, "random", 0.7, 2.0, ["END"], 7)


def test_max_completion_tokens_is_an_alias_of_max_tokens():
    assert one(max_completion_tokens=40).gen_length == 40
    assert one(max_completion_tokens=40, max_tokens=40).gen_length == 40
    with pytest.raises(APIError) as e:
        one(max_completion_tokens=40, max_tokens=50)
    assert e.value.param == "max_completion_tokens"


def test_omitted_steps_keep_the_servers_steps_per_token_ratio():
    assert one(max_tokens=80).steps == 80
    half = SamplerConfig(gen_length=128, steps=64)
    assert chat(max_tokens=80).settings(half)[0].steps == 40
    assert chat(max_tokens=3).settings(half)[0].steps == 2


def test_user_steps_pass_through_even_beyond_max_tokens():
    assert one(max_tokens=10, steps=512).steps == 512  # the sampler clamps to one step per column


@pytest.mark.parametrize("use_cache,use_dual_cache,default,expected", [
    (True, True, "none", "dual"), (True, False, "dual", "prefix"), (False, False, "dual", "none"),
    (False, None, "dual", "none"), (True, None, "dual", "dual"), (True, None, "prefix", "prefix"),
    (None, False, "dual", "prefix"), (None, True, "none", "dual"), (None, None, "prefix", "prefix"),
    (None, None, "none", "none"),
])
def test_cache_flags_map_to_a_cache_mode(use_cache, use_dual_cache, default, expected):
    kw = {k: v for k, v in (("use_cache", use_cache), ("use_dual_cache", use_dual_cache)) if v is not None}
    assert chat(**kw).settings(SamplerConfig(cache=default))[0].cache == expected


def test_dual_cache_without_cache_is_refused():
    with pytest.raises(APIError) as e:
        one(use_cache=False, use_dual_cache=True)
    assert e.value.param == "use_dual_cache"


def test_explicit_null_threshold_means_quota_mode():
    assert one(threshold=None).threshold is None
    assert one().threshold == 0.9


def test_choices_get_consecutive_seeds():
    assert [s.seed for s in chat(n=3, seed=5).settings(SERVER)] == [5, 6, 7]
    assert [s.seed for s in chat(n=2).settings(SERVER)] == [None, None]
    assert [s.seed for s in chat(n=2, seed=2**64 - 1).settings(SERVER)] == [2**64 - 1, 0]


@pytest.mark.parametrize("field,value", [
    ("top_p", 0.9), ("top_k", 40), ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
    ("repetition_penalty", 1.2), ("min_p", 0.1), ("logit_bias", {"42": 5.0}), ("logprobs", True),
    ("top_logprobs", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}), ("functions", [{"name": "f"}]),
    ("stream_options", {"include_usage": True}),
])
def test_unhonourable_fields_are_refused_naming_the_parameter(field, value):
    with pytest.raises(APIError) as e:
        one(**{field: value})
    assert e.value.status == 400 and e.value.param == field


@pytest.mark.parametrize("field,value", [
    ("top_p", 1.0), ("top_k", -1), ("top_k", 0), ("presence_penalty", 0), ("frequency_penalty", 0.0),
    ("logit_bias", {}), ("logprobs", False), ("tools", []), ("tool_choice", "none"),
    ("response_format", {"type": "text"}),
])
def test_neutral_values_are_accepted(field, value):
    one(**{field: value})


@pytest.mark.parametrize("payload,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": MSG, "temperature": 2.5}, "temperature"),
    ({"messages": MSG, "temperature": "0.5"}, "temperature"),
    ({"messages": MSG, "steps": 513}, "steps"),
    ({"messages": MSG, "steps": 0}, "steps"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": MSG, "threshold": 1.5}, "threshold"),
    ({"messages": MSG, "cfg_scale": -1}, "cfg_scale"),
    ({"messages": MSG, "remasking": "top"}, "remasking"),
    ({"messages": MSG, "use_cache": "yes"}, "use_cache"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "stop": [""]}, "stop"),
    ({"messages": MSG, "factor": 0}, "factor"),
    ({"messages": MSG, "temperature": float("nan")}, "temperature"),
])
def test_invalid_values_name_the_parameter(payload, param):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(payload)
    err = e.value.errors()[0]
    assert param_name(tuple(p for p in err["loc"] if p not in ("str", "list[dict[str,any]]"))) == param


def test_text_parts_are_joined_and_developer_is_system():
    r = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    seen = {}

    class Tok:
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            seen["msgs"] = msgs
            return "x"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, 2]}

    assert r.prompt_ids(Tok(), max_chars=100) == [1, 2]
    assert seen["msgs"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


def test_completion_prompt_forms():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    ids = lambda p: CompletionRequest.model_validate({"prompt": p}).prompt_ids(Tok(), 100, 100)  # noqa: E731
    assert ids("ab c") == [[2, 1]]
    assert ids(["a", "bb"]) == [[1], [2]]
    assert ids([5, 6]) == [[5, 6]]
    assert ids([[5], [6, 7]]) == [[5], [6, 7]]
    for bad, param in (("", "prompt"), ([], "prompt"), ([[1], [100]], "prompt[1]"), ([[1], []], "prompt[1]")):
        with pytest.raises(APIError) as e:
            ids(bad)
        assert e.value.param == param


def test_completion_refuses_echo_suffix_logprobs():
    for field, value in (("echo", True), ("suffix", "x"), ("logprobs", 1), ("best_of", 3)):
        with pytest.raises(APIError) as e:
            CompletionRequest.model_validate({"prompt": "x", field: value}).settings(SERVER)
        assert e.value.param == field


def test_completion_tokens_count_the_stop_token_but_not_the_padding():
    stats = Stats(nfe=4, committed=12)
    assert completion_tokens(Result([1, 2, 3], "abc", "stop", 7, stats)) == 4
    assert completion_tokens(Result([1, 2, 3], "ab", "stop", "c", stats)) == 3
    assert completion_tokens(Result([1, 2, 3], "abc", "length", None, stats)) == 3
    u = usage(5, [Result([1, 2, 3], "abc", "stop", 7, stats), Result([1], "a", "length", None, stats)])
    assert u == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10, "nfe": 8, "tokens_per_forward": 3.0}


def test_stream_never_splits_a_utf8_character():
    data = "héllo 世界".encode()
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731  (one token per byte)
    ts = TextStream(decode, [])
    deltas = [ts.push([b]) for b in data]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + ts.finish(data.decode()) == "héllo 世界"


def test_stream_holds_back_a_possible_stop_string_start():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    ts = TextStream(decode, ["STOP"])
    out = [ts.push([ord(c)]) for c in "abST"]
    assert "".join(out) == "ab"  # "ST" could start "STOP"
    out.append(ts.push([ord("x")]))  # "STx" cannot
    assert "".join(out) == "abSTx"
    out.append(ts.push([ord(c) for c in "STOPzz"]))
    assert "".join(out) == "abSTx"  # never beyond a stop string
    assert "".join(out) + ts.finish("abSTx") == "abSTx"


def test_stream_concatenation_equals_the_final_text():
    words = ["the", " cat", " sat", " on", " the", " mat"]
    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    ts = TextStream(decode, ["mat"])
    out = "".join(ts.push([i]) for i in range(6))
    assert out + ts.finish("the cat sat on the ") == "the cat sat on the "


@pytest.mark.parametrize("loc,name", [(("body", "messages", 0, "role"), "messages[0].role"),
                                      (("body", "temperature"), "temperature"), (("body",), None)])
def test_param_names_follow_openai_style(loc, name):
    assert param_name(loc) == name


def test_lone_surrogates_are_refused_naming_the_field():
    for payload, field in (({"messages": [{"role": "user", "content": "a\ud800"}]}, "content"),
                           ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
                            "content"),
                           ({"messages": MSG, "stop": ["ok", "\ud800"]}, "stop")):
        with pytest.raises(ValidationError) as e:
            ChatCompletionRequest.model_validate(payload)
        err = e.value.errors()[0]
        assert field in err["loc"] and "is not valid Unicode: lone surrogate \\ud" in err["msg"], err
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"prompt": ["fine", "x\ud800"]})
    assert "prompt[1] is not valid Unicode" in e.value.errors()[0]["msg"]


def test_assistant_message_may_omit_content_and_completion_logprobs_zero_is_no_logprobs():
    r = ChatCompletionRequest.model_validate({"messages": [{"role": "assistant"}, *MSG]})
    r.settings(SERVER)
    assert r.messages[0].text() == ""
    with pytest.raises(APIError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]}).settings(SERVER)
    assert e.value.param == "messages[0].content"
    CompletionRequest.model_validate({"prompt": "x", "logprobs": 0}).settings(SERVER)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "logprobs": -1})


def test_prompts_over_the_character_limit_are_refused_before_tokenizing():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            raise AssertionError("tokenized")

        apply_chat_template = __call__

    with pytest.raises(APIError) as e:
        chat(messages=[{"role": "user", "content": "ab"}, {"role": "user", "content": "cd"}]).prompt_ids(Tok(), 3)
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")
    assert "at most 3" in e.value.message
    with pytest.raises(APIError) as e:
        CompletionRequest.model_validate({"prompt": ["ab", "abcd"]}).prompt_ids(Tok(), 100, 3)
    assert e.value.param == "prompt[1]" and "at most 3" in e.value.message
