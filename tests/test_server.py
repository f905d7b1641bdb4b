"""The real server on a real socket (uvicorn in a background thread), driven by the openai client and httpx.

Most tests use a tiny random model written with tests/tiny.py; the end-to-end payload tests use the bundled demo
model once llada_xp/demo/model exists (else the tiny one).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest
import torch
import uvicorn

from llada_xp.config import ModelConfig, SamplerConfig, ServeConfig, ServerConfig
from llada_xp.server import create_app
from tests import tiny

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hello world"}]
DEFAULTS = SamplerConfig(gen_length=32, block_length=8, steps=32, cache="dual", threshold=0.9)


class Live:
    """A server on a free port in a background thread; `stop()` shuts it down."""

    def __init__(self, model: ModelConfig, sampler: SamplerConfig = DEFAULTS, **server):
        self.app = create_app(ServeConfig(model=model, sampler=sampler, server=ServerConfig(**server)))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 30.0) -> "Live":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.http.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError("server did not become ready")

    @property
    def engine(self):
        return self.app.state.llada.engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.http.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny.write_hub_folder(tmp_path_factory.mktemp("tiny") / "model", tiny.model(sharpen=4.0))


def tiny_model(folder: Path) -> ModelConfig:
    return ModelConfig(source="hf", path=str(folder), name="tiny", aliases=["llada-8b-instruct"], dtype="float32")


@pytest.fixture(scope="module")
def srv(tiny_folder):
    s = Live(tiny_model(tiny_folder)).wait_ready()
    yield s
    s.stop()


class Process:
    """`python serve.py ...` in a subprocess (the real entry point; the client shares no GIL with it)."""

    def __init__(self, overrides: list[str], run_dir: Path):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(run_dir / "serve.log", "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"server.port={port}",
                                      f"hydra.run.dir={run_dir}", "server.log_level=warning", *overrides],
                                     cwd=run_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 120.0) -> "Process":
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                if self.http.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.log.seek(0)
        raise RuntimeError(f"serve.py did not become ready:\n{self.log.read()[-3000:]}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.http.close()
        self.log.close()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """serve.py on the demo model (model=demo), sampler=fast defaults."""
    s = Process(["model=demo", "model.aliases=[llada-8b-instruct]"], tmp_path_factory.mktemp("serve"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def chat(srv: Live, **kw) -> dict:
    r = srv.http.post("/v1/chat/completions", json={"messages": HI, **kw})
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------------ basics
def test_health_keeps_the_old_fields_and_adds_model_info(srv):
    h = srv.http.get("/health").json()
    assert h["status"] == "healthy" and h["model_loaded"] is True and h["device"] == "cpu"
    assert h["model"]["name"] == "tiny" and h["model"]["max_length"] == 256
    assert h["max_batch_size"] == 4  # the CPU default
    assert h["threads"] == torch.get_num_threads() == 1  # auto: one thread for a model this small


def test_max_batch_size_defaults_by_device_and_config_wins():
    from llada_xp.server import max_batch_size

    assert [max_batch_size(ServerConfig(), d) for d in ("cpu", "cuda:0", "cuda")] == [4, 16, 16]
    assert max_batch_size(ServerConfig(max_batch_size=32), "cpu") == 32


def test_models_lists_the_name_and_aliases(srv):
    assert [m.id for m in srv.client().models.list().data] == ["tiny", "llada-8b-instruct"]


def test_models_retrieve_answers_the_name_and_aliases(srv):
    c = srv.client()
    for name in ("tiny", "llada-8b-instruct"):
        m = c.models.retrieve(name)
        assert (m.id, m.object, m.model_extra["root"], m.model_extra["max_model_len"]) == (name, "model", "tiny", 256)
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert srv.metric('llada_xp_requests_total{endpoint="/v1/models/{id}",status="404"}') >= 1


def test_chat_with_the_openai_client(srv):
    r = srv.client().chat.completions.create(model="llada-8b-instruct", messages=HI, max_tokens=20)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "llada-8b-instruct"
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 20 + 1 and r.usage.prompt_tokens > 0
    assert r.usage.model_extra["nfe"] >= 1 and r.usage.model_extra["tokens_per_forward"] > 0


def test_completions_take_a_string_or_a_list(srv):
    c = srv.client()
    one = c.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, seed=1)
    assert one.object == "text_completion" and len(one.choices) == 1
    many = c.completions.create(model="tiny", prompt=["the cat sat", "hello"], max_tokens=12, n=2, seed=1)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == one.choices[0].text


def test_max_tokens_is_a_hard_cap_and_length_is_reported(srv):
    for n in (1, 5, 17):
        r = chat(srv, max_tokens=n, stop=None)
        u, c = r["usage"], r["choices"][0]
        assert u["completion_tokens"] <= n + (c["finish_reason"] == "stop")
        assert c["finish_reason"] in ("stop", "length")
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stream_equals_the_non_stream_text(srv):
    c = srv.client()
    kw = dict(model="tiny", messages=HI, max_tokens=40, temperature=0.8, seed=11)
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really incremental


def test_completion_stream_equals_the_non_stream_text(srv):
    c = srv.client()
    kw = dict(model="tiny", prompt="the cat", max_tokens=24, seed=3, temperature=1.0)
    full = c.completions.create(**kw).choices[0].text
    assert "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices) == full


def test_raw_stream_ends_with_done(srv):
    with srv.http.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True,
                                                                "max_tokens": 8}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_n_choices_with_a_seed_differ_and_reproduce(srv):
    c = srv.client()
    kw = dict(model="tiny", messages=HI, max_tokens=24, temperature=1.0, seed=5, n=3)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]
    assert len(set(texts)) > 1
    single = c.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=1.0, seed=6)
    assert single.choices[0].message.content == texts[1]  # choice i uses seed + i


def test_streamed_n_choices_each_equal_their_non_stream_text(srv):
    c = srv.client()
    kw = dict(model="tiny", messages=HI, max_tokens=24, temperature=1.0, seed=8, n=2)
    full = [ch.message.content for ch in c.chat.completions.create(**kw).choices]
    got = ["", ""]
    for ch in c.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            got[choice.index] += choice.delta.content or ""
    assert got == full


def test_stop_string_cuts_the_answer(srv):
    base = chat(srv, max_tokens=32, temperature=1.0, seed=21)["choices"][0]["message"]["content"]
    words = base.split()
    assert len(words) > 3
    stop = words[2]
    r = chat(srv, max_tokens=32, temperature=1.0, seed=21, stop=[stop, "zzz"])
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["message"]["content"] == base[:base.find(stop)]
    stream = srv.client().chat.completions.create(model="tiny", messages=HI, max_tokens=32, temperature=1.0,
                                                  seed=21, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == c["message"]["content"]


def test_seed_reproduces_sampled_text(srv):
    kw = dict(max_tokens=24, temperature=1.2, remasking="random")
    a = chat(srv, seed=42, **kw)["choices"][0]["message"]["content"]
    assert chat(srv, seed=42, **kw)["choices"][0]["message"]["content"] == a
    assert chat(srv, seed=43, **kw)["choices"][0]["message"]["content"] != a


def test_llada_fields_arrive_through_extra_body(srv):
    c = srv.client()
    for extra in ({"steps": 16, "block_length": 4, "use_cache": False, "use_dual_cache": False},
                  {"use_cache": True, "use_dual_cache": False, "threshold": 0.5},
                  {"factor": 2.0, "cfg_scale": 1.0, "remasking": "random"}, {"threshold": None, "steps": 8}):
        r = c.chat.completions.create(model="tiny", messages=HI, max_tokens=16, extra_body=extra)
        assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HI, extra_body={"remasking": "top"})
    assert e.value.body["param"] == "remasking"


def test_quota_mode_nfe_follows_steps(srv):
    r = chat(srv, max_tokens=16, steps=4, block_length=16, threshold=None, use_cache=False)
    assert r["usage"]["nfe"] <= 4


def test_unknown_fields_are_ignored(srv):
    assert chat(srv, max_tokens=4, foo="bar", metadata={"a": 1})["choices"]


# ------------------------------------------------------------------------------------------------ bad input
BAD = [
    ("malformed json", b"{", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("a string body", b'"hi"', 400, None),
    ("empty body", b"", 400, None),
    ("no messages", {}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("no role", {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content"),
    ("number content", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("null content", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("tool calls", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, 400,
     "messages[0].tool_calls"),
    ("temperature too high", {"temperature": 2.5}, 400, "temperature"),
    ("temperature negative", {"temperature": -0.1}, 400, "temperature"),
    ("temperature string", {"temperature": "hot"}, 400, "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens float", {"max_tokens": 10.5}, 400, "max_tokens"),
    ("max_tokens beyond the model", {"max_tokens": 100000}, 400, "max_tokens"),
    ("prompt beyond the model", {"messages": [{"role": "user", "content": "hello " * 300}]}, 400, "messages"),
    ("aliases disagree", {"max_tokens": 10, "max_completion_tokens": 20}, 400, "max_completion_tokens"),
    ("steps zero", {"steps": 0}, 400, "steps"),
    ("steps too many", {"steps": 513}, 400, "steps"),
    ("block_length zero", {"block_length": 0}, 400, "block_length"),
    ("cfg_scale negative", {"cfg_scale": -1}, 400, "cfg_scale"),
    ("remasking unknown", {"remasking": "entropy"}, 400, "remasking"),
    ("threshold above one", {"threshold": 1.5}, 400, "threshold"),
    ("factor zero", {"factor": 0}, 400, "factor"),
    ("use_cache string", {"use_cache": "yes"}, 400, "use_cache"),
    ("dual without cache", {"use_cache": False, "use_dual_cache": True}, 400, "use_dual_cache"),
    ("n zero", {"n": 0}, 400, "n"),
    ("n too many", {"n": 1000}, 400, "n"),
    ("stop empty", {"stop": ""}, 400, "stop"),
    ("stop not strings", {"stop": [1, 2]}, 400, "stop"),
    ("seed string", {"seed": "abc"}, 400, "seed"),
    ("stream string", {"stream": "yes"}, 400, "stream"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("top_p", {"top_p": 0.5}, 400, "top_p"),
    ("top_k", {"top_k": 50}, 400, "top_k"),
    ("presence_penalty", {"presence_penalty": 1.0}, 400, "presence_penalty"),
    ("frequency_penalty", {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("logit_bias", {"logit_bias": {"1": 10}}, 400, "logit_bias"),
    ("logprobs", {"logprobs": True}, 400, "logprobs"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("json mode", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    ("unknown model", {"model": "gpt-4"}, 404, "model"),
    ("model not a string", {"model": 5}, 400, "model"),
    ("user message without content", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400,
     "messages[0].content"),
    ("lone surrogate in a text part", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": '
     b'"\\udc00 x"}]}]}', 400, "messages[0].content"),
    ("lone surrogate in stop", b'{"messages": [{"role": "user", "content": "x"}], "stop": "\\ud800"}', 400, "stop"),
]
BAD_COMPLETIONS = [
    ("no prompt", {}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("token out of vocabulary", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("mixed prompt list", {"prompt": ["a", 1]}, 400, "prompt"),
    ("echo", {"prompt": "a", "echo": True}, 400, "echo"),
    ("completion logprobs", {"prompt": "a", "logprobs": 1}, 400, "logprobs"),
    ("completion logprobs negative", {"prompt": "a", "logprobs": -1}, 400, "logprobs"),
    ("lone surrogate in prompt", b'{"prompt": "the \\ud800 cat"}', 400, "prompt"),
    ("lone surrogate in a prompt list", b'{"prompt": ["the cat", "\\udfff"]}', 400, "prompt"),
    ("suffix", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
]


def _post(srv: Live, path: str, payload, base: dict) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps({**base, **payload}).encode()
    return srv.http.post(path, content=body, headers={"content-type": "application/json"})


CASES = [("/v1/chat/completions", *c) for c in BAD] + [("/v1/completions", *c) for c in BAD_COMPLETIONS]


@pytest.mark.parametrize("path,name,payload,status,param", CASES, ids=[f"{c[0][4:]}: {c[1]}" for c in CASES])
def test_bad_input_gets_a_4xx_openai_error(srv, path, name, payload, status, param):
    chat_needs_messages = path.endswith("chat/completions") and isinstance(payload, dict) and payload \
        and "messages" not in payload
    r = _post(srv, path, payload, {"messages": HI} if chat_needs_messages else {})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


def test_server_still_answers_after_bad_input(srv):
    for _, payload, _, _ in BAD:
        _post(srv, "/v1/chat/completions", payload, {"messages": HI})
    assert srv.http.get("/health").status_code == 200
    assert chat(srv, max_tokens=8)["choices"][0]["message"]["content"] is not None


def test_unknown_route_and_method_use_the_error_shape(srv):
    r = srv.http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = srv.http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_docs_are_served(srv):
    assert srv.http.get("/docs").status_code == 200
    assert "/v1/chat/completions" in srv.http.get("/openapi.json").json()["paths"]


def test_openapi_document_declares_what_the_server_answers(srv):
    doc = srv.http.get("/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert "422" not in responses and {"400", "401", "404", "413", "415", "429", "503"} <= set(responses)
        assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert "text/event-stream" in responses["200"]["content"]
    assert set(schemas["ErrorInfo"]["properties"]) == {"message", "type", "param", "code"}
    assert "404" in paths["/v1/models/{model}"]["get"]["responses"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert srv.http.get("/metrics").headers["content-type"].startswith("text/plain")
    # what the server refuses, the schema refuses: an empty prompt, content missing on a non-assistant message
    assert all(m.get("minItems", m.get("minLength")) == 1 for m in
               schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"])
    assert schemas["Message"]["then"]["required"] == ["content"]


def test_schema_valid_requests_are_accepted(srv):
    history = [{"role": "user", "content": "hello"}, {"role": "assistant"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "world"}]
    assert chat(srv, messages=history, max_tokens=4)["choices"]
    r = srv.http.post("/v1/completions", json={"prompt": "the cat", "logprobs": 0, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


def test_a_body_not_sent_as_json_is_told_the_content_type(srv):
    body = json.dumps({"messages": HI, "max_tokens": 4}).encode()
    for headers, named in (({"content-type": "application/x-www-form-urlencoded"}, "x-www-form-urlencoded"),
                           ({}, "without a Content-Type")):  # curl -d without -H; no header at all
        r = srv.http.post("/v1/chat/completions", content=body, headers=headers)
        err = r.json()["error"]
        assert r.status_code == 415 and "Content-Type: application/json" in err["message"], r.text
        assert named in err["message"]
    r = srv.http.post("/v1/chat/completions", content=body,
                      headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrent_requests_equal_the_same_requests_alone(srv):
    prompts = ["hello", "the cat sat on the mat", "a b c", "world hello world"]
    reqs = [dict(messages=[{"role": "user", "content": prompts[i % 4]}], max_tokens=16 + i % 3 * 8,
                 temperature=0.7, seed=100 + i) for i in range(16)]
    batches = srv.engine.batches
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda kw: chat(srv, **kw), reqs))
    assert srv.engine.batches - batches < 8  # they were batched
    alone = [chat(srv, **kw) for kw in reqs]
    for t, a in zip(together, alone):
        assert t["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert t["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]


def test_health_answers_quickly_during_generation(e2e):
    long = dict(messages=HI, max_tokens=200, steps=200, threshold=None, use_cache=False)
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(e2e.http.post, "/v1/chat/completions", json=long) for _ in range(4)]
        time.sleep(0.2)
        times = []
        with httpx.Client(base_url=e2e.url) as h:
            for _ in range(10):
                t = time.perf_counter()
                assert h.get("/health").status_code == 200
                times.append(time.perf_counter() - t)
        busy = not any(j.done() for j in jobs)
        assert all(j.result().status_code == 200 for j in jobs)
    assert busy and max(times) < 0.1, times


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_dropped_stream_frees_its_slot_and_spares_the_others(srv, caplog):
    caplog.set_level("INFO", logger="llada_xp.server")
    disconnects = srv.metric("llada_xp_disconnects_total")
    long = dict(max_tokens=200, steps=200, threshold=None, use_cache=False, temperature=0.5)
    other = dict(messages=[{"role": "user", "content": "the cat"}], seed=7, **long)  # alone: 187 tokens
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(chat, srv, max_tokens=40, steps=40, use_cache=False)  # so the next two batch up
        wait_for(lambda: srv.engine.running == 1, what="the blocker to run")
        with srv.http.stream("POST", "/v1/chat/completions",
                             json={"messages": HI, "stream": True, "seed": 4, **long}) as r:
            fut = pool.submit(chat, srv, **other)
            wait_for(lambda: srv.engine.running == 2, what="both requests to run in one batch")
            assert srv.metric("llada_xp_running_batch_size") == 2
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # one real content delta, then drop the connection
        wait_for(lambda: srv.metric("llada_xp_running_batch_size") == 1, what="the dropped row to leave")
        assert not fut.done()
        wait_for(lambda: srv.metric("llada_xp_disconnects_total") == disconnects + 1, what="the count")
        assert "client disconnected; aborting 1 rows" in caplog.text
        together = fut.result()
        assert blocker.result()["choices"]
    assert together["choices"][0]["message"]["content"] == chat(srv, **other)["choices"][0]["message"]["content"]
    assert srv.metric("llada_xp_running_batch_size") == 0


def test_dropped_non_stream_request_is_aborted(srv):
    before = srv.metric("llada_xp_disconnects_total")
    slow = dict(messages=HI, max_tokens=240, steps=240, threshold=None, use_cache=False)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/chat/completions", json=slow, timeout=httpx.Timeout(60, read=0.1))
    wait_for(lambda: srv.metric("llada_xp_disconnects_total") == before + 1, what="the abort")
    wait_for(lambda: srv.engine.running == 0, what="the slot to be freed")
    assert chat(srv, max_tokens=4)["choices"]


def test_metrics_count_requests_tokens_and_latency(srv):
    before = srv.metric("llada_xp_completion_tokens_total")
    r = chat(srv, max_tokens=8)
    assert srv.metric("llada_xp_completion_tokens_total") == before + r["usage"]["completion_tokens"]
    assert srv.metric('llada_xp_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 1
    for name in ("llada_xp_queue_depth", "llada_xp_nfe_total", "llada_xp_disconnects_total", "llada_xp_request_latency_seconds_count",
                 "llada_xp_time_to_first_token_seconds_count", "llada_xp_prompt_tokens_total"):
        srv.metric(name)


# ------------------------------------------------------------------------------------------------ limits
class Tokenizer:
    """The served tokenizer behind a proxy: counts template and tokenizer calls; `slow` seconds each; `fail` raises."""

    def __init__(self, srv: Live, slow: float = 0.0, fail: Optional[Exception] = None):
        self.loaded, self.slow, self.fail, self.calls = srv.app.state.llada.loaded, slow, fail, 0
        self.real = self.loaded.tokenizer

    def __enter__(self):
        self.loaded.tokenizer = self
        return self

    def __exit__(self, *exc):
        self.loaded.tokenizer = self.real

    def _called(self):
        self.calls += 1
        time.sleep(self.slow)
        if self.fail is not None:
            raise self.fail

    def __call__(self, *a, **kw):
        self._called()
        return self.real(*a, **kw)

    def apply_chat_template(self, *a, **kw):
        self._called()
        return self.real.apply_chat_template(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_prompt_over_the_character_limit_is_refused_before_tokenizing(srv):
    limit = 256 * 32  # the tiny model's max_length × CHARS_PER_TOKEN
    with Tokenizer(srv) as tok:
        for path, body, param in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 5000},
                                                                         {"role": "user", "content": "a" * 5000}]},
                                   "messages"),
                                  ("/v1/completions", {"prompt": ["hello", "a" * (limit + 1)]}, "prompt[1]")):
            r = srv.http.post(path, json={**body, "max_tokens": 4})  # the tiny tokenizer: "aaa…" is one token
            err = r.json()["error"]
            assert (r.status_code, err["param"], err["code"]) == (400, param, "context_length_exceeded"), r.text
            assert f"at most {limit}" in err["message"]
        assert tok.calls == 0


def test_internal_errors_do_not_reveal_internals(srv, caplog):
    with Tokenizer(srv, fail=RuntimeError("secret path /home/x")):
        r = srv.http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert "secret path /home/x" in caplog.text


def test_huge_request_is_refused_at_once_while_health_stays_fast(e2e):
    huge = json.dumps({"messages": [{"role": "user", "content": "hello " * 1_666_667}]}).encode()  # 10M chars
    big = json.dumps({"messages": [{"role": "user", "content": "hello " * 200_000}]}).encode()  # 1.2 MB: < limit
    times, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=e2e.url) as h:
            while not done.is_set():
                t = time.perf_counter()
                assert h.get("/health").status_code == 200
                times.append(time.perf_counter() - t)
                time.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        poller = pool.submit(poll)
        time.sleep(0.1)
        t = time.perf_counter()
        r = e2e.http.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4 MiB" in r.json()["error"]["message"], r.text[:300]
        chunked = e2e.http.post("/v1/chat/completions", content=iter([huge[i:i + 2**20] for i in
                                                                     range(0, len(huge), 2**20)]),
                                headers={"content-type": "application/json"})  # no Content-Length
        assert chunked.status_code == 413
        r = e2e.http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        assert "characters" in r.json()["error"]["message"]
        took = time.perf_counter() - t
        done.set()
        poller.result()
    assert took < 5 and len(times) > 3 and max(times) < 0.1, (took, times)


def test_full_queue_answers_429_without_parsing_or_tokenizing(tiny_folder):
    s = Live(tiny_model(tiny_folder), max_batch_size=1, max_queue=1, batch_window_ms=0).wait_ready()
    try:
        slow = {"messages": HI, "max_tokens": 200, "steps": 200, "threshold": None, "use_cache": False}
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(s.http.post, "/v1/chat/completions", json=slow)]
            wait_for(lambda: s.engine.running == 1, what="the first request to run")
            jobs.append(pool.submit(s.http.post, "/v1/chat/completions", json=slow))
            wait_for(lambda: s.engine.waiting == 1, what="a waiting request")
            with Tokenizer(s, slow=5.0) as tok:
                t = time.perf_counter()
                r = s.http.post("/v1/chat/completions", json=slow)
                assert r.status_code == 429 and time.perf_counter() - t < 1 and tok.calls == 0
                r = s.http.post("/v1/completions", content=b'{"prompt": [1, 2, ',
                                headers={"content-type": "application/json"})
                assert r.status_code == 429  # not even parsed
            assert all(j.result().status_code == 200 for j in jobs)
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ server variants
def test_full_queue_answers_429_with_retry_after(tiny_folder):
    s = Live(tiny_model(tiny_folder), max_batch_size=1, max_queue=2, batch_window_ms=0).wait_ready()
    try:
        slow = {"messages": HI, "max_tokens": 200, "steps": 200, "threshold": None, "use_cache": False}
        with ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(s.http.post, "/v1/chat/completions", json=slow)]
            wait_for(lambda: s.engine.running == 1, what="the first request to run")
            jobs += [pool.submit(s.http.post, "/v1/chat/completions", json=slow) for _ in range(2)]
            wait_for(lambda: s.engine.waiting == 2, what="two waiting requests")
            assert s.metric("llada_xp_queue_depth") == 2
            r = s.http.post("/v1/chat/completions", json=slow)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
            assert all(j.result().status_code == 200 for j in jobs)
        r = s.http.post("/v1/chat/completions", json={**slow, "n": 3})  # more rows than the queue ever holds
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    finally:
        s.stop()


def test_error_after_the_stream_started_is_a_data_event_then_done(tiny_folder, caplog):
    s = Live(tiny_model(tiny_folder)).wait_ready()
    real = s.engine.sampler.running

    def broken(on_event=None):  # a running set that emits one token, then fails mid-batch
        def once(e):
            on_event(e)
            raise RuntimeError("device lost")
        return real(once)

    s.engine.sampler.running = broken
    try:
        with s.http.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True}) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "server log" in err["message"]
        assert "device lost" not in err["message"] and "RuntimeError" not in err["message"]  # internals: log only
        r = s.http.post("/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 500 and r.json()["error"]["message"] == err["message"]
        assert "device lost" in caplog.text
        s.engine.sampler.running = real
        assert s.http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4}).status_code == 200
    finally:
        s.stop()


def test_api_key_guards_v1_but_not_health(tiny_folder, monkeypatch):
    monkeypatch.setenv("LLADA_XP_API_KEY", "sekrit")
    s = Live(tiny_model(tiny_folder)).wait_ready()
    try:
        assert s.http.get("/health").status_code == 200
        r = s.http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="sekrit").chat.completions.create(model="tiny", messages=HI, max_tokens=4).choices
    finally:
        s.stop()


def test_health_is_503_while_loading_and_requests_wait_for_ready(tiny_folder, monkeypatch):
    import llada_xp.loading

    gate, real = threading.Event(), llada_xp.loading.load_model
    monkeypatch.setattr(llada_xp.loading, "load_model", lambda cfg: (gate.wait(30), real(cfg))[1])
    s = Live(tiny_model(tiny_folder))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = s.http.get("/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert r.status_code == 503 and r.json()["model_loaded"] is False and r.json()["status"] == "loading"
        r = s.http.post("/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        s.wait_ready()
    finally:
        gate.set()
        s.stop()


def test_failed_load_reports_the_reason_and_exits_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "serve.py"), "model=hf", f"model.path={tmp_path}/missing",
                           "server.port=0", f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "model folder not found" in proc.stdout + proc.stderr


def test_serve_config_composes_with_hydra_overrides():
    from llada_xp.bench import compose_serve_config

    cfg = compose_serve_config([])
    assert isinstance(cfg, ServeConfig) and (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.model.source == "demo" and cfg.sampler.cache == "dual" and cfg.server.api_key is None
    cfg = compose_serve_config(["model=llada_8b_instruct", "sampler=llada", "server.port=8080",
                                "server.log_level=debug"])
    assert (cfg.model.name, cfg.sampler.cache, cfg.server.port, cfg.server.log_level) == \
        ("llada-8b-instruct", "none", 8080, "debug")


# ------------------------------------------------------------------------------------------------ old README
OLD_PAYLOADS = [
    {"model": "llada-8b-instruct", "messages": [{"role": "user", "content": "Hello, how are you?"}],
     "max_tokens": 100, "temperature": 0.0},
    {"messages": [{"role": "user", "content": "Add: 3 + 4"}], "max_tokens": 150, "steps": 64, "block_length": 64},
    {"messages": [{"role": "user", "content": "Copy: the cat"}], "max_tokens": 80, "temperature": 0.0},
    {"messages": [{"role": "user", "content": "Sort: c a b"}], "max_tokens": 128, "steps": 128, "block_length": 32,
     "use_cache": False, "use_dual_cache": False},  # quality preset
    {"messages": [{"role": "user", "content": "Reverse: abc"}], "max_tokens": 128, "use_cache": True,
     "use_dual_cache": True, "threshold": 0.9},  # speed preset
    {"messages": [{"role": "user", "content": "Count a: a b a"}], "max_tokens": 64, "use_cache": True,
     "use_dual_cache": False, "threshold": 0.8},
    {"messages": [{"role": "user", "content": "Add: 10 + 5"}], "max_tokens": 64, "factor": 2.0},
    {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Copy: sun"}],
     "max_tokens": 50, "temperature": 0.7, "cfg_scale": 0.0, "remasking": "random"},
    {"messages": [{"role": "user", "content": "Add: 1 + 1"}], "max_tokens": 60, "steps": 30, "block_length": 20,
     "cfg_scale": 1.0, "remasking": "low_confidence"},
    {"messages": [{"role": "user", "content": "Copy: one two"}], "max_tokens": 32, "stream": True},
    {"messages": [{"role": "user", "content": "Sort: 3 1 2"}], "max_completion_tokens": 48, "stream": True,
     "steps": 512, "block_length": 7},
]


@pytest.mark.parametrize("payload", OLD_PAYLOADS, ids=range(len(OLD_PAYLOADS)))
def test_old_readme_payloads_work(e2e, payload):
    r = e2e.http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200, r.text
    cap = payload.get("max_tokens") or payload.get("max_completion_tokens")
    if payload.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        return
    body = r.json()
    c = body["choices"][0]
    assert c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= cap + 1


def test_old_example_client_flow(e2e):
    """The old example client: check /health's model_loaded, then the openai client with extra_body."""
    assert e2e.http.get("/health").json()["model_loaded"] is True
    c = e2e.client()
    for max_tokens, extra in ((150, {"steps": 64, "block_length": 64}), (80, {})):
        r = c.chat.completions.create(model="llada-8b-instruct", max_tokens=max_tokens, temperature=0.0,
                                      messages=[{"role": "user", "content": "Add: 12 + 30"}], extra_body=extra)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens <= max_tokens + 1
        s = c.chat.completions.create(model="llada-8b-instruct", max_tokens=max_tokens, temperature=0.0,
                                      messages=[{"role": "user", "content": "Add: 12 + 30"}], extra_body=extra,
                                      stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == r.choices[0].message.content


# ------------------------------------------------------------------------------------------------ this README
def readme_blocks(lang: str, start: str) -> list[str]:
    """The README's ```lang code blocks whose first line starts with `start`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if b.startswith(start)]


def test_readme_python_examples_run_as_written(e2e, capsys):
    """The openai and LangChain snippets of the README, unchanged but for the URL, against serve.py on the demo."""
    blocks = readme_blocks("python", "from openai import OpenAI") + readme_blocks("python", "from langchain_openai")
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code.replace("http://localhost:8000", e2e.url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("42 + 7 = 49") == 2  # the demo model answers the README's question, through both clients
    assert "z, q, m, a" in out  # the streamed example


def test_readme_curl_examples_run_as_written(e2e):
    blocks = readme_blocks("bash", "curl http://localhost:8000/health")
    assert len(blocks) == 1
    commands = [c for c in re.split(r"\n(?=curl )", blocks[0].strip()) if c.startswith("curl")]
    assert len(commands) == 4
    for cmd in commands:
        cmd = re.sub(r"\n#.*", "", cmd).replace("http://localhost:8000", e2e.url)
        p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        if '"stream": true' in cmd:
            assert p.stdout.rstrip().endswith("data: [DONE]") and '"usage"' in p.stdout
        else:
            body = json.loads(p.stdout)
            assert "error" not in body and ("status" in body or body["choices"]), body
    presets = readme_blocks("bash", "# Quality: LLaDA's reference decoding")
    assert len(presets) == 1
    for cmd in re.findall(r"^curl .*?}'", presets[0], flags=re.S | re.M):
        p = subprocess.run(["bash", "-c", cmd.replace("http://localhost:8000", e2e.url)], capture_output=True,
                           text=True, timeout=60)
        body = json.loads(p.stdout)
        assert body["choices"][0]["message"]["content"] == "a, c, m, x", body  # both presets, the same answer
