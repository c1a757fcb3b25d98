"""A²ATS (He et al., 2025): WRoPE query x query-aware VQ codes of pre-RoPE keys, via a lookup table.

The ablations are the same method over other codebooks: ``a2ats-euclid`` (plain k-means,
``query_aware=False``) and ``a2ats-postrope`` (post-RoPE keys scored with the true query, no WRoPE,
``post_rope=True``).
"""

from __future__ import annotations

import torch

from a2ats import kernels
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig, score_dtype
from a2ats.core.distributed import kv_heads_held
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.core.selection import DecodeStep, table_scores
from a2ats.kernels import lookup_tables, tile_centroids
from a2ats.kernels.ops import huge_page_copy, score_select_direct
from a2ats.methods.base import Method


class A2ATSMethod(Method):
    def __init__(self, codebooks: Codebooks, wrope: WRoPE, score_precision: str = A2ATSConfig.score_precision):
        """``score_precision``: the centroid rows every path scores from (:class:`~a2ats.core.config.A2ATSConfig`),
        the same on the reference and the fast paths, so the two select alike."""
        self.score_dtype = score_dtype(score_precision)
        self.codebooks = codebooks
        self.wrope = wrope
        self._tiles: dict = {}  # (layer or "rows", heads, device) -> the kernels' centroid layouts
        s = codebooks.settings
        self.post_rope = s.post_rope
        self.name = "a2ats-postrope" if s.post_rope else ("a2ats" if s.query_aware else "a2ats-euclid")
        if wrope.banded and not s.post_rope:
            self.name += "-banded"

    @classmethod
    def for_model(cls, model, codebooks: Codebooks, config: A2ATSConfig) -> A2ATSMethod:
        """The method over ``codebooks`` for ``model`` at ``config``'s WRoPE, once the codebooks are checked to
        belong to this model and these settings (a clear :class:`~a2ats.core.codebook.CodebookError` otherwise).
        Under tensor parallelism the method keeps only the codebooks of the KV heads this rank computes."""
        codebooks.check_compatible(model, config.wrope_distance, band_ratio=config.wrope_band_ratio)
        wrope = WRoPE(find_rotary_embedding(model), config.wrope_distance, config.wrope_band_ratio)
        return cls(codebooks.for_heads(kv_heads_held(model)), wrope, config.score_precision)

    def encode(self, layer: int, k_pre: torch.Tensor, k_post: torch.Tensor | None, kv_heads: slice) -> torch.Tensor:
        """int16 codes (B, Hkv, t) of new keys: their nearest centroids, in the kernel (post-RoPE codebooks
        encode ``k_post``; the others the pre-RoPE keys)."""
        k = k_post if self.post_rope else k_pre
        if k is None:
            raise ValueError(f"{self.name} encodes post-RoPE keys; this caller passed only pre-RoPE keys")
        return kernels.encode_nearest(*self.codebooks.encode_inputs(layer, k, kv_heads))

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        # Every key is encoded once, as it is written; int16 holds up to 32767 centroids.
        store.write_extra("codes", self.encode(layer, k_pre, k_post, kv_heads))

    def band_offsets(self, valid: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(bands in use, offsets (B, n) int32 or None): with banded WRoPE token j of row b reads the
        table of its band, at offset band·C. Depends only on the rows' lengths: once per step, not per layer."""
        if self.post_rope or not self.wrope.banded:
            return 1, None
        nb = self.wrope.bands_for(int(valid.sum(-1).max()))  # bands present in the longest row
        band = self.wrope.band_of(_relative_distance(valid), nb)
        return nb, (band * self.codebooks.settings.n_centroids).to(torch.int32)

    def queries(self, layer: int, q_pre: torch.Tensor, query: torch.Tensor, bands: int,
                kv_heads: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (B, Hkv, G·bands, d) fp32, centroids (Hkv, C, d) as scored, :meth:`rows`): row g·bands + i of q is query head g's query for
        band i (q̃ = WRoPE's rotation of q_pre; the post-RoPE query itself for post-RoPE codebooks), whose dot
        product with centroid c is the score of the tokens of band i that carry code c. Rounded to the score
        precision (bf16: every path's scores are then sums of exact bf16 products)."""
        B, Hq, d = q_pre.shape
        centroids = self.rows(layer, kv_heads, q_pre.device)
        Hkv = centroids.shape[0]
        if self.post_rope:
            q = query.float()
        elif self.wrope.banded:  # WRoPE.queries' values, bit for bit, in one kernel call instead of five ops
            cos, sin = self.wrope.band_rotation(q_pre.device, bands, d)
            x = q_pre.float().unsqueeze(2).expand(B, Hq, bands, d)
            q = kernels.rope(x, cos.expand(B, 1, bands, -1), sin.expand(B, 1, bands, -1))
        else:
            q = self.wrope.query(q_pre)
        if self.score_dtype != torch.float32:  # both operands at the score precision, as a matrix unit takes them
            q = q.to(self.score_dtype).float()
        return q.reshape(B, Hkv, (Hq // Hkv) * bands, d), centroids

    def rows(self, layer: int, kv_heads: slice, device) -> torch.Tensor:
        """The centroids (Hkv, C, d) every path scores from, in the method's score precision: a view of one copy of
        every layer's, made once (on huge pages where the kernel makes one: the direct kernel reads rows scattered
        over MiBs)."""
        key = ("rows", kv_heads.start, kv_heads.stop, str(device))
        if key not in self._tiles:
            rows = torch.stack([self.codebooks.tensors_for(i, kv_heads, device)[0]
                                for i in range(self.codebooks.num_layers)])
            self._tiles[key] = huge_page_copy(rows.to(self.score_dtype))
        return self._tiles[key][layer]

    def lut(self, layer: int, q_pre: torch.Tensor, query: torch.Tensor, bands: int, kv_heads: slice) -> torch.Tensor:
        """Lookup tables (B, Hkv, G, bands·C) fp32, a row per query head: q̃ · centroids for each band's q̃."""
        q, centroids = self.queries(layer, q_pre, query, bands, kv_heads)
        B, Hkv, R, _ = q.shape
        key = (layer, kv_heads.start, kv_heads.stop, str(q.device))
        if key not in self._tiles:
            self._tiles[key] = tile_centroids(centroids.float())  # None off the CPU kernel: plain matmul there
        return lookup_tables(q, centroids, self._tiles[key]).reshape(B, Hkv, R // bands, bands * centroids.shape[1])

    def score_tokens(self, layer: int, q_pre: torch.Tensor, query: torch.Tensor, codes: torch.Tensor, bands: int,
                     offsets: torch.Tensor | None, kv_heads: slice) -> torch.Tensor:
        """Estimated scores (B, Hq, n) of every cached token (codes (B, Hkv, n)) for this step's queries: the
        reference path's view of the step (a full-length score tensor, then :func:`a2ats.core.selection.select`)."""
        return table_scores(self.lut(layer, q_pre, query, bands, kv_heads), codes, offsets)

    def select_rows(self, layer: int, q_pre: torch.Tensor, query: torch.Tensor, codes: torch.Tensor,
                    valid: torch.Tensor, budget: torch.Tensor, config: A2ATSConfig, kv_heads: slice, bands: int,
                    offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step's selection as row indices (idx (B, Hkv, m) int32, count (B, Hkv)): fused scoring and
        top-K (:func:`a2ats.kernels.ops.score_select_direct`, the GQA reduction included), which computes only the
        table entries that cached tokens carry. Every fast path (transformers' fast path, the runtime, the offload
        system) selects through here; it selects the set of :meth:`score_tokens` + :func:`a2ats.core.selection.select`
        but where a score's fp32 rounding in another summation order decides a near-tie at the threshold."""
        q, centroids = self.queries(layer, q_pre, query, bands, kv_heads)
        return score_select_direct(q, centroids, bands, config.reduction == "max", codes, offsets, valid, budget,
                                   config.sinks, config.window)

    def scores(self, step: DecodeStep) -> torch.Tensor:
        bands, offsets = self.band_offsets(step.valid)
        return self.score_tokens(step.layer, step.q_pre, step.query, step.store.extra("codes"), bands, offsets,
                                 step.kv_heads)


def _relative_distance(valid: torch.Tensor) -> torch.Tensor:
    """(B, n) distance of each token from the newest real token of its row (padding: 0, never selected)."""
    rank = valid.long().cumsum(-1) - 1
    return ((valid.sum(-1, keepdim=True) - 1 - rank) * valid).clamp_min(0)
