"""Compact decode weights: each format's packing against its definition, the activation quantizer, and each kernel
build against the reference (weights.reference)."""

from __future__ import annotations

import pytest
import torch

from a2ats.kernels import weights as W

# each format, and int8 also in tiles of 16 output rows (weights.tiles: the AVX-512 VNNI build's layout)
VARIANTS = ["bf16", "int8", "int8-tiles", "int4"]


def _packed(w, variant, ext=None):
    """``w`` packed as ``variant``; tiles are skipped on builds without their kernel."""
    if variant != "int8-tiles":
        return W.pack(w, variant)
    if ext is not None and not ext.int8_tiles():
        pytest.skip("int8 tiles need the AVX-512 VNNI build")
    return W.tiles(W.pack(w, "int8"))


def _kernel(ext, x, p, bias, **glue):
    if p.layout == "tiles":
        return ext.linear_int8w_tiles(x, p.data, p.scale, p.shape[0], bias, **glue)
    if p.fmt == "bf16":
        return ext.linear_bf16w(x, p.data, bias, **glue)
    if p.fmt == "int8":
        return ext.linear_int8w(x, p.data, p.scale, bias, **glue)
    return ext.linear_int4w(x, p.data, p.scale, p.mins, bias, **glue)


def _exact(x, p, bias):
    """The format's product in float64 (the activations as the format quantizes them), and the sum of the
    products' magnitudes: the scale of fp32 rounding error in any order of summation."""
    xa, w = W.activations(x, p.fmt).double(), W.unpack(p).double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return xa @ w.T + b, xa.abs() @ w.abs().T + b.abs()


# inputs: below one block (13), ragged blocks (37, 100, 576 + 5), odd 64-byte vectors and int4 groups of 4 (96, 160);
# outputs: split across threads in 4 streams with rows left over (101, 1001), fewer than 4 (1, 3), tiles of 16 with
# rows left over (all but 960), tiles in 2 streams with one left over (1001); rows: 1, 3, 8 (passes of 4 activation
# rows; one pass over a tile), 5, 9 and 17 (passes of 8 over each tile)
SHAPES = [(1, 576, 960), (3, 96, 101), (8, 64, 1), (1, 1536, 17), (3, 37, 13), (8, 100, 6), (1, 581, 33),
          (3, 13, 3), (8, 160, 7), (5, 576, 20), (3, 96, 1001), (9, 100, 50), (17, 581, 1001)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M,I,O", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernels_match_the_reference(isa_ext, variant, M, I, O, bias):
    if variant == "int4" and I % W.GROUP:
        pytest.skip("int4 needs inputs in groups of 32 (refused: see test_int4_refuses_ragged_inputs)")
    g = torch.Generator().manual_seed(M * I + O)
    x, w = torch.randn(M, I, generator=g), torch.randn(O, I, generator=g)
    x[0, : I // 3] *= 20  # blocks of very different scales in one row
    b = torch.randn(O, generator=g) if bias else None
    p = _packed(w, variant, isa_ext)
    want, mag = _exact(x, p, b)
    got = _kernel(isa_ext, x, p, b).double()
    assert got.shape == (M, O)
    assert ((got - want).abs() <= 1e-6 * mag + 1e-30).all(), ((got - want).abs() / mag).max()
    # the torch reference agrees to fp32 rounding too
    assert ((W.reference(x, p, b).double() - want).abs() <= 1e-6 * mag + 1e-30).all()


@pytest.mark.parametrize("I", [1, 13, 32, 37, 100, 581])
def test_kernels_quantize_activations_as_the_reference(isa_ext, I):
    g = torch.Generator().manual_seed(I)
    x = torch.randn(3, I, generator=g) * torch.logspace(-4, 4, 3)[:, None]
    x[1, :5] = 0.0
    x[2, : min(I, 32)] = 0.0  # an all-zero block
    x[0, -1] = -x[0].abs().max() * 2  # a negative extreme
    q, s = isa_ext.quantize_activations(x)
    want_q, want_s = W.quantize_activations(x)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)


@pytest.mark.parametrize("variant", ["int8", "int8-tiles", "int4"])
def test_kernels_keep_nan(isa_ext, variant):
    """A NaN activation makes its row's outputs NaN (the block's scale is NaN), not a silent number."""
    g = torch.Generator().manual_seed(1)
    x, p = torch.randn(2, 128, generator=g), _packed(torch.randn(9, 128, generator=g), variant, isa_ext)
    x[1, 70] = float("nan")
    y = _kernel(isa_ext, x, p, None)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_kernels_refuse_mismatched_inputs(isa_ext):
    p8, p4 = W.pack(torch.randn(4, 64), "int8"), W.pack(torch.randn(4, 64), "int4")
    with pytest.raises(RuntimeError, match="float32"):
        isa_ext.linear_int8w(torch.randn(2, 64).double(), p8.data, p8.scale, None)
    with pytest.raises(RuntimeError, match="matching x"):
        isa_ext.linear_int8w(torch.randn(2, 63), p8.data, p8.scale, None)
    with pytest.raises(RuntimeError, match="divisible by 32"):
        isa_ext.linear_int4w(torch.randn(2, 40), p4.data[:, :20].contiguous(), p4.scale, p4.mins, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        isa_ext.linear_int4w(torch.randn(2, 64), p4.data, p4.scale, p4.mins, torch.randn(5))


@pytest.mark.parametrize("I", [1, 37, 64, 581])
def test_kernels_prepare_rows_as_torch_does(isa_ext, I):
    """The fused glue's first half: RMSNorm (transformers' formula) and the SiLU gate, as torch computes them."""
    g = torch.Generator().manual_seed(I)
    x, norm = torch.randn(3, I, generator=g) * torch.logspace(-3, 3, 3)[:, None], torch.randn(I, generator=g)
    torch.testing.assert_close(isa_ext.prepare_activations(x, norm, 1e-5), W.prepare(x, norm, 1e-5), rtol=2e-6, atol=0)
    gate_up = torch.randn(3, 2 * I, generator=g) * 4
    torch.testing.assert_close(isa_ext.prepare_activations(gate_up, None, 1e-6, True), W.prepare(gate_up, gated=True),
                               rtol=2e-6, atol=1e-30)
    assert torch.equal(isa_ext.prepare_activations(x), x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M,I,O", [(1, 576, 960), (3, 37, 13), (5, 96, 101)])
def test_kernels_fuse_norm_gate_and_residual(isa_ext, variant, M, I, O):
    """A fused call is the plain kernel on the prepared rows, plus the residual: the same floats."""
    if variant == "int4" and I % W.GROUP:
        pytest.skip("int4 needs inputs in groups of 32")
    g = torch.Generator().manual_seed(M + I + O)
    p, b = _packed(torch.randn(O, I, generator=g), variant, isa_ext), torch.randn(O, generator=g)
    x, norm, res = torch.randn(M, I, generator=g), torch.randn(I, generator=g), torch.randn(M, O, generator=g)
    gate_up = torch.randn(M, 2 * I, generator=g)
    normed = _kernel(isa_ext, isa_ext.prepare_activations(x, norm, 1e-5), p, b)
    assert torch.equal(_kernel(isa_ext, x, p, b, norm=norm, eps=1e-5), normed)
    assert torch.equal(_kernel(isa_ext, x, p, b, norm=norm, eps=1e-5, residual=res), normed + res)
    gated = _kernel(isa_ext, isa_ext.prepare_activations(gate_up, None, 1e-6, True), p, None)
    assert torch.equal(_kernel(isa_ext, gate_up, p, None, gated=True, residual=res), gated + res)


def test_tiles_refuse_mismatched_inputs(isa_ext):
    p = W.tiles(W.pack(torch.randn(20, 64), "int8"))
    if not isa_ext.int8_tiles():
        with pytest.raises(RuntimeError, match="need a build with AVX-512 VNNI: use the row layout"):
            _kernel(isa_ext, torch.randn(2, 64), p, None)
        return
    with pytest.raises(RuntimeError, match=r"tiles must be a contiguous uint8 \(ceil\(O/16\)"):
        isa_ext.linear_int8w_tiles(torch.randn(2, 96), p.data, p.scale, 20)  # I of another weight
    with pytest.raises(RuntimeError, match="tiles must be"):
        isa_ext.linear_int8w_tiles(torch.randn(2, 64), p.data, p.scale, 40)  # more rows than the tiles hold
    with pytest.raises(RuntimeError, match="scale must be"):
        isa_ext.linear_int8w_tiles(torch.randn(2, 64), p.data, p.scale[:20].contiguous(), 20)


def test_kernels_refuse_mismatched_glue(isa_ext):
    p = W.pack(torch.randn(4, 64), "int8")
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="a norm or a gate"):
        _kernel(isa_ext, x, p, None, norm=torch.ones(64), gated=True)
    with pytest.raises(RuntimeError, match="norm must be"):
        _kernel(isa_ext, x, p, None, norm=torch.ones(63))
    with pytest.raises(RuntimeError, match=r"gate, up\] \(M, 2I\)"):
        _kernel(isa_ext, torch.randn(2, 129), p, None, gated=True)
    with pytest.raises(RuntimeError, match="residual must be"):
        _kernel(isa_ext, x, p, None, residual=torch.randn(2, 5))
    with pytest.raises(ValueError, match="a norm or a gate"):
        W.prepare(x, torch.ones(64), gated=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_fuses_the_glue_as_the_reference_does(variant, monkeypatch):
    fmt = variant.split("-")[0]
    g = torch.Generator().manual_seed(9)
    p, b = _packed(torch.randn(33, 96, generator=g), variant), torch.randn(33, generator=g)
    x, norm, res = torch.randn(2, 1, 96, generator=g), torch.rand(96, generator=g) + 0.5, torch.randn(2, 1, 33, generator=g)
    gate_up = torch.randn(2, 1, 192, generator=g)
    for kw in ({"norm": norm, "eps": 1e-5}, {"gated": True}):
        xin = gate_up if kw.get("gated") else x
        got, want = W.linear(xin, p, b, residual=res, **kw), W.reference(xin, p, b, residual=res, **kw)
        assert got.shape == (2, 1, 33)
        # bf16 multiplies the prepared rows as they are; int8/int4 quantize them, where a last-bit difference in
        # the prepared row may move one activation by a quantization step
        tol = 1e-5 if fmt == "bf16" else 0.05
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        monkeypatch.setenv("A2ATS_KERNELS", "0")
        assert torch.equal(W.linear(xin, p, b, residual=res, **kw), want)
        monkeypatch.delenv("A2ATS_KERNELS")
    with pytest.raises(ValueError, match=r"\(\.\.\., 192\)"):
        W.linear(x, p, gated=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_runs_the_kernel_or_the_reference(variant, monkeypatch):
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(2, 3, 96, generator=g), torch.randn(33, 96, generator=g), torch.randn(33, generator=g)
    p = _packed(w, variant)
    want, mag = _exact(x, p, b)
    assert ((W.linear(x, p, b).double() - want).abs() <= 1e-6 * mag).all()
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    torch.testing.assert_close(W.linear(x, p, b), W.reference(x, p, b), atol=0, rtol=0)
    assert ((W.linear(x, p, b).double() - want).abs() <= 1e-6 * mag).all()
    with pytest.raises(ValueError, match="float32"):
        W.linear(x.double(), p)


def test_the_formats_quantize_activations_bf16_does_not():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 70, generator=g)
    assert torch.equal(W.activations(x, "bf16"), x)
    for fmt in ("int8", "int4"):
        assert torch.equal(W.activations(x, fmt), W.dequantize_activations(*W.quantize_activations(x)))
    with pytest.raises(ValueError, match="weight format"):
        W.activations(x, "int2")


def test_quantize_activations_round_within_half_a_step():
    g = torch.Generator().manual_seed(11)
    I = 32 * 5 + 7  # a partial last block
    x = torch.randn(2, 3, I, generator=g) * torch.logspace(-3, 3, 6).view(2, 3, 1)
    x[0, 1, 32:64] = 0.0  # an all-zero block
    x[1, 2, 64:96] = -x[1, 2, 64:96].abs()  # all negative: the extreme is -max|x|
    q, s = W.quantize_activations(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, 3, 6)
    blocks = torch.nn.functional.pad(x, (0, 6 * 32 - I)).view(2, 3, 6, 32)
    assert torch.equal(s, blocks.abs().amax(-1) / 127)
    assert q.abs().max() <= 127
    back = W.dequantize_activations(q, s)
    step = s.repeat_interleave(32, -1)[..., :I]
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    # the zero block: scale 0, values 0, no NaN
    assert s[0, 1, 1] == 0 and (q[0, 1, 32:64] == 0).all() and (back[0, 1, 32:64] == 0).all()
    # each block's largest magnitude is exactly +-127 steps: the negative extreme is stored exactly
    seg = x[1, 2, 64:96]
    i = seg.abs().argmax()
    assert q[1, 2, 64 + i] == -127
    torch.testing.assert_close(back[1, 2, 64 + i], seg[i], atol=0, rtol=1e-6)
    assert torch.isfinite(back).all()


def test_quantize_activations_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.0]])  # scale 1: q = round(x)
    q, s = W.quantize_activations(x)
    assert s.tolist() == [[1.0]]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -126, 3]]


def test_formats_round_within_half_a_step():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 128, generator=g) * torch.logspace(-3, 1, 37).unsqueeze(1)  # rows of very different scales
    w[5] = 0.0  # an all-zero row must not divide by zero
    assert torch.equal(W.unpack(W.pack(w, "bf16")), w.bfloat16().float())
    p8 = W.pack(w, "int8")
    assert p8.data.dtype == torch.int8 and p8.nbytes() == 37 * 128 + 37 * 4
    assert ((W.unpack(p8) - w).abs() <= p8.scale[:, None] / 2 * (1 + 1e-5)).all()
    p4 = W.pack(w, "int4")
    assert p4.data.shape == (37, 64) and p4.shape == (37, 128)
    err = (W.unpack(p4) - w).abs().view(37, 4, 32)
    assert (err <= p4.scale[..., None] / 2 * (1 + 1e-4) + 1e-7).all()
    # each group's extremes are stored exactly (q = 0 and 15)
    grp = w.view(37, 4, 32)
    torch.testing.assert_close(W.unpack(p4).view(37, 4, 32).amax(-1), grp.amax(-1), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(W.unpack(p8)).all() and torch.isfinite(W.unpack(p4)).all()
    assert (W.unpack(p8)[5] == 0).all() and (W.unpack(p4)[5] == 0).all()


def test_int4_refuses_ragged_inputs():
    with pytest.raises(ValueError, match="divisible by 32"):
        W.pack(torch.randn(4, 40), "int4")
    with pytest.raises(ValueError, match="weight format"):
        W.pack(torch.randn(4, 64), "int2")


@pytest.mark.parametrize("O,I", [(1, 1), (16, 32), (33, 96), (20, 581)])
def test_tiles_hold_the_rows_weight(O, I):
    """Tiles are a layout, not a format: the same weight, its shape kept, zeros past O and I."""
    rows = W.pack(torch.randn(O, I, generator=torch.Generator().manual_seed(O + I)), "int8")
    t = W.tiles(rows)
    assert t.layout == "tiles" and t.shape == (O, I) and t.data.dtype == torch.uint8
    assert t.data.shape == (-(-O // W.TILE), -(-I // W.ACT_BLOCK) * W.ACT_BLOCK * W.TILE)
    assert torch.equal(W.unpack(t), W.unpack(rows))
    assert torch.equal(t.scale[O:], torch.zeros(t.scale.numel() - O))
    quads = t.data.view(t.data.shape[0], -1, W.TILE, 4)
    assert int(quads[0, 0, 0, 0]) == int(rows.data[0, 0]) + 128  # output row 0, input 0: offset to unsigned
    if O > 1 and I > 5:
        assert int(quads[0, 1, 1, 1]) == int(rows.data[1, 5]) + 128  # row 1, input 4 * 1 + 1


def test_tiles_take_int8_by_rows_only():
    for p in (W.pack(torch.randn(4, 64), "int4"), W.tiles(W.pack(torch.randn(4, 64), "int8"))):
        with pytest.raises(ValueError, match="tiles take an int8 weight by rows"):
            W.tiles(p)
    t = W.tiles(W.pack(torch.randn(4, 64), "int8"))
    with pytest.raises(ValueError, match="make tiles with weights.tiles"):
        W.PackedWeight("int8", t.data, t.scale, layout="tiles")  # no dims: the shape is unknown
    with pytest.raises(ValueError, match="layout must be"):
        W.PackedWeight("int8", t.data, t.scale, layout="columns")
    with pytest.raises(ValueError, match="only int8 weights come in tiles"):
        W.PackedWeight("int4", t.data, t.scale, layout="tiles", dims=(4, 64))


def test_for_kernel_tiles_int8_where_the_build_has_them(monkeypatch):
    p8, p4 = W.pack(torch.randn(20, 64), "int8"), W.pack(torch.randn(20, 64), "int4")
    ext = W.cpu_backend()
    want = "tiles" if ext is not None and ext.int8_tiles() else "rows"
    assert W.for_kernel(p8).layout == want and W.for_kernel(p4) is p4
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    assert W.for_kernel(p8) is p8  # no kernels: the reference multiplies rows
