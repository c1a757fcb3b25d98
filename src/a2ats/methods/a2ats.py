"""A²ATS (He et al., 2025): WRoPE query x query-aware VQ codes of pre-RoPE keys, via a lookup table."""

from __future__ import annotations

import torch

from ..codebook import Codebooks
from ..rope import WRoPE
from ..selection import DecodeStep
from .base import Method


class A2ATSMethod(Method):
    name = "a2ats"

    def __init__(self, codebooks: Codebooks, wrope: WRoPE):
        self.codebooks = codebooks
        self.wrope = wrope

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        # Every key is encoded once, as it is written; int16 holds up to 32767 centroids.
        store.write_extra("codes", self.codebooks.encode(layer, k_pre, kv_heads))

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, d = step.q_pre.shape
        Hkv, G = step.keys.shape[1], step.group
        centroids = self.codebooks.tensors_for(step.layer, step.kv_heads, step.q_pre.device)[0]  # (Hkv, C, d)
        q_rot = self.wrope.query(step.q_pre).reshape(B, Hkv, G, d)
        lut = torch.einsum("bhgd,hcd->bhgc", q_rot, centroids)  # (B, Hkv, G, C): one row per query head
        codes = step.store.extra("codes").long()  # (B, Hkv, n)
        n = codes.shape[-1]
        est = torch.gather(lut, -1, codes.unsqueeze(2).expand(B, Hkv, G, n))
        return est.reshape(B, Hq, n)
