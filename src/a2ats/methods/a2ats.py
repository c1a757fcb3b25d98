"""A²ATS (He et al., 2025): WRoPE query x query-aware VQ codes of pre-RoPE keys, via a lookup table.

The ablations are the same method over other codebooks: ``a2ats-euclid`` (plain k-means,
``query_aware=False``) and ``a2ats-postrope`` (post-RoPE keys scored with the true query, no WRoPE,
``post_rope=True``).
"""

from __future__ import annotations

import torch

from ..codebook import Codebooks
from ..rope import WRoPE
from ..selection import DecodeStep
from .base import Method


class A2ATSMethod(Method):
    def __init__(self, codebooks: Codebooks, wrope: WRoPE):
        self.codebooks = codebooks
        self.wrope = wrope
        s = codebooks.settings
        self.post_rope = s.post_rope
        self.name = "a2ats-postrope" if s.post_rope else ("a2ats" if s.query_aware else "a2ats-euclid")
        if wrope.banded and not s.post_rope:
            self.name += "-banded"

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        # Every key is encoded once, as it is written; int16 holds up to 32767 centroids.
        store.write_extra("codes", self.codebooks.encode(layer, k_post if self.post_rope else k_pre, kv_heads))

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, d = step.q_pre.shape
        Hkv, G = step.keys.shape[1], step.group
        centroids = self.codebooks.tensors_for(step.layer, step.kv_heads, step.q_pre.device)[0]  # (Hkv, C, d)
        codes = step.store.extra("codes").long()  # (B, Hkv, n)
        n, C = codes.shape[-1], centroids.shape[1]
        if self.post_rope or not self.wrope.banded:
            q = step.query.float() if self.post_rope else self.wrope.query(step.q_pre)
            lut = torch.einsum("bhgd,hcd->bhgc", q.reshape(B, Hkv, G, d), centroids)  # (B, Hkv, G, C): a row per query head
        else:  # one table per band; a token's entry is picked by its band and its code
            distance = _relative_distance(step.valid)
            nb = self.wrope.bands_for(int(step.valid.sum(-1).max()))  # bands present in the longest row
            band = self.wrope.band_of(distance, nb)
            q = self.wrope.queries(step.q_pre, nb).reshape(B, Hkv, G, nb, d)
            lut = torch.einsum("bhgkd,hcd->bhgkc", q, centroids).reshape(B, Hkv, G, nb * C)
            codes = codes + (band * C).unsqueeze(1)
        est = torch.gather(lut, -1, codes.unsqueeze(2).expand(B, Hkv, G, n))
        return est.reshape(B, Hq, n)


def _relative_distance(valid: torch.Tensor) -> torch.Tensor:
    """(B, n) distance of each token from the newest real token of its row (padding: 0, never selected)."""
    rank = valid.long().cumsum(-1) - 1
    return ((valid.sum(-1, keepdim=True) - 1 - rank) * valid).clamp_min(0)
