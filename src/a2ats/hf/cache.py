"""Where K, V and each token's retrieval metadata (e.g. A²ATS codes) live: a transformers ``Cache``.

This is the *reference* placement: everything on the model's device. Buffers grow in chunks and
``keys``/``values`` are views, so a decode step appends in place instead of concatenating the
whole cache. Per-token metadata ("extras", e.g. int16 codes of shape (B, Hkv, n)) shares the token
axis (dim 2) and moves with K/V under beam reordering, batch selection and cropping.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_GROW_MIN = 256


def _grow(buf: torch.Tensor | None, like: torch.Tensor, need: int) -> torch.Tensor:
    """A buffer shaped like ``like`` (token axis 2) with room for ``need`` tokens, keeping old contents."""
    if buf is not None and buf.shape[2] >= need:
        return buf
    cap = max(need, _GROW_MIN, 0 if buf is None else buf.shape[2] * 3 // 2)
    cap = -(-cap // 64) * 64
    shape = (*like.shape[:2], cap, *like.shape[3:])
    new = torch.empty(shape, dtype=like.dtype, device=like.device)
    if buf is not None:
        new[:, :, : buf.shape[2]] = buf
    return new


class A2ATSLayer(CacheLayerMixin):
    """One layer's K, V (post-RoPE, (B, Hkv, n, d)) and per-token extras, in growable buffers."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._extras: dict[str, torch.Tensor] = {}
        # Per-sequence method state without a token axis (batch at dim 0), e.g. PQ codebooks fit at prefill.
        self.state: dict[str, torch.Tensor] = {}

    # transformers reads .keys/.values; they are views of the filled part.
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("A2ATSLayer.keys is read-only; use update()")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("A2ATSLayer.values is read-only; use update()")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        end = self.length + t
        self._k = _grow(self._k, key_states, end)
        self._v = _grow(self._v, value_states, end)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V buffers (B, Hkv, capacity, d), for kernels that gather rows by index."""
        return self._k, self._v

    # -- per-token metadata --------------------------------------------------------------------------------

    def write_extra(self, name: str, value: torch.Tensor) -> None:
        """Store metadata of the newest ``value.shape[2]`` tokens (those the last update appended)."""
        t = value.shape[2]
        buf = _grow(self._extras.get(name), value, self.length)
        buf[:, :, self.length - t : self.length] = value
        self._extras[name] = buf

    def extra(self, name: str) -> torch.Tensor:
        if name not in self._extras:
            raise KeyError(f"no per-token '{name}' in this cache layer")
        return self._extras[name][:, :, : self.length]

    def snapshot_metadata(self) -> tuple[dict, dict]:
        """Copies of the per-token extras and per-sequence state (what a method built from the keys so far)."""
        return {k: v.clone() for k, v in self._extras.items()}, {k: v.clone() for k, v in self.state.items()}

    def restore_metadata(self, snapshot: tuple[dict, dict]) -> None:
        """Extras and state from :meth:`snapshot_metadata` of a layer holding the same keys."""
        extras, state = snapshot
        self._extras = {k: v.clone() for k, v in extras.items()}
        self.state = {k: v.clone() for k, v in state.items()}

    # -- transformers Cache protocol -----------------------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self._k is None:
            return
        self._k, self._v = fn(self._k), fn(self._v)
        self._extras = {k: fn(v) for k, v in self._extras.items()}
        self.state = {k: fn(v) for k, v in self.state.items()}

    def cast(self, dtype: torch.dtype) -> None:
        """K and V in ``dtype`` (e.g. after a prefill under autocast left V in bf16); extras keep theirs."""
        if self._k is not None:
            self._k, self._v = self._k.to(dtype), self._v.to(dtype)
            self.dtype = dtype

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        self._extras = {}
        self.state = {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def offload(self):  # the reference placement keeps everything on the model's device
        pass

    def prefetch(self):
        pass


class A2ATSCache(Cache):
    """A transformers cache whose layers hold K, V and retrieval metadata (see :class:`A2ATSLayer`)."""

    def __init__(self, num_layers: int | None = None):
        if num_layers is None:
            super().__init__(layer_class_to_replicate=A2ATSLayer)
        else:
            super().__init__(layers=[A2ATSLayer() for _ in range(num_layers)])
