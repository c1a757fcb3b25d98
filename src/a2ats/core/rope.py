"""Rotary position embedding as the model applies it, and WRoPE (docs/design.md §1.1).

Transformers hands attention post-RoPE queries and keys. Both are rotated by the model's own
cos/sin (so llama3, YaRN, dynamic scaling are all included); the inverse rotation recovers the
pre-RoPE vectors exactly, without knowing the rope type. All functions use the HF convention
``x' = x*cos + rotate_half(x)*sin`` and support partial rotary (cos narrower than head_dim).
"""

from __future__ import annotations

import torch
from torch import nn

from a2ats.core.config import check_band_ratio
from a2ats.core.support import UnsupportedModelError, model_type


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _broadcast(cs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # cos/sin come as (B, n, d) or (n, d); heads sit at dim 1 of x (B, H, n, d).
    if cs.dim() == 3 and x.dim() == 4:
        cs = cs.unsqueeze(1)
    return cs.to(torch.float32)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` forward by the angles in cos/sin, in fp32."""
    return _rotate(x, cos, sin, sign=1.0)


def undo_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rotation`, in fp32.

    Some rope types scale cos and sin (YaRN's attention factor), so the inverse divides by
    cos^2 + sin^2 rather than assuming a pure rotation.
    """
    return _rotate(x, cos, sin, sign=-1.0)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    x = x.to(torch.float32)
    cos, sin = _broadcast(cos, x), _broadcast(sin, x)
    rot = cos.shape[-1]
    xr = x[..., :rot]
    out = xr * cos + sign * rotate_half(xr) * sin
    if sign < 0:
        out = out / (cos * cos + sin * sin)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)


def find_rotary_embedding(model: nn.Module) -> nn.Module:
    """The model's shared rotary-embedding module (``model.model.rotary_emb`` for Llama-like models)."""
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    for module in rotary:
        if hasattr(module, "inv_freq"):
            return module
    if rotary:
        raise UnsupportedModelError(
            f"a2ats does not support this {model_type(model)} model: its rotary embedding ({type(rotary[0]).__name__}) "
            "has no single set of frequencies (inv_freq), e.g. one per layer type; WRoPE needs the one rotation "
            "every layer applies")
    raise UnsupportedModelError(
        f"a2ats does not support this {model_type(model)} model: it has no rotary position embedding module, and "
        "A²ATS needs a RoPE model (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, ...); absolute or ALiBi positions are not supported"
    )


def rotary_at(rotary: nn.Module, distance: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (each (1, 1, rot_dim), fp32) of the rotation by ``distance`` positions, from the model's module."""
    probe = torch.zeros(1, 1, 1, device=device, dtype=torch.float32)
    pos = torch.tensor([[distance]], device=device, dtype=torch.long)
    with torch.no_grad():
        cos, sin = rotary(probe, position_ids=pos)
    return cos.to(torch.float32), sin.to(torch.float32)


class WRoPE:
    """Scores every token outside the window as if it sat exactly ``distance`` positions away.

    ``(R_b q_pre) . k_pre`` equals the true RoPE score at relative distance b, so keys carry no
    position and one codebook serves every position.

    Banded (``band_ratio`` set; not in the paper): relative distances are cut into geometric bands
    ``[first*r^i, first*r^(i+1))`` (band 0 also holds everything nearer) and each band is scored at its
    own distance ``first*r^(i+1/2)``. Keys stay position-free (same codes, same codebook); a step
    costs one lookup table per band in use instead of one.
    """

    def __init__(self, rotary: nn.Module, distance: int = 2048, band_ratio: float | None = None, first_edge: int = 64):
        check_band_ratio(band_ratio)
        if first_edge < 1:
            raise ValueError(f"first_edge must be >= 1, got {first_edge}")
        self.rotary = rotary
        self.distance = distance
        self.band_ratio = band_ratio
        self.first_edge = first_edge
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._edges: dict[tuple[torch.device, int], torch.Tensor] = {}

    @property
    def banded(self) -> bool:
        return self.band_ratio is not None

    def band_distance(self, band: int) -> int:
        """The distance band ``band`` is scored at (the single distance b when not banded)."""
        if not self.banded:
            return self.distance
        return round(self.first_edge * self.band_ratio ** (band + 0.5))

    def bands_for(self, length: int) -> int:
        """How many bands hold tokens at relative distances below ``length``."""
        if not self.banded:
            return 1
        n, lo = 1, self.first_edge * self.band_ratio
        while lo <= length - 1:
            n, lo = n + 1, lo * self.band_ratio
        return n

    def band_of(self, distance: torch.Tensor, bands: int | None = None) -> torch.Tensor:
        """Band index (long, same shape) of each relative distance; ``bands`` (from :meth:`bands_for`) saves a
        pass over ``distance`` when the caller knows the longest row."""
        if not self.banded:
            return torch.zeros_like(distance, dtype=torch.long)
        if bands is None:
            bands = self.bands_for(int(distance.max()) + 1 if distance.numel() else 1)
        key = (distance.device, bands)
        if key not in self._edges:  # built once per device and band count, not per step and layer
            self._edges[key] = torch.tensor([self.first_edge * self.band_ratio ** (i + 1) for i in range(bands - 1)],
                                            device=distance.device)
        edges = self._edges[key]
        return torch.bucketize(distance.to(edges.dtype), edges, right=True)

    def rotation(self, device: torch.device, band: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        distance = self.band_distance(band)
        key = (torch.device(device), distance)
        if key not in self._cache:  # computed once per device and distance, not per step
            self._cache[key] = rotary_at(self.rotary, distance, device)
        return self._cache[key]

    def query(self, q_pre: torch.Tensor, band: int = 0) -> torch.Tensor:
        """``R_b q_pre`` for query heads (..., d), fp32, scaled so that ``query(q) . k_pre`` is the model's own
        logit at distance b (rope types such as YaRN scale both q and k by their attention factor)."""
        return apply_rotation(q_pre, *self._scaled(q_pre.device, band))

    def _scaled(self, device: torch.device, band: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (rot,) of band ``band``, times the rope type's attention factor (see :meth:`query`)."""
        key = (torch.device(device), self.band_distance(band), "scaled")
        if key not in self._cache:  # once per device and distance: a decode step calls this once per layer
            cos, sin = self.rotation(device, band)
            cos, sin = cos.reshape(-1), sin.reshape(-1)
            factor = (cos * cos + sin * sin).sqrt()
            self._cache[key] = (cos * factor, sin * factor)
        return self._cache[key]

    def queries(self, q_pre: torch.Tensor, bands: int) -> torch.Tensor:
        """The query rotated for each of the first ``bands`` bands: (..., bands, d), the same values as stacking
        :meth:`query` per band, bit for bit (a decode step calls this once per layer: a few broadcast operations
        instead of ``bands`` rotations plus a stack)."""
        d = q_pre.shape[-1]
        key = (torch.device(q_pre.device), bands, d, "stacked")
        if key not in self._cache:
            self._cache[key] = self._stacked(q_pre.device, bands, d)
        cos, sin, swap = self._cache[key]
        x = q_pre.to(torch.float32).unsqueeze(-2)  # (..., 1, d), broadcast over the bands
        return (x * cos).add_(x.index_select(-1, swap) * sin)

    def band_rotation(self, device: torch.device, bands: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed_sin), each (bands, rot), the rotation :meth:`queries` applies to the first ``rot`` dims
        for each band, in the layout of :func:`a2ats.kernels.ops.rope` (``signed_sin``: the sign of
        ``rotate_half`` folded in); the dims past a partial rotary pass through."""
        key = (device, bands, d, "rotation")
        if key not in self._cache:
            cos, sin, _ = self._stacked(device, bands, d)
            rot = self._scaled(device, 0)[0].shape[-1]
            self._cache[key] = (cos[:, :rot].contiguous(), sin[:, :rot].contiguous())
        return self._cache[key]

    def _stacked(self, device: torch.device, bands: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, swap) with ``x * cos + x[..., swap] * sin`` = :func:`apply_rotation` of x (..., d) by each
        band's rotation, (bands, d): ``swap`` exchanges the two halves of the rotated dims, the sign of
        ``rotate_half`` sits in ``sin`` (a negation is exact: the same products), and dims past a partial rotary
        pass through (cos 1, sin 0)."""
        per_band = [self._scaled(device, b) for b in range(bands)]
        rot = per_band[0][0].shape[-1]
        half = rot // 2
        cos = torch.ones(bands, d, device=device)
        sin = torch.zeros(bands, d, device=device)
        cos[:, :rot] = torch.stack([c for c, _ in per_band])
        sin[:, :rot] = torch.stack([s for _, s in per_band])
        sin[:, :half] = -sin[:, :half]
        swap = torch.arange(d, device=device)
        swap[:rot] = torch.cat([swap[half:rot], swap[:half]])
        return cos, sin, swap
