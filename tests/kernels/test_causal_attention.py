"""The dense passes' bf16 causal attention kernel against the fp32 reference on the same bf16 operands, on every ISA
build that has it; the dispatcher's fallbacks; and the Hugging Face path (``dense``) that routes calibration's and
prefill's attention to it."""

from __future__ import annotations

import pytest
import torch

from a2ats.kernels import (
    bf16_attention_kernel,
    causal_attention,
    reference_causal_attention,
)

# Probabilities are rounded to bf16 before they weight V (as torch's bf16 attention does): ~2^-9 relative per
# weight, averaged over the keys. One key too many or too few moves an output by ~0.1 or more.
TOL = dict(atol=1.5e-2, rtol=1.5e-2)


def _qkv(B, Hq, Hkv, t, start, d=64, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, t, d, generator=g) * q_scale).bfloat16()
    k = torch.randn(B, Hkv, start + t, d, generator=g).bfloat16()
    v = torch.randn(B, Hkv, start + t, d, generator=g).bfloat16()
    return q, k, v


@pytest.fixture(scope="module")
def bf16_ext(isa_ext):
    if not isa_ext.bf16_attention():
        pytest.skip("this build has no bf16 attention kernel (it needs AVX-512 BF16)")
    return isa_ext


# (B, Hq, Hkv, t, start): groups of 1, 3 and 7 heads; lengths off every block size (16 positions, 64 keys);
# a single query; chunks after earlier positions (start > 0), whose first key block is not the query's.
SHAPES = [(1, 9, 3, 37, 0), (2, 14, 2, 100, 0), (1, 4, 4, 1, 0), (1, 4, 4, 5, 70), (1, 14, 2, 129, 300),
          (1, 9, 3, 1, 50), (3, 2, 1, 64, 64), (1, 7, 1, 250, 3)]


@pytest.mark.parametrize("B,Hq,Hkv,t,start", SHAPES)
def test_kernel_matches_the_reference(bf16_ext, B, Hq, Hkv, t, start):
    q, k, v = _qkv(B, Hq, Hkv, t, start)
    out = bf16_ext.causal_attention(q, k, v, 0.125, start)
    assert out.dtype == torch.float32 and out.shape == (B, Hq, t, 64)
    torch.testing.assert_close(out, reference_causal_attention(q, k, v, 0.125, start), **TOL)


@pytest.mark.parametrize("q_scale", [0.01, 8.0])
def test_kernel_holds_flat_and_peaked_softmax(bf16_ext, q_scale):
    """Near-uniform weights (every key counts) and scores spanning hundreds of units (the running max grows block
    after block, rescaling what came before; most weights underflow)."""
    q, k, v = _qkv(1, 6, 2, 200, 33, q_scale=q_scale, seed=1)
    if q_scale > 1:  # scores that grow with the key's position: every later block raises each row's max
        k = (k.float() + torch.linspace(0, 4, k.shape[2])[:, None] * q.float().mean((0, 1, 2))).bfloat16()
    out = bf16_ext.causal_attention(q, k, v, 0.125, 33)
    torch.testing.assert_close(out, reference_causal_attention(q, k, v, 0.125, 33), **TOL)


def test_kernel_reads_strided_views_of_a_cache(bf16_ext):
    """Rows of one slot of a (slots, Hkv, capacity, d) cache, as a chunked prefill reads them in place."""
    q, k, v = _qkv(1, 6, 2, 40, 90)
    cache_k, cache_v = torch.zeros(3, 2, 256, 64, dtype=torch.bfloat16), torch.zeros(3, 2, 256, 64, dtype=torch.bfloat16)
    cache_k[1, :, :130], cache_v[1, :, :130] = k[0], v[0]
    out = bf16_ext.causal_attention(q, cache_k[1:2, :, :130], cache_v[1:2, :, :130], 0.125, 90)
    torch.testing.assert_close(out, reference_causal_attention(q, k, v, 0.125, 90), **TOL)


def test_kernel_refuses_bad_inputs(bf16_ext):
    q, k, v = _qkv(1, 4, 2, 8, 0)
    with pytest.raises(RuntimeError, match="start \\+ t rows"):
        bf16_ext.causal_attention(q, k, v, 0.125, 3)
    with pytest.raises(RuntimeError, match="bfloat16"):
        bf16_ext.causal_attention(q.float(), k, v, 0.125, 0)
    with pytest.raises(RuntimeError, match="head dim 64"):
        bf16_ext.causal_attention(*_qkv(1, 4, 2, 8, 0, d=32), 0.125, 0)


def test_builds_without_bf16_say_so(isa_ext):
    if isa_ext.bf16_attention():
        pytest.skip("this build has the kernel")
    q, k, v = _qkv(1, 4, 2, 8, 0)
    with pytest.raises(RuntimeError, match="AVX-512 BF16"):
        isa_ext.causal_attention(q, k, v, 0.125, 0)


@pytest.mark.parametrize("kernels_on", ["1", "0"])
@pytest.mark.parametrize("d", [64, 48])
def test_dispatcher_matches_the_reference_with_or_without_the_kernel(monkeypatch, kernels_on, d):
    """Other head dims, and no kernels at all, take torch's bf16 attention: the same result within rounding."""
    monkeypatch.setenv("A2ATS_KERNELS", kernels_on)
    q, k, v = _qkv(2, 6, 3, 21, 11, d=d)
    out = causal_attention(q.float(), k.float(), v, 0.2, 11)  # any float operands: rounded to bf16 first
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_causal_attention(q, k, v, 0.2, 11), **TOL)


def test_dispatcher_rejects_mismatched_shapes():
    q, k, v = _qkv(1, 4, 2, 8, 0)
    with pytest.raises(ValueError, match="start \\+ t"):
        causal_attention(q, k, v, 0.125, start=2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        causal_attention(q[:, :3], k, v, 0.125)
    with pytest.raises(ValueError, match="alike"):
        causal_attention(q, k, v[..., :32], 0.125)


class _Module:
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups  # what SDPA's integration repeats K/V by when a mask is given


@pytest.mark.parametrize("autocast", [True, False])
def test_dense_routes_whole_causal_bf16_sequences_to_the_kernel(monkeypatch, autocast):
    """Under bf16 autocast (fp32 operands) or with bf16 operands, a whole causal sequence takes the kernel and gives
    SDPA's output within rounding, in SDPA's layout and dtype; a mask keeps SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from a2ats.hf import patch

    calls = []
    monkeypatch.setattr(patch.kernels, "causal_attention",
                        lambda *a, **kw: calls.append(1) or causal_attention(*a, **kw))
    q, k, v = _qkv(1, 6, 2, 70, 0)
    if autocast:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = patch.dense(_Module(3), q, k, v, None, scaling=0.125)
        want, _ = sdpa_attention_forward(_Module(3), q, k, v, None, scaling=0.125)
        mask = torch.ones(70, 70, dtype=torch.bool).tril()[None, None]
        masked, _ = patch.dense(_Module(3), q, k, v, mask, scaling=0.125)
    assert calls == ([1] if bf16_attention_kernel(64) else [])
    assert out.dtype == want.dtype == torch.bfloat16 and out.shape == want.shape == (1, 70, 6, 64)
    torch.testing.assert_close(out.float(), want.float(), **TOL)
    torch.testing.assert_close(masked.float(), want.float(), **TOL)


def test_dense_keeps_fp32_attention_in_fp32():
    from a2ats.hf import patch

    q, k, v = _qkv(1, 4, 2, 30, 0)
    out, _ = patch.dense(_Module(2), q.float(), k.float(), v.float(), None, scaling=0.125)
    assert out.dtype == torch.float32


def test_torch_attention_turns_the_kernel_off_and_back_on(monkeypatch):
    """The benches' same-run baseline: inside ``torch_attention`` the dense path is SDPA's; after it, the kernel's."""
    from a2ats.hf import patch
    from a2ats.kernels import torch_attention

    if not bf16_attention_kernel(64):
        pytest.skip("no bf16 attention kernel on this CPU")
    calls = []
    monkeypatch.setattr(patch.kernels, "causal_attention", lambda *a, **kw: calls.append(1) or causal_attention(*a, **kw))
    q, k, v = _qkv(1, 4, 2, 20, 0)
    with torch_attention():
        assert not bf16_attention_kernel(64)
        inside, _ = patch.dense(_Module(2), q, k, v, None, scaling=0.125)
    outside, _ = patch.dense(_Module(2), q, k, v, None, scaling=0.125)
    assert calls == [1]
    torch.testing.assert_close(inside.float(), outside.float(), **TOL)


@pytest.mark.parametrize("start", [0, 13])
def test_torch_causal_attention_is_the_reference_in_fp32(start):
    """torch's attention as the fp32 prefill calls it (a first chunk plain causal, a later one with an offset mask)."""
    from a2ats.kernels import torch_causal_attention

    q, k, v = (x.float() for x in _qkv(1, 6, 2, 19, start))
    out = torch_causal_attention(q, k, v, 0.125, start)
    torch.testing.assert_close(out, reference_causal_attention(q, k, v, 0.125, start), atol=1e-5, rtol=1e-5)
