"""Fused CPU kernels for A²ATS: LUT scoring + union top-K selection, attention over the selection, and
key encoding (nearest centroid).

Each runs a C++ extension (built on first use, see :mod:`.cpu`) on CPU tensors and falls back to its
torch reference (:mod:`.reference`), which defines the semantics, everywhere else. Selection on CUDA
tensors runs a Triton kernel (:mod:`.triton_score`) when triton is installed.
"""

from a2ats.kernels.cpu import cpu_backend
from a2ats.kernels.ops import (
    bf16_attention_kernel,
    causal_attention,
    dequantize_rows,
    encode_nearest,
    kmeans_nearest,
    kmeans_nearest_among,
    kmeans_pp_picks,
    linear_bf16w,
    lookup_tables,
    quantize_rows,
    rope,
    score,
    score_select,
    sparse_attention,
    store_rows,
    tile_centroids,
    torch_attention,
)
from a2ats.kernels.paths import PATHS, resolve_path
from a2ats.kernels.reference import (
    reference_causal_attention,
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

__all__ = [
    "PATHS",
    "bf16_attention_kernel",
    "causal_attention",
    "cpu_backend",
    "resolve_path",
    "dequantize_rows",
    "quantize_rows",
    "encode_nearest",
    "kmeans_nearest",
    "kmeans_nearest_among",
    "kmeans_pp_picks",
    "linear_bf16w",
    "lookup_tables",
    "reference_causal_attention",
    "reference_encode_nearest",
    "reference_lookup_tables",
    "reference_score_select",
    "reference_rope",
    "reference_scores",
    "reference_sparse_attention",
    "reference_store_rows",
    "rope",
    "score",
    "score_select",
    "sparse_attention",
    "store_rows",
    "tile_centroids",
    "torch_causal_attention",
    "torch_attention",
    "triton_available",
    "triton_score_select",
]
