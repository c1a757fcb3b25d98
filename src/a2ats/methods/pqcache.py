"""PQCache-style retrieval (Zhang et al., SIGMOD 2025): product quantization of post-RoPE keys,
with plain Euclidean k-means fit per sequence at prefill, scored by inner product with the query.

Each layer's keys are split into ``subspaces`` parts; each part of each (sequence, KV head) gets
``2**bits`` centroids from its own prefill keys. Keys written later are encoded with those
centroids. Padding keys of a left-padded row take part in its fit (they are never selected).
"""

from __future__ import annotations

import torch

from a2ats.core.kmeans import assign, kmeans
from a2ats.core.selection import DecodeStep
from a2ats.methods.base import Method


class PQCacheMethod(Method):
    name = "pqcache"

    def __init__(self, subspaces: int = 2, bits: int = 6, iterations: int = 10, seed: int = 0):
        if subspaces < 1 or not 1 <= bits <= 15:
            raise ValueError(f"need subspaces >= 1 and 1 <= bits <= 15, got {subspaces}, {bits}")
        self.subspaces, self.centroids, self.iterations, self.seed = subspaces, 2**bits, iterations, seed

    def _split(self, k: torch.Tensor) -> torch.Tensor:
        """(B, H, t, d) -> (B*H*M, t, d/M)."""
        B, H, t, d = k.shape
        M = self.subspaces
        if d % M:
            raise ValueError(f"head_dim {d} is not divisible into {M} PQ subspaces")
        return k.float().reshape(B, H, t, M, d // M).permute(0, 1, 3, 2, 4).reshape(B * H * M, t, d // M)

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        B, H, t, _ = k_post.shape
        parts = self._split(k_post)
        if "pq" not in store.state:  # prefill: fit this sequence's codebooks
            k = min(self.centroids, t)
            res = kmeans(parts, k, max_iter=self.iterations, tol=1e-4, seed=self.seed)
            store.state["pq"] = res.centroids.reshape(B, H * self.subspaces, k, -1)
        cent = store.state["pq"].reshape(B * H * self.subspaces, -1, parts.shape[-1])
        codes, _ = assign(parts, cent)
        codes = codes.reshape(B, H, self.subspaces, t).permute(0, 1, 3, 2)  # (B, H, t, M)
        store.write_extra("pq_codes", codes.to(torch.int16).contiguous())

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, d = step.query.shape
        Hkv, G, M = step.keys.shape[1], step.group, self.subspaces
        cent = step.store.state["pq"].reshape(B, Hkv, M, -1, d // M)  # (B, Hkv, M, C, d/M)
        q = step.query.float().reshape(B, Hkv, G, M, d // M)
        lut = torch.einsum("bhgmx,bhmcx->bhgmc", q, cent)  # (B, Hkv, G, M, C)
        codes = step.store.extra("pq_codes").long()  # (B, Hkv, n, M)
        n = codes.shape[2]
        est = torch.zeros(B, Hkv, G, n, device=q.device)
        for m in range(M):
            est += torch.gather(lut[:, :, :, m], -1, codes[:, :, None, :, m].expand(B, Hkv, G, n))
        return est.reshape(B, Hq, n)
