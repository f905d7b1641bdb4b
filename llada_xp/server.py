"""The OpenAI-compatible HTTP server: app factory, endpoints, errors, API key, Prometheus metrics, `serve()`.

The model loads in the lifespan hook on a background thread (/health answers 503 until it is ready); then the
engine's worker thread owns it. Cheap checks come first, before the body is read (API key, content type, room in
the queue, body size); handlers validate (protocol.py), template and tokenize on a thread of their own, submit rows
to the engine and turn its events into OpenAI responses or SSE chunks: the event loop never waits on the model or
the tokenizer. Every error leaves as the OpenAI error object. Knows nothing about tensors beyond token ids, nor
about how decoding works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llada_xp.config import ServeConfig, ServerConfig
from llada_xp.engine import Engine, Failed, Job, QueueFull
from llada_xp.protocol import (MAX_BODY_BYTES, APIError, ChatCompletionRequest, CompletionRequest, ErrorResponse,
                               TextStream, authorized, error_body, media_type_refusal, new_id, now, too_large,
                               unauthorized, usage, validation_body)
from llada_xp.sampler import Finished, Request as Row, Sampler, Tokens

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/server_info",
             "/model_info", "/get_load")
GENERATE = ("/v1/chat/completions", "/v1/completions")
CHARS_PER_TOKEN = 32  # a prompt over max_length × this many characters cannot fit: 400 before it is tokenized
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DISCONNECTED = object()
INTERNAL = "internal server error (the details are in the server log)"


class Metrics:
    """Prometheus metrics on the app's own registry (several apps may live in one process, e.g. tests)."""

    def __init__(self, engine: Callable[[], Optional[Engine]]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llada_xp_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        Gauge("llada_xp_queue_depth", "Rows (choices) waiting for a batch", registry=r).set_function(
            lambda: (e := engine()) and e.waiting or 0)
        Gauge("llada_xp_running_batch_size", "Rows of the running batch not finished yet", registry=r).set_function(
            lambda: (e := engine()) and e.running or 0)
        self.prompt_tokens = Counter("llada_xp_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("llada_xp_completion_tokens", "Completion tokens returned", registry=r)
        self.nfe = Counter("llada_xp_nfe", "Model forwards taken part in, summed over rows", registry=r)
        self.disconnects = Counter("llada_xp_disconnects", "Requests aborted because the client went away",
                                   registry=r)
        self.latency = Histogram("llada_xp_request_latency_seconds", "Arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llada_xp_time_to_first_token_seconds", "Arrival to first final token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("llada_xp_queue_wait_seconds", "Submission to admission into a batch, per row",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.mid_batch = Counter("llada_xp_rows_admitted_mid_batch", "Rows that joined rows already decoding "
                                 "(server.scheduler=continuous)", registry=r)

    def admitted(self, wait_s: float, mid_batch: bool) -> None:
        """The engine's on_admit hook (its worker thread)."""
        self.queue_wait.observe(wait_s)
        if mid_batch:
            self.mid_batch.inc()


class _State:
    """What the app holds: config, load status, the loaded model's tokenizer and info, the engine."""

    def __init__(self, cfg: ServeConfig, on_load_error: Optional[Callable[[Exception], None]]):
        self.cfg, self.on_load_error = cfg, on_load_error
        self.api_key = cfg.server.api_key or os.environ.get("LLADA_XP_API_KEY") or None
        self.loaded = None
        self.engine: Optional[Engine] = None
        self.error: Optional[str] = None
        self.metrics = Metrics(lambda: self.engine)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="llada-xp-tokenize")

    def load(self) -> None:
        from llada_xp.loading import load_model

        try:
            loaded = load_model(self.cfg.model)
            sampler = Sampler(loaded.model, loaded.info.ids, decode=loaded.tokenizer.decode)
            s = self.cfg.server
            engine = Engine(sampler, max_batch_size(s, loaded.info.device), s.max_queue, s.batch_window_ms / 1000,
                            s.scheduler, self.metrics.admitted, s.join_wait_steps)
            self.loaded, self.created = loaded, now()
            self.engine = engine.start()  # last: a set engine means ready
            log.info("ready: serving %s as %s", loaded.info.path, self.names)
        except Exception as e:  # any failure is reported on /health and ends serve() with the reason
            self.error = str(e)
            log.error("model load failed: %s", e)
            if self.on_load_error is not None:
                self.on_load_error(e)

    def close(self) -> None:
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.stop()

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenizing thread (chat template, tokenizer): the event loop answers meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    @property
    def max_chars(self) -> int:
        return CHARS_PER_TOKEN * self.loaded.info.max_length

    def card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "llada-xp",
                "root": self.names[0], "max_model_len": self.loaded.info.max_length}

    @property
    def names(self) -> list[str]:
        return [self.loaded.info.name] + [a for a in self.cfg.model.aliases if a != self.loaded.info.name]

    def ready(self) -> "_State":
        if self.engine is None:
            msg = f"model failed to load: {self.error}" if self.error else "the model is loading; retry shortly"
            raise APIError(503, msg, code="model_not_ready", headers={"Retry-After": "5"})
        return self

    def served_name(self, requested: Optional[str]) -> str:
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise APIError(404, f"model {requested!r} does not exist; this server serves {self.names}", "model",
                           "model_not_found")
        return requested

    def check_length(self, prompt_len: int, gen_length: int, where: str) -> None:
        limit = self.loaded.info.max_length
        if prompt_len + gen_length > limit:
            param = where if prompt_len >= limit else "max_tokens"
            raise APIError(400, f"{where} ({prompt_len} tokens) + max_tokens ({gen_length}) = "
                                f"{prompt_len + gen_length} exceeds the model's max_sequence_length {limit}",
                           param, "context_length_exceeded")


class _Gate:
    """ASGI middleware: Bearer API key on /v1/* (constant-time), and requests counted by endpoint and status."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            err = self._refusal(scope)
            if err is None and path in GENERATE and scope["method"] == "POST":
                receive, err = await _bounded(scope, receive)
            if err is not None:
                await JSONResponse(err.body(), err.status, err.headers)(scope, receive, counted_send)
                return
            await self.app(scope, receive, counted_send)
        finally:
            endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope) -> Optional[APIError]:
        """The checks that need no body: API key on /v1/*; on the generation endpoints the content type, room
        in the queue (a 429 costs no parsing or tokenizing; submit checks again) and the declared body size."""
        path, headers = scope["path"], dict(scope["headers"])
        if path.startswith("/v1/") and self.state.api_key \
                and not authorized(headers.get(b"authorization", b""), self.state.api_key):
            return unauthorized()
        if path not in GENERATE or scope["method"] != "POST":
            return None
        refusal = media_type_refusal(headers.get(b"content-type", b"").decode("latin-1"))
        if refusal is not None:
            return refusal
        if self.state.engine is not None:
            try:
                self.state.engine.check_room()
            except QueueFull as e:
                return _busy(e)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return too_large()
        return None


def _busy(e: QueueFull) -> APIError:
    return APIError(429, str(e), code="server_busy", headers={"Retry-After": str(e.retry_after)})


async def _bounded(scope, receive):
    """(receive, None) for a body within MAX_BODY_BYTES, else (receive, 413 error). A body of declared length
    was checked before (uvicorn holds it to that length); one without is read here, up to the limit, and replayed."""
    if b"content-length" in dict(scope["headers"]):
        return receive, None
    messages, size = [], 0
    while True:
        m = await receive()
        messages.append(m)
        size += len(m.get("body", b""))
        if size > MAX_BODY_BYTES:
            return receive, too_large()
        if m["type"] != "http.request" or not m.get("more_body"):
            break

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay, None


def _errors(*codes: int) -> dict:
    """OpenAPI responses: these statuses, and any other (`default`, e.g. 500), answer the OpenAI error object."""
    doc = {400: "Invalid request; `param` names the parameter", 401: "Missing or invalid API key",
           404: "Unknown model", 413: f"Request body over {MAX_BODY_BYTES} bytes",
           415: "Content-Type is not application/json", 429: "Queue full; retry after Retry-After seconds",
           503: "The model is loading, or failed to load"}
    return {**{c: {"model": ErrorResponse, "description": doc[c]} for c in codes},
            "default": {"model": ErrorResponse, "description": "Any other error (500: internal, see the server log)"}}


def create_app(cfg: ServeConfig, on_load_error: Optional[Callable[[Exception], None]] = None) -> FastAPI:
    """The FastAPI app; the model loads in the background once the app starts (lifespan)."""
    state = _State(cfg, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="llada-xp-load", daemon=True).start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="llada-xp", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for LLaDA diffusion language models (Fast-dLLM decoding)")
    app.state.llada = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), e.status, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse(validation_body(e.errors()), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), e.status_code, e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)  # the details go to the log, never to the client
        return JSONResponse(error_body(500, INTERNAL), 500)

    generate_doc = {200: {"description": "The completion; with stream=true, server-sent events ending with "
                                         "`data: [DONE]`", "content": {"text/event-stream": {}}},
                    **_errors(400, 401, 404, 413, 415, 429, 503)}

    @app.get("/health", responses={503: {"description": "The model is loading or failed to load (same fields)"}})
    async def health():
        ready = state.engine is not None
        info = state.loaded.info if ready else None
        body = {"status": "healthy" if ready else ("failed" if state.error else "loading"), "model_loaded": ready,
                "device": info.device if ready else _planned_device(cfg.model.device)}
        if ready:
            body["model"] = {"name": info.name, "aliases": state.names[1:], "source": info.source, "path": info.path,
                             "dtype": info.dtype, "parameters": info.parameters, "max_length": info.max_length}
            body["max_batch_size"] = state.engine.max_batch_size
            body["threads"] = info.threads
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # What the sglang-router gateway asks a worker (llada_xp/launch.py runs it in front of replicas): /server_info
    # and /model_info when it registers the worker (served_model_name becomes the model id on the gateway's
    # /v1/models), /get_load
    # every second under policy power_of_two (it sums num_tokens over the list: here rows in flight, not tokens).
    @app.get("/server_info", responses={503: {"description": "The model is loading or failed to load"}})
    async def server_info():
        st = state.ready()
        info = st.loaded.info
        return {"served_model_name": st.names[0], "model_path": info.path, "aliases": st.names[1:],
                "max_batch_size": st.engine.max_batch_size, "max_total_tokens": info.max_length,
                "device": info.device, "version": app.version}

    @app.get("/model_info", responses={503: {"description": "The model is loading or failed to load"}})
    async def model_info():
        st = state.ready()
        return {"model_path": st.loaded.info.path, "tokenizer_path": st.loaded.info.path, "is_generation": True,
                "model_type": getattr(st.loaded.model.config, "model_type", None),
                "architectures": getattr(st.loaded.model.config, "architectures", None)}

    @app.get("/get_load", responses={503: {"description": "The model is loading or failed to load"}})
    async def get_load():
        e = state.ready().engine
        waiting, running = e.waiting, e.running
        return [{"dp_rank": 0, "num_reqs": running + waiting, "num_waiting_reqs": waiting,
                 "num_tokens": running + waiting}]

    @app.get("/v1/models", responses=_errors(401, 503))
    async def models():
        st = state.ready()
        return {"object": "list", "data": [st.card(name) for name in st.names]}

    @app.get("/v1/models/{model:path}", responses=_errors(401, 404, 503))
    async def model(model: str):
        st = state.ready()
        return st.card(st.served_name(model))

    @app.post("/v1/chat/completions", responses=generate_doc)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        st = state.ready()
        model = st.served_name(body.model)
        body.log_unknown("/v1/chat/completions")
        settings = body.settings(cfg.sampler)
        prompt = await st.off_loop(body.prompt_ids, st.loaded.tokenizer, st.max_chars)
        st.check_length(len(prompt), settings[0].gen_length, "messages")
        rows = [Row(prompt, s) for s in settings]
        return await _respond(st, request, "chat", model, rows, len(prompt), body, t0)

    @app.post("/v1/completions", responses=generate_doc)
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        st = state.ready()
        model = st.served_name(body.model)
        body.log_unknown("/v1/completions")
        settings = body.settings(cfg.sampler)
        prompts = await st.off_loop(body.prompt_ids, st.loaded.tokenizer, st.loaded.model.config.vocab_size,
                                    st.max_chars)
        for i, p in enumerate(prompts):
            st.check_length(len(p), settings[0].gen_length, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        rows = [Row(p, s) for p in prompts for s in settings]
        return await _respond(st, request, "text", model, rows, sum(map(len, prompts)), body, t0)

    return app


def max_batch_size(s: ServerConfig, device: str) -> int:
    """server.max_batch_size, or its default for the device the model is on."""
    if s.max_batch_size is not None:
        return s.max_batch_size
    return 4 if str(device).split(":")[0] == "cpu" else 16


def _planned_device(device: str) -> str:
    from llada_xp.loading import pick_device

    return str(pick_device(device))


# ------------------------------------------------------------------------------------------------ responding
async def _respond(st: _State, request: Request, kind: str, model: str, rows: list[Row], prompt_tokens: int,
                   body, t0: float):
    try:
        job = st.engine.submit(rows, tokens=bool(body.stream))
    except QueueFull as e:
        raise _busy(e) from e
    except ValueError as e:  # more rows than the queue can ever hold
        raise APIError(400, str(e), "n" if len(rows) == body.n else None) from e
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    run = _Run(st, job, kind, model, rows, prompt_tokens, t0)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(run.stream(watcher, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await run.complete()
    finally:
        watcher.cancel()
        job.cancel()


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Tell the job's consumer when the client goes away (stream or not), so its rows are aborted."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.events.put_nowait((None, _DISCONNECTED))
            return


class _Run:
    """One HTTP request's rows while they decode: events → OpenAI body (complete) or SSE chunks (stream)."""

    def __init__(self, st: _State, job: Job, kind: str, model: str, rows: list[Row], prompt_tokens: int, t0: float):
        self.st, self.job, self.kind, self.model, self.rows = st, job, kind, model, rows
        self.prompt_tokens, self.t0 = prompt_tokens, t0
        self.id, self.created = new_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.gone = False

    def disconnected(self, rows: int) -> None:
        """The client went away: count and log it (once), abort its rows."""
        if not self.gone:
            self.gone = True
            log.info("%s: client disconnected; aborting %d rows", self.id, rows)
            self.st.metrics.disconnects.inc()
        self.job.cancel()

    async def events(self):
        """(choice, Tokens | Finished) until every row finished; Failed → APIError; disconnect → stops."""
        left = len(self.rows)
        while left:
            i, ev = await self.job.events.get()
            if ev is _DISCONNECTED:
                self.disconnected(left)
                return
            if isinstance(ev, Failed):  # the engine logged it
                self.job.cancel()
                bad = isinstance(ev.error, ValueError)
                raise APIError(400 if bad else 500, str(ev.error) if bad else INTERNAL)
            if isinstance(ev, Finished):
                left -= 1
            yield i, ev

    def record(self, results: list) -> dict:
        u = usage(self.prompt_tokens, results)
        m = self.st.metrics
        m.latency.observe(time.perf_counter() - self.t0)
        if self.job.first_token_s is not None:
            m.ttft.observe(self.job.first_token_s - self.t0)
        m.prompt_tokens.inc(u["prompt_tokens"])
        m.completion_tokens.inc(u["completion_tokens"])
        m.nfe.inc(u["nfe"])
        return u

    async def complete(self) -> dict:
        results = [None] * len(self.rows)
        async for i, ev in self.events():
            if isinstance(ev, Finished):
                results[i] = ev.result
        if any(r is None or r.finish_reason == "abort" for r in results):
            return Response(status_code=499)  # the client is gone; nobody reads this
        choices = []
        for i, r in enumerate(results):
            c = {"index": i, "finish_reason": r.finish_reason, "logprobs": None}
            if self.kind == "chat":
                c["message"] = {"role": "assistant", "content": r.text}
            else:
                c["text"] = r.text
            choices.append(c)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.record(results)}

    def chunk(self, i: int, text: Optional[str] = None, finish: Optional[str] = None, role: bool = False) -> str:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return _sse({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                     "choices": [choice]})

    async def stream(self, watcher: asyncio.Task, include_usage: bool) -> AsyncIterator[str]:
        decode = self.st.loaded.tokenizer.decode
        texts = [TextStream(decode, r.settings.stop) for r in self.rows]
        results = [None] * len(self.rows)
        ended = False  # every row ended, or the stream carries an error (else the client left mid-stream)
        try:
            if self.kind == "chat":
                for i in range(len(self.rows)):
                    yield self.chunk(i, role=True)
            async for i, ev in self.events():
                if isinstance(ev, Tokens):
                    delta = texts[i].push(ev.tokens)
                    if delta:
                        yield self.chunk(i, delta)
                elif isinstance(ev, Finished):
                    results[i] = ev.result
                    if ev.result.finish_reason == "abort":  # the server is stopping
                        ended = True
                        return
                    delta = texts[i].finish(ev.result.text)
                    if delta:
                        yield self.chunk(i, delta)
                    yield self.chunk(i, finish=ev.result.finish_reason)
            if any(r is None for r in results):
                return  # disconnected
            ended = True
            u = self.record(results)
            if include_usage:
                yield _sse({"id": self.id, "object": self.object + ".chunk" if self.kind == "chat" else self.object,
                            "created": self.created, "model": self.model, "choices": [], "usage": u})
        except APIError as e:  # the stream has started: the error goes out as a data event
            ended = True
            yield _sse(e.body())
        finally:  # Starlette cancels this generator when the client disconnects: count that here
            watcher.cancel()
            if not ended:
                self.disconnected(sum(r is None for r in results))
            self.job.cancel()
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------ serve
def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted. Raises ModelLoadError (or the load's exception) if the model fails."""
    import uvicorn

    level = cfg.server.log_level.upper()
    logging.getLogger("llada_xp").setLevel(logging.DEBUG if level == "TRACE" else level)
    failed: list[Exception] = []
    server: Optional[uvicorn.Server] = None

    def on_load_error(e: Exception) -> None:
        failed.append(e)
        server.should_exit = True

    app = create_app(cfg, on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                                           log_level=cfg.server.log_level, timeout_graceful_shutdown=5))
    auth = "Bearer key required on /v1/*" if app.state.llada.api_key else "no API key"
    log.info("llada-xp server on http://%s:%d (docs /docs, %s); loading %s", cfg.server.host, cfg.server.port,
             auth, cfg.model.path or cfg.model.source)
    server.run()
    if failed:
        raise failed[0]
