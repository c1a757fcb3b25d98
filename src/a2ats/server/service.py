"""What a request becomes between HTTP and the engine: prompt ids (text, ids, or chat messages through the model's
template), a checked :class:`~a2ats.runtime.Request`, and its text as the tokens arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from a2ats.runtime import Engine, Request, Sampling, SamplingError, TokenLogprobs
from a2ats.server.config import ServerConfig
from a2ats.server.metrics import Metrics
from a2ats.server.protocol import ApiError, ChatRequest, CompletionRequest, TokenText
from a2ats.server.text import TextStream
from a2ats.server.worker import Draining, End, Job, Overloaded, Token, Worker


class ClientGone(Exception):
    """The client closed the connection; its sequence was cancelled."""


def stop_token_ids(tokenizer, model) -> set[int]:
    """Ids that end a sequence: the tokenizer's end-of-sequence token and the model's generation config's (an
    instruct model's end-of-turn token is often only there)."""
    ids: set[int] = set()
    for x in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update([] if x is None else [x] if isinstance(x, int) else x)
    return ids


class Service:
    """The engine behind the API: its worker thread, metrics, and the per-request logic."""

    def __init__(self, engine: Engine, tokenizer, config: ServerConfig, stop_tokens: set[int]):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.stop_tokens = set(stop_tokens)
        self.metrics = Metrics(engine.slots, engine.method_name)
        self.metrics.prefix = engine.prefix
        self.worker = Worker(engine, self.stop_tokens, config.max_queue, self.metrics)
        self.draining = False

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    # -- requests ----------------------------------------------------------------------------------------------

    def prompt_ids(self, body: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(body, ChatRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, "this model has no chat template: send the text to /v1/completions", "messages")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(enc["input_ids"])
        prompt = body.one_prompt
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt is empty", "prompt")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = prompt
            vocab = self.engine.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def echo(self, body: CompletionRequest | ChatRequest, ids: list[int]) -> str:
        """The prompt's text when a completion request asks for it back (``echo``), else ''."""
        if not (isinstance(body, CompletionRequest) and body.echo):
            return ""
        prompt = body.one_prompt
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)

    def request(self, body: CompletionRequest | ChatRequest, ids: list[int], id: str) -> Request:
        """The engine request for ``body``, refused (400) when it cannot run in a slot."""
        asked = body.new_tokens if isinstance(body, ChatRequest) else body.max_tokens
        room = self.max_context - len(ids)
        new = asked if asked is not None else min(self.config.default_max_tokens, room)
        if new < 1 or len(ids) + new > self.max_context:
            what = f"{len(ids)} prompt tokens + {new} new tokens" if new >= 1 else f"{len(ids)} prompt tokens"
            raise ApiError(400, f"this request needs {what}, more than a slot holds: {self.max_context} tokens (the "
                           "server's --max-context); shorten the prompt or lower max_tokens",
                           "max_tokens" if asked is not None and len(ids) < self.max_context else "prompt",
                           "context_length_exceeded")
        if isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs would need the prompt's log probabilities, which this server does "
                           "not compute: leave out echo or logprobs", "echo")
        try:
            sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                logit_bias=body.biases(), logprobs=body.top)
        except SamplingError as e:
            field = "top_logprobs" if isinstance(body, ChatRequest) and e.field == "logprobs" else e.field
            raise ApiError(400, str(e), field) from None
        try:
            r = Request(ids, new, id=id, sampling=sampling, budget=body.budget)
            self.engine.check(r)
        except SamplingError as e:
            raise ApiError(400, str(e), e.field) from None
        except ValueError as e:
            raise ApiError(400, str(e), "budget" if body.budget is not None and "budget" in str(e) else None) from None
        return r

    def submit(self, request: Request) -> Job:
        job = Job(request, asyncio.get_running_loop())
        if self.draining:
            raise ApiError(503, "the server is shutting down: no new requests", code="shutting_down")
        try:
            self.worker.submit(job)
        except Overloaded:
            raise ApiError(429, f"the server is at capacity ({self.engine.slots} slots busy and {self.config.max_queue} "
                           "requests waiting): retry later", code="overloaded",
                           headers={"Retry-After": str(self.config.retry_after_seconds)}) from None
        except Draining:
            raise ApiError(503, "the server is shutting down: no new requests", code="shutting_down") from None
        return job

    def generation(self, job: Job, stops: list[str]) -> Generation:
        return Generation(self, job, TextStream(self.tokenizer, stops, self.stop_tokens))


class Generation:
    """One request's text as it is decoded: :meth:`deltas` yields it; ``finish`` and ``tokens`` at the end."""

    def __init__(self, service: Service, job: Job, text: TextStream):
        self.service, self.job, self.text = service, job, text
        self.tokens = 0  # generated, the end-of-sequence token included
        self.finish: str | None = None  # "stop" or "length"
        self._logprobs: list[TokenLogprobs] = []  # of the tokens pushed since the last take_logprobs()

    def take_logprobs(self) -> list[TokenText]:
        """The log probabilities of the tokens that arrived since the last call (end-of-sequence tokens, which
        are never text, left out), their tokens as text."""
        decode = self.text.tokenizer.decode
        out = [TokenText(decode([t.token]), t.logprob, tuple((decode([a]), lp) for a, lp in t.top))
               for t in self._logprobs]
        self._logprobs = []
        return out

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.request.prompt)

    def cancel(self) -> None:
        """Free the slot unless the engine has finished the sequence (a no-op then)."""
        if not self.job.ended:
            self.service.worker.cancel(self.job)

    async def deltas(self, gone: asyncio.Future) -> AsyncIterator[str]:
        """Text deltas (never empty) as tokens come; raises :class:`ApiError` when the request fails and
        :class:`ClientGone` when ``gone`` completes first (the client left). Its sequence is cancelled whenever
        this ends before the engine finished it."""
        try:
            while True:
                event = await _next(self.job.events, gone)
                if isinstance(event, Token):
                    self.tokens += 1
                    if event.logprobs is not None and event.id not in self.text.skip and not self.text.stopped:
                        self._logprobs.append(event.logprobs)
                    delta = self.text.push(event.id)
                    if delta:
                        yield delta
                    if self.text.stopped:  # a stop string: the text ends before it, the slot frees now
                        self.finish = "stop"
                        return
                    continue
                assert isinstance(event, End)
                if event.reason in ("eos", "length"):
                    rest = self.text.finish()
                    if rest:
                        yield rest
                    self.finish = "stop" if event.reason == "eos" else "length"
                    return
                raise _failure(event)
        finally:
            self.cancel()


def _failure(end: End) -> Exception:
    if end.reason == "error":
        return ApiError(500, f"decoding this request failed ({end.message}); the server goes on serving the others",
                        code="decode_error")
    if end.reason == "failed":
        return ApiError(500, f"{end.message}; the server goes on serving new requests", code="engine_error")
    if end.reason == "shutdown":
        return ApiError(503, end.message or "the server is shutting down", code="shutting_down")
    if end.reason == "invalid":
        return ApiError(400, end.message or "the engine refused this request")
    return ClientGone()  # cancelled: only this request's own connection cancels it


async def _next(queue: asyncio.Queue, gone: asyncio.Future):
    """The next event, or :class:`ClientGone` if the client leaves first."""
    if not queue.empty():
        return queue.get_nowait()
    get = asyncio.ensure_future(queue.get())
    await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    raise ClientGone
