"""Public entry points: the C++ kernels on CPU tensors when they are available, else the references."""

from __future__ import annotations

import torch

from .cpu import cpu_backend
from .reference import reference_score_select, reference_scores, reference_sparse_attention

__all__ = ["score", "score_select", "sparse_attention"]


def _check_score_inputs(lut, codes, offsets):
    if lut.dim() != 4:
        raise ValueError(f"lut must be (B, Hkv, G, T), got shape {tuple(lut.shape)}")
    if codes.dim() != 3 or codes.shape[:2] != lut.shape[:2]:
        raise ValueError(f"codes must be (B, Hkv, n) matching lut's (B, Hkv) {tuple(lut.shape[:2])}, got {tuple(codes.shape)}")
    if codes.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"codes must be an integer tensor (int16), got {codes.dtype}")
    if offsets is not None and tuple(offsets.shape) != (codes.shape[0], codes.shape[2]):
        raise ValueError(f"offsets must be (B, n) = {(codes.shape[0], codes.shape[2])}, got {tuple(offsets.shape)}")


def _on_cpu(*tensors) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _score_args(lut, codes, offsets):
    # The kernel reads codes as int16 with unit token stride (any other strides) and a dense table.
    lut = lut.to(torch.float32).contiguous()
    codes = codes.to(torch.int16)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if offsets is not None:
        offsets = offsets.to(torch.int32).contiguous()
    return lut, codes, offsets


def score(lut: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Estimated scores (B, Hkv*G, n) float32: lut[b, h, g, codes[b, h, j] + offsets[b, j]]."""
    _check_score_inputs(lut, codes, offsets)
    ext = cpu_backend() if _on_cpu(lut, codes, offsets) else None
    if ext is None:
        return reference_scores(lut, codes, offsets)
    return ext.score(*_score_args(lut, codes, offsets))


def score_select(
    lut: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor | None,
    valid: torch.Tensor,
    k: torch.Tensor | int,
    sinks: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union top-K selection from LUT scores, as :func:`a2ats.selection.select` ("union") computes it.

    lut (B, Hkv, G, T) float32; codes (B, Hkv, n) int16; offsets (B, n) int32 or None; valid (B, n) bool;
    k (B,) int64 tokens per query head. Returns idx (B, Hkv, L) int32 (ascending in the first count
    entries) and count (B, Hkv) int32.
    """
    _check_score_inputs(lut, codes, offsets)
    B, n = codes.shape[0], codes.shape[2]
    if valid.dtype != torch.bool or tuple(valid.shape) != (B, n):
        raise ValueError(f"valid must be a bool (B, n) = {(B, n)} tensor, got {valid.dtype} {tuple(valid.shape)}")
    if not isinstance(k, torch.Tensor):
        k = torch.full((B,), int(k), dtype=torch.long, device=valid.device)
    if tuple(k.shape) != (B,):
        raise ValueError(f"k must have shape (B,) = ({B},), got {tuple(k.shape)}")
    if sinks < 0 or window < 0:
        raise ValueError(f"sinks and window must be >= 0, got {sinks}, {window}")
    ext = cpu_backend() if _on_cpu(lut, codes, offsets, valid, k) else None
    if ext is None:
        return reference_score_select(lut, codes, offsets, valid, k, sinks, window)
    lut, codes, offsets = _score_args(lut, codes, offsets)
    idx, count = ext.score_select(lut, codes, offsets, valid, k.to(torch.long).contiguous(), int(sinks), int(window))
    return idx, count


def sparse_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention (B, Hq, d) of each query head over rows idx[b, h // G, :count[b, h]] of k_buf/v_buf.

    q (B, Hq, d) post-RoPE; k_buf/v_buf (B, Hkv, cap, d) float32 or bfloat16 (views welcome: strides
    are honoured, rows must be contiguous). fp32 accumulation; the result has q's dtype.
    """
    if q.dim() != 3 or k_buf.dim() != 4 or v_buf.dim() != 4:
        raise ValueError(f"q must be (B, Hq, d) and k/v (B, Hkv, cap, d); got {tuple(q.shape)}, {tuple(k_buf.shape)}, {tuple(v_buf.shape)}")
    B, Hq, d = q.shape
    Hkv = k_buf.shape[1]
    if k_buf.shape[:2] != v_buf.shape[:2] or k_buf.shape[0] != B or k_buf.shape[3] != d or v_buf.shape[3] != d:
        raise ValueError(f"k/v (B, Hkv, cap, d) disagree with q (B={B}, d={d}): {tuple(k_buf.shape)}, {tuple(v_buf.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (B, Hkv) or tuple(count.shape) != (B, Hkv):
        raise ValueError(f"idx must be (B, Hkv, L) and count (B, Hkv) with (B, Hkv) = {(B, Hkv)}")
    ext = cpu_backend() if _on_cpu(q, k_buf, v_buf, idx, count) else None
    kernel_dtypes = (torch.float32, torch.bfloat16)
    if ext is None or k_buf.dtype not in kernel_dtypes or v_buf.dtype not in kernel_dtypes:
        return reference_sparse_attention(q, k_buf, v_buf, idx, count, scaling)
    if k_buf.stride(-1) != 1:
        k_buf = k_buf.contiguous()
    if v_buf.stride(-1) != 1:
        v_buf = v_buf.contiguous()
    return ext.sparse_attention(q, k_buf, v_buf, idx.to(torch.int32), count.to(torch.int32), float(scaling))
