"""Quest (Tang et al., ICML 2024): pages of 16 tokens, element-wise min/max of their (post-RoPE) keys,
and an upper bound of each page's score; the top pages fill the budget.

Every token of a page gets its page's bound, so the shared top-K takes whole pages, best first.
Pages are cut along each row's real tokens (padding skipped), so a padded row pages as it would alone.
"""

from __future__ import annotations

import torch

from a2ats.core.selection import DecodeStep
from a2ats.methods.base import Method


class QuestMethod(Method):
    name = "quest"

    def __init__(self, page_size: int = 16):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, d = step.query.shape
        keys = step.keys.float()
        Hkv, n = keys.shape[1], keys.shape[2]
        pages = -(-int(step.valid.sum(-1).max()) // self.page_size)
        rank = step.valid.long().cumsum(-1) - 1
        page = torch.where(step.valid, rank // self.page_size, pages)  # padding goes to a dummy last page
        idx = page[:, None, :, None].expand(B, Hkv, n, d)
        kmin = keys.new_full((B, Hkv, pages + 1, d), float("inf")).scatter_reduce(2, idx, keys, "amin")
        kmax = keys.new_full((B, Hkv, pages + 1, d), float("-inf")).scatter_reduce(2, idx, keys, "amax")
        q = step.query.float().reshape(B, Hkv, Hq // Hkv, 1, d)
        bound = torch.maximum(q * kmin.unsqueeze(2), q * kmax.unsqueeze(2)).sum(-1)  # (B, Hkv, G, pages + 1)
        per_token = torch.gather(bound, -1, page[:, None, None, :].expand(B, Hkv, Hq // Hkv, n))
        # the dummy page's bound is +/-inf or NaN; its tokens are never candidates, but keep the scores finite
        return torch.nan_to_num(per_token, nan=0.0, posinf=0.0, neginf=0.0).reshape(B, Hq, n)
