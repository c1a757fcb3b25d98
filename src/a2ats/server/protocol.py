"""The OpenAI-compatible wire format: request bodies (pydantic, unknown fields refused, no type coercion),
response and stream-chunk bodies, and error bodies in OpenAI's shape ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Strict: "10" is not a number and true is not 1 (a client sending those has a bug worth hearing about).
_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints take besides the prompt. Ranges OpenAI documents are checked by the runtime's
    :class:`~a2ats.runtime.Sampling` (one check, one message)."""

    model_config = _STRICT
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0  # the runtime's default: greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request
    user: str | None = None  # accepted for compatibility; not used
    # Extension: this request's retrieval budget, as --budget: 0.1 is a fraction of the context, 512 tokens.
    budget: int | float | str | None = None

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def top(self) -> int | None:
        """Alternatives to report per token (None: no log probabilities)."""
        raise NotImplementedError

    def biases(self) -> tuple[tuple[int, float], ...]:
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ApiError(400, f"logit_bias keys must be token ids (digits), got {key!r}", "logit_bias")
            out.append((int(key), bias))
        return tuple(out)


class CompletionRequest(_Sampling):
    # text, or token ids; or a list of one of those (OpenAI's batch form, which clients send for a single prompt)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0)] | None = None  # the pick's and this many alternatives' log probabilities
    echo: bool = False  # the prompt's text before the completion's
    best_of: Annotated[int, Field(ge=1, le=1)] = 1  # one candidate, the one returned

    @property
    def top(self) -> int | None:
        return self.logprobs

    @property
    def one_prompt(self) -> str | list[int]:
        """The prompt: text or token ids, unwrapped from a list of one."""
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise ApiError(400, f"this server answers one prompt per request, got a list of {len(p)}: send them "
                               "as separate requests", "prompt")
            return p[0]
        return p


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None  # alternatives per token; needs logprobs: true

    @property
    def top(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ApiError(Exception):
    """An answer other than 200: status, message, and OpenAI's error type, parameter and code."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.TYPES.get(self.status, "invalid_request_error"), self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse(model: type[BaseModel], body: bytes) -> Any:
    """``body`` validated as ``model``, or an :class:`ApiError` (400) naming the first problem."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        loc = _fields(err["loc"])
        where = ".".join(str(x) for x in loc) or None
        kind = err["type"]
        if kind == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}") from None
        if kind == "model_type":
            raise ApiError(400, "the body must be a JSON object") from None
        if kind == "extra_forbidden":
            where = ".".join(str(x) for x in err["loc"])
            known = f" (this endpoint takes: {', '.join(model.model_fields)})" if len(err["loc"]) == 1 else ""
            raise ApiError(400, f"unknown field '{where}'{known}", where) from None
        if kind == "missing":
            raise ApiError(400, f"'{where}' is required", where) from None
        # a union's members each fail: say what each would have needed
        msgs = list(dict.fromkeys(x["msg"] for x in errors if _fields(x["loc"]) == loc))
        raise ApiError(400, f"'{where}': {'; or '.join(msgs)}", where) from None


def _fields(loc: tuple) -> tuple:
    """An error location without pydantic's union-member tags ('str', 'list[int]', ...): fields and indices."""
    out = []
    for x in loc:
        if not (isinstance(x, int) or x in _FIELD_NAMES):
            break
        out.append(x)
    return tuple(out)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(frozen=True)
class TokenText:
    """A generated token's log probability and its alternatives', each token as its text."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -Infinity; OpenAI writes the unlikely as -9999


def logprobs_body(chat: bool, tokens: list[TokenText], offset: int = 0) -> dict[str, Any]:
    """A choice's ``logprobs`` in each endpoint's shape; ``offset``: where the first token's text starts in the
    completion (completions' ``text_offset``)."""
    if chat:
        return {"content": [{"token": t.text, "logprob": _finite(t.logprob), "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": a, "logprob": _finite(lp), "bytes": list(a.encode())}
                                              for a, lp in t.top]} for t in tokens], "refusal": None}
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [_finite(t.logprob) for t in tokens],
            "top_logprobs": [{a: _finite(lp) for a, lp in t.top} for t in tokens], "text_offset": offsets}


def completion_body(chat: bool, id: str, model: str, text: str, finish: str, use: dict[str, int],
                    logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk_body(chat: bool, id: str, model: str, text: str | None, finish: str | None, role: bool = False,
               use: dict[str, int] | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent event's data; ``text`` None: a chunk without a choice (the usage chunk)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        else:
            choice["text"] = text
        choices.append(choice)
    body = {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


_FIELD_NAMES = {name for m in (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions) for name in m.model_fields}
