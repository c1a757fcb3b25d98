"""What one forward shares across its layers (nano-vllm's per-step context), and a per-part step timer."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    """Set once per forward by :class:`~a2ats.runtime.runner.Runner`, read by every layer."""

    decode: bool
    slot: int = -1  # prefill: the slot being filled
    start: int = 0  # prefill: first position of this chunk
    end: int = 0  # prefill: end of this chunk
    pos: torch.Tensor | None = None  # decode: (S,) position written by each slot, on the accelerator
    pending: torch.Tensor | None = None  # decode: (S·Hkv,) rows of the pending buffer the new pre-RoPE keys go to
    flush: list[tuple[int, int, int]] | None = None  # decode: (slot, first position, keys) to encode now
    kv_rows: torch.Tensor | None = None  # decode: (S·Hkv,) rows of the host K/V the new keys and values go to
    parts: list[slice] | None = None  # decode: the micro-batches' slot ranges
    valid: torch.Tensor | None = None  # decode: (S, n) bool on the accelerator
    host_valid: torch.Tensor | None = None  # decode without a method: the same on the host
    # dense decode over a bf16 or int8 cache (fast path): every row's positions (S, Hkv, n) int32 and counts (S, Hkv)
    # int32 on the host, for the attention kernel, which reads such rows as stored
    all_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    budget: torch.Tensor | None = None  # decode: (S,) tokens per query head beyond sinks and window
    bands: int = 1  # banded WRoPE: tables in use
    offsets: torch.Tensor | None = None  # (S, n) int32: each token's offset into its band's table
    active: list[bool] | None = None  # decode: which slots hold a sequence (host)
    # decode with a method: why this step attends to every token instead of selecting (None: it selects).
    # Keys are still encoded, so the next selecting step finds every code it needs.
    dense: str | None = None


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
