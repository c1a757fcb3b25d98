"""The HTTP surface (FastAPI): ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent
events with ``stream: true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Every answer other than 200 is JSON in OpenAI's error shape; an unexpected exception is logged on the server
and answered 500 with a generic message, never its traceback. Bodies are read and validated here (not by
FastAPI's parameter binding) so the size limit holds before parsing and every 4xx says what was wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from a2ats.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    logprobs_body,
    new_id,
    parse,
    usage,
)
from a2ats.server.service import ClientGone, Service

log = logging.getLogger("a2ats.server")

_OUTCOME = {401: "unauthorized", 429: "overloaded", 500: "error", 503: "unavailable"}  # other 4xx: invalid


def create_app(service: Service) -> FastAPI:
    config, metrics = service.config, service.metrics
    # No interactive docs or schema: nothing is served that was not asked for.
    app = FastAPI(title="a2ats", docs_url=None, redoc_url=None, openapi_url=None)
    key_digest = None if config.api_key is None else hashlib.sha256(config.api_key.encode()).digest()

    def fail(e: ApiError) -> JSONResponse:
        metrics.outcome(_OUTCOME.get(e.status, "invalid"))
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return fail(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return fail(ApiError(e.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return fail(ApiError(400, "the request is not valid"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        metrics.outcome("error")
        return JSONResponse(error_body("internal server error (logged on the server)", "server_error"), 500)

    def authorize(request: Request) -> None:
        if key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Digests of equal length, compared in constant time: neither the key's content nor its length leaks.
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, key_digest):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        too_big = ApiError(413, f"the request body is over the server's limit of {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def json_only(request: Request) -> None:
        # A body of another type is refused before it is read: a web page may post text/plain to a server on
        # localhost without asking first (no CORS preflight), but not application/json.
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                           f"{kind or 'no Content-Type'}", code="unsupported_media_type")

    async def generate(request: Request, kind: type[CompletionRequest] | type[ChatRequest]) -> Response:
        authorize(request)
        json_only(request)
        body = parse(kind, await read_body(request))
        if body.model != config.model_name:
            raise ApiError(404, f"the model '{body.model}' does not exist: this server serves '{config.model_name}'",
                           "model", "model_not_found")
        chat = kind is ChatRequest
        id = new_id("chatcmpl" if chat else "cmpl")
        ids = service.prompt_ids(body)
        r = service.request(body, ids, id)
        echo = service.echo(body, ids)
        gen = service.generation(service.submit(r), body.stops)
        logprobs = body.top is not None
        if body.stream:
            usage_chunk = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(events(request, gen, chat, id, usage_chunk, logprobs, echo),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gone = asyncio.ensure_future(_gone(request))
        try:
            async with aclosing(gen.deltas(gone)) as deltas:
                text = "".join([d async for d in deltas])
        except ClientGone:
            metrics.outcome("cancelled")
            return Response(status_code=499)  # nobody reads it: the client has left
        finally:
            gone.cancel()
        metrics.outcome(gen.finish)
        return JSONResponse(completion_body(chat, id, config.model_name, echo + text, gen.finish,
                                            usage(gen.prompt_tokens, gen.tokens),
                                            logprobs_body(chat, gen.take_logprobs(), len(echo)) if logprobs else None))

    async def events(request: Request, gen, chat: bool, id: str, usage_chunk: bool, logprobs: bool, echo: str):
        """Server-sent events: a chunk per text delta as it is decoded (with its tokens' log probabilities when
        asked for), the finish reason, ``[DONE]``. A failure after the 200 went out arrives as an event
        ``{"error": ...}`` (the OpenAI client raises it)."""
        gone = asyncio.ensure_future(_gone(request))
        outcome = "cancelled"  # unless it ends otherwise: a connection dropped mid-stream cancels
        offset = len(echo)  # completions' text_offset: where the next token's text starts

        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(text: str, finish: str | None = None) -> str:
            nonlocal offset
            lp = None
            if logprobs:
                lp = logprobs_body(chat, gen.take_logprobs(), offset)
                offset += len(text)
            return event(chunk_body(chat, id, config.model_name, text, finish, logprobs=lp))

        try:
            if chat:
                yield event(chunk_body(chat, id, config.model_name, "", None, role=True))
            elif echo:
                yield event(chunk_body(chat, id, config.model_name, echo, None))
            async with aclosing(gen.deltas(gone)) as deltas:
                async for delta in deltas:
                    yield chunk(delta)
            yield chunk("", gen.finish)
            if usage_chunk:
                yield event(chunk_body(chat, id, config.model_name, None, None,
                                       use=usage(gen.prompt_tokens, gen.tokens)))
            yield "data: [DONE]\n\n"
            outcome = gen.finish
        except ClientGone:
            pass
        except ApiError as e:
            outcome = _OUTCOME.get(e.status, "invalid")
            yield event(e.body())
        except Exception:
            log.exception("unexpected error while streaming %s", id)
            outcome = "error"
            yield event(error_body("internal server error (logged on the server)", "server_error"))
        finally:
            gone.cancel()
            gen.cancel()  # the client left before the stream began: nobody reads this sequence
            metrics.outcome(outcome)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatRequest)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                                         "owned_by": "a2ats"}]})

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok", "slots": service.engine.slots, "max_context": service.max_context,
                             "method": service.engine.method_name})

    @app.get("/metrics")
    async def prometheus(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
