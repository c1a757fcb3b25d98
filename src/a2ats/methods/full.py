"""Full (dense) attention behind the selection interface: every real token, every step."""

from __future__ import annotations

import torch

from a2ats.core.config import A2ATSConfig
from a2ats.core.selection import DecodeStep
from a2ats.methods.base import Method


class FullMethod(Method):
    name = "full"

    def select(self, step: DecodeStep, config: A2ATSConfig) -> torch.Tensor:
        return step.valid.unsqueeze(1).expand(-1, step.keys.shape[1], -1)
