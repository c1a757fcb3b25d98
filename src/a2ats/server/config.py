"""What the HTTP server is set to: typed and validated on construction, so a bad setting fails at start-up."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "A2ATS_API_KEY"  # where the key is read from when --api-key is not given


@dataclass(frozen=True)
class ServerConfig:
    """``model_name``: the one name ``/v1/models`` lists and requests must give. ``host``: 127.0.0.1 by default
    (reachable from this machine only). ``api_key``: when set, every ``/v1`` and ``/metrics`` request must carry
    ``Authorization: Bearer KEY``. ``max_queue``: requests waiting for a slot beyond the busy ones; one more is
    answered 429 with ``Retry-After``. ``max_body_bytes``: a larger request body is answered 413.
    ``default_max_tokens``: new tokens when a request does not say (capped by what its slot holds).
    ``drain_seconds``: after SIGTERM, how long requests in flight may still run before they are answered 503."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 2 << 20
    default_max_tokens: int = 64
    drain_seconds: float = 30.0
    retry_after_seconds: int = 1

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the server needs a model name (what /v1/models lists and requests name)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0-65535 (0: any free port), got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(f"the API key is empty: give a non-empty --api-key (or ${API_KEY_ENV}), or none")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not self.drain_seconds >= 0:
            raise ValueError(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        if self.retry_after_seconds < 1:
            raise ValueError(f"retry_after_seconds must be >= 1, got {self.retry_after_seconds}")
