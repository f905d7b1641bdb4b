"""The public front of the replicas: a reverse proxy on server.host:server.port in front of the sglang-router gateway.

The gateway (0.3.2) re-serialises a chat request from its own typed request, which has no field for LLaDA's
`steps`, `block_length`, ... (protocol.LLADA_FIELDS), so they would never reach a replica (sgl-project/sglang#22740);
it keeps `metadata`. The front copies those fields of a chat request into metadata[protocol.CARRIER] (a JSON string;
ChatCompletionRequest takes them back), so clients send what they send to one server. Everything else passes as it
is, both ways, streams included. Knows nothing about models, routing or the API key (the gateway checks it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from llada_xp.protocol import CARRIER, LLADA_FIELDS, error_body

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
MAX_BODY_BYTES = 4 * 2**20  # as a replica's limit (server.py): a bigger body gets the same 413 here
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"host", b"content-length"}  # not forwarded: per connection, or set again for the next hop
_GONE = object()
_NAMES = tuple(f'"{name}"'.encode() for name in LLADA_FIELDS)


def carry(body: bytes) -> bytes:
    """A chat request body with its LLaDA fields also in metadata[CARRIER]; any other body unchanged (bad JSON,
    a metadata that is not an object: the gateway answers those itself)."""
    if not any(name in body for name in _NAMES):  # the usual request: no parsing
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or not isinstance(data.get("metadata", {}), dict):
        return body
    fields = {k: data[k] for k in LLADA_FIELDS if k in data}
    if not fields:
        return body
    data["metadata"] = {**data.get("metadata", {}), CARRIER: json.dumps(fields)}
    return json.dumps(data).encode()


class Front:
    """ASGI app: every HTTP request to `upstream` (the gateway) and its answer back, chat bodies through `carry`."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.client = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        body = await self._body(receive)
        if body is _GONE:
            return
        if body is None:
            return await _error(send, 413, f"the request body is larger than the server's limit of "
                                           f"{MAX_BODY_BYTES} bytes", "request_too_large")
        if scope["method"] == "POST" and scope["path"] == CHAT:
            body = carry(body)
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
            return await _error(send, 502, "the gateway behind this address did not answer", "bad_gateway")
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


async def _error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def run(host: str, port: int, upstream: str, log_level: str) -> None:
    """Serve the front until SIGINT/SIGTERM (uvicorn's handlers)."""
    import uvicorn

    uvicorn.run(Front(upstream), host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                timeout_graceful_shutdown=5)
