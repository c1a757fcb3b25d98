"""Property tests: the fast paths (the C++ kernels where they build, else their torch fallbacks) against the
algorithm's own torch definitions (:mod:`a2ats.core.selection`, :mod:`a2ats.core.attention`) over random shapes,
budgets, GQA groups, band offsets and left paddings. Examples are derandomized: CI sees the same cases each run."""

from __future__ import annotations

import pytest
import torch

from a2ats import kernels
from a2ats.core.attention import attend_selected
from a2ats.core.config import A2ATSConfig, Budget
from a2ats.core.selection import reduce_tables, select, table_scores
from a2ats.kernels.reference import indices_to_mask, mask_to_indices

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def selection_cases(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 5))  # includes groups that are not powers of two
    n = draw(st.integers(1, 150))
    bands = draw(st.integers(1, 3))
    C = draw(st.integers(1, 40))
    ties = draw(st.booleans())  # few distinct table values: ties everywhere, broken toward the later token
    seed = draw(st.integers(0, 2**16))
    lengths = [draw(st.integers(1, n)) for _ in range(B)]
    cfg = A2ATSConfig(budget=Budget(tokens=draw(st.integers(0, n))), sinks=draw(st.integers(0, 6)),
                      window=draw(st.integers(1, 12)), reduction=draw(st.sampled_from(["union", "max"])),
                      wrope_band_ratio=None)
    g = torch.Generator().manual_seed(seed)
    lut = torch.randn(B, Hkv, G, bands * C, generator=g)
    if ties:
        lut = torch.randint(0, 3, lut.shape, generator=g).float()
    codes = torch.randint(0, C, (B, Hkv, n), generator=g, dtype=torch.int16)
    offsets = (torch.randint(0, bands, (B, n), generator=g, dtype=torch.int32) * C) if bands > 1 else None
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        valid[b, n - length:] = True  # left padding
    return lut, codes, offsets, valid, cfg


@SETTINGS
@given(selection_cases())
def test_score_select_selects_what_the_algorithm_selects(case):
    lut, codes, offsets, valid, cfg = case
    Hkv = codes.shape[1]
    want = select(table_scores(lut, codes, offsets), valid, Hkv, cfg)
    k = cfg.budget.tokens_for(valid.sum(-1))
    idx, count = kernels.score_select(reduce_tables(lut, cfg.reduction), codes, offsets, valid, k, cfg.sinks, cfg.window)
    got = indices_to_mask(idx, count, codes.shape[-1])
    assert torch.equal(got, want)
    assert torch.equal(count, want.sum(-1).to(count.dtype))


@st.composite
def attention_cases(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 4))
    n = draw(st.integers(1, 120))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    cap = n + draw(st.integers(0, 9))  # buffers longer than the filled part, as caches are
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Hkv, n, generator=g) < draw(st.floats(0.05, 1.0))
    keep[..., -1] = True  # every head attends at least to the newest token, as decode always does
    q = torch.randn(B, Hkv * G, d, generator=g)
    k_buf, v_buf = torch.randn(B, Hkv, cap, d, generator=g), torch.randn(B, Hkv, cap, d, generator=g)
    return q, k_buf, v_buf, keep, d**-0.5


@SETTINGS
@given(attention_cases())
def test_sparse_attention_attends_as_the_masked_reference(case):
    q, k_buf, v_buf, keep, scaling = case
    n = keep.shape[-1]
    idx, count = mask_to_indices(keep)
    got = kernels.sparse_attention(q, k_buf, v_buf, idx, count, scaling)
    want = attend_selected(q.unsqueeze(2), k_buf[:, :, :n], v_buf[:, :, :n], keep, scaling)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
