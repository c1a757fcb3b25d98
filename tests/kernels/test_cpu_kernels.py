"""The C++ CPU kernels against the torch references: identical selections, attention within rounding."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from a2ats.kernels import cpu as cpu_mod
from a2ats.kernels import (
    cpu_backend,
    dequantize_rows,
    encode_nearest,
    linear_bf16w,
    lookup_tables,
    quantize_rows,
    reference_encode_nearest,
    reference_lookup_tables,
    reference_score_select,
    reference_scores,
    reference_sparse_attention,
    score_select,
    sparse_attention,
)
from a2ats.kernels.reference import indices_to_mask, mask_to_indices


@pytest.fixture(scope="module")
def ext():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = cpu_backend()
    if mod is None:
        pytest.skip(f"C++ CPU kernels cannot be built here: {[str(w.message) for w in caught] or 'disabled'}")
    return mod


def make_case(B, H, G, n, T, *, banded, lengths, seed, cap_extra=13):
    """LUT, codes (a view of a larger int16 buffer), offsets, left-padded valid mask."""
    g = torch.Generator().manual_seed(seed)
    bands = 3 if banded else 1
    C = T // bands
    lut = torch.randn(B, H, G, bands * C, generator=g)
    if T <= 8:  # few distinct values: ties everywhere
        lut = torch.randint(0, 3, lut.shape, generator=g).float()
    buf = torch.randint(0, C, (B, H, n + cap_extra), generator=g, dtype=torch.int16)
    codes = buf[:, :, :n]
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        valid[b, n - length:] = True
    offsets = torch.randint(0, bands, (B, n), generator=g, dtype=torch.int32) * C if banded else None
    return lut, codes, offsets, valid


def assert_same_selection(got, want):
    (gi, gc), (wi, wc) = got, want
    assert torch.equal(gc, wc), (gc, wc)
    B, H = gc.shape
    for b in range(B):
        for h in range(H):
            c = int(wc[b, h])
            assert torch.equal(gi[b, h, :c], wi[b, h, :c]), (b, h)
            assert bool((gi[b, h, c:] == -1).all()), (b, h)  # the documented padding after the count


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("n", [37, 301, 1000])
@pytest.mark.parametrize("banded", [False, True])
@pytest.mark.parametrize("T", [6, 96])
def test_score_select_matches_reference(ext, G, n, banded, T):
    B, H = 3, 2
    lengths = [n, n - n // 3, max(n // 5, 1)]  # left padding of different lengths
    lut, codes, offsets, valid = make_case(B, H, G, n, T, banded=banded, lengths=lengths, seed=n * 31 + G)
    for k, sinks, window in [([5, 40, 1000], 4, 16), ([0, 3, 7], 0, 8), ([n, n // 10, 1], 2, 0), ([0, 0, 0], 1, 1)]:
        k = torch.tensor(k, dtype=torch.long)
        want = reference_score_select(lut, codes, offsets, valid, k, sinks, window)
        got = ext.score_select(lut, codes, offsets, valid, k, sinks, window)
        assert_same_selection(got, want)
        assert torch.equal(ext.score(lut, codes, offsets), reference_scores(lut, codes, offsets))
        assert_same_selection(score_select(lut, codes, offsets, valid, k, sinks, window), want)


def test_score_select_scattered_valid_and_heavy_ties(ext):
    # Any mask (not only a suffix) and a constant table: the choice is decided by recency alone.
    B, H, G, n = 2, 2, 3, 500
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(B, n, generator=g) > 0.3
    codes = torch.randint(0, 4, (B, H, n), generator=g, dtype=torch.int16)
    for lut in (torch.zeros(B, H, G, 4), torch.tensor([-0.0, 0.0, 1.0, float("-inf")]).expand(B, H, G, 4).contiguous()):
        k = torch.tensor([17, 250])
        assert_same_selection(ext.score_select(lut, codes, None, valid, k, 3, 5),
                              reference_score_select(lut, codes, None, valid, k, 3, 5))


def test_score_select_rejects_out_of_table_codes(ext):
    lut = torch.randn(1, 1, 1, 4)
    codes = torch.full((1, 1, 10), 7, dtype=torch.int16)
    with pytest.raises(RuntimeError, match="outside the lookup table"):
        ext.score_select(lut, codes, None, torch.ones(1, 10, dtype=torch.bool), torch.tensor([2]), 0, 0)


def random_selection(B, H, n, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, n, generator=g) < 0.3
    for b, length in enumerate(lengths):
        keep[b, :, : n - length] = False
    keep[0, 0] = False  # an empty selection: zeros, as SDPA gives for an all-False mask
    idx, count = mask_to_indices(keep)
    return idx, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# d = 64 dots up to 8 query heads per pass over the K rows (9 = 8 + 1) and weighs V 4 heads at a time (7 = 4 + 3)
@pytest.mark.parametrize("G", [1, 3, 4, 6, 7, 8, 9])
@pytest.mark.parametrize("n,d", [(37, 16), (301, 64), (1000, 128), (700, 40)])
def test_sparse_attention_matches_reference(ext, dtype, G, n, d):
    B, H, cap = 2, 2, n + 50
    g = torch.Generator().manual_seed(n + G)
    # Cache buffers larger than the filled part, garbage (NaN) past it, rows padded (stride(2) != d).
    kbuf = torch.full((B, H, cap, d + 8), float("nan"))
    vbuf = torch.full((B, H, cap, d + 8), float("nan"))
    kbuf[:, :, :n, :d] = torch.randn(B, H, n, d, generator=g) * 2
    vbuf[:, :, :n, :d] = torch.randn(B, H, n, d, generator=g)
    k_view, v_view = kbuf.to(dtype)[..., :d], vbuf.to(dtype)[..., :d]
    q = torch.randn(B, H * G, d, generator=g).to(dtype)
    idx, count = random_selection(B, H, n, n, [n, n // 2])
    scaling = d**-0.5
    got = ext.sparse_attention(q, k_view, v_view, idx, count, scaling)
    assert got.dtype == dtype and got.shape == (B, H * G, d)
    # bf16: against the fp32 reference on the same rounded inputs
    want = reference_sparse_attention(q.float(), k_view.float(), v_view.float(), idx, count, scaling)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=1e-4 if dtype == torch.float32 else 1e-2)
    assert torch.all(got[0, :G] == 0)
    if dtype == torch.float32:
        torch.testing.assert_close(sparse_attention(q, k_view, v_view, idx, count, scaling), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("G,n,d", [(1, 37, 16), (3, 301, 64), (4, 1000, 128), (8, 700, 40)])
@pytest.mark.parametrize("mixed", [False, True])
def test_sparse_attention_int8_rows_match_the_dequantized_reference(ext, G, n, d, mixed):
    """int8 K/V with a float32 scale per row (mixed: int8 K, fp32 V): the kernel equals attention over the
    dequantized rows; views with row padding and a larger capacity; an empty selection gives zeros."""
    B, H, cap = 2, 2, n + 50
    g = torch.Generator().manual_seed(7 * n + G)
    k = torch.randn(B, H, cap, d, generator=g) * 3
    v = torch.randn(B, H, cap, d, generator=g)
    kq, ks = quantize_rows(k)
    vq, vs = quantize_rows(v)
    assert kq.dtype == torch.int8 and ks.shape == (B, H, cap)
    assert (dequantize_rows(kq, ks) - k).abs().max() <= ks.max() / 2 + 1e-6  # half a step of rounding at most
    kbuf = torch.zeros(B, H, cap, d + 5, dtype=torch.int8)
    kbuf[..., :d] = kq
    k_view = kbuf[..., :d]
    v_buf, v_scale = (v, None) if mixed else (vq, vs)
    q = torch.randn(B, H * G, d, generator=g)
    idx, count = random_selection(B, H, n, n, [n, n // 2])
    got = sparse_attention(q, k_view, v_buf, idx, count, d**-0.5, ks, v_scale)
    want = reference_sparse_attention(q, dequantize_rows(kq, ks), dequantize_rows(v_buf, v_scale), idx, count, d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.all(got[0, :G] == 0)
    with pytest.raises(ValueError, match="k_scale goes with an int8 k cache"):
        sparse_attention(q, k_view, v_buf, idx, count, 0.1, None, v_scale)


@pytest.mark.parametrize("kt,vt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                   (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("G", [3, 7])
def test_sparse_attention_long_selection_splits_and_merges(ext, kt, vt, G):
    # Far more rows than one chunk (256), wide score range: exercises the partial-softmax merge; K and V of
    # either width (fp32 or bf16 rows: bf16 rows are read in a permuted lane order), compared on the same
    # rounded values
    B, H, n, d = 1, 1, 3000, 64
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(B, H, n, d, generator=g) * 4).to(kt)
    v = torch.randn(B, H, n, d, generator=g).to(vt)
    q = torch.randn(B, H * G, d, generator=g)
    idx, count = mask_to_indices(torch.rand(B, H, n, generator=g) < 0.9)
    torch.testing.assert_close(ext.sparse_attention(q, k, v, idx, count, 0.125),
                               reference_sparse_attention(q, k.float(), v.float(), idx, count, 0.125), atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [3, 7])
def test_sparse_attention_over_consecutive_rows_matches_reference(ext, dtype, G):
    """A dense step's selection (every valid row, consecutive) and selections with long consecutive runs: their
    chunks prefetch ahead past the chunk's end, up to the cache's last row (capacity exactly the rows here), and
    attend exactly what the reference does; a padded row attends its own consecutive tail."""
    B, H, n, d = 2, 2, 700, 64
    g = torch.Generator().manual_seed(11 + G)
    k = (torch.randn(B, H, n, d, generator=g) * 2).to(dtype)
    v = torch.randn(B, H, n, d, generator=g).to(dtype)
    q = torch.randn(B, H * G, d, generator=g)
    dense = torch.zeros(B, H, n, dtype=torch.bool)
    dense[0] = True
    dense[1, :, n - 333 :] = True  # a left-padded row
    runs = torch.rand(B, H, n, generator=g) < 0.3
    runs[:, :, 40:400] = True  # a run longer than a chunk, then scattered rows
    for keep in (dense, runs):
        idx, count = mask_to_indices(keep)
        want = reference_sparse_attention(q, k.float(), v.float(), idx, count, 0.125)
        torch.testing.assert_close(ext.sparse_attention(q, k, v, idx, count, 0.125), want, atol=1e-5, rtol=1e-4)


def test_selection_feeds_attention_end_to_end(ext):
    B, H, G, n, d = 2, 2, 4, 777, 32
    lut, codes, offsets, valid = make_case(B, H, G, n, 64, banded=True, lengths=[n, 500], seed=5)
    k = torch.tensor([40, 25])
    idx, count = score_select(lut, codes, offsets, valid, k, 4, 32)
    keep = indices_to_mask(idx, count, n)
    assert torch.equal(mask_to_indices(keep)[1], count)
    g = torch.Generator().manual_seed(6)
    q, kk, vv = torch.randn(B, H * G, d, generator=g), torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    from a2ats.core.attention import attend_selected

    want = attend_selected(q.unsqueeze(2), kk, vv, keep, 0.2).squeeze(1)
    torch.testing.assert_close(sparse_attention(q, kk, vv, idx, count, 0.2), want, atol=1e-5, rtol=1e-4)


def test_portable_build_gives_identical_results(ext):
    default = cpu_mod.build("default")
    lut, codes, offsets, valid = make_case(2, 2, 3, 1000, 6, banded=True, lengths=[1000, 600], seed=9)
    k = torch.tensor([50, 700])
    assert_same_selection(default.score_select(lut, codes, offsets, valid, k, 4, 16),
                          ext.score_select(lut, codes, offsets, valid, k, 4, 16))
    q, kk, vv = torch.randn(2, 6, 64), torch.randn(2, 2, 1000, 64), torch.randn(2, 2, 1000, 64)
    idx, count = ext.score_select(lut, codes, offsets, valid, k, 4, 16)
    torch.testing.assert_close(default.sparse_attention(q, kk, vv, idx, count, 0.125),
                               ext.sparse_attention(q, kk, vv, idx, count, 0.125), atol=1e-6, rtol=1e-5)
    for n in (130, 300):  # a few keys (fp32 everywhere) and many (bf16 shortlists where the CPU has them)
        z, t = torch.randn(2, 2, n, 64), torch.randn(2, 500, 64)
        half = 0.5 * (t * t).sum(-1)
        assert torch.equal(default.encode_nearest(z, t, half), ext.encode_nearest(z, t, half))


def test_a_lock_left_by_a_killed_build_does_not_block_the_next(ext):
    # torch's builder leaves a bare `lock` file when a process dies mid-build; the next build must not wait on it
    cpu_mod.build("default")
    stale = os.path.join(cpu_mod.build_directory(f"a2ats_cpu_default_{cpu_mod.source_digest()}"), "lock")
    open(stale, "w").close()
    try:
        proc = subprocess.run([sys.executable, "-c", "from a2ats.kernels import cpu; cpu.build('default')"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.remove(stale)


def test_isa_selection(monkeypatch):
    monkeypatch.setenv("A2ATS_CPU_ISA", "default")
    assert cpu_mod.select_isa() == "default"
    monkeypatch.setenv("A2ATS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="A2ATS_CPU_ISA"):
        cpu_mod.select_isa()
    best = cpu_mod.detected_isa()
    for isa in cpu_mod.ISAS:  # at or below what the CPU runs: as asked; above: never (an illegal instruction)
        monkeypatch.setenv("A2ATS_CPU_ISA", isa)
        if cpu_mod.ISAS.index(isa) <= cpu_mod.ISAS.index(best):
            assert cpu_mod.select_isa() == isa
        else:
            with pytest.warns(UserWarning, match="not supported"):
                assert cpu_mod.select_isa() == best


def _inputs():
    lut, codes, offsets, valid = make_case(2, 2, 3, 301, 96, banded=False, lengths=[301, 200], seed=2)
    q, kk, vv = torch.randn(2, 6, 16), torch.randn(2, 2, 301, 16), torch.randn(2, 2, 301, 16)
    return lut, codes, offsets, valid, torch.tensor([10, 20]), q, kk, vv


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_mod, "_loaded", {})
    monkeypatch.setattr(cpu_mod, "_by_settings", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    lut, codes, offsets, valid, k, q, kk, vv = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idx, count = score_select(lut, codes, offsets, valid, k, 4, 8)
        out = sparse_attention(q, kk, vv, idx, count, 0.25)
        assert cpu_backend() is None
    mine = [w for w in caught if "CPU kernels unavailable" in str(w.message)]
    assert len(mine) == 1 and "no C++ compiler" in str(mine[0].message)
    assert_same_selection((idx, count), reference_score_select(lut, codes, offsets, valid, k, 4, 8))
    torch.testing.assert_close(out, reference_sparse_attention(q, kk, vv, idx, count, 0.25))


def test_kernels_disabled_by_env(monkeypatch):
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    monkeypatch.setattr(cpu_mod, "build", lambda isa: pytest.fail("must not build when disabled"))
    assert cpu_backend() is None
    lut, codes, offsets, valid, k, *_ = _inputs()
    assert_same_selection(score_select(lut, codes, offsets, valid, k, 4, 8),
                          reference_score_select(lut, codes, offsets, valid, k, 4, 8))


def test_shape_validation():
    lut, codes, offsets, valid, k, q, kk, vv = _inputs()
    with pytest.raises(ValueError, match="valid"):
        score_select(lut, codes, offsets, valid[:, :5], k, 4, 8)
    with pytest.raises(ValueError, match="lut"):
        score_select(lut[0], codes, offsets, valid, k, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        sparse_attention(q[:, :5], kk, vv, torch.zeros(2, 2, 1, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("B,H,n,d,C", [(1, 1, 1, 16, 7), (2, 3, 65, 64, 4096), (1, 2, 300, 40, 333), (3, 1, 129, 8, 1)])
def test_encode_nearest_matches_reference(ext, B, H, n, d, C):
    g = torch.Generator().manual_seed(n + C)
    z, t = torch.randn(B, H, n, d, generator=g), torch.randn(H, C, d, generator=g)
    half = 0.5 * (t * t).sum(-1)
    got = ext.encode_nearest(z, t, half)
    assert got.dtype == torch.int16 and got.shape == (B, H, n)
    assert torch.equal(got, reference_encode_nearest(z, t, half))
    # ties go to the first centroid, as torch.argmax: duplicate every centroid
    t2 = torch.cat([t, t], 1)
    assert torch.equal(ext.encode_nearest(z, t2, torch.cat([half, half], 1)), got)
    assert torch.equal(encode_nearest(z, t, half), got)  # the public entry point uses the kernel


def test_encode_nearest_validates_and_falls_back(monkeypatch):
    z, t = torch.randn(1, 2, 5, 8), torch.randn(2, 9, 8)
    half = 0.5 * (t * t).sum(-1)
    with pytest.raises(ValueError, match="disagree"):
        encode_nearest(z, t[:1], half[:1])
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    assert torch.equal(encode_nearest(z, t, half), reference_encode_nearest(z, t, half))


@pytest.mark.parametrize("M,I,O", [(1, 576, 960), (3, 37, 101), (5, 64, 1), (2, 1536, 17)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bf16w_matches_widened_weights(ext, M, I, O, bias):
    g = torch.Generator().manual_seed(M * I + O)
    x, w = torch.randn(M, I, generator=g), torch.randn(O, I, generator=g).bfloat16()
    b = torch.randn(O, generator=g) if bias else None
    want = torch.nn.functional.linear(x, w.float(), b)
    tol = 2e-6 * I**0.5  # fp32 sums of I products in another order than BLAS's: rounding grows with sqrt(I)
    torch.testing.assert_close(ext.linear_bf16w(x, w, b), want, atol=tol, rtol=1e-5)
    torch.testing.assert_close(linear_bf16w(x.view(M, 1, I), w, b), want.view(M, 1, O), atol=tol, rtol=1e-5)
    with pytest.raises(ValueError, match="bfloat16"):
        linear_bf16w(x, w.float())


@pytest.mark.parametrize("B,H,R,d,C", [(1, 3, 3, 64, 4096), (2, 2, 11, 16, 33), (1, 1, 1, 8, 1), (3, 2, 27, 40, 100)])
def test_lookup_tables_match_matmul(ext, B, H, R, d, C):
    g = torch.Generator().manual_seed(R * C)
    q, cent = torch.randn(B, H, R, d, generator=g), torch.randn(H, C, d, generator=g)
    want = reference_lookup_tables(q, cent)
    tiles = ext.tile_centroids(cent)
    assert tiles.shape == (H, -(-C // 16), d, 16)
    torch.testing.assert_close(ext.lookup_tables(q, tiles, C), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lookup_tables(q, cent), want, atol=1e-5, rtol=1e-5)  # tiles made on the spot
    with pytest.raises(ValueError, match="same H and d"):
        lookup_tables(q, cent[:, :, :-1])


@pytest.mark.parametrize("B,H,groups,per,d,C", [(1, 3, 3, 8, 64, 4096), (2, 2, 7, 1, 16, 33), (1, 1, 2, 3, 8, 17),
                                                (3, 2, 4, 5, 40, 100)])
def test_lookup_tables_group_max_is_the_max_of_the_rows(ext, B, H, groups, per, d, C, monkeypatch):
    """The GQA max taken inside the kernel equals the max over the kernel's own rows bit for bit (the same sums),
    and the reference's max within rounding; odd group sizes and a tile not filled included."""
    g = torch.Generator().manual_seed(groups * C + per)
    q, cent = torch.randn(B, H, groups * per, d, generator=g), torch.randn(H, C, d, generator=g)
    tiles = ext.tile_centroids(cent)
    rows = ext.lookup_tables(q, tiles, C)
    got = ext.lookup_tables(q, tiles, C, groups)
    assert got.shape == (B, H, per, C)
    assert torch.equal(got, rows.view(B, H, groups, per, C).amax(2))
    want = reference_lookup_tables(q, cent).view(B, H, groups, per, C).amax(2)
    torch.testing.assert_close(lookup_tables(q, cent, tiles, groups=groups), want, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    assert torch.equal(lookup_tables(q, cent, groups=groups), want)
    with pytest.raises(ValueError, match="groups"):
        lookup_tables(q, cent, groups=groups * per + 1)
