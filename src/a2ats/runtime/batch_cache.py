"""Static per-layer buffers for the engine: K and V post-RoPE (B, Hkv, cap, d), codes (B, Hkv, cap) int16,
and which slots hold real tokens (B, cap). Allocated once for prompt + new tokens; grown (rarely) by 1.5x."""

from __future__ import annotations

import torch


class BatchKV:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", codes: bool = True):
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.dtype, self.device, self.with_codes = dtype, torch.device(device), codes
        self.length = 0
        self.encoded = 0  # slots [0, encoded) have codes; newer ones wait in `pending` (see Runner)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.codes: list[torch.Tensor] = []
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.reserve(capacity)

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                     dtype: torch.dtype, codes: bool = True) -> int:
        per_token = 2 * head_dim * torch.empty(0, dtype=dtype).element_size() + (2 if codes else 0)
        return num_layers * batch * kv_heads * capacity * per_token + batch * capacity

    def reserve(self, capacity: int) -> None:
        """Room for ``capacity`` tokens, keeping what is cached; a multiple of 64 so rows stay aligned."""
        capacity = -(-capacity // 64) * 64
        if capacity <= self.capacity:
            return
        B, H, d, n = self.batch, self.kv_heads, self.head_dim, self.length

        k, v, c = [], [], []
        for i in range(self.num_layers):
            nk = torch.empty(B, H, capacity, d, dtype=self.dtype, device=self.device)
            nv = torch.empty_like(nk)
            if self.k:
                nk[:, :, :n] = self.k[i][:, :, :n]
                nv[:, :, :n] = self.v[i][:, :, :n]
            k.append(nk)
            v.append(nv)
            if self.with_codes:
                nc = torch.zeros(B, H, capacity, dtype=torch.int16, device=self.device)
                if self.codes:
                    nc[:, :, :n] = self.codes[i][:, :, :n]
                c.append(nc)
        valid = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)
        valid[:, :n] = self.valid[:, :n]
        self.k, self.v, self.codes, self.valid, self.capacity = k, v, c, valid, capacity

    def advance(self, mask: torch.Tensor) -> tuple[int, int]:
        """Open slots for ``mask.shape[1]`` new tokens (mask (B, t) bool: real or padding); returns (start, end)."""
        start, end = self.length, self.length + mask.shape[1]
        if end > self.capacity:
            self.reserve(max(end, self.capacity * 3 // 2))
        self.valid[:, start:end] = mask
        self.length = end
        return start, end

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, codes: torch.Tensor | None) -> None:
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if codes is not None:
            self.codes[layer][:, :, start:end] = codes

    def write_codes(self, layer: int, start: int, codes: torch.Tensor) -> None:
        self.codes[layer][:, :, start : start + codes.shape[-1]] = codes

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer][:, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer][:, :, : self.length]

    def layer_codes(self, layer: int) -> torch.Tensor:
        return self.codes[layer][:, :, : self.length]

    @property
    def valid_now(self) -> torch.Tensor:
        return self.valid[:, : self.length]
