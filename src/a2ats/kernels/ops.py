"""Public entry points: the C++ kernels on CPU tensors when they are available, the Triton kernel for
selection on CUDA tensors when triton is installed, else the references."""

from __future__ import annotations

import contextlib

import torch

from a2ats.core.kmeans import nearest_among, pp_picks
from a2ats.kernels.cpu import cpu_backend
from a2ats.kernels.reference import (
    dequantize_rows,
    quantize_rows,
    reference_encode_nearest,
    reference_lookup_tables,
    reference_rope,
    reference_score_select,
    reference_scores,
    reference_sparse_attention,
    reference_store_rows,
    torch_causal_attention,
)
from a2ats.kernels.triton_score import triton_available, triton_score_select

__all__ = ["bf16_attention_kernel", "causal_attention", "dequantize_rows", "encode_nearest", "kmeans_nearest", "kmeans_nearest_among", "kmeans_pp_picks", "linear_bf16w", "lookup_tables", "quantize_rows", "tile_centroids", "torch_attention", "score",
           "rope", "score_select", "score_select_direct", "sparse_attention", "store_rows"]


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


def _on_cuda(*tensors) -> bool:
    devices = {t.device for t in tensors if t is not None}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"  # one GPU: the kernels take no mix


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
    """Union top-K selection from LUT scores, as :func:`a2ats.core.selection.select` ("union") computes it.

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
    if _on_cuda(lut, codes, offsets, valid, k) and triton_available():
        return triton_score_select(*_score_args(lut, codes, offsets), valid, k, int(sinks), int(window))
    ext = cpu_backend() if _on_cpu(lut, codes, offsets, valid, k) else None
    if ext is None:
        return reference_score_select(lut, codes, offsets, valid, k, sinks, window)
    lut, codes, offsets = _score_args(lut, codes, offsets)
    idx, count = ext.score_select(lut, codes, offsets, valid, k.to(torch.long).contiguous(), int(sinks), int(window))
    return idx, count


def score_select_direct(
    q: torch.Tensor,
    centroids: torch.Tensor,
    bands: int,
    group_max: bool,
    codes: torch.Tensor,
    offsets: torch.Tensor | None,
    valid: torch.Tensor,
    k: torch.Tensor | int,
    sinks: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_select` on the lookup tables of q (B, Hkv, G·bands, d) float32 and centroids (Hkv, C, d) float32
    or bfloat16, ``group_max``: on their max over each GQA group (the "max" reduction), without building the tables.

    Row g·bands + i of q is query head g's query for band i, whose table entries are i·C + code (offsets (B, n)
    int32: each token's band·C, or None with one band); k (B,) int64. On CPU tensors the kernel computes, per
    (row, KV head), only the entries that candidate tokens carry, as plain dot products: the same selection as
    the tables give but where fp32 rounding of a score in another summation order decides a near-tie at the
    threshold. Elsewhere the tables are built (:func:`lookup_tables`) and :func:`score_select` selects.
    """
    if q.dim() != 4 or centroids.dim() != 3 or q.shape[1] != centroids.shape[0] or q.shape[3] != centroids.shape[2]:
        raise ValueError(f"q must be (B, Hkv, G*bands, d) and centroids (Hkv, C, d) with the same Hkv and d; got "
                         f"{tuple(q.shape)}, {tuple(centroids.shape)}")
    if bands < 1 or q.shape[2] % bands:
        raise ValueError(f"q's rows ({q.shape[2]}) must be G x bands ({bands})")
    if not isinstance(k, torch.Tensor):
        k = torch.full((codes.shape[0],), int(k), dtype=torch.long, device=valid.device)
    ext = cpu_backend() if _on_cpu(q, centroids, codes, offsets, valid, k) else None
    if ext is None:
        G = q.shape[2] // bands
        lut = lookup_tables(q, centroids, groups=G if group_max else 1)
        B, H = lut.shape[:2]
        return score_select(lut.reshape(B, H, 1 if group_max else G, -1), codes, offsets, valid, k, sinks, window)
    if centroids.dtype not in (torch.float32, torch.bfloat16) or not centroids.is_contiguous():
        centroids = centroids.float().contiguous()
    if codes.dtype != torch.int16 or codes.stride(-1) != 1:
        codes = codes.to(torch.int16).contiguous()
    if offsets is not None and (offsets.dtype != torch.int32 or not offsets.is_contiguous()):
        offsets = offsets.to(torch.int32).contiguous()
    return ext.score_select_direct(q.float(), centroids, int(bands), bool(group_max), codes, offsets, valid,
                                   k.to(torch.long), int(sinks), int(window))


def sparse_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, scaling: float,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention (B, Hq, d) of each query head over rows idx[b, h // G, :count[b, h]] of k_buf/v_buf.

    q (B, Hq, d) post-RoPE; k_buf/v_buf (B, Hkv, cap, d) float32, bfloat16, or int8 with float32 row
    scales ``k_scale``/``v_scale`` (B, Hkv, cap) from :func:`quantize_rows` (views welcome: strides are
    honoured, rows must be contiguous). fp32 accumulation; the result has q's dtype.
    """
    # A decode step calls this once per layer: the checks read each shape once (they cost more than the kernel's
    # call at short contexts when written as repeated attribute reads).
    qs, ks, vs, ishape, cshape = q.shape, k_buf.shape, v_buf.shape, idx.shape, count.shape
    if len(qs) != 3 or len(ks) != 4 or len(vs) != 4:
        raise ValueError(f"q must be (B, Hq, d) and k/v (B, Hkv, cap, d); got {tuple(qs)}, {tuple(ks)}, {tuple(vs)}")
    B, Hq, d = qs
    Hkv = ks[1]
    if ks[:2] != vs[:2] or ks[0] != B or ks[3] != d or vs[3] != d:
        raise ValueError(f"k/v (B, Hkv, cap, d) disagree with q (B={B}, d={d}): {tuple(ks)}, {tuple(vs)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if len(ishape) != 3 or ishape[:2] != ks[:2] or cshape != ks[:2]:
        raise ValueError(f"idx must be (B, Hkv, L) and count (B, Hkv) with (B, Hkv) = {(B, Hkv)}")
    quantized = k_scale is not None or v_scale is not None or k_buf.dtype == torch.int8 or v_buf.dtype == torch.int8
    if quantized:
        for name, buf, sc in (("k", k_buf, k_scale), ("v", v_buf, v_scale)):
            if (buf.dtype == torch.int8) != (sc is not None):
                raise ValueError(f"{name}_scale goes with an int8 {name} cache (and only then); got {buf.dtype} and "
                                 f"{'a' if sc is not None else 'no'} scale")
            if sc is not None and (sc.dtype != torch.float32 or tuple(sc.shape) != tuple(buf.shape[:3])):
                raise ValueError(f"{name}_scale must be float32 {tuple(buf.shape[:3])}, got {sc.dtype} {tuple(sc.shape)}")
    on_cpu = q.is_cpu and k_buf.is_cpu and v_buf.is_cpu and idx.is_cpu and count.is_cpu and (
        not quantized or _on_cpu(k_scale, v_scale))
    ext = cpu_backend() if on_cpu else None
    if ext is None or k_buf.dtype not in _KERNEL_DTYPES or v_buf.dtype not in _KERNEL_DTYPES:
        return reference_sparse_attention(q, k_buf, v_buf, idx, count, scaling, k_scale, v_scale)
    if k_buf.stride(-1) != 1:
        k_buf = k_buf.contiguous()
    if v_buf.stride(-1) != 1:
        v_buf = v_buf.contiguous()
    if idx.dtype != torch.int32:
        idx = idx.to(torch.int32)
    if count.dtype != torch.int32:
        count = count.to(torch.int32)
    return ext.sparse_attention(q, k_buf, v_buf, idx, count, float(scaling), k_scale, v_scale)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # the rows sparse_attention's kernel reads


_torch_attention = [False]  # set by torch_attention(): the benches' same-run baseline


@contextlib.contextmanager
def torch_attention():
    """Within it, :func:`causal_attention` and the dense passes use torch's attention instead of the kernel (the
    kernel's baseline, timed in the same run)."""
    _torch_attention[0] = True
    try:
        yield
    finally:
        _torch_attention[0] = False


def bf16_attention_kernel(head_dim: int) -> bool:
    """Whether :func:`causal_attention` runs the C++ kernel for CPU tensors of this head dim (AVX-512 BF16, d 64)."""
    ext = cpu_backend()
    return head_dim == 64 and ext is not None and ext.bf16_attention() and not _torch_attention[0]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, start: int = 0) -> torch.Tensor:
    """Causal attention (B, Hq, t, d) float32 with bf16 operands, as a bf16 dense pass computes it: q (B, Hq, t, d)
    at positions start .. start + t - 1 over k/v (B, Hkv, start + t, d), query i seeing keys 0 .. start + i of KV
    head h // (Hq / Hkv). Products of bf16 values, fp32 sums and softmax, the probabilities rounded to bf16 before
    they weight V (as torch's bf16 attention does). The C++ kernel where the CPU has AVX-512 BF16 and d is 64;
    elsewhere torch's attention on the bf16 operands."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q must be (B, Hq, t, d) and k, v (B, Hkv, n, d) alike; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if start < 0 or k.shape[2] != start + q.shape[2]:
        raise ValueError(f"k and v must hold start + t = {start} + {q.shape[2]} rows, got {k.shape[2]}")
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    if _on_cpu(q, k, v) and bf16_attention_kernel(q.shape[3]):
        ext = cpu_backend()
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return ext.causal_attention(q, k, v, float(scaling), int(start))
    return torch_causal_attention(q, k, v, scaling, start).float()


def encode_nearest(z: torch.Tensor, t: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Codes int16 (B, H, n): the first argmax over c of z[b, h, j] · t[h, c] - half[h, c].

    z (B, H, n, d) keys already in the transformed space, t (H, C, d) transformed centroids, half (H, C)
    their half squared norms: the nearest centroid. The kernel takes the argmax on a cache-sized tile
    instead of materializing n x C similarities; it may differ from the reference only on exact ties
    within float rounding.
    """
    if z.dim() != 4 or t.dim() != 3 or half.dim() != 2:
        raise ValueError(f"z must be (B, H, n, d), t (H, C, d), half (H, C); got {tuple(z.shape)}, {tuple(t.shape)}, {tuple(half.shape)}")
    if t.shape[0] != z.shape[1] or t.shape[2] != z.shape[3] or tuple(half.shape) != tuple(t.shape[:2]):
        raise ValueError(f"z {tuple(z.shape)}, t {tuple(t.shape)} and half {tuple(half.shape)} disagree on heads or dims")
    ext = cpu_backend() if _on_cpu(z, t, half) else None
    if ext is None:
        return reference_encode_nearest(z.float(), t.float(), half.float())
    return ext.encode_nearest(z.float(), t.float(), half.float())


def kmeans_pp_picks(pts: torch.Tensor, first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """k-means++'s draws (G, k) over points ``pts`` (G, S, d): :func:`a2ats.core.kmeans.pp_picks`, whose loop of
    small torch ops per draw is the seeding's cost, run in C++ on CPU tensors (the same picks but where float
    rounding of a distance moves a draw across a boundary)."""
    if pts.dim() != 3 or first.shape != pts.shape[:1] or u.dim() != 2 or u.shape[0] != pts.shape[0]:
        raise ValueError(f"pts must be (G, S, d), first (G,), u (G, k - 1); got {tuple(pts.shape)}, "
                         f"{tuple(first.shape)}, {tuple(u.shape)}")
    ext = cpu_backend() if _on_cpu(pts, first, u) else None
    if ext is None:
        return pp_picks(pts, first, u)
    return ext.kmeans_pp_picks(pts.float(), first.long(), u.double())


def kmeans_nearest_among(x: torch.Tensor, centroids: torch.Tensor, half: torch.Tensor, cand: torch.Tensor,
                         cur: torch.Tensor) -> torch.Tensor:
    """Each point's nearest centroid (G, N) int64 among the candidates of its current one:
    :func:`a2ats.core.kmeans.nearest_among` in C++ on CPU tensors (the same choice but where float rounding
    reorders two candidates' scores)."""
    if x.dim() != 3 or centroids.dim() != 3 or cand.dim() != 3 or cur.shape != x.shape[:2]:
        raise ValueError(f"x must be (G, N, d), centroids (G, k, d), cand (G, k, m), cur (G, N); got {tuple(x.shape)}, "
                         f"{tuple(centroids.shape)}, {tuple(cand.shape)}, {tuple(cur.shape)}")
    ext = cpu_backend() if _on_cpu(x, centroids, half, cand, cur) else None
    if ext is None:
        return nearest_among(x, centroids, half, cand, cur)
    return ext.kmeans_nearest_among(x.float(), centroids.float(), half.float(), cand.to(torch.int32), cur.long())


def kmeans_nearest(x: torch.Tensor, centroids: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Each point's nearest centroid (G, N) int64 over every centroid: the first argmax over c of
    ``x[g, i] · centroids[g, c] - half[g, c]``, with ``half`` (G, k) the half squared norms of ``centroids`` (G, k, d)
    and x (G, N, d). On CPU tensors the C++ kernel, which where the CPU has AVX-512 BF16 shortlists centroids with bf16
    dot products under a proven error bound and decides among them in fp32: the exact nearest centroid but where fp32
    rounding reorders a near-tie. Elsewhere the torch reference of key encoding, the same argmax with ``half`` as given."""
    if x.dim() != 3 or centroids.dim() != 3 or half.dim() != 2:
        raise ValueError(f"x must be (G, N, d), centroids (G, k, d), half (G, k); got {tuple(x.shape)}, "
                         f"{tuple(centroids.shape)}, {tuple(half.shape)}")
    if centroids.shape[0] != x.shape[0] or centroids.shape[2] != x.shape[2] or half.shape != centroids.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)}, centroids {tuple(centroids.shape)} and half {tuple(half.shape)} disagree "
                         "on point sets or dims")
    if centroids.shape[1] == 0 and x.shape[1] > 0:
        raise ValueError("no centroids to assign the points to")
    ext = cpu_backend() if _on_cpu(x, centroids, half) else None
    if ext is None:
        return reference_encode_nearest(x.unsqueeze(0).float(), centroids.float(), half.float()).squeeze(0).long()
    return ext.kmeans_nearest(x.float(), centroids.float(), half.float())


def linear_bf16w(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for float32 x (..., I) and bfloat16 w (O, I), with fp32 math (as fp32 weights
    rounded to bf16). The kernel serves the few rows of a decode step, where reading the weights is
    the cost; elsewhere (no kernel, another device) the weights are widened and torch multiplies."""
    if x.dtype != torch.float32 or w.dtype != torch.bfloat16 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x must be float32 (..., I) and w bfloat16 (O, I); got {x.dtype} {tuple(x.shape)}, {w.dtype} {tuple(w.shape)}")
    ext = cpu_backend() if _on_cpu(x, w, bias) else None
    if ext is None:
        return torch.nn.functional.linear(x, w.float(), None if bias is None else bias.float())
    lead = x.shape[:-1]
    y = ext.linear_bf16w(x.reshape(-1, x.shape[-1]), w.contiguous(), bias)
    return y.reshape(*lead, w.shape[0])


def lookup_tables(q: torch.Tensor, centroids: torch.Tensor, tiles: torch.Tensor | None = None,
                  groups: int = 1) -> torch.Tensor:
    """Lookup tables (B, H, R, C) float32: q (B, H, R, d) dotted with every centroid (H, C, d) of its KV head.

    ``tiles``: :func:`tile_centroids` of ``centroids``, computed once and kept by the caller (the kernel
    streams that layout); without it the layout is made on the spot. ``groups`` > 1: rows come as ``groups``
    blocks of R / groups (a GQA group's query heads) and the result is their entry-wise max, (B, H, R / groups, C),
    exactly ``lookup_tables(q, ...).view(B, H, groups, -1, C).amax(2)``.
    """
    if groups < 1 or q.dim() == 4 and q.shape[2] % groups:
        raise ValueError(f"groups must be >= 1 and divide the rows of q; got {groups} for q {tuple(q.shape)}")
    if q.dim() != 4 or centroids.dim() != 3 or q.shape[1] != centroids.shape[0] or q.shape[3] != centroids.shape[2]:
        raise ValueError(f"q must be (B, H, R, d) and centroids (H, C, d) with the same H and d; got "
                         f"{tuple(q.shape)}, {tuple(centroids.shape)}")
    ext = cpu_backend() if _on_cpu(q, centroids) else None
    if ext is None:
        lut = reference_lookup_tables(q, centroids)
        B, H, R, C = lut.shape
        return lut if groups == 1 else lut.view(B, H, groups, R // groups, C).amax(2)
    if tiles is None:
        tiles = ext.tile_centroids(centroids.float())
    return ext.lookup_tables(q.float(), tiles, centroids.shape[1], groups)


def tile_centroids(centroids: torch.Tensor) -> torch.Tensor | None:
    """The kernel's layout of centroids (H, C, d), or None where :func:`lookup_tables` will not use the kernel."""
    ext = cpu_backend() if _on_cpu(centroids) else None
    if ext is None:
        return None
    return ext.tile_centroids(centroids.float())


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on 2 MiB pages where the CPU kernel can make one (Linux's transparent huge pages), else ``t``:
    direct scoring reads centroid rows scattered over MiBs per head, and with 4 KiB pages most of those reads
    missed the TLB."""
    ext = cpu_backend() if _on_cpu(t) else None
    return t if ext is None else ext.huge_page_copy(t)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``rot`` dims of x (B, H, t, d) with cos and ``signed_sin`` (B, 1, t, rot)
    (:func:`~a2ats.kernels.reference.reference_rope`: the same values, bit for bit); the kernel for float32 CPU
    tensors, one call where torch takes four ops."""
    ext = cpu_backend() if x.is_cpu and cos.is_cpu and signed_sin.is_cpu else None
    if (ext is None or x.dim() != 4 or cos.dim() != 4 or signed_sin.dim() != 4
            or not x.dtype == cos.dtype == signed_sin.dtype == torch.float32):
        return reference_rope(x, cos, signed_sin)
    return ext.rope(x, cos, signed_sin)


def store_rows(k_dst: torch.Tensor, v_dst: torch.Tensor, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """A decode step's new rows: row s·H + h of k (S, H, d) into row ``flat[s·H + h]`` of ``k_dst`` (N, d), and v into
    ``v_dst``, in the destination's dtype (:func:`~a2ats.kernels.reference.reference_store_rows`); the kernel for
    float32 rows into float32 or bf16 CPU rows, one call where torch takes eight ops."""
    ext = cpu_backend() if k_dst.is_cpu and k.is_cpu and v.is_cpu and flat.is_cpu else None
    if (ext is None or k_dst.dtype not in (torch.float32, torch.bfloat16) or k.dtype != torch.float32
            or v.dtype != torch.float32 or k.dim() != 3 or k.stride(-1) != 1 or v.stride(-1) != 1
            or flat.dtype != torch.int64):
        reference_store_rows(k_dst, v_dst, flat, k, v)
        return
    ext.store_rows(k_dst, v_dst, flat, k, v)
