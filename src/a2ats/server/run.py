"""Running the server: uvicorn on the app, the engine's worker thread beside it, and a drain on SIGTERM.

SIGTERM (or Ctrl-C) drains: uvicorn stops listening and closes idle connections, new requests on open ones are
answered 503, requests in flight go on; after ``drain_seconds`` those still running are answered 503 ("shutting
down"), and the process exits 0 once every connection has closed. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn

from a2ats.runtime import Engine
from a2ats.server.app import create_app
from a2ats.server.config import ServerConfig
from a2ats.server.service import Service

log = logging.getLogger("a2ats.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server whose exit signals start the drain. uvicorn re-raises a captured signal after its shutdown
    (the process then dies of it); a drained server has done what SIGTERM asks, so it is not recorded and the
    process exits 0."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
            return
        self._on_signal()
        self.should_exit = True


class HttpServer:
    """The OpenAI-compatible server over ``engine`` (fixed ``slots`` and ``max_context``: its cache is allocated,
    after the memory preflight, before the server starts). ``stop_tokens``: ids that end a sequence."""

    def __init__(self, engine: Engine, tokenizer, config: ServerConfig, stop_tokens: set[int],
                 log_level: str = "warning"):
        self.config = config
        self.service = Service(engine, tokenizer, config, stop_tokens)
        self.app = create_app(self.service)
        self._uvicorn = _Uvicorn(uvicorn.Config(self.app, host=config.host, port=config.port, lifespan="off",
                                                log_level=log_level, timeout_graceful_shutdown=config.drain_seconds + 10),
                                 self.drain)
        self._timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose when configured with port 0)."""
        return self._uvicorn.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def drain(self) -> None:
        """Stop taking requests; answer those still running after the grace period (SIGTERM calls this)."""
        if self.service.draining:
            return
        log.warning("draining: no new requests; %d in flight get %g s to finish", self.service.worker.outstanding,
                    self.config.drain_seconds)
        self.service.draining = True
        self.service.worker.drain()
        self._timer = threading.Timer(self.config.drain_seconds, self.service.worker.abandon,
                                      ("the server is shutting down: this request did not finish within the "
                                       f"{self.config.drain_seconds:g} s grace period",))
        self._timer.daemon = True
        self._timer.start()

    def run(self) -> int:
        """Serve until a signal (or :meth:`stop`) ends it; 0 after a clean drain."""
        self.service.worker.start()
        try:
            self._uvicorn.run()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.service.worker.stop(timeout=30)
        return 0 if self._uvicorn.started else 1

    # -- in a thread (tests, benchmarks) -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> HttpServer:
        """Serve from a background thread; returns once it listens."""
        self._thread = threading.Thread(target=self.run, name="a2ats-http", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.01)
        return self

    def stop(self, drain: bool = False, timeout: float = 60.0) -> None:
        """End a server started with :meth:`start` (``drain``: as SIGTERM does)."""
        if drain:
            self._uvicorn.handle_exit(signal.SIGTERM, None)
        else:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
