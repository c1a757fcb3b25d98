"""Bytes a decode step reads per sequence and KV head, per method: the data its scoring reads plus K and V of
the tokens it attends to. The x axis of the retrieval-quality comparison (same bytes, more attention kept).

Counted as our implementation stores things: fp16 K/V (2 bytes), int16 A²ATS codes, Quest's per-page fp16 min
and max keys, PQCache's codes at their bit width. Tables shared by the whole batch (A²ATS's codebook, PQCache's
sub-centroids are per sequence) are reported apart: their cost per sequence falls with the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from a2ats.core.codebook import CodebookSettings
from a2ats.methods.registry import info, parse_method, rerank

KV_BYTES = 2  # fp16 / bf16


@dataclass(frozen=True)
class StepBytes:
    scoring: float  # per sequence: what the method reads to choose tokens
    attended: float  # per sequence: K and V of the chosen tokens
    shared: float  # per step for the whole batch (A²ATS codebook)

    def per_sequence(self, batch: int = 1) -> float:
        return self.scoring + self.attended + self.shared / batch


def step_bytes(method: str, context: int, attended: float, head_dim: int, centroids: int = CodebookSettings.n_centroids,
               page_size: int = 16, pq_subspaces: int = 2, pq_bits: int = 6, shortlist: float = 0.0) -> StepBytes:
    """Bytes one KV head reads at one decode step with ``context`` tokens cached, ``attended`` of them attended;
    ``shortlist``: keys a re-rank reads to re-score its shortlist (the attended tokens' keys counted again: a
    bound, an implementation keeping them from the re-rank reads less)."""
    try:
        reads = info(method).reads
    except ValueError as e:
        raise ValueError(f"no byte count for method {method!r}: {e}") from None
    kv_row = 2 * head_dim * KV_BYTES
    if reads == "cache":
        return StepBytes(0.0, context * kv_row, 0.0)
    if reads == "keys":  # exact scores need every key: the ceiling, not a saving
        return StepBytes(context * head_dim * KV_BYTES, attended * head_dim * KV_BYTES, 0.0)
    if reads == "nothing":
        return StepBytes(0.0, attended * kv_row, 0.0)
    if reads == "page bounds":
        return StepBytes(math.ceil(context / page_size) * 2 * head_dim * KV_BYTES, attended * kv_row, 0.0)
    if reads == "pq codes":
        sub = (2**pq_bits) * head_dim * KV_BYTES  # every subspace's centroids: 2^bits rows of d/M, M subspaces
        return StepBytes(context * pq_subspaces * pq_bits / 8 + sub, attended * kv_row, 0.0)
    if reads == "codes":
        keys = shortlist * head_dim * KV_BYTES if rerank(parse_method(method)[0]) is not None else 0.0
        return StepBytes(context * 2.0 + keys, attended * kv_row, centroids * head_dim * KV_BYTES)
    raise ValueError(f"no byte count for method {method!r} (it reads {reads})")
