"""A decode layer's glue kernels (RoPE on q and k, the new K/V rows into the cache) against their torch references,
bit for bit, on every ISA build; and the dispatchers' fallbacks."""

from __future__ import annotations

import pytest
import torch

from a2ats.kernels import rope, store_rows
from a2ats.kernels.reference import reference_rope, reference_store_rows


def _cos_sin(B, t, rot, g):
    angle = torch.rand(B, 1, t, rot // 2, generator=g) * 50
    cos = torch.cat([angle.cos(), angle.cos()], -1)
    sin = torch.cat([angle.sin(), angle.sin()], -1)
    half = rot // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


@pytest.mark.parametrize("B,H,t,d,rot", [(1, 12, 1, 64, 64), (2, 5, 3, 64, 32), (1, 3, 700, 40, 40), (3, 2, 1, 18, 10)])
def test_rope_kernel_is_the_reference_bit_for_bit(isa_ext, B, H, t, d, rot):
    g = torch.Generator().manual_seed(B * 100 + d)
    # q and k as the model has them: heads of a (B, t, H, d) projection, transposed (not contiguous)
    x = torch.randn(B, t, H, d, generator=g).transpose(1, 2)
    cos, ssin = _cos_sin(B, t, rot, g)
    want = reference_rope(x, cos, ssin)
    got = isa_ext.rope(x, cos, ssin)
    assert got.is_contiguous() and torch.equal(got, want)
    assert torch.equal(isa_ext.rope(x.contiguous(), cos, ssin), want)
    assert torch.equal(rope(x, cos, ssin), want)  # the dispatcher


def test_rope_falls_back_for_other_dtypes_and_rejects_bad_shapes(isa_ext):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 64, generator=g)
    cos, ssin = _cos_sin(1, 2, 64, g)
    assert torch.equal(rope(x.double(), cos.double(), ssin.double()), reference_rope(x.double(), cos.double(), ssin.double()))
    with pytest.raises(RuntimeError, match="rot even"):
        isa_ext.rope(x, cos[..., :63], ssin[..., :63])
    with pytest.raises(RuntimeError, match="float32"):
        isa_ext.rope(x.double(), cos, ssin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,H,d", [(1, 3, 64), (3, 2, 40), (2, 5, 7)])
def test_store_rows_kernel_is_the_reference_bit_for_bit(isa_ext, dtype, S, H, d):
    g = torch.Generator().manual_seed(S * 10 + d)
    N = S * H * 50
    base_k, base_v = torch.randn(N, d, generator=g).to(dtype), torch.randn(N, d, generator=g).to(dtype)
    # the step's rows: k from a transposed projection, v a strided slice (unit stride along d only)
    k = torch.randn(S, 1, H, d, generator=g).transpose(1, 2)[:, :, 0]
    v = torch.randn(S, H, 2 * d, generator=g)[..., :d]
    flat = torch.randperm(N, generator=g)[: S * H]
    want_k, want_v = base_k.clone(), base_v.clone()
    reference_store_rows(want_k, want_v, flat, k, v)
    got_k, got_v = base_k.clone(), base_v.clone()
    isa_ext.store_rows(got_k, got_v, flat, k, v)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    got_k, got_v = base_k.clone(), base_v.clone()
    store_rows(got_k, got_v, flat, k, v)  # the dispatcher
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_store_rows_refuses_rows_outside_and_falls_back_for_int8(isa_ext):
    k_dst, v_dst = torch.zeros(6, 8), torch.zeros(6, 8)
    k = v = torch.ones(1, 2, 8)
    with pytest.raises(RuntimeError, match="outside"):
        isa_ext.store_rows(k_dst, v_dst, torch.tensor([0, 6]), k, v)
    assert not k_dst.any()  # nothing written before the check
    q_dst = torch.zeros(6, 8, dtype=torch.int8)
    store_rows(q_dst, q_dst.clone(), torch.tensor([1, 2]), k, v)  # no kernel for int8 rows: the reference
    assert q_dst[1:3].eq(1).all() and q_dst[0].eq(0).all()


@pytest.mark.parametrize("family", ["llama", "yarn", "linear", "qwen3"])
def test_band_queries_through_the_rope_kernel_are_wrope_queries_bit_for_bit(isa_ext, family):
    """A decode step rotates each query for every band in one kernel call (the query broadcast over the bands,
    each band's cos and sin broadcast over the rows): the values of WRoPE.queries, the reference, exactly."""
    from a2ats.core.rope import WRoPE, find_rotary_embedding
    from a2ats.methods import A2ATSMethod
    from conftest import random_codebooks, tiny_model

    model = tiny_model(family)
    w = WRoPE(find_rotary_embedding(model), band_ratio=2, first_edge=8)
    Hq = model.config.num_attention_heads
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // Hq
    q = torch.randn(3, Hq, d, generator=torch.Generator().manual_seed(3))
    for bands in (1, 5):
        want = w.queries(q, bands)
        cos, ssin = w.band_rotation(q.device, bands, d)
        got = isa_ext.rope(q.unsqueeze(2).expand(3, Hq, bands, d), cos.expand(3, 1, bands, -1),
                           ssin.expand(3, 1, bands, -1))
        assert torch.equal(got, want)
    # the method's decode queries (default build): the same rows, laid out per KV head, at the score precision
    Hkv = model.config.num_key_value_heads
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        method = A2ATSMethod(random_codebooks(model), w, precision)
        got, _ = method.queries(0, q, q, 5, slice(0, Hkv))
        assert got.dtype == torch.float32
        assert torch.equal(got, w.queries(q, 5).to(dtype).float().reshape(3, Hkv, -1, d))
