"""StreamingLLM (Xiao et al., 2024): sinks and the most recent tokens only.

Scoring by recency makes the shared top-K keep the K most recent tokens beyond the window, so at
equal budget it attends to exactly as many tokens as the retrieval methods.
"""

from __future__ import annotations

import torch

from a2ats.core.selection import DecodeStep
from a2ats.methods.base import Method


class StreamingMethod(Method):
    name = "streaming"

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, _ = step.query.shape
        n = step.keys.shape[2]
        recency = torch.arange(n, device=step.keys.device, dtype=torch.float32)
        return recency.expand(B, Hq, n)
