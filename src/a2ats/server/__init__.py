"""An OpenAI-compatible HTTP server over the runtime's :class:`~a2ats.runtime.Engine` (``a2ats serve --http``).

- :mod:`.config`: :class:`ServerConfig`, validated on construction (host, port, API key, queue, limits, drain).
- :mod:`.protocol`: the wire format: request bodies (unknown fields refused), responses, chunks, errors.
- :mod:`.text`: incremental detokenization and ``stop`` strings.
- :mod:`.worker`: the engine's one thread: adds, cancels and steps; events to each request's asyncio queue.
- :mod:`.service`: a request from body to engine (prompt ids, checks, back-pressure) and its text back.
- :mod:`.metrics`: what ``/metrics`` reports (Prometheus text).
- :mod:`.app`: the FastAPI routes, authentication, the body limit, errors in OpenAI's shape.
- :mod:`.run`: :class:`HttpServer`: uvicorn, the worker beside it, the drain on SIGTERM.
"""

from a2ats.server.config import API_KEY_ENV, ServerConfig

__all__ = ["API_KEY_ENV", "HttpServer", "ServerConfig", "stop_token_ids"]


def __getattr__(name: str):
    # FastAPI and uvicorn (the `serve` extra) are imported on first use: `a2ats serve PROMPTS` and the command
    # line's parser run without them
    if name == "HttpServer":
        from a2ats.server.run import HttpServer

        return HttpServer
    if name == "stop_token_ids":
        from a2ats.server.service import stop_token_ids

        return stop_token_ids
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
