"""The OpenAI wire format: request models, their mapping to sampler settings, errors, and streamed text.

One pydantic model per endpoint (ChatCompletionRequest, CompletionRequest). A request converts itself to one
SamplerConfig per choice: user value → the server's default (the sampler config group) → the built-in default.
Cross-field checks and fields we cannot honour raise APIError (HTTP 400 naming the parameter); unknown fields are
logged and ignored. `TextStream` turns final tokens into final text without splitting a character or leaking the
start of a stop string. Knows nothing about threads, the engine, HTTP routing or tensors (the tokenizer is passed in).

Steps rule: a request's `steps` is passed through (1–512); the sampler spreads it over blocks, at least one and at
most one per column each, so the effective count is clamp(steps, number of blocks, max_tokens) and every valid
combination works. Without `steps`, the server's default keeps its ratio to the default canvas:
steps = ceil(default.steps × max_tokens / default.gen_length).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import time
import uuid
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from llada_xp.config import SamplerConfig

log = logging.getLogger(__name__)

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
# The request fields of the old LLaDA server beyond OpenAI's (declared in _Generation). The sglang-router gateway
# drops them from a chat request and refuses some values we take (front.py), so its front sends those in
# metadata[CARRIER] as JSON, which the gateway keeps; a request takes CARRIED fields back from there (_carried).
LLADA_FIELDS = ("steps", "block_length", "cfg_scale", "remasking", "use_cache", "use_dual_cache", "threshold", "factor")
GATEWAY_CHECKED = ("prompt", "n", "stop", "seed")  # OpenAI fields with values the gateway may refuse (front.py)
CARRIED = LLADA_FIELDS + GATEWAY_CHECKED
CARRIER = "llada_xp"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error the client receives as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """The body of every error response (for the OpenAPI document)."""

    error: ErrorInfo


def param_name(loc: tuple) -> Optional[str]:
    """('body', 'messages', 0, 'role') → 'messages[0].role'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


# ------------------------------------------------------------------------ the checks before decoding a request
# A server (server.py) and the replicas' front (front.py) both make them, in this order, with these answers: a
# request refused by the front gets exactly what one server would answer.
MAX_BODY_BYTES = 4 * 2**20  # a bigger request body gets 413 unread (a max-length prompt is far smaller)
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def authorized(header: bytes, key: str) -> bool:
    """Does an Authorization header carry `Bearer key` (constant-time)?"""
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode())


def unauthorized() -> APIError:
    return APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def media_type_refusal(content_type: str) -> Optional[APIError]:
    """415 unless a generation request's Content-Type is JSON (application/json or application/*+json)."""
    mime = content_type.split(";")[0].strip().lower()
    if mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")):
        return None
    return APIError(415, f"the body must be JSON sent with Content-Type: application/json, not "
                         f"{content_type or 'without a Content-Type'} (curl: add -H 'Content-Type: application/json')",
                    code="unsupported_media_type")


def too_large() -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {MAX_BODY_BYTES} bytes "
                         f"({MAX_BODY_BYTES / 2**20:g} MiB)", code="request_too_large")


def validation_body(errors) -> dict:
    """pydantic / FastAPI validation errors → one OpenAI error (HTTP 400) naming the first bad parameter."""
    if not errors:
        return error_body(400, "invalid request")
    e = errors[0]
    if e.get("type") == "json_invalid":
        return error_body(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None,
                          "invalid_json")
    loc = tuple(p for p in e.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
    param = param_name(loc)
    msg = e.get("msg", "invalid value")
    if param is None and e.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        msg = "the request body must be a JSON object"
    return error_body(400, f"{param}: {msg}" if param else msg, param, "invalid_value")


def read_body(raw: bytes, request_model: type[BaseModel]) -> tuple[Any, Optional[dict]]:
    """(the decoded JSON, None), or (None, the 400 error body) a server answers for this body: FastAPI's decoding
    (fastapi.routing: an empty body is a missing one, a JSON error is json_invalid, anything else "There was an error
    parsing the body") and the request model's validation."""
    from pydantic import ValidationError

    if not raw:
        return None, validation_body([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, validation_body([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "ctx": {"error": e.msg}}])
    except ValueError:  # not UTF-8/16/32
        return None, error_body(400, "There was an error parsing the body")
    try:
        request_model.model_validate(data)
    except ValidationError as e:
        return None, validation_body(e.errors())
    return data, None


def valid_unicode(text: str, what: str) -> str:
    """`text`, or ValueError if it holds a lone UTF-16 surrogate (JSON allows "\\ud800"; no tokenizer does)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: lone surrogate {ascii(text[e.start])[1:-1]} at character "
                         f"{e.start}") from None
    return text


# ---------------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


_TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
              "required": ["type", "text"]}


class Message(BaseModel):
    """A chat message; as in OpenAI's API, only an assistant message may omit its content (it then counts as "")."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={
        "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
        "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}})
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Annotated[dict[str, Any], WithJsonSchema(_TEXT_PART)]], None] = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            for j, part in enumerate(v):
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {j} has type {kind!r}; only text parts "
                                     f'({{"type": "text", "text": "..."}}) are supported')
                valid_unicode(part["text"], f"content part {j}")
        elif isinstance(v, str):
            valid_unicode(v, "content")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p["text"] for p in self.content)
        return self.content or ""


class _Generation(BaseModel):
    """Fields common to both endpoints: OpenAI sampling fields, refused ones, and the LLaDA / Fast-dLLM fields."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: Optional[str] = Field(None, description="Served model name or alias; omitted = the served model")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = argmax (default 0)")
    max_tokens: Optional[int] = Field(None, ge=1, description="Hard cap on answer tokens (the canvas length)")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt")
    stop: Union[str, list[str], None] = Field(None, description="Stop string(s); the answer ends before one")
    seed: Optional[int] = Field(None, ge=-2**63, le=2**64 - 1, description="Seed; choice i uses seed + i")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # LLaDA fields (old server's names, ranges and meaning)
    steps: Optional[int] = Field(None, ge=1, le=512, description="Denoising steps over the answer canvas")
    block_length: Optional[int] = Field(None, ge=1, description="Columns decoded together, left to right")
    cfg_scale: Optional[float] = Field(None, ge=0, description="Classifier-free guidance scale (0 = off)")
    remasking: Optional[Literal["low_confidence", "random"]] = None
    # Fast-dLLM fields: both caches → dual, only use_cache → prefix, neither → none
    use_cache: Optional[bool] = None
    use_dual_cache: Optional[bool] = None
    threshold: Optional[float] = Field(None, ge=0, le=1, description="Parallel decoding threshold; null = off")
    factor: Optional[float] = Field(None, gt=0, description="Fast-dLLM dynamic factor (wins over threshold)")
    # OpenAI fields accepted only at their neutral value (we cannot honour anything else)
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop strings are supported, got {len(v)}")
            if any(not s for s in v):
                raise ValueError("stop strings must be non-empty")
        elif v == "":
            raise ValueError("stop strings must be non-empty")
        for s in [v] if isinstance(v, str) else v or []:
            valid_unicode(s, "stop string")
        return v

    @model_validator(mode="before")
    @classmethod
    def _carried(cls, data):
        """Fields the front carried past the gateway in metadata[CARRIER] become top-level fields again; a carried
        value wins (it is the client's own: the gateway may have dropped or replaced the top-level one)."""
        meta = data.get("metadata") if isinstance(data, dict) else None
        if not isinstance(meta, dict) or CARRIER not in meta:
            return data
        try:
            carried = json.loads(meta[CARRIER])
        except (TypeError, ValueError):
            carried = None
        if not isinstance(carried, dict) or set(carried) - set(CARRIED):
            raise ValueError(f"metadata.{CARRIER} must be a JSON object of fields the replicas' front carries "
                             f"({', '.join(CARRIED)})")
        rest = {k: v for k, v in meta.items() if k != CARRIER}
        data = {**{k: v for k, v in data.items() if k != "metadata"}, **carried}
        return {**data, "metadata": rest} if rest else data

    # ----------------------------------------------------------------- checks
    def refuse(self) -> None:
        """Raise APIError for any field set to a value we cannot honour (never silently ignored)."""
        neutral = {"top_p": (1.0,), "top_k": (0, -1), "min_p": (0.0,), "presence_penalty": (0.0,),
                   "frequency_penalty": (0.0,), "repetition_penalty": (1.0,)}
        for name, ok in neutral.items():
            v = getattr(self, name)
            if v is not None and v not in ok:
                raise APIError(400, f"{name}={v!r} is not supported by diffusion decoding; omit it or send "
                                    f"{ok[0]!r}", name, "unsupported_parameter")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported; omit it or send {}", "logit_bias",
                           "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")

    def log_unknown(self, endpoint: str) -> None:
        extra = sorted(self.model_extra or {})
        if extra:
            log.info("%s: ignoring unknown fields %s", endpoint, ", ".join(extra))

    @property
    def canvas(self) -> Optional[int]:
        return self.max_tokens

    # ----------------------------------------------------------------- settings
    def settings(self, default: SamplerConfig) -> list[SamplerConfig]:
        """One SamplerConfig per choice: user value → server default → built-in default."""
        self.refuse()
        given = self.model_fields_set
        gen = self.canvas or default.gen_length
        if self.steps is not None:
            steps = self.steps
        else:  # keep the server's steps-per-token ratio for the requested canvas
            steps = max(1, math.ceil(default.steps * gen / default.gen_length))
        cache = self._cache(default.cache)
        threshold = self.threshold if "threshold" in given else default.threshold
        factor = self.factor if "factor" in given else default.factor
        stop = ([self.stop] if isinstance(self.stop, str) else list(self.stop)) if self.stop is not None \
            else list(default.stop)
        seed = self.seed if self.seed is not None else default.seed
        base = dataclasses.replace(
            default, gen_length=gen, steps=steps, cache=cache, threshold=threshold, factor=factor, stop=stop,
            temperature=default.temperature if self.temperature is None else float(self.temperature),
            block_length=self.block_length or default.block_length,
            cfg_scale=default.cfg_scale if self.cfg_scale is None else float(self.cfg_scale),
            remasking=self.remasking or default.remasking)
        return [dataclasses.replace(base, seed=None if seed is None else (seed + i) % 2**64)
                for i in range(self.n)]

    def _cache(self, default: str) -> str:
        """use_cache / use_dual_cache (old server) → cache mode; unset ones take the server default's values."""
        if self.use_cache is False and self.use_dual_cache is True:
            raise APIError(400, "use_dual_cache=true needs use_cache=true (the dual cache is a KV cache)",
                           "use_dual_cache")
        use_cache = self.use_cache if self.use_cache is not None else default != "none" or self.use_dual_cache
        dual = self.use_dual_cache if self.use_dual_cache is not None else default == "dual"
        return ("dual" if dual else "prefix") if use_cache else "none"


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Newer name of max_tokens")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict[str, Any], None] = None
    response_format: Optional[dict[str, Any]] = None

    @property
    def canvas(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def refuse(self) -> None:
        super().refuse()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                f"({self.max_completion_tokens}) disagree; send one", "max_completion_tokens")
        if self.logprobs:
            raise APIError(400, "logprobs is not supported", "logprobs", "unsupported_parameter")
        if self.top_logprobs:
            raise APIError(400, "top_logprobs is not supported", "top_logprobs", "unsupported_parameter")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (tool calling) is not supported", name, "unsupported_parameter")
        for name in ("tool_choice", "function_call"):
            v = getattr(self, name)
            if v is not None and v not in ("none", "auto"):
                raise APIError(400, f"{name}={v!r} is not supported (no tool calling)", name,
                               "unsupported_parameter")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format type {self.response_format.get('type')!r} is not supported; "
                                "only 'text'", "response_format", "unsupported_parameter")
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":
                raise APIError(400, f"messages[{i}] ({m.role}) has no content", f"messages[{i}].content")
            for key in ("tool_calls", "function_call", "audio"):
                if (m.model_extra or {}).get(key):
                    raise APIError(400, f"messages[{i}].{key} is not supported", f"messages[{i}].{key}",
                                   "unsupported_parameter")

    def prompt_ids(self, tokenizer, max_chars: Optional[int] = None) -> list[int]:
        """The chat template applied to the messages ("developer" is sent as "system"), as token ids.

        Messages longer than `max_chars` characters in all (None = no limit) are refused before the template runs."""
        chars = sum(len(m.text()) for m in self.messages)
        if max_chars is not None and chars > max_chars:
            raise APIError(400, f"messages have {chars} characters; this model takes at most {max_chars}",
                           "messages", "context_length_exceeded")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own types (e.g. role-order checks in some templates)
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from e
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class CompletionRequest(_Generation):
    """POST /v1/completions: raw prompt(s), for base models and completion clients."""

    # the schema says what prompt_ids() checks: no empty prompt (the sampler needs one token), ids >= 0
    prompt: Annotated[Union[str, list[str], list[int], list[list[int]]], WithJsonSchema({"anyOf": [
        _TEXT, {"type": "array", "items": _TEXT, "minItems": 1}, _IDS,
        {"type": "array", "items": _IDS, "minItems": 1}]})]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = Field(None, ge=0, description="0 = no logprobs (the only value supported)")

    @field_validator("prompt")
    @classmethod
    def _valid_text(cls, v):
        for i, one in enumerate([v] if isinstance(v, str) else v):
            if isinstance(one, str):
                valid_unicode(one, "prompt" if isinstance(v, str) else f"prompt[{i}]")
        return v

    def refuse(self) -> None:
        super().refuse()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", "suffix", "unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (only best_of = n)", "best_of", "unsupported_parameter")
        if self.logprobs:
            raise APIError(400, "logprobs is not supported; omit it or send 0", "logprobs", "unsupported_parameter")

    def prompt_ids(self, tokenizer, vocab_size: int, max_chars: Optional[int] = None) -> list[list[int]]:
        """Each prompt as token ids (strings are encoded with the tokenizer's special tokens, e.g. BOS).

        A string longer than `max_chars` characters (None = no limit) is refused before it is tokenized."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            p = [p]
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        wheres = ["prompt"] if len(p) == 1 else [f"prompt[{i}]" for i in range(len(p))]
        for where, one in zip(wheres, p):
            if isinstance(one, str) and max_chars is not None and len(one) > max_chars:
                raise APIError(400, f"{where} has {len(one)} characters; this model takes at most {max_chars}",
                               where, "context_length_exceeded")
        out = []
        for where, one in zip(wheres, p):
            if isinstance(one, str):
                ids = list(tokenizer(one)["input_ids"])
                if not one or not ids:
                    raise APIError(400, f"{where} is empty", where)
            else:
                bad = next((t for t in one if not 0 <= t < vocab_size), None)
                if not one or bad is not None:
                    raise APIError(400, f"{where} is empty" if not one else
                                   f"{where} has token id {bad} outside the vocabulary [0, {vocab_size})", where)
                ids = list(one)
            out.append(ids)
        return out


# ---------------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def completion_tokens(result) -> int:
    """Tokens returned plus the stop token that ended the answer (not the EOS padding of the canvas)."""
    return len(result.tokens) + (1 if isinstance(result.stop, int) else 0)


def usage(prompt_tokens: int, results: list) -> dict:
    """OpenAI usage plus the diffusion stats: model forwards (summed over choices) and tokens per forward."""
    done = sum(completion_tokens(r) for r in results)
    nfe = sum(r.stats.nfe for r in results)
    committed = sum(r.stats.committed for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "nfe": nfe, "tokens_per_forward": round(committed / nfe, 4) if nfe else 0.0}


class TextStream:
    """Final tokens in, final text out: decodes the committed prefix and sends only text that cannot change.

    Holds back trailing U+FFFD (a UTF-8 character split across tokens) and any tail that could start a stop
    string. `finish(text)` sends the rest of the sampler's final text (already cut at stop strings), so the
    concatenated deltas equal the non-stream text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.decode(self.tokens).rstrip("\ufffd")
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text = text[:min(hits)]
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = text[:len(text) - hold]
        return self._advance(safe)

    def finish(self, text: Optional[str]) -> str:
        return self._advance(text or "", final=True)

    def _advance(self, safe: str, final: bool = False) -> str:
        if not safe.startswith(self.sent):
            if final:
                log.warning("final text does not extend the streamed text; the stream may differ from it")
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta
