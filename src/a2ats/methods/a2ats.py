"""A²ATS (He et al., 2025): WRoPE query x query-aware VQ codes of pre-RoPE keys, via a lookup table.

The ablations are the same method over other codebooks: ``a2ats-euclid`` (plain k-means,
``query_aware=False``) and ``a2ats-postrope`` (post-RoPE keys scored with the true query, no WRoPE,
``post_rope=True``).
"""

from __future__ import annotations

import torch

from ..kernels import lookup_tables, tile_centroids
from ..codebook import Codebooks
from ..rope import WRoPE
from ..selection import DecodeStep
from .base import Method


class A2ATSMethod(Method):
    def __init__(self, codebooks: Codebooks, wrope: WRoPE):
        self.codebooks = codebooks
        self.wrope = wrope
        self._tiles: dict = {}  # (layer, heads, device) -> the LUT kernel's centroid layout
        s = codebooks.settings
        self.post_rope = s.post_rope
        self.name = "a2ats-postrope" if s.post_rope else ("a2ats" if s.query_aware else "a2ats-euclid")
        if wrope.banded and not s.post_rope:
            self.name += "-banded"

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        # Every key is encoded once, as it is written; int16 holds up to 32767 centroids.
        store.write_extra("codes", self.codebooks.encode(layer, k_post if self.post_rope else k_pre, kv_heads))

    def band_offsets(self, valid: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(bands in use, offsets (B, n) int32 or None): with banded WRoPE token j of row b reads the
        table of its band, at offset band·C. Depends only on the rows' lengths: once per step, not per layer."""
        if self.post_rope or not self.wrope.banded:
            return 1, None
        nb = self.wrope.bands_for(int(valid.sum(-1).max()))  # bands present in the longest row
        band = self.wrope.band_of(_relative_distance(valid), nb)
        return nb, (band * self.codebooks.settings.n_centroids).to(torch.int32)

    def lut(self, layer: int, q_pre: torch.Tensor, query: torch.Tensor, bands: int, kv_heads: slice) -> torch.Tensor:
        """Lookup tables (B, Hkv, G, bands·C) fp32, a row per query head: q̃ · centroids for each band's q̃."""
        B, Hq, d = q_pre.shape
        centroids = self.codebooks.tensors_for(layer, kv_heads, q_pre.device)[0]  # (Hkv, C, d)
        Hkv, C = centroids.shape[0], centroids.shape[1]
        G = Hq // Hkv
        if self.post_rope:
            q = query.float().reshape(B, Hkv, G, d)
        elif self.wrope.banded:
            q = self.wrope.queries(q_pre, bands).reshape(B, Hkv, G * bands, d)
        else:
            q = self.wrope.query(q_pre).reshape(B, Hkv, G, d)
        key = (layer, kv_heads.start, kv_heads.stop, str(q.device))
        if key not in self._tiles:
            self._tiles[key] = tile_centroids(centroids)  # None off the CPU kernel: plain matmul there
        return lookup_tables(q, centroids, self._tiles[key]).reshape(B, Hkv, G, bands * C)

    def tables(self, layer: int, q_pre: torch.Tensor, query: torch.Tensor, valid: torch.Tensor, kv_heads: slice):
        """``lut`` (B, Hkv, G, T) and ``offsets`` (B, n) or None: token j of KV head h is scored
        ``lut[b, h, g, codes[b, h, j] + offsets[b, j]]`` by query head g of the group."""
        bands, offsets = self.band_offsets(valid)
        return self.lut(layer, q_pre, query, bands, kv_heads), offsets

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, _ = step.q_pre.shape
        lut, offsets = self.tables(step.layer, step.q_pre, step.query, step.valid, step.kv_heads)
        codes = step.store.extra("codes").long()  # (B, Hkv, n)
        if offsets is not None:
            codes = codes + offsets.unsqueeze(1)
        Hkv, G, n = lut.shape[1], lut.shape[2], codes.shape[-1]
        est = torch.gather(lut, -1, codes.unsqueeze(2).expand(B, Hkv, G, n))
        return est.reshape(B, Hq, n)


def _relative_distance(valid: torch.Tensor) -> torch.Tensor:
    """(B, n) distance of each token from the newest real token of its row (padding: 0, never selected)."""
    rank = valid.long().cumsum(-1) - 1
    return ((valid.sum(-1, keepdim=True) - 1 - rank) * valid).clamp_min(0)
