"""The front before the gateway (front.py): a server's checks first, then the served model filled in and LLaDA chat
fields carried in metadata, everything else unchanged, in process (an ASGI app as the gateway; the real gateway and
replicas, answering exactly as one server, are in test_replicas.py)."""

import asyncio
import json

import httpx
import pytest

from llada_xp.config import SamplerConfig
from llada_xp.front import CHAT, Front, prepared
from llada_xp.protocol import CARRIER, LLADA_FIELDS, MAX_BODY_BYTES, ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]
SERVER = SamplerConfig(gen_length=128, block_length=32, steps=128, cache="dual", threshold=0.9, temperature=0.0)
OLD_CLIENT = {"steps": 64, "block_length": 16, "cfg_scale": 0.5, "remasking": "random", "use_cache": True,
              "use_dual_cache": False, "threshold": None, "factor": 2.0}  # every LLaDA field, none at its default


def test_every_llada_field_is_one_the_old_server_documents():
    assert set(OLD_CLIENT) == set(LLADA_FIELDS)


def test_carried_fields_survive_a_gateway_that_drops_them_and_give_the_same_settings():
    body = {"model": "m", "messages": MSG, "max_tokens": 48, "metadata": {"team": "a"}, **OLD_CLIENT}
    sent = prepared(CHAT, body, "served")
    forwarded = {k: v for k, v in sent.items() if k not in LLADA_FIELDS}  # what sglang-router 0.3.2 keeps
    routed = ChatCompletionRequest.model_validate(forwarded)
    assert routed.settings(SERVER) == ChatCompletionRequest.model_validate(body).settings(SERVER)
    assert routed.model_extra == {"metadata": {"team": "a"}}  # the user's own metadata, not the carrier


def test_a_carried_field_wins_over_the_top_level_one_the_gateway_may_have_replaced():
    body = {"messages": MSG, "steps": 8, "metadata": {CARRIER: json.dumps({"steps": 4, "block_length": 8})}}
    s = ChatCompletionRequest.model_validate(body).settings(SERVER)[0]
    assert (s.steps, s.block_length) == (4, 8)
    sent = CompletionRequest.model_validate({"prompt": "1 2", "metadata": {CARRIER: json.dumps({"prompt": [1, 2]})}})
    assert sent.prompt == [1, 2] and "metadata" not in (sent.model_extra or {})


# valid for one server, refused by sglang-router 0.3.2 (measured; test_replicas.py sends them through the real one)
GATEWAY_REFUSES = [(CHAT, {"messages": MSG, "seed": 2**64 - 1}, {"seed": 2**64 - 1}),
                   (CHAT, {"messages": MSG, "n": 16}, {"n": 16}),
                   (CHAT, {"messages": MSG, "stop": list("abcde"), "steps": 4}, {"stop": list("abcde"), "steps": 4}),
                   ("/v1/completions", {"prompt": [5, 6, 7]}, {"prompt": [5, 6, 7]}),
                   ("/v1/completions", {"prompt": [[5, 6], [7]], "seed": 2**63}, {"prompt": [[5, 6], [7]], "seed": 2**63})]


@pytest.mark.parametrize("path,body,carried", GATEWAY_REFUSES)
def test_values_the_gateway_refuses_travel_in_the_carrier_and_come_back(path, body, carried):
    sent = prepared(path, {**body, "model": "m"}, "served")
    assert json.loads(sent["metadata"][CARRIER]) == carried
    moved = set(carried) - set(LLADA_FIELDS) - {"prompt"}
    assert not moved & set(sent)  # out of the gateway's sight
    if "prompt" in carried:
        assert sent["prompt"] in ("5 6 7", ["5 6", "7"])  # the ids as text: something to route by
    request = (ChatCompletionRequest if path == CHAT else CompletionRequest).model_validate(sent)
    assert {k: getattr(request, k) for k in carried} == carried


@pytest.mark.parametrize("path,body", [(CHAT, {"messages": MSG, "seed": 2**63 - 1, "n": 10, "stop": list("abcd")}),
                                       ("/v1/completions", {"prompt": ["a", "b"], "n": 16, "stop": list("abcdef")})])
def test_values_the_gateway_takes_stay_where_they_are(path, body):
    assert prepared(path, {**body, "model": "m"}, "served") is None


@pytest.mark.parametrize("carried", ["{", "[1]", json.dumps({"steps": 4, "temperature": 2})])
def test_a_carrier_that_is_not_an_object_of_llada_fields_is_refused(carried):
    with pytest.raises(ValueError, match=f"metadata.{CARRIER} must be a JSON object of fields the replicas' front"):
        ChatCompletionRequest.model_validate({"messages": MSG, "metadata": {CARRIER: carried}})


@pytest.mark.parametrize("path,body", [(CHAT, {"model": "m", "messages": MSG, "max_tokens": 8}),
                                       (CHAT, {"model": "m", "messages": MSG, "steps": 3, "metadata": "tags"}),
                                       ("/v1/completions", {"model": "m", "prompt": "a", "steps": 3})])
def test_requests_naming_their_model_without_llada_chat_fields_pass_unchanged(path, body):
    assert prepared(path, body, "served") is None  # the body goes out as it came, byte for byte


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_a_request_without_model_gets_the_served_one_as_from_one_server(path):
    body = {"prompt": "a"} if path != CHAT else {"messages": MSG}
    assert prepared(path, body, "served") == {**body, "model": "served"}
    assert prepared(path, {**body, "model": None}, "served") == {**body, "model": "served"}
    assert prepared(path, {**body, "model": "alias"}, "served") is None


# ------------------------------------------------------------------------------------------------ the proxy
async def gateway(scope, receive, send):
    """Stands for the gateway: answers every request with what it received, in three chunks."""
    body, more = b"", True
    while more:
        m = await receive()
        body, more = body + m.get("body", b""), m.get("more_body", False)
    seen = json.dumps({"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
                       "auth": dict(scope["headers"]).get(b"authorization", b"").decode(),
                       "body": body.decode()}).encode()
    await send({"type": "http.response.start", "status": 207, "headers": [(b"x-gateway", b"1")]})
    for part in (seen[:5], seen[5:9], seen[9:]):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def through_front(method: str, path: str, upstream=gateway, model=None, api_key=None, **kw) -> httpx.Response:
    async def go():
        front = Front("http://gateway", model, api_key)
        front.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as c:
            r = await c.request(method, path, **kw)
        await front.client.aclose()
        return r

    return asyncio.run(go())


def test_the_front_forwards_method_path_query_headers_and_body_and_returns_the_answer_as_is():
    r = through_front("POST", "/v1/completions?x=1", json={"prompt": "a", "steps": 4},
                      headers={"Authorization": "Bearer k"})
    assert r.status_code == 207 and r.headers["x-gateway"] == "1"
    seen = r.json()
    assert (seen["method"], seen["path"], seen["query"], seen["auth"]) == ("POST", "/v1/completions", "x=1",
                                                                            "Bearer k")
    assert json.loads(seen["body"]) == {"prompt": "a", "steps": 4}  # only chat bodies are rewritten


# bad requests the front answers as one server does (test_replicas.py compares with a real replica's answers)
REFUSED = [(b'{"messages": [', "application/json", 400, None, "invalid_json"),
           (b"", "application/json", 400, None, "invalid_value"),
           (b"[1]", "application/json", 400, None, "invalid_value"),
           (b"\xff\xfe\xfa", "application/json", 400, None, None),
           (b'{"messages": "hi"}', "application/json", 400, "messages", "invalid_value"),
           (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "application/json", 400,
            "temperature", "invalid_value"),
           (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "application/json", 400, "n",
            "invalid_value"),
           (b'{"messages": [{"role": "user", "content": "hi"}], "steps": "8"}', "application/json", 400, "steps",
            "invalid_value"),
           (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain", 415, None, "unsupported_media_type")]


@pytest.mark.parametrize("raw,kind,status,param,code", REFUSED)
def test_a_bad_request_is_answered_by_the_front_with_the_servers_openai_error(raw, kind, status, param, code):
    r = through_front("POST", "/v1/chat/completions", content=raw, headers={"content-type": kind}, model="m")
    assert r.status_code == status, r.text  # not 207: the gateway never saw it
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code, r.json()
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_front_wants_the_key_before_it_reads_the_body():
    bad = {"content": b"{", "headers": {"content-type": "application/json"}}
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        r = through_front("POST", "/v1/chat/completions", api_key="k", **{**bad, "headers": {**bad["headers"],
                                                                                              **auth}})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert through_front("GET", "/v1/models", api_key="k", headers=auth).status_code == 401
    r = through_front("POST", "/v1/chat/completions", api_key="k", **{**bad, "headers": {**bad["headers"],
                                                                                          "Authorization": "Bearer k"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert through_front("GET", "/health", api_key="k").status_code == 207  # only /v1/* wants the key


def test_the_front_sends_the_served_model_when_the_request_has_none():
    r = through_front("POST", "/v1/completions", json={"prompt": "a"}, model="served")
    assert json.loads(r.json()["body"]) == {"prompt": "a", "model": "served"}


def test_the_front_carries_llada_fields_of_a_chat_request():
    r = through_front("POST", "/v1/chat/completions", json={"messages": MSG, "steps": 4})
    sent = json.loads(r.json()["body"])
    assert sent["steps"] == 4 and json.loads(sent["metadata"][CARRIER]) == {"steps": 4}


def test_the_front_refuses_a_body_over_the_replicas_limit_with_the_openai_error():
    r = through_front("POST", "/v1/chat/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_gateway_that_does_not_answer_is_a_502_openai_error():
    async def down(scope, receive, send):
        raise httpx.ConnectError("connection refused")

    r = through_front("GET", "/v1/models", upstream=down)
    assert r.status_code == 502 and set(r.json()["error"]) == {"message", "type", "param", "code"}
