"""Fused CPU kernels for A²ATS decode: LUT scoring + union top-K selection, and attention over the selection.

``score_select`` and ``sparse_attention`` run a C++ extension (built on first use, see :mod:`.cpu`) on
CPU tensors and fall back to the torch references, which define the semantics, everywhere else.
"""

from .cpu import cpu_backend
from .ops import score, score_select, sparse_attention
from .reference import reference_score_select, reference_scores, reference_sparse_attention

__all__ = [
    "cpu_backend",
    "reference_score_select",
    "reference_scores",
    "reference_sparse_attention",
    "score",
    "score_select",
    "sparse_attention",
]
