"""Hybrid WRoPE (not in the paper): part of the budget by the paper's single-distance score, the
rest by banded WRoPE, over the same codes.

The paper's single distance b scores every far token by content alone (no recency), which on the
default model finds needles its own attention misses; banded WRoPE scores each band of distances
at its own distance, which tracks the true attention (mass, recall, perplexity). Each query head
keeps its ``share`` x K best tokens by the first, then fills up to K with the best of the others
by the second: K tokens per head, the bytes of either scoring alone. One codebook and one code per
token serve both; a step costs the paper's lookup table plus one per band in use.
"""

from __future__ import annotations

import torch

from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE
from a2ats.core.selection import DecodeStep, always_kept, topk_mask
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.methods.base import Method


class HybridMethod(Method):
    def __init__(self, codebooks: Codebooks, rotary, distance: int = 2048, band_ratio: float = 2.0, share: float = 0.5):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share (of the budget chosen by the single-distance score) must be in [0, 1], got {share}")
        self.share = share
        self.content = A2ATSMethod(codebooks, WRoPE(rotary, distance))
        self.position = A2ATSMethod(codebooks, WRoPE(rotary, distance, band_ratio))
        self.position._tiles = self.content._tiles  # same codebooks: one centroid layout for both tables
        self.name = f"a2ats-hybrid{share:g}"

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        self.content.on_append(layer, store, k_pre, k_post, kv_heads)  # one code per token serves both scorings

    def select(self, step: DecodeStep, config: A2ATSConfig) -> torch.Tensor:
        always, candidates, length = always_kept(step.valid, config.sinks, config.window)
        k = config.budget.tokens_for(length)
        k_first = torch.floor(k.to(torch.float64) * self.share).to(torch.long)
        first = self.content.scores(step)
        second = self.position.scores(step)
        B, Hq, n = first.shape
        Hkv, G = step.keys.shape[1], step.group
        if config.reduction == "max":
            first = first.view(B, Hkv, G, n).amax(2)
            second = second.view(B, Hkv, G, n).amax(2)
        chosen = topk_mask(first, candidates, k_first)
        # already chosen tokens sink to the bottom of the second ranking; if a row has fewer other
        # candidates than it may still take, re-picking them changes nothing
        second = second.float().masked_fill(chosen, float("-inf"))
        chosen |= topk_mask(second, candidates, k - k_first)
        if config.reduction != "max":
            chosen = chosen.view(B, Hkv, G, n).any(2)
        return chosen | always.unsqueeze(1)
