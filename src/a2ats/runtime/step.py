"""What one step shares across all layers, computed once per step instead of once per layer."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    start: int  # first cache slot written this step
    end: int  # cache length after this step
    valid: torch.Tensor  # (B, end) bool: real tokens (False: padding)
    decode: bool  # one new token per row: sparse attention applies
    budget: torch.Tensor | None = None  # (B,) long: tokens per query head beyond sinks and window
    bands: int = 1  # banded WRoPE: tables in use
    offsets: torch.Tensor | None = None  # (B, end) int32: each token's offset into its band's table
    slot: int = 0  # decode: this token's slot among the keys waiting to be encoded
    encode_from: int = -1  # decode: >= 0 when this step encodes the waiting keys, from this cache slot on


@dataclass
class Timer:
    """Wall time per part of a step: ``lap(name)`` charges the time since the previous lap to ``name``."""

    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _last: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] += now - self._last
        self._last = now
