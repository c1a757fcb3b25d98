"""Compact projection weights for decode steps: bf16, int8 (a scale per output row) and 4-bit (groups of 32).

A decode step multiplies a few rows by every weight of the model, so it is bound by reading the weights:
fewer bytes per weight, a faster step. ``pack`` stores a weight in a format; :func:`unpack` is the fp32
weight it stands for; :func:`reference` defines what a format computes, and :func:`linear` runs the C++
kernel on CPU tensors and the reference elsewhere.

- ``bf16``: the weight rounded to bfloat16 (lossless for checkpoints stored in bf16). 16 bits. fp32 math.
- ``int8``: symmetric, one fp32 scale per output row, ``w = q * scale``, q in -127..127. 8 bits.
- ``int4``: asymmetric in groups of 32 inputs, ``w = q * scale + min``, q in 0..15, one fp32 scale and min
  per group. 6 bits per weight with its scale and min.

int8 and int4 multiply their weights by the activations quantized in blocks of 32 inputs
(:func:`quantize_activations`: symmetric int8, one fp32 scale per block, as llama.cpp's Q8_0): the sums
inside a block are then exact integer dot products, 64 weights per instruction, so the kernels run at the
speed of reading the weights (widening each weight to fp32 for an FMA is compute-bound at a fraction of
it). The cost in quality is measured by ``a2ats bench weights``.

An int8 weight is packed by output rows (``layout="rows"``: any build, and the layout tensor parallelism slices);
:func:`for_kernel` lays it out once in tiles of 16 output rows where the build multiplies those (AVX-512 VNNI):
one instruction then takes 4 inputs of 16 output rows, which keeps a step of several sequences at the speed of
reading the weights instead of bound by the instructions that scale each row's blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from a2ats.kernels.cpu import cpu_backend

FORMATS = ("bf16", "int8", "int4")
BITS = {"fp32": 32.0, "bf16": 16.0, "int8": 8.0, "int4": 4.0 + 64 / 32}  # int4: + fp32 scale and min per 32
GROUP = 32  # inputs per int4 group
ACT_BLOCK = 32  # inputs per activation block (int8 and int4): one int4 group each
TILE = 16  # output rows per int8 tile


@dataclass(frozen=True)
class PackedWeight:
    """One (O, I) weight in a compact format; ``scale``/``mins`` as the format needs. ``layout="tiles"`` (int8
    only, :func:`tiles`): ``data`` in tiles of 16 output rows, ``scale`` zero-padded to them, ``dims`` = (O, I)."""

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    layout: str = "rows"
    dims: tuple[int, int] | None = None

    def __post_init__(self):
        if self.layout not in ("rows", "tiles") or (self.layout == "tiles") != (self.dims is not None):
            raise ValueError(f"layout must be 'rows' (no dims) or 'tiles' (with dims (O, I)); got {self.layout!r} "
                             f"with dims {self.dims}: make tiles with weights.tiles")
        if self.layout == "tiles" and self.fmt != "int8":
            raise ValueError(f"only int8 weights come in tiles, got {self.fmt}")

    @property
    def shape(self) -> tuple[int, int]:
        if self.dims is not None:
            return self.dims
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


def tiles(p: PackedWeight) -> PackedWeight:
    """An int8 weight by rows laid out in tiles of 16 output rows (zero rows after O): tile t is (ceil(I / 32) * 8)
    quads of 4 inputs, a quad 64 bytes holding output row 16t + l's 4 inputs at bytes 4l .. 4l + 3 (zero after I),
    each stored as w + 128 (uint8: the unsigned operand of the integer dot product)."""
    if p.fmt != "int8" or p.layout != "rows":
        raise ValueError(f"tiles take an int8 weight by rows, got {p.fmt} by {p.layout}")
    O, I = p.shape
    T, width = -(-O // TILE), -(-I // ACT_BLOCK) * ACT_BLOCK
    q = torch.nn.functional.pad(p.data, (0, width - I, 0, T * TILE - O))  # int8 throughout: an LM head is large
    quads = (q.view(torch.uint8) ^ 0x80).view(T, TILE, width // 4, 4).transpose(1, 2)  # two's complement + 128
    scale = torch.zeros(T * TILE, dtype=torch.float32)
    scale[:O] = p.scale
    return PackedWeight("int8", quads.reshape(T, width * TILE).contiguous(), scale, layout="tiles", dims=(O, I))


_rows_only = False  # set by rows_only(): a benchmark's baseline


@contextlib.contextmanager
def rows_only():
    """Within: :func:`for_kernel` keeps int8 weights by rows (a benchmark's baseline for the tiles, in one run)."""
    global _rows_only
    before, _rows_only = _rows_only, True
    try:
        yield
    finally:
        _rows_only = before


def for_kernel(p: PackedWeight) -> PackedWeight:
    """``p`` in the layout this machine's kernels multiply fastest: int8 in tiles where the CPU build has them."""
    ext = cpu_backend() if p.data.is_cpu else None
    if p.fmt == "int8" and p.layout == "rows" and not _rows_only and ext is not None and ext.int8_tiles():
        return tiles(p)
    return p


def unpack(p: PackedWeight) -> torch.Tensor:
    """The fp32 (O, I) weight that ``p`` stands for."""
    if p.fmt == "bf16":
        return p.data.float()
    if p.layout == "tiles":
        O, I = p.dims
        T, width = p.data.shape[0], p.data.shape[1] // TILE
        q = (p.data ^ 0x80).view(torch.int8).view(T, width // 4, TILE, 4).transpose(1, 2).reshape(T * TILE, width)
        return q[:O, :I].float() * p.scale[:O, None]
    if p.fmt == "int8":
        return p.data.float() * p.scale[:, None]
    O, half = p.data.shape
    b = p.data.view(O, half // 16, 16)
    q = torch.cat([b & 0x0F, b >> 4], -1).float()  # (O, groups, 32)
    return (q * p.scale[..., None] + p.mins[..., None]).reshape(O, half * 2)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., I) in blocks of 32 inputs along the last dim (the last block may be partial): int8 ``q``
    (..., I) and float32 ``scale`` (..., ceil(I / 32)) with ``scale = max|x| / 127`` per block and ``q =
    round(x / scale)`` (half to even; an all-zero block has scale 0 and q 0). The int8 and int4 formats multiply
    the weights by ``q * scale``."""
    x = x.float()
    I = x.shape[-1]
    blocks = -(-I // ACT_BLOCK)
    padded = torch.nn.functional.pad(x, (0, blocks * ACT_BLOCK - I)).unflatten(-1, (blocks, ACT_BLOCK))
    scale = padded.abs().amax(-1) / 127
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / divisor[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.flatten(-2)[..., :I], scale


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values ``q * scale`` that :func:`quantize_activations`'s output stands for."""
    return q.float() * scale.repeat_interleave(ACT_BLOCK, -1)[..., : q.shape[-1]]


def activations(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` (float32) as format ``fmt`` multiplies it: itself for bf16, its blocks quantized for int8 and int4."""
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    x = x.float()
    return x if fmt == "bf16" else dequantize_activations(*quantize_activations(x))


def prepare(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6, gated: bool = False) -> torch.Tensor:
    """The rows a projection multiplies, in x's dtype: ``x``; with ``norm``, x RMS-normalized with that weight (RMSNorm
    as transformers computes it); with ``gated``, a SiLU-gated MLP's ``silu(gate) * up`` for ``x = [gate, up]``."""
    if norm is not None and gated:
        raise ValueError("a projection takes a norm or a gate, not both")
    if norm is not None:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm, eps)
    if gated:
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return x


def reference(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None, *, norm: torch.Tensor | None = None,
              eps: float = 1e-6, gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`linear` computes, in torch: ``activations(prepare(x), p.fmt) @ unpack(p).T + bias + residual``,
    fp32."""
    y = torch.nn.functional.linear(activations(prepare(x.float(), norm, eps, gated), p.fmt), unpack(p),
                                   None if bias is None else bias.float())
    return y if residual is None else y + residual


def linear(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None, *, norm: torch.Tensor | None = None,
           eps: float = 1e-6, gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``prepare(x, norm, eps, gated) @ unpack(p).T + bias + residual`` for float32 x (..., I) (or (..., 2I) gated),
    x quantized in blocks of 32 for int8 and int4 (:func:`reference`); the C++ kernel on CPU tensors, the reference
    elsewhere. A decode layer's norms, gate and residual adds ride along: one call instead of several torch ops."""
    O, I = p.shape
    shape = x.shape  # read once: a decode step makes ~100 of these calls, each worth a few microseconds of kernel
    if x.dtype != torch.float32 or shape[-1] != (2 * I if gated else I):
        raise ValueError(f"x must be float32 (..., {2 * I if gated else I}); got {x.dtype} {tuple(shape)}")
    ext = cpu_backend() if x.is_cpu and p.data.is_cpu else None
    if ext is None or (p.layout == "tiles" and not ext.int8_tiles()):
        return reference(x, p, bias, norm=norm, eps=eps, gated=gated, residual=residual)
    x2 = x.reshape(-1, shape[-1])
    res = None if residual is None else residual.reshape(-1, O)
    if p.layout == "tiles":
        y = ext.linear_int8w_tiles(x2, p.data, p.scale, O, bias, norm, eps, gated, res)
    elif p.fmt == "int8":
        y = ext.linear_int8w(x2, p.data, p.scale, bias, norm, eps, gated, res)
    elif p.fmt == "bf16":
        y = ext.linear_bf16w(x2, p.data, bias, norm, eps, gated, res)
    else:
        y = ext.linear_int4w(x2, p.data, p.scale, p.mins, bias, norm, eps, gated, res)
    return y.view(*shape[:-1], O)
