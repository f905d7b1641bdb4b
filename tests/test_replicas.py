"""`serve.py server.replicas=2`: two server processes behind the sglang-router gateway, on the demo model.

Through the one public URL: the API key, the real model name, chat / completions / streaming / n > 1, LLaDA fields
sent by the `openai` client, bad input, a replica killed under load, and Ctrl-C leaving no process behind. Skipped
when the gateway is not installed.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.test_launch import as_a_background_job

ROOT = Path(__file__).resolve().parents[1]
KEY = "replica-k3y-5e1d"
NAME = "llada-xp-demo"
HI = [{"role": "user", "content": "What is 3 + 4?"}]

pytest.importorskip("sglang_router", reason="the gateway (pip install 'llada-xp[serve]') is not installed")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Replicas:
    """serve.py server.replicas=2 with an API key; the public URL, each replica's URL, the log."""

    def __init__(self, run_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = run_dir / "serve.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), LLADA_XP_API_KEY=KEY)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "server.replicas=2",
                                      f"server.port={self.port}", f"hydra.run.dir={run_dir}",
                                      "model.aliases=[llada-8b-instruct]"],
                                     cwd=run_dir, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     preexec_fn=as_a_background_job)  # Ctrl-C must still stop it all
        self.http = httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> "Replicas":
        deadline = time.time() + timeout
        while "behind the sglang-router gateway" not in self.text():
            assert self.proc.poll() is None, f"serve.py exited {self.proc.returncode}:\n{self.text()[-4000:]}"
            assert time.time() < deadline, f"not ready within {timeout}s:\n{self.text()[-4000:]}"
            time.sleep(0.5)
        self.replicas = {int(i): (int(pid), url) for i, pid, url in
                         re.findall(r"replica (\d+): pid (\d+) on (http://\S+)", self.text())}
        return self

    def post(self, path: str, **body) -> httpx.Response:
        return self.http.post(path, json={"model": NAME, **body})


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Replicas(tmp_path_factory.mktemp("replicas"))
    try:
        yield s.wait_ready()
    finally:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGINT)
            try:
                s.proc.wait(60)
            except subprocess.TimeoutExpired:
                s.proc.kill()
        s.http.close()


def test_public_url_requires_the_key_and_so_does_every_replica(srv):
    body = {"model": NAME, "messages": HI, "max_tokens": 8}
    assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    for _, url in srv.replicas.values():
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    assert httpx.get(srv.url + "/v1/models", timeout=60).status_code == 401  # as on one server (the gateway lets
    assert httpx.get(srv.url + "/health", timeout=60).status_code == 200  # its /v1/models pass without a key)
    assert srv.post("/v1/chat/completions", messages=HI, max_tokens=8).status_code == 200


def test_models_names_the_real_model_through_the_gateway(srv):
    r = srv.http.get("/v1/models")
    assert r.status_code == 200 and NAME in [m["id"] for m in r.json()["data"]], r.text


def test_replicas_answer_health_server_info_and_load(srv):
    for _, url in srv.replicas.values():
        assert httpx.get(url + "/health").json()["model"]["name"] == NAME
        assert httpx.get(url + "/server_info").json()["served_model_name"] == NAME
        load = httpx.get(url + "/get_load").json()
        assert load[0]["dp_rank"] == 0 and load[0]["num_tokens"] >= 0
        assert "llada_xp_requests_total" in httpx.get(url + "/metrics").text


def test_every_replica_line_in_the_shared_log_names_its_replica(srv):
    lines = [line for line in srv.text().splitlines() if '"GET /health HTTP/1.1"' in line]  # uvicorn access lines
    assert {m for line in lines for m in re.findall(r"^\[replica (\d)\] ", line)} == {"0", "1"}, lines[-5:]
    assert all(line.startswith("[replica ") for line in lines), [x for x in lines if not x.startswith("[replica")]
    assert re.search(r"^\[replica 1\] INFO: +Uvicorn running on http://127\.0\.0\.1:", srv.text(), re.M)


def test_gateway_metrics_are_exposed(srv):
    port = re.search(r"gateway metrics on http://[^:]+:(\d+)/metrics", srv.text()).group(1)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "smg_" in text


def test_text_through_the_gateway_equals_each_replicas_own(srv):
    body = dict(messages=HI, max_tokens=16, temperature=0.8, seed=11)
    direct = [httpx.post(url + "/v1/chat/completions", json={"model": NAME, **body}, timeout=120,
                         headers={"Authorization": f"Bearer {KEY}"}).json()["choices"][0]["message"]["content"]
              for _, url in srv.replicas.values()]
    assert direct[0] == direct[1]
    routed = [srv.post("/v1/chat/completions", **body).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert routed == direct  # round robin: one from each replica


def test_stream_through_the_gateway_equals_the_non_stream_text(srv):
    body = dict(messages=HI, max_tokens=16, seed=3)
    whole = srv.post("/v1/chat/completions", **body).json()["choices"][0]["message"]["content"]
    with srv.http.stream("POST", "/v1/chat/completions", json={"model": NAME, "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    streamed = "".join(json.loads(ln)["choices"][0]["delta"].get("content") or "" for ln in lines[:-1])
    assert streamed == whole


def test_completions_with_n_and_llada_fields_through_the_gateway(srv):
    r = srv.post("/v1/completions", prompt="3 + 4 =", max_tokens=8, n=2, seed=5, temperature=0.9, steps=8,
                 block_length=8)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    bad = srv.post("/v1/completions", prompt="3 + 4 =", max_tokens=8, steps=0)  # the field reached the replica
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"


def test_llada_fields_on_chat_reach_the_replica(srv):
    """sglang-router 0.3.2 drops the fields its typed chat request lacks (sgl-project/sglang#22740); the front
    carries them past it (README), so the replica validates them as without the gateway."""
    for field, value in (("steps", 0), ("threshold", 1.5), ("remasking", "lowest"), ("use_cache", "yes")):
        r = srv.post("/v1/chat/completions", messages=HI, max_tokens=8, **{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


# what an old-server client sends: 4 steps on one 16-token block, no parallel decoding, no cache
OLD_CLIENT = {"steps": 4, "block_length": 16, "threshold": None, "use_cache": False, "remasking": "low_confidence"}


def test_openai_client_llada_fields_act_on_chat_stream_and_completions_as_on_one_replica(srv):
    """The `openai` client sends the LLaDA fields through extra_body; through the gateway they have the same effect
    (text, model forwards) as on one replica, on chat, streamed chat and completions."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    _, replica = srv.replicas[0]
    direct = httpx.post(replica + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": NAME, "messages": HI, "max_tokens": 16, **OLD_CLIENT}).json()
    assert direct["usage"]["nfe"] == 4
    chat = client.chat.completions.create(model=NAME, messages=HI, max_tokens=16, extra_body=OLD_CLIENT)
    assert (chat.choices[0].message.content, chat.usage.model_extra["nfe"]) == \
        (direct["choices"][0]["message"]["content"], 4)
    default = client.chat.completions.create(model=NAME, messages=HI, max_tokens=16)
    assert default.usage.model_extra["nfe"] != 4  # the server's sampler (threshold 0.9): a different schedule

    stream = client.chat.completions.create(model=NAME, messages=HI, max_tokens=16, extra_body=OLD_CLIENT,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.model_extra["nfe"] == 4

    direct = httpx.post(replica + "/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": NAME, "prompt": "3 + 4 =", "max_tokens": 16, **OLD_CLIENT}).json()
    text = client.completions.create(model=NAME, prompt="3 + 4 =", max_tokens=16, extra_body=OLD_CLIENT)
    assert (text.choices[0].text, text.usage.model_extra["nfe"]) == (direct["choices"][0]["text"], 4)


# what the replica itself answers, through the gateway, with the OpenAI error object naming the parameter
REPLICA_ANSWERS = [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 300}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HI, "top_p": 0.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": HI, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "a", "threshold": 1.5}, 400, "threshold"),
]
# what the gateway (sglang-router 0.3.2) would answer itself, with its own error text: the front answers it first,
# exactly as a replica does (same status, same OpenAI error object)
GATEWAY_WOULD_ANSWER = [
    ("/v1/chat/completions", b"{", "application/json"),
    ("/v1/chat/completions", b"", "application/json"),
    ("/v1/chat/completions", b"[1, 2]", "application/json"),
    ("/v1/chat/completions", b"\xff\xfe\xfa", "application/json"),
    ("/v1/chat/completions", json.dumps({"model": NAME}).encode(), "application/json"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": HI, "temperature": -1}).encode(),
     "application/json"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": HI, "n": 0}).encode(), "application/json"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": HI, "max_tokens": "8"}).encode(),
     "application/json"),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": HI}).encode(), "text/plain"),
    ("/v1/completions", json.dumps({"model": NAME}).encode(), "application/json"),
    ("/v1/completions", json.dumps({"model": 7, "prompt": "a"}).encode(), "application/json"),
]


@pytest.mark.parametrize("path,payload,status,param", REPLICA_ANSWERS, ids=[p[3] for p in REPLICA_ANSWERS])
def test_bad_input_reaching_a_replica_gets_its_openai_error(srv, path, payload, status, param):
    r = srv.post(path, **payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


def test_bad_input_gets_exactly_a_replicas_answer_and_opens_no_circuit(srv):
    replica = srv.replicas[0][1]
    for _ in range(2):  # 22 bad requests: more than the circuit breaker's 10 failures, were it on
        for path, raw, kind in GATEWAY_WOULD_ANSWER:
            headers = {"content-type": kind}
            direct = srv.http.post(replica + path, content=raw, headers=headers)
            public = srv.http.post(path, content=raw, headers=headers)
            assert 400 <= direct.status_code < 500 and set(direct.json()["error"]) == {"message", "type", "param",
                                                                                        "code"}, direct.text
            assert (public.status_code, public.json()) == (direct.status_code, direct.json()), (raw, public.text)
    for _ in range(2):
        assert srv.post("/v1/chat/completions", messages=HI, max_tokens=8).status_code == 200


def test_a_request_without_model_is_answered_by_the_served_model_as_by_one_server(srv):
    for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "3 + 4 ="})):
        direct = srv.http.post(srv.replicas[0][1] + path, json={**body, "max_tokens": 8})
        public = srv.http.post(path, json={**body, "max_tokens": 8})
        assert public.status_code == direct.status_code == 200, public.text
        assert public.json()["model"] == direct.json()["model"] == NAME
        assert public.json()["choices"][0] == direct.json()["choices"][0]  # temperature 0: the same answer


# valid for one server, refused by the gateway itself (400/422): the front carries them past it
GATEWAY_WOULD_REFUSE = [
    ("/v1/chat/completions", {"messages": HI, "seed": 2**64 - 1, "temperature": 0.8, "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": HI, "n": 12, "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": HI, "stop": ["w", "x", "y", "z", "="], "max_tokens": 16}),
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 8}),  # lm-eval's local-completions sends token ids
    ("/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 8, "seed": 2**63, "temperature": 0.8}),
]


@pytest.mark.parametrize("path,body", GATEWAY_WOULD_REFUSE, ids=["seed", "n", "stop", "ids", "id_batch"])
def test_valid_requests_the_gateway_would_refuse_get_a_replicas_answer(srv, path, body):
    direct = srv.http.post(srv.replicas[0][1] + path, json=body)
    public = srv.http.post(path, json=body)
    assert public.status_code == direct.status_code == 200, public.text
    assert public.json()["choices"] == direct.json()["choices"]  # same seed or temperature 0: the same choices
    assert public.json()["usage"] == direct.json()["usage"]


def test_killing_a_replica_under_load_loses_only_its_requests(srv):
    """Last but one: replica 1 is killed while 8 requests run; the others finish, and every later request works."""
    def ask(_):
        try:
            return srv.post("/v1/completions", prompt="3 + 4 =", max_tokens=64, steps=64, block_length=8).status_code
        except httpx.HTTPError:
            return None

    pid = srv.replicas[1][0]
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(ask, i) for i in range(8)]
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        codes = [f.result() for f in running]
    assert codes.count(200) >= 4, codes  # replica 0's half (round robin) at least
    deadline = time.time() + 30
    while "replica 1 (pid" not in srv.text():
        assert time.time() < deadline, srv.text()[-3000:]
        time.sleep(0.2)
    assert "left out" in srv.text()
    after = [srv.post("/v1/chat/completions", messages=HI, max_tokens=8).status_code for _ in range(10)]
    assert after == [200] * 10


def test_ctrl_c_stops_the_gateway_and_every_replica(srv):
    tree = children(srv.proc.pid)
    assert len(tree) >= 2  # the gateway and replica 0 (replica 1 was killed above)
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(60) == 0
    deadline = time.time() + 10
    while any(alive(p) for p in tree) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in tree if alive(p)]
    assert not alive(srv.replicas[0][0])


def test_missing_gateway_is_told_how_to_install(tmp_path):
    """With sglang_router hidden (a stub package that cannot be found), serve.py says what to pip install."""
    stub = tmp_path / "stub"
    (stub / "sglang_router").mkdir(parents=True)
    code = ("import sys, importlib.util; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'sglang_router' else real(n, *a); "
            f"sys.argv = ['serve.py', 'server.replicas=2', 'hydra.run.dir={tmp_path}/run']; "
            f"sys.path.insert(0, {str(ROOT)!r}); import runpy; runpy.run_path({str(ROOT / 'serve.py')!r}, "
            "run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert p.returncode == 1
    assert "pip install 'llada-xp[serve]'" in p.stdout + p.stderr and "sglang-router==0.3.2" in p.stdout + p.stderr
