"""Compact projection weights for decode steps: bf16, int8 (a scale per output row) and 4-bit (groups of 32).

A decode step multiplies a few rows by every weight of the model, so it is bound by reading the weights:
fewer bytes per weight, a faster step. ``pack`` stores a weight in a format; :func:`unpack` is the
reference that defines it (the fp32 weight the kernels multiply by); :func:`linear` runs the C++
kernel on CPU tensors and the reference elsewhere. The math stays fp32 in every format: only the
weights are rounded.

- ``bf16``: the weight rounded to bfloat16 (lossless for checkpoints stored in bf16). 16 bits.
- ``int8``: symmetric, one fp32 scale per output row, ``w = q * scale``, q in -127..127. 8 bits.
- ``int4``: asymmetric in groups of 32 inputs, ``w = q * scale + min``, q in 0..15, one fp32 scale and min
  per group. 6 bits per weight with its scale and min.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2ats.kernels.cpu import cpu_backend

FORMATS = ("bf16", "int8", "int4")
BITS = {"fp32": 32.0, "bf16": 16.0, "int8": 8.0, "int4": 4.0 + 64 / 32}  # int4: + fp32 scale and min per 32
GROUP = 32  # inputs per int4 group


@dataclass(frozen=True)
class PackedWeight:
    """One (O, I) weight in a compact format; ``scale``/``mins`` as the format needs."""

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.data.shape
        return rows, cols * 2 if self.fmt == "int4" else cols

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.mins) if t is not None)


def check_format(fmt: str, in_features: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "int4" and in_features % GROUP:
        raise ValueError(f"int4 weights need input sizes divisible by {GROUP}; this model has {in_features}: "
                         "use the int8 or bf16 format")


def pack(w: torch.Tensor, fmt: str) -> PackedWeight:
    """``w`` (O, I) in format ``fmt`` (see the module's docstring)."""
    if w.dim() != 2:
        raise ValueError(f"weights must be (O, I), got {tuple(w.shape)}")
    check_format(fmt, w.shape[1])
    w = w.detach().float()
    if fmt == "bf16":
        return PackedWeight(fmt, w.to(torch.bfloat16).contiguous())
    if fmt == "int8":
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return PackedWeight(fmt, q.contiguous(), scale.contiguous())
    O, I = w.shape
    g = w.view(O, I // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j (low nibble), element j + 16 (high)
    return PackedWeight(fmt, packed.reshape(O, I // 2).contiguous(), scale.contiguous(), lo.contiguous())


def unpack(p: PackedWeight) -> torch.Tensor:
    """The fp32 (O, I) weight that ``p`` stands for: the reference for the kernels."""
    if p.fmt == "bf16":
        return p.data.float()
    if p.fmt == "int8":
        return p.data.float() * p.scale[:, None]
    O, half = p.data.shape
    b = p.data.view(O, half // 16, 16)
    q = torch.cat([b & 0x0F, b >> 4], -1).float()  # (O, groups, 32)
    return (q * p.scale[..., None] + p.mins[..., None]).reshape(O, half * 2)


def linear(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ unpack(p).T + bias`` for float32 x (..., I), fp32 math."""
    O, I = p.shape
    if x.dtype != torch.float32 or x.shape[-1] != I:
        raise ValueError(f"x must be float32 (..., {I}); got {x.dtype} {tuple(x.shape)}")
    on_cpu = x.device.type == "cpu" and p.data.device.type == "cpu"
    ext = cpu_backend() if on_cpu else None
    if ext is None:
        return torch.nn.functional.linear(x, unpack(p), None if bias is None else bias.float())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, I)
    if p.fmt == "bf16":
        y = ext.linear_bf16w(x2, p.data, bias)
    elif p.fmt == "int8":
        y = ext.linear_int8w(x2, p.data, p.scale, bias)
    else:
        y = ext.linear_int4w(x2, p.data, p.scale, p.mins, bias)
    return y.reshape(*lead, O)
