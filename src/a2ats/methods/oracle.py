"""Oracle top-K: the true attention logits (exact keys, true RoPE). The ceiling for any retrieval method."""

from __future__ import annotations

import torch

from a2ats.core.selection import DecodeStep
from a2ats.methods.base import Method


class OracleMethod(Method):
    name = "oracle"

    def scores(self, step: DecodeStep) -> torch.Tensor:
        B, Hq, d = step.query.shape
        Hkv, G = step.keys.shape[1], step.group
        q = step.query.float().reshape(B, Hkv, G, d)
        return torch.einsum("bhgd,bhnd->bhgn", q, step.keys.float()).reshape(B, Hq, -1)
