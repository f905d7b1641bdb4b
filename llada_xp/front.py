"""The public front of the replicas: a reverse proxy on server.host:server.port in front of the sglang-router gateway.

The gateway (0.3.2) answers some bad requests itself, with its own error text (400/422 without `param`), requires
`model`, and re-serialises a chat request from its own typed request, which has no field for LLaDA's `steps`,
`block_length`, ... (protocol.LLADA_FIELDS), so they would never reach a replica (sgl-project/sglang#22740); it keeps
`metadata`. So on the two generation endpoints the front makes a server's own checks first (protocol: API key,
Content-Type, body size, the request model's validation), answering exactly what one server would; then it fills in
the served model when `model` is left out, and copies the LLaDA fields of a chat request into
metadata[protocol.CARRIER] (a JSON string; ChatCompletionRequest takes them back). Clients see what one server shows
them. Everything else passes as it is, both ways, streams included. Knows nothing about routing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Optional

from llada_xp.protocol import (CARRIER, GATEWAY_CHECKED, LLADA_FIELDS, MAX_BODY_BYTES, APIError,
                               ChatCompletionRequest, CompletionRequest, authorized, error_body, media_type_refusal,
                               read_body, too_large, unauthorized)

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
REQUESTS = {CHAT: ChatCompletionRequest, "/v1/completions": CompletionRequest}
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"host", b"content-length"}  # not forwarded: per connection, or set again for the next hop
_GONE = object()


def prepared(path: str, data: dict, model: Optional[str]) -> Optional[dict]:
    """The body the gateway gets for a valid request `data`, or None to send it as it came: with the served `model`
    when the client left it out (one server then answers with its model; the gateway would refuse the request), and
    in metadata[CARRIER] what the gateway would lose: a chat request's LLaDA fields (dropped), and values it refuses
    (`_gateway_refuses`), taken out of the top level (a token-id prompt leaves its ids as text there, for routing).
    A request whose metadata is not an object is sent as it came (the gateway answers it)."""
    carried = {k: data[k] for k in LLADA_FIELDS if k in data} if path == CHAT else {}
    carried |= {k: data[k] for k in GATEWAY_CHECKED if k in data and _gateway_refuses(path, k, data[k])}
    out = {k: v for k, v in data.items() if k not in carried or k in LLADA_FIELDS}
    if "prompt" in carried:
        ids = carried["prompt"]
        out["prompt"] = [" ".join(map(str, one)) for one in ids] if ids and isinstance(ids[0], list) \
            else " ".join(map(str, ids))
    if data.get("model") is None and model is not None:
        out["model"] = model
    if carried and isinstance(data.get("metadata", {}), dict):
        out["metadata"] = {**data.get("metadata", {}), CARRIER: json.dumps(carried)}
    elif carried:
        return None
    return None if out == data else out


def _gateway_refuses(path: str, key: str, value) -> bool:
    """Values we take that sglang-router 0.3.2 refuses (measured: 400/422 before any replica sees them): a seed
    outside i64; on chat more than 10 choices or 4 stop strings; on completions a prompt of token ids."""
    if key == "seed":
        return not -2**63 <= value < 2**63
    if path == CHAT:
        return (key == "n" and value > 10) or (key == "stop" and isinstance(value, list) and len(value) > 4)
    return key == "prompt" and not isinstance(value, str) and not all(isinstance(p, str) for p in value)


class Front:
    """ASGI app: every HTTP request to `upstream` (the gateway) and its answer back; a generation request only once
    it passes a server's checks (`api_key`: the key a replica wants), then as `prepared` makes it (`model`: the
    served model's name)."""

    def __init__(self, upstream: str, model: Optional[str] = None, api_key: Optional[str] = None):
        self.upstream, self.model, self.api_key = upstream.rstrip("/"), model, api_key
        self.client = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, headers = scope["path"], dict(scope["headers"])
        request_model = REQUESTS.get(path) if scope["method"] == "POST" else None
        if self.api_key and path.startswith("/v1/") and not authorized(headers.get(b"authorization", b""),
                                                                      self.api_key):
            return await _refuse(send, unauthorized())
        if request_model is not None:
            refusal = media_type_refusal(headers.get(b"content-type", b"").decode("latin-1"))
            if refusal is not None:
                return await _refuse(send, refusal)
        body = await self._body(receive)
        if body is _GONE:
            return
        if body is None:
            return await _refuse(send, too_large())
        if request_model is not None:
            if len(body) > 2**13:  # a chat request parses in ~20 µs, a 4,000-id prompt in 3 ms: off the event loop
                data, error = await asyncio.to_thread(read_body, body, request_model)
            else:
                data, error = read_body(body, request_model)
            if error is not None:
                return await _send_json(send, 400, error)
            if (out := prepared(path, data, self.model)) is not None:
                body = json.dumps(out).encode()
        url = self.upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        request = self.client.build_request(scope["method"], url, content=body,
                                            headers=[(k, v) for k, v in scope["headers"] if k.lower() not in HOP])
        relay = asyncio.create_task(self._relay(request, send))
        gone = asyncio.create_task(_disconnect(receive))
        # a client that leaves closes the connection to the gateway, which then gives up on the request
        await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (relay, gone):
            task.cancel()
        if relay.done() and not relay.cancelled():
            relay.result()

    async def _relay(self, request, send) -> None:
        import httpx

        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.warning("the gateway did not answer %s %s: %s", request.method, request.url.path, e)
            return await _send_json(send, 502, error_body(502, "the gateway behind this address did not answer",
                                                          code="bad_gateway"))
        try:
            # the body goes out as the gateway sent it (aiter_raw: still encoded), so its length holds
            headers = [(k, v) for k, v in response.headers.raw
                       if k.lower() not in HOP or k.lower() == b"content-length"]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError as e:  # the answer had started: the client sees a cut response
            log.warning("the gateway's answer to %s %s broke off: %s", request.method, request.url.path, e)
        finally:
            await response.aclose()

    @staticmethod
    async def _body(receive):
        """The whole request body; None once it exceeds MAX_BODY_BYTES, _GONE if the client left meanwhile."""
        chunks, size, more = [], 0, True
        while more:
            m = await receive()
            if m["type"] == "http.disconnect":
                return _GONE
            chunks.append(m.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return None
            more = m.get("more_body", False)
        return b"".join(chunks)

    async def _lifespan(self, receive, send) -> None:
        import httpx

        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                # no pool limit (the gateway queues), no timeout (the gateway has its own, and decoding is long)
                self.client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None,
                                                                                   max_keepalive_connections=256))
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _refuse(send, e: APIError) -> None:
    await _send_json(send, e.status, e.body(), e.headers)


async def _send_json(send, status: int, obj: dict, extra: Optional[dict] = None) -> None:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]})
    await send({"type": "http.response.body", "body": body})


def run(host: str, port: int, upstream: str, log_level: str, model: Optional[str], api_key: Optional[str]) -> None:
    """Serve the front until SIGINT/SIGTERM (uvicorn's handlers)."""
    import uvicorn

    uvicorn.run(Front(upstream, model, api_key), host=host, port=port, log_level=log_level, access_log=False,
                lifespan="on", timeout_graceful_shutdown=5)
