"""The engine's one thread: it owns the :class:`~a2ats.runtime.Engine`, adds and cancels requests between steps,
steps while there is work, and hands each request's tokens to the event loop that waits for them.

The engine is not thread-safe and its steps block (torch releases the GIL inside them), so it lives in its own
thread; HTTP handlers on the asyncio loop talk to it through two lists under one lock (submitted jobs,
cancellations) and receive events on a per-request :class:`asyncio.Queue` filled with
``loop.call_soon_threadsafe``: one call per step carries every event of that step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from a2ats.runtime import Engine, Request, StepResult, TokenLogprobs
from a2ats.server.metrics import Metrics

log = logging.getLogger("a2ats.server")


class Overloaded(Exception):
    """Every slot is busy and the queue is full."""


class Draining(Exception):
    """The server is shutting down: no new requests."""


@dataclass(frozen=True)
class Token:
    id: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class End:
    """How a request ended: ``eos``/``length`` (done), ``cancelled``, ``error`` (its sequence failed), ``failed``
    (a whole step failed), ``shutdown`` (the server stopped before it finished), ``invalid`` (refused)."""

    reason: str
    message: str | None = None


@dataclass(eq=False)
class Job:
    """One request on its way through the engine; ``events`` receives its :class:`Token` s then one :class:`End`."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int | None = None  # the engine's index, once added (worker thread)
    admitted: bool = False  # holds a slot (its first token came)
    ended: bool = False


class Worker:
    def __init__(self, engine: Engine, stop_tokens: set[int], max_queue: int, metrics: Metrics):
        if engine.cache is None:
            raise ValueError("the server needs an engine with a fixed cache: build it with slots= and max_context=")
        self.engine, self.metrics = engine, metrics
        engine.stop_tokens = set(stop_tokens)
        self.capacity = engine.slots + max_queue  # requests held at once: busy slots + the queue
        self._cv = threading.Condition()
        self._incoming: list[Job] = []
        self._cancels: list[Job] = []
        self._abandon: str | None = None  # answer everything in flight with this (grace period over)
        self._stopping = False
        self._draining = False
        self._outstanding = 0  # accepted, not yet ended
        self._jobs: dict[int, Job] = {}  # engine index -> job (worker thread only)
        self._thread = threading.Thread(target=self._run, name="a2ats-engine", daemon=True)

    # -- from the event loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Hand ``job`` to the engine, or refuse at once (:class:`Overloaded`, :class:`Draining`)."""
        with self._cv:
            if self._draining or self._stopping:
                raise Draining
            if self._outstanding >= self.capacity:
                raise Overloaded
            self._outstanding += 1
            self._incoming.append(job)
            self.metrics.queue_depth += 1
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Free ``job``'s slot (or queue place) before the next step; a no-op once it has ended."""
        with self._cv:
            if not job.ended:
                self._cancels.append(job)
                self._cv.notify()

    def drain(self) -> None:
        """No new requests from now on; those in flight go on."""
        with self._cv:
            self._draining = True

    def abandon(self, message: str) -> None:
        """End every request in flight now, answered with ``message`` (the drain's grace period is over)."""
        with self._cv:
            self._abandon = message
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Answer whatever is left as shut down and end the thread."""
        with self._cv:
            self._stopping = True
            self._abandon = self._abandon or "the server stopped before this request finished"
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- the worker thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._incoming or self._cancels or self._abandon or self._stopping or engine.has_work):
                    self._cv.wait()
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
                abandon, self._abandon = self._abandon, None
                stopping = self._stopping
            out: list[tuple[Job, object]] = []
            for job in incoming:
                try:
                    job.index = engine.add(job.request)
                    self._jobs[job.index] = job
                except Exception as e:  # the handler checked it: only an engine that changed gets here
                    self._end(job, End("invalid", str(e)), out)
            for job in cancels:
                if job.index in self._jobs:
                    engine.cancel(job.index)
                    self._end(job, End("cancelled"), out)
            if abandon is not None:
                for job in list(self._jobs.values()):
                    engine.cancel(job.index)
                    self._end(job, End("shutdown", abandon), out)
            if engine.has_work and not stopping:
                self._step(out)
            self._deliver(out)
            if stopping:
                return

    def _step(self, out: list) -> None:
        try:
            res = self.engine.step()
        except Exception as e:  # the engine dropped every sequence; it stays usable for the next requests
            log.exception("an engine step failed; every request in flight is answered with an error")
            for job in list(self._jobs.values()):
                self._end(job, End("failed", f"the engine failed: {type(e).__name__}: {e}"), out)
            return
        self._count(res)
        for i, token in res.tokens.items():
            job = self._jobs.get(i)
            if job is not None:
                if not job.admitted:
                    job.admitted = True
                    with self._cv:
                        self.metrics.queue_depth -= 1
                        self.metrics.busy_slots += 1
                out.append((job, Token(token, res.logprobs.get(i))))
        for i, c in res.finished:
            job = self._jobs.get(i)
            if job is not None:
                self._end(job, End(c.finish_reason, c.error), out)

    def _count(self, res: StepResult) -> None:
        if res.prefill_tokens:
            self.metrics.step(True, res.prefill_tokens, res.prefill_seconds)
        if res.decoded:
            self.metrics.step(False, res.decode_rows, res.decode_seconds, res.attended, res.context)

    def _end(self, job: Job, end: End, out: list) -> None:
        self._jobs.pop(job.index, None)
        with self._cv:
            job.ended = True
            self._outstanding -= 1
            if job.admitted:
                self.metrics.busy_slots -= 1
            else:
                self.metrics.queue_depth -= 1
        out.append((job, end))

    def _deliver(self, out: list[tuple[Job, object]]) -> None:
        """Every event of this round to its request's queue: one thread-safe call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for job, event in out:
            by_loop[job.loop].append((job.events, event))
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # that loop has closed: nobody is waiting
                pass


def _put_all(events: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)
