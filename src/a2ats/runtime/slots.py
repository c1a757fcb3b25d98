"""Where the runtime's sequences live: one *slot* per sequence, each with its own length (no shared padding).

- host: K and V of every layer, (slots, Hkv, capacity, d), post-RoPE, in the layout of the CPU
  sparse-attention kernel; pinned when CUDA is present, so copies to and from it run asynchronously.
  float32, bfloat16, or int8 with a float32 scale per row (token and head): the compact layout.
- accelerator: the int16 codes of every key, (slots, Hkv, capacity), and each slot's length.

A slot's tokens occupy positions [0, length) of its rows; later positions are invalid, so the
selection kernels see a right-padded batch. A finished sequence frees its slot for the next one.
Everything is allocated once, at the server's capacity, so admitting a sequence costs no allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2ats.kernels import dequantize_rows, quantize_rows, store_rows


@dataclass
class KVState:
    """One sequence's cache, taken out of a slot or to be put into one: per layer K and V (Hkv, n, d), post-RoPE,
    and the keys' codes (Hkv, n) int16 (None for an engine without a method)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    codes: list[torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def check(self, num_layers: int, kv_heads: int, head_dim: int, codes: bool) -> None:
        """A clear error when this state was not made for a model of these dimensions (or lacks codes it needs)."""
        if len(self.k) != num_layers or len(self.v) != num_layers:
            raise ValueError(f"the cache state has {len(self.k)} layers; this model has {num_layers}")
        for x in (*self.k, *self.v):
            if x.dim() != 3 or (x.shape[0], x.shape[1], x.shape[2]) != (kv_heads, self.length, head_dim):
                raise ValueError(f"the cache state holds a tensor of shape {tuple(x.shape)}; this model needs "
                                 f"({kv_heads} KV heads, {self.length} tokens, head_dim {head_dim}) in every layer")
        if codes and (self.codes is None or len(self.codes) != num_layers):
            raise ValueError("this engine selects over codes and the cache state has none: take the state from an "
                             "engine with the same codebooks")


@dataclass(frozen=True)
class SlotBytes:
    """Bytes a :class:`SlotCache` needs on each side."""

    host: int  # K and V
    accelerator: int  # codes, lengths

    @staticmethod
    def of(num_layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
           codes: bool = True) -> SlotBytes:
        item = torch.empty(0, dtype=dtype).element_size()
        row = head_dim * item + (4 if dtype == torch.int8 else 0)  # int8 rows carry a float32 scale
        kv = num_layers * slots * kv_heads * capacity * row * 2
        c = num_layers * slots * kv_heads * capacity * 2 if codes else 0
        return SlotBytes(host=kv, accelerator=c + slots * 8)


class SlotCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, accelerator: torch.device | str, host: torch.device | str = "cpu",
                 codes: bool = True):
        self.num_layers, self.slots, self.kv_heads, self.head_dim = num_layers, slots, kv_heads, head_dim
        self.capacity = -(-capacity // 64) * 64  # rows stay aligned for the kernels
        self.dtype = dtype
        self.accelerator, self.host = torch.device(accelerator), torch.device(host)
        pin = self.host.type == "cpu" and self.accelerator.type == "cuda"
        shape = (slots, kv_heads, self.capacity, head_dim)
        # Zeroed, not empty: dense attention masks positions past a slot's length, and a mask does not
        # neutralize NaN bit patterns (0 x NaN) that uninitialized memory may hold.
        self.k = [torch.zeros(shape, dtype=dtype, device=self.host, pin_memory=pin) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.host, pin_memory=pin) for _ in range(num_layers)]
        # int8: row scales, K and V, (slots, Hkv, capacity) float32 per layer; None for float caches.
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = [torch.zeros(shape[:3], device=self.host, pin_memory=pin) for _ in range(num_layers)]
            self.v_scale = [torch.zeros(shape[:3], device=self.host, pin_memory=pin) for _ in range(num_layers)]
        self.codes = [torch.zeros(slots, kv_heads, self.capacity, dtype=torch.int16, device=self.accelerator)
                      for _ in range(num_layers)] if codes else None
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.accelerator)
        self._kv_rows = head_rows(slots, kv_heads, self.capacity, self.host)  # each (slot, head)'s first row
        # The same lengths on the host, read by the scheduler without a device sync.
        self.host_lengths = [0] * slots
        # Positions [0, encoded[b]) of slot b have codes; later ones wait, pre-RoPE, in the runner's
        # pending buffer until they are encoded together (see Runner.begin_decode).
        self.encoded = [0] * slots

    @property
    def bytes(self) -> SlotBytes:
        return SlotBytes.of(self.num_layers, self.slots, self.kv_heads, self.head_dim, self.capacity, self.dtype,
                            self.codes is not None)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def put(self, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows (..., d) at ``index`` of layer ``layer``'s K and V (quantized for an int8 cache)."""
        if self.quantized:
            (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
            self.k[layer][index], self.k_scale[layer][index] = kq.to(self.host), ks.to(self.host)
            self.v[layer][index], self.v_scale[layer][index] = vq.to(self.host), vs.to(self.host)
        else:
            self.k[layer][index] = k.to(self.host, self.dtype)
            self.v[layer][index] = v.to(self.host, self.dtype)

    def flat_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Row numbers, in a layer's K (or V) seen as (slots·Hkv·capacity, d), of position ``positions[b]`` of
        every slot b and head: (slots·Hkv,) on the host, for :meth:`put_rows`."""
        return (self._kv_rows + positions.to(self.host)[:, None]).reshape(-1)

    def put_rows(self, layer: int, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one row (slots, Hkv, d) of K and V per slot and head at ``flat`` (:meth:`flat_index`): a decode
        step's new keys and values in one indexed copy each."""
        d = self.head_dim
        if self.quantized:
            (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
            for dst, scale, q, sc in ((self.k, self.k_scale, kq, ks), (self.v, self.v_scale, vq, vs)):
                dst[layer].view(-1, d).index_copy_(0, flat, q.reshape(-1, d).to(self.host))
                scale[layer].view(-1).index_copy_(0, flat, sc.reshape(-1).to(self.host))
            return
        store_rows(self.k[layer].view(-1, d), self.v[layer].view(-1, d), flat, k.to(self.host), v.to(self.host))

    def _stores(self) -> list[list[torch.Tensor]]:
        """Every per-position array, per layer: K, V, an int8 cache's scales, the codes ((slots, Hkv, capacity, ...))."""
        return [x for x in (self.k, self.v, self.k_scale, self.v_scale, self.codes) if x is not None]

    def copy_out(self, slot: int, start: int, end: int) -> list[list[torch.Tensor]]:
        """Copies of positions [start, end) of ``slot`` as stored (no conversion), for :meth:`copy_in`."""
        return [[x[slot, :, start:end].clone() for x in store] for store in self._stores()]

    def copy_in(self, slot: int, start: int, rows: list[list[torch.Tensor]]) -> None:
        """Put :meth:`copy_out`'s rows at positions [start, ...) of ``slot``."""
        for store, parts in zip(self._stores(), rows, strict=True):
            for x, part in zip(store, parts, strict=True):
                x[slot, :, start : start + part.shape[1]] = part

    def rows(self, layer: int, slots: slice, end: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` up to position ``end`` as float ``dtype`` tensors on ``device``."""
        k, v = self.k[layer][slots, :, :end], self.v[layer][slots, :, :end]
        if self.quantized:
            k = dequantize_rows(k, self.k_scale[layer][slots, :, :end])
            v = dequantize_rows(v, self.v_scale[layer][slots, :, :end])
        return k.to(device, dtype), v.to(device, dtype)

    def export(self, slot: int, dtype: torch.dtype) -> KVState:
        """A copy of ``slot``'s cache, its whole length, as ``dtype`` tensors on the host."""
        n = self.host_lengths[slot]
        k, v = zip(*(self.rows(i, slice(slot, slot + 1), n, dtype, self.host) for i in range(self.num_layers)))
        codes = None if self.codes is None else [c[slot, :, :n].cpu() for c in self.codes]
        return KVState([x[0].clone() for x in k], [x[0].clone() for x in v], codes)

    def load(self, slot: int, state: KVState) -> None:
        """Put ``state`` in positions [0, length) of ``slot`` (quantized for an int8 cache), codes included."""
        n = state.length
        where = (slot, slice(None), slice(0, n))
        for i in range(self.num_layers):
            self.put(i, where, state.k[i], state.v[i])
            if self.codes is not None:
                self.codes[i][where] = state.codes[i].to(self.accelerator)
        self.filled(slot, n)

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.host_lengths[slot] = 0
        self.encoded[slot] = 0

    def filled(self, slot: int, length: int) -> None:
        """Slot ``slot`` now holds ``length`` tokens, all of them encoded (after a prefill)."""
        self.lengths[slot] = length
        self.host_lengths[slot] = length
        self.encoded[slot] = length

    def valid(self, lengths: torch.Tensor, n: int) -> torch.Tensor:
        """(slots, n) bool: position j of slot b holds a token when j < lengths[b]."""
        return torch.arange(n, device=lengths.device) < lengths.unsqueeze(1)


def head_rows(slots: int, heads: int, stride: int, device: torch.device | str) -> torch.Tensor:
    """(slots, heads): the first row of each (slot, head) in a buffer (slots, heads, stride, d) seen as
    (slots·heads·stride, d); adding a position per slot gives the rows an indexed copy writes."""
    return (torch.arange(slots, device=device)[:, None] * heads + torch.arange(heads, device=device)) * stride
