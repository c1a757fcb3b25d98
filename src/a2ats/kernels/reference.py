"""Torch references for the CPU kernels: the library's own selection and attention, repackaged.

They are built on (or are) :mod:`a2ats.core.selection`, :mod:`a2ats.core.attention` and :mod:`a2ats.core.codebook`, so a kernel that matches them
matches the method. Slow (full-length masks, a topk over every token) but simple and device-agnostic.
"""

from __future__ import annotations

import torch

from a2ats.core.attention import attend_selected
from a2ats.core.codebook import nearest_centroid as reference_encode_nearest
from a2ats.core.selection import always_kept, topk_mask
from a2ats.core.selection import table_scores as reference_scores

__all__ = ["reference_encode_nearest", "reference_scores"]  # the algorithm's own computations, named as references


def reference_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                               start: int = 0) -> torch.Tensor:
    """(B, Hq, t, d) float32: softmax attention of q (B, Hq, t, d) over k/v (B, Hkv, start + t, d), query i seeing
    keys 0 .. start + i of KV head h // (Hq / Hkv); fp32 math on the operands as given."""
    t, n = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    keys, values = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    s = torch.matmul(q.float(), keys.transpose(2, 3)) * scaling
    seen = torch.arange(n, device=q.device) <= start + torch.arange(t, device=q.device)[:, None]
    return torch.matmul(s.masked_fill(~seen, float("-inf")).softmax(-1), values)


def torch_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                           start: int = 0) -> torch.Tensor:
    """torch's attention (SDPA) for queries at positions start .. start + t - 1 over keys 0 .. start + t - 1, in the
    operands' dtype: plain causal for a first chunk (SDPA's causal kernel, about twice as fast as a mask), an offset
    mask for a later one, which sees every earlier position."""
    t, n = q.shape[2], k.shape[2]
    mask = None if start == 0 else torch.ones(t, n, dtype=torch.bool, device=q.device).tril(start)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0, scale=scaling,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def reference_lookup_tables(q: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, H, R, C) float32: q (B, H, R, d) · centroids (H, C, d) of the same KV head."""
    return torch.matmul(q.float(), centroids.float().transpose(1, 2))


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, H, n) -> (idx int32 (B, H, L) ascending in the first count entries, -1 after; count int32 (B, H))."""
    n = mask.shape[-1]
    count = mask.sum(-1)
    L = int(count.max()) if count.numel() else 0
    pos = torch.where(mask, torch.arange(n, device=mask.device), n)
    idx = pos.sort(-1).values[..., :L]
    idx = idx.masked_fill(idx >= n, -1)
    return idx.to(torch.int32), count.to(torch.int32)


def indices_to_mask(idx: torch.Tensor, count: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`mask_to_indices`: boolean (B, H, n) of the first count[b, h] entries of idx."""
    B, H, L = idx.shape
    used = torch.arange(L, device=idx.device) < count.unsqueeze(-1).long()
    safe = torch.where(used, idx.long(), n)  # unused slots land in a spare column, dropped below
    keep = torch.zeros(B, H, n + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, safe, True)
    return keep[..., :n]


def reference_score_select(
    lut: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor | None,
    valid: torch.Tensor,
    k: torch.Tensor,
    sinks: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`a2ats.core.selection.select` with reduction "union" and a given k per row, as (idx, count)."""
    B, H, G, _ = lut.shape
    n = codes.shape[-1]
    scores = reference_scores(lut, codes, offsets)
    always, candidates, _ = always_kept(valid, sinks, window)
    chosen = topk_mask(scores, candidates, k.to(torch.long)).view(B, H, G, n).any(2)
    return mask_to_indices(chosen | always.unsqueeze(1))


def reference_score_select_direct(
    q: torch.Tensor,
    centroids: torch.Tensor,
    bands: int,
    group_max: bool,
    codes: torch.Tensor,
    offsets: torch.Tensor | None,
    valid: torch.Tensor,
    k: torch.Tensor,
    sinks: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_score_select` on the lookup tables q (B, H, G·bands, d) · centroids (H, C, d): row g·bands + i
    of q fills entries i·C .. (i+1)·C - 1 of query head g's table; ``group_max``: one table per KV head, their max."""
    B, H, R, _ = q.shape
    lut = reference_lookup_tables(q, centroids).view(B, H, R // bands, bands * centroids.shape[1])
    if group_max:
        lut = lut.amax(2, keepdim=True)
    return reference_score_select(lut, codes, offsets, valid, k, sinks, window)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and float32 scales, ``x ≈ q * scale[..., None]``: symmetric, one scale per row (token and head)."""
    scale = x.float().abs().amax(-1).clamp_min(1e-30) / 127.0
    return (x.float() / scale.unsqueeze(-1)).round().clamp_(-127, 127).to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rows :func:`quantize_rows` encodes (a float cache, ``scale`` None, is returned as ``dtype``)."""
    if q.dtype != torch.int8:
        return q.to(dtype)
    return (q.float() * scale[..., : q.shape[-2]].unsqueeze(-1)).to(dtype)


def reference_sparse_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    scaling: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hq, d): :func:`a2ats.core.attention.attend_selected` over the rows idx[b, h, :count[b, h]]
    (int8 caches dequantized with their row scales)."""
    used = torch.arange(idx.shape[-1], device=idx.device) < count.unsqueeze(-1).long()
    top = int(torch.where(used, idx.long(), -1).max()) + 1 if idx.numel() else 0
    # Only rows up to the last selected one: buffer capacity past the filled part may hold garbage
    # (even NaN), which a mask does not neutralize inside SDPA.
    top = max(top, 1)
    keep = indices_to_mask(idx, count, top)
    key = dequantize_rows(k_buf[:, :, :top], k_scale, q.dtype)
    value = dequantize_rows(v_buf[:, :, :top], v_scale, q.dtype)
    out = attend_selected(q.unsqueeze(2), key, value, keep, scaling)
    return out.squeeze(1)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama applies it, on the first ``rot`` dims (the rest unchanged):
    ``x * cos + cat(-x2, x1) * sin``, written ``x * cos + roll(x) * signed_sin`` with ``signed_sin`` = cat(-sin1, sin2)
    (made once per forward): the same products, fewer ops."""
    rot = cos.shape[-1]
    whole = rot == x.shape[-1]
    xr = x if whole else x[..., :rot]
    out = xr * cos + xr.roll(rot // 2, -1) * signed_sin
    return out if whole else torch.cat((out, x[..., rot:]), dim=-1)


def reference_store_rows(k_dst: torch.Tensor, v_dst: torch.Tensor, flat: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> None:
    """Rows (S, H, d) of ``k``/``v`` into rows ``flat`` (S·H,) of ``k_dst``/``v_dst`` (N, d), in their dtype."""
    d = k_dst.shape[-1]
    k_dst.index_copy_(0, flat, k.reshape(-1, d).to(k_dst.device, k_dst.dtype))
    v_dst.index_copy_(0, flat, v.reshape(-1, d).to(v_dst.device, v_dst.dtype))
