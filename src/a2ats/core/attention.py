"""Exact attention over a selection (decode), with standard RoPE at true positions.

The reference path applies the selection as a mask over the full cache: mathematically what the
method computes, with no speedup. Fast paths (a fused CPU kernel, the host-side attention of the
offload engine) must match :func:`attend_selected`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend_selected(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention of each query head over the tokens its KV head keeps.

    query (B, Hq, t, d); key/value (B, Hkv, n, d); keep (B, Hkv, n) bool.
    Returns (B, t, Hq, d), the layout transformers' attention functions return.
    """
    G = query.shape[1] // key.shape[1]
    mask = keep.repeat_interleave(G, dim=1).unsqueeze(2)  # (B, Hq, 1, n): a few bytes per token
    # enable_gqa reads each KV head for its whole group instead of copying the cache G times per step
    out = F.scaled_dot_product_attention(
        query, key, value.to(query.dtype), attn_mask=mask, scale=scaling, enable_gqa=G > 1
    )
    return out.transpose(1, 2).contiguous()
