"""The one interface every selection method implements (A²ATS, its ablations, the baselines).

A method sees new keys as they are written (to keep per-token metadata in the cache layer, e.g.
codes) and, at each decode step, estimates a score per query head and token. Turning scores into
a selection (top-K, sinks, window, GQA reduction) is shared code in :mod:`a2ats.core.selection`, so
methods compare at equal budgets. A method with its own selection (a fused kernel, page-level
top-K) overrides :meth:`Method.select`.
"""

from __future__ import annotations

import torch

from a2ats.core.config import A2ATSConfig
from a2ats.core.selection import DecodeStep, select


class Method:
    name = "method"

    def on_append(self, layer: int, store, k_pre: torch.Tensor, k_post: torch.Tensor, kv_heads: slice) -> None:
        """New keys (B, Hkv, t, d), pre- and post-RoPE, were just appended to ``store`` (prefill or decode)."""

    def scores(self, step: DecodeStep) -> torch.Tensor:
        """Estimated attention logits (B, Hq, n); only their order matters."""
        raise NotImplementedError

    def select(self, step: DecodeStep, config: A2ATSConfig) -> torch.Tensor:
        """Tokens each KV head attends to, (B, Hkv, n) bool."""
        return select(self.scores(step), step.valid, step.keys.shape[1], config)
