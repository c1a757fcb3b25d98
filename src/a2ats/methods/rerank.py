"""Shortlist re-rank (not in the paper): a cheap estimate shortlists, exact keys decide.

The estimate (any method's ``scores``, e.g. A²ATS's lookup table) keeps ``factor`` x K tokens per query
head; their union over the GQA group is the KV head's shortlist (with the ``max`` reduction: ``factor`` x K
per KV head by the group's max estimate), whose keys are read and scored exactly
(q · k, as the oracle does); each query head then keeps its K best of the shortlist and the group's
choices are reduced as usual. Tokens the estimate ranks just below the cut (a part of the attention
a needle gets) are recovered by the exact scores, at the cost of reading the shortlist's keys: K rows for
``factor`` x K tokens, V rows for K.
"""

from __future__ import annotations

import math

import torch

from a2ats.core.config import A2ATSConfig
from a2ats.core.selection import DecodeStep, always_kept, select, topk_mask
from a2ats.methods.base import Method
from a2ats.methods.oracle import OracleMethod


class RerankMethod(Method):
    def __init__(self, inner: Method, factor: float = 2.0):
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"shortlist factor must be a number >= 1 (the shortlist holds factor x K tokens per "
                             f"query head), got {factor!r}")
        self.inner = inner
        self.factor = float(factor)
        self.name = f"{inner.name}-rerank{factor:g}"
        self.shortlisted: list[float] = []  # shortlist rows per KV head, one entry per layer and step (bytes read)
        self.exact = OracleMethod()  # exact q · k, scored over the whole cache then masked to the shortlist

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        self.inner.on_append(layer, store, k_pre, k_post, kv_heads)

    def shortlist(self, step: DecodeStep, config: A2ATSConfig) -> torch.Tensor:
        """(B, Hkv, n) bool: ``factor`` x K best estimates per query head, OR over the group (``union``), or
        per KV head by the group's max estimate (``max``: bounded reads, like the selection it feeds)."""
        _, candidates, length = always_kept(step.valid, config.sinks, config.window)
        k = torch.ceil(config.budget.tokens_for(length).to(torch.float64) * self.factor).to(torch.long)
        est = self.inner.scores(step)
        B, Hq, n = est.shape
        Hkv = step.keys.shape[1]
        if config.reduction == "max":
            return topk_mask(est.float().view(B, Hkv, Hq // Hkv, n).amax(2), candidates, k)
        return topk_mask(est, candidates, k).view(B, Hkv, Hq // Hkv, n).any(2)

    def select(self, step: DecodeStep, config: A2ATSConfig) -> torch.Tensor:
        short = self.shortlist(step, config)
        self.shortlisted.append(float(short.sum(-1).float().mean()))
        B, Hkv, n = short.shape
        exact = self.exact.scores(step).view(B, Hkv, -1, n)
        # outside the shortlist nothing can win: a head whose shortlist is smaller than K took every candidate
        exact = exact.masked_fill(~short.unsqueeze(2), float("-inf")).view(B, -1, n)
        return select(exact, step.valid, Hkv, config)
