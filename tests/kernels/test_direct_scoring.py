"""Selection scored straight from the centroids (score_select_direct) against the torch reference: lookup tables
by matmul, then the reference selection.

The kernel computes each table entry it needs as a dot product in its own summation order, so its scores differ
from the reference's in fp32 rounding and a selection may differ where the reference's scores of two tokens at
the top-K threshold are within that rounding (near-ties). Integer-valued inputs make every sum exact: there the
selection must be the reference's exactly, ties (broken toward the later token) included.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from a2ats.core.selection import always_kept, select, table_scores
from a2ats.kernels import cpu as cpu_mod
from a2ats.kernels import reference_lookup_tables
from a2ats.kernels.ops import score_select_direct
from a2ats.kernels.reference import indices_to_mask, reference_score_select_direct

EPS = 2.0**-24


@pytest.fixture(scope="module", params=cpu_mod.ISAS)
def isa_ext(request):
    """The extension built for each ISA this CPU runs."""
    isa = request.param
    if cpu_mod.ISAS.index(isa) > cpu_mod.ISAS.index(cpu_mod.detected_isa()):
        pytest.skip(f"this CPU does not run {isa}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = cpu_mod.cpu_backend(isa)
    if mod is None:
        pytest.skip(f"C++ CPU kernels cannot be built here: {[str(w.message) for w in caught] or 'disabled'}")
    return mod


def make_case(B, H, G, bands, n, C, d, *, lengths, seed, integer=False, cap_extra=13):
    """q (B, H, G*bands, d), centroids (H, C, d), codes (a view of a larger int16 buffer), offsets (band*C or
    None), left-padded valid. ``integer``: small integers everywhere, so every dot product is exact."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        q = torch.randint(-1, 2, (B, H, G * bands, d), generator=g).float()
        cent = torch.randint(-2, 3, (H, C, d), generator=g).float()
    else:
        q, cent = torch.randn(B, H, G * bands, d, generator=g), torch.randn(H, C, d, generator=g)
    codes = torch.randint(0, C, (B, H, n + cap_extra), generator=g, dtype=torch.int16)[:, :, :n]
    offsets = torch.randint(0, bands, (B, n), generator=g, dtype=torch.int32) * C if bands > 1 else None
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        valid[b, n - length:] = True
    return q, cent, codes, offsets, valid


def bf16_bound(q, cent):
    """How far rounding the centroids to bf16 moves a score q · c: each component by at most 2^-8 of itself."""
    return 2.0**-8 * float(reference_lookup_tables(q.abs(), cent.float().abs()).max())


def rounding_tol(q, cent):
    """A bound on the difference two fp32 summation orders of a score q · c make: d eps sum |q_i c_i|, doubled."""
    return 2 * q.shape[-1] * EPS * float(reference_lookup_tables(q.abs(), cent.float().abs()).max())


def assert_same_up_to_near_ties(got, want, q, cent, bands, group_max, codes, offsets, valid, k, sinks, window, tol):
    """``got`` selects what ``want`` (the reference) selects, but for tokens whose reference score is within
    ``tol`` of their row's threshold (the k-th largest candidate score) in some query head row of their KV head."""
    B, H, R, _ = q.shape
    n = codes.shape[-1]
    lut = reference_lookup_tables(q, cent).view(B, H, R // bands, -1)
    if group_max:
        lut = lut.amax(2, keepdim=True)
    Gr = lut.shape[2]
    scores = table_scores(lut, codes, offsets).view(B, H, Gr, n)
    always, cand, _ = always_kept(valid, sinks, window)
    gmask, wmask = (indices_to_mask(i, c, n) for i, c in (got, want))
    for b in range(B):
        kk = min(int(k[b]), int(cand[b].sum()))
        for h in range(H):
            diff = (gmask[b, h] ^ wmask[b, h]).nonzero().flatten()
            if not len(diff):
                continue
            assert kk > 0 and bool(cand[b, diff].all()), (b, h, diff)  # only ranked candidates may differ
            s = scores[b, h][:, cand[b]]
            thr = s.topk(kk, dim=-1).values[:, -1:]  # (Gr, 1)
            near = ((scores[b, h][:, diff] - thr).abs() <= tol).any(0)
            assert bool(near.all()), f"row {b} KV head {h}: tokens {diff[~near].tolist()} differ beyond near-ties"
    if group_max:  # one top-K per KV head: the same count whatever the ties
        assert torch.equal(got[1], want[1])


def assert_same_selection(got, want):
    (gi, gc), (wi, wc) = got, want
    assert torch.equal(gc, wc), (gc, wc)
    for b in range(gc.shape[0]):
        for h in range(gc.shape[1]):
            c = int(wc[b, h])
            assert torch.equal(gi[b, h, :c], wi[b, h, :c]), (b, h)
            assert bool((gi[b, h, c:] == -1).all()), (b, h)  # the documented padding after the count


CASES = [  # B, H, G, bands, n, C, d
    (1, 3, 3, 5, 2048, 4096, 64),  # SmolLM2's shapes at 2K
    (3, 2, 7, 3, 301, 100, 64),  # Qwen's group; n and C not multiples of 16
    (2, 2, 1, 1, 1000, 33, 40),  # unbanded, d not a multiple of 16
    (3, 1, 4, 2, 37, 17, 16),
    (2, 2, 3, 4, 777, 64, 8),
    # d = 64 takes up to 8 query heads per batch of entries (16 // G entries: 16, 2), more the general loop
    (2, 1, 1, 2, 500, 300, 64),
    (1, 2, 8, 2, 333, 200, 64),
    (1, 1, 9, 2, 250, 150, 64),
]
BUDGETS = [([5, 40, 1000], 4, 16), ([0, 3, 7], 0, 8), ([10**6, 11, 1], 2, 0), ([0, 0, 0], 1, 1)]  # k per row, sinks, window


@pytest.mark.parametrize("B,H,G,bands,n,C,d", CASES)
@pytest.mark.parametrize("group_max", [True, False])
def test_direct_selection_is_the_tables_up_to_near_ties(isa_ext, B, H, G, bands, n, C, d, group_max):
    lengths = [n, n - n // 3, max(n // 5, 1)][:B]  # left padding of different lengths
    q, cent, codes, offsets, valid = make_case(B, H, G, bands, n, C, d, lengths=lengths, seed=n + G + d)
    tol = rounding_tol(q, cent)
    for k, sinks, window in BUDGETS:
        k = torch.tensor(k[:B], dtype=torch.long)
        want = reference_score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, sinks, window)
        got = isa_ext.score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, sinks, window)
        assert_same_up_to_near_ties(got, want, q, cent, bands, group_max, codes, offsets, valid, k, sinks, window, tol)
        assert bool((got[0][..., :][got[0] >= 0] < n).all())


@pytest.mark.parametrize("B,H,G,bands,n,C,d", CASES)
@pytest.mark.parametrize("group_max", [True, False])
def test_exact_sums_select_exactly_the_reference(isa_ext, B, H, G, bands, n, C, d, group_max):
    """Small integers: every score is exact in any order, ties are everywhere and go to the later token."""
    lengths = [n, n - n // 3, max(n // 5, 1)][:B]
    q, cent, codes, offsets, valid = make_case(B, H, G, bands, n, C, d, lengths=lengths, seed=7 * n + G, integer=True)
    for k, sinks, window in BUDGETS:
        k = torch.tensor(k[:B], dtype=torch.long)
        want = reference_score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, sinks, window)
        assert_same_selection(isa_ext.score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, sinks,
                                                          window), want)
    assert_same_selection(score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, sinks, window), want)


def test_scattered_valid_and_one_constant_score(isa_ext):
    """Any mask (not only left padding), and centroids whose scores all tie: recency alone decides."""
    B, H, G, bands, n, C, d = 2, 2, 3, 2, 500, 20, 16
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(B, n, generator=g) > 0.3
    codes = torch.randint(0, C, (B, H, n), generator=g, dtype=torch.int16)
    offsets = torch.randint(0, bands, (B, n), generator=g, dtype=torch.int32) * C
    q = torch.randint(-1, 2, (B, H, G * bands, d), generator=g).float()
    for cent in (torch.zeros(H, C, d), torch.randint(-1, 2, (H, C, d), generator=g).float()):
        for group_max in (True, False):
            k = torch.tensor([17, 250])
            assert_same_selection(isa_ext.score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, 3, 5),
                                  reference_score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, 3, 5))


def test_the_near_tie_rule_fails_a_wrong_selection():
    B, H, G, bands, n, C, d = 1, 2, 3, 3, 400, 50, 64
    q, cent, codes, offsets, valid = make_case(B, H, G, bands, n, C, d, lengths=[n], seed=3)
    k, tol = torch.tensor([30]), rounding_tol(q, cent)
    want = reference_score_select_direct(q, cent, bands, True, codes, offsets, valid, k, 4, 16)
    args = (q, cent, bands, True, codes, offsets, valid, k, 4, 16, tol)
    assert_same_up_to_near_ties(want, want, *args)
    scores = table_scores(reference_lookup_tables(q, cent).view(B, H, G, -1).amax(2, keepdim=True), codes, offsets)
    _, cand, _ = always_kept(valid, 4, 16)
    keep = indices_to_mask(*want, n)
    # swap the best selected candidate of KV head 0 for its worst unselected one: the same count, a wrong set
    s = scores[0, 0]
    best = torch.where(keep[0, 0] & cand[0], s, -float("inf")).argmax()
    worst = torch.where(~keep[0, 0] & cand[0], s, float("inf")).argmin()
    keep[0, 0, best], keep[0, 0, worst] = False, True
    from a2ats.kernels.reference import mask_to_indices

    with pytest.raises(AssertionError, match="beyond near-ties"):
        assert_same_up_to_near_ties(mask_to_indices(keep), want, *args)


def test_bf16_centroids_score_as_their_fp32_values(isa_ext):
    """bfloat16 centroids are read as the fp32 numbers they hold (the reference widens them)."""
    B, H, G, bands, n, C, d = 2, 2, 3, 3, 600, 70, 64
    q, cent, codes, offsets, valid = make_case(B, H, G, bands, n, C, d, lengths=[n, 400], seed=11)
    c16 = cent.bfloat16()
    tol = rounding_tol(q, c16.float())
    for group_max in (True, False):
        k = torch.tensor([50, 20])
        want = reference_score_select_direct(q, c16.float(), bands, group_max, codes, offsets, valid, k, 4, 16)
        got = isa_ext.score_select_direct(q, c16, bands, group_max, codes, offsets, valid, k, 4, 16)
        assert_same_up_to_near_ties(got, want, q, c16.float(), bands, group_max, codes, offsets, valid, k, 4, 16, tol)


def test_bf16_rounded_centroids_select_as_fp32_up_to_their_rounding(isa_ext):
    """The fast paths' default (A2ATSConfig.score_precision="bf16"): scoring from the centroids rounded to bf16
    selects what the fp32 centroids select, but for tokens within the rounding's bound of the threshold: each
    centroid component moves by at most 2^-8 of itself, so a score by at most 2^-8 sum |q_i c_i|."""
    B, H, G, bands, n, C, d = 2, 3, 3, 5, 1000, 97, 64
    q, cent, codes, offsets, valid = make_case(B, H, G, bands, n, C, d, lengths=[n, 701], seed=23)
    tol = bf16_bound(q, cent) + rounding_tol(q, cent)
    for group_max in (True, False):
        k = torch.tensor([100, 37])
        want = reference_score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, 4, 64)
        got = isa_ext.score_select_direct(q, cent.bfloat16(), bands, group_max, codes, offsets, valid, k, 4, 64)
        assert_same_up_to_near_ties(got, want, q, cent, bands, group_max, codes, offsets, valid, k, 4, 64, tol)
        # the bound is tight enough to mean something: most of the selection lies outside it
        _, cand, _ = always_kept(valid, 4, 64)
        lut = reference_lookup_tables(q, cent).view(B, H, -1, bands * C)
        scores = table_scores(lut.amax(2, keepdim=True), codes, offsets)  # (B, H, n)
        thr = torch.where(cand[:, None], scores, -float("inf")).topk(int(k.min()), -1).values[..., -1:]
        assert float(((scores - thr).abs() <= tol).float().mean()) < 0.05


def distance_offsets(B, n, bands, C, first_edge=64):
    """Offsets as banded WRoPE makes them (method.band_offsets): token j's band from its distance to the newest
    token, bands doubling from ``first_edge``; the newest bands hold few tokens (few entries in use), the oldest
    most (nearly every code), so one row mixes bands the kernel computes entry by entry and bands it computes
    whole (every C codes at once)."""
    dist = torch.arange(n - 1, -1, -1, dtype=torch.float32)
    edges = torch.tensor([first_edge * 2.0 ** (i + 1) for i in range(bands - 1)])
    return (torch.bucketize(dist, edges, right=True) * C).to(torch.int32).expand(B, n).contiguous()


# Shapes whose rows mix sparse bands and whole bands (d = 64, bf16 centroids, up to 8 query heads per KV head),
# the G = 9 case taking entry-by-entry dots only.
DENSE_CASES = [  # B, H, G, bands, n, C, d
    (1, 3, 3, 5, 2048, 4096, 64),  # SmolLM2's shapes at 2K: bands 0-2 sparse, 3-4 whole
    (2, 2, 7, 6, 3000, 1000, 64),  # Qwen's group; C not a multiple of 16
    (2, 1, 1, 4, 900, 77, 64),
    (1, 2, 8, 3, 700, 300, 64),
    (1, 1, 9, 3, 500, 150, 64),
]


@pytest.mark.parametrize("B,H,G,bands,n,C,d", DENSE_CASES)
def test_bf16_operands_select_exactly_the_reference_on_exact_sums(isa_ext, B, H, G, bands, n, C, d):
    """bf16 centroids and queries (score_precision "bf16") with small integer values: every score is exact in any
    order, so the selection is the reference's exactly, ties included, whether a band's entries are computed one by
    one or whole."""
    lengths = [n, n - n // 3][:B]
    q, cent, codes, _, valid = make_case(B, H, G, bands, n, C, d, lengths=lengths, seed=n + G, integer=True)
    offsets = distance_offsets(B, n, bands, C)
    for group_max in (True, False):
        for k, sinks, window in BUDGETS:
            k = torch.tensor(k[:B], dtype=torch.long)
            want = reference_score_select_direct(q, cent, bands, group_max, codes, offsets, valid, k, sinks, window)
            got = isa_ext.score_select_direct(q, cent.bfloat16(), bands, group_max, codes, offsets, valid, k, sinks,
                                              window)
            assert_same_selection(got, want)


@pytest.mark.parametrize("B,H,G,bands,n,C,d", DENSE_CASES)
@pytest.mark.parametrize("round_q", [True, False])
def test_bf16_centroids_select_as_the_reference_up_to_near_ties(isa_ext, B, H, G, bands, n, C, d, round_q):
    """Random bf16 centroids, queries rounded to bf16 (the method's, every lo half zero) or not (split into two
    bf16 halves): the reference's selection on the same fp32 values, but for near-ties."""
    lengths = [n, n - n // 3][:B]
    q, cent, codes, _, valid = make_case(B, H, G, bands, n, C, d, lengths=lengths, seed=3 * n + G)
    q = q.bfloat16().float() if round_q else q
    c16 = cent.bfloat16()
    offsets = distance_offsets(B, n, bands, C)
    tol = rounding_tol(q, c16.float())
    for group_max in (True, False):
        k = torch.tensor([n // 10, 37][:B])
        want = reference_score_select_direct(q, c16.float(), bands, group_max, codes, offsets, valid, k, 4, 16)
        got = isa_ext.score_select_direct(q, c16, bands, group_max, codes, offsets, valid, k, 4, 16)
        assert_same_up_to_near_ties(got, want, q, c16.float(), bands, group_max, codes, offsets, valid, k, 4, 16, tol)


def test_out_of_table_codes_raise_and_leave_the_next_call_right(isa_ext):
    B, H, G, bands, n, C, d = 1, 2, 2, 2, 300, 40, 16
    q, cent, codes, offsets, valid = make_case(B, H, G, bands, n, C, d, lengths=[n], seed=5, integer=True)
    bad = codes.clone()
    bad[0, 1, 100] = C  # band 1's last code + 1 reads past the table
    k = torch.tensor([20])
    with pytest.raises(RuntimeError, match="outside the lookup table"):
        isa_ext.score_select_direct(q, cent, bands, True, bad, offsets + C, valid, k, 2, 4)
    bad[0, 1, 100] = -bands * C - 1  # below the table whatever the band
    with pytest.raises(RuntimeError, match="outside the lookup table"):
        isa_ext.score_select_direct(q, cent, bands, True, bad, offsets, valid, k, 2, 4)
    # the counts a failed call made are not carried into the next one
    assert_same_selection(isa_ext.score_select_direct(q, cent, bands, True, codes, offsets, valid, k, 2, 4),
                          reference_score_select_direct(q, cent, bands, True, codes, offsets, valid, k, 2, 4))


def test_fallback_without_kernels_is_the_reference(monkeypatch):
    q, cent, codes, offsets, valid = make_case(2, 2, 3, 3, 200, 30, 16, lengths=[200, 120], seed=2)
    k = torch.tensor([20, 30])
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    for group_max in (True, False):
        assert_same_selection(score_select_direct(q, cent, 3, group_max, codes, offsets, valid, k, 2, 8),
                              reference_score_select_direct(q, cent, 3, group_max, codes, offsets, valid, k, 2, 8))
    with pytest.raises(ValueError, match="G x bands"):
        score_select_direct(q, cent, 4, True, codes, offsets, valid, k, 2, 8)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("reduction", ["max", "union"])
@pytest.mark.parametrize("banded", [True, False])
def test_method_select_rows_selects_what_score_tokens_and_select_do(reduction, banded, precision):
    """The decode step's selection (select_rows: queries and centroids, the kernel) against the reference path's
    (score_tokens: full tables and scores, then core.selection.select) on a tiny model's rotation, both scoring
    from the method's rows (bf16-rounded or fp32 centroids, A2ATSConfig.score_precision)."""
    from a2ats.core.config import A2ATSConfig
    from a2ats.core.rope import WRoPE, find_rotary_embedding
    from a2ats.methods import A2ATSMethod
    from conftest import random_codebooks, tiny_model

    model = tiny_model("llama")
    method = A2ATSMethod(random_codebooks(model), WRoPE(find_rotary_embedding(model), 2048, 2.0 if banded else None,
                                                        first_edge=8), precision)
    cfg = A2ATSConfig(budget=0.2, sinks=2, window=4, reduction=reduction, wrope_band_ratio=2.0 if banded else None)
    Hq, Hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.hidden_size // Hq
    C = method.codebooks.settings.n_centroids
    B, n = 2, 150
    g = torch.Generator().manual_seed(4)
    q_pre = torch.randn(B, Hq, d, generator=g)
    codes = torch.randint(0, C, (B, Hkv, n), generator=g, dtype=torch.int16)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :40] = False
    heads = slice(0, Hkv)
    bands, offsets = method.band_offsets(valid)
    k = cfg.budget.tokens_for(valid.sum(-1))
    for layer in range(model.config.num_hidden_layers):
        got = method.select_rows(layer, q_pre, q_pre, codes, valid, k, cfg, heads, bands, offsets)
        want = select(method.score_tokens(layer, q_pre, q_pre, codes, bands, offsets, heads), valid, Hkv, cfg, k)
        q, cent = method.queries(layer, q_pre, q_pre, bands, heads)
        from a2ats.kernels.reference import mask_to_indices

        assert cent.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert_same_up_to_near_ties(got, mask_to_indices(want), q, cent, bands, reduction == "max", codes, offsets,
                                    valid, k, cfg.sinks, cfg.window, rounding_tol(q, cent))


def test_huge_page_copy_holds_the_same_values(isa_ext, monkeypatch):
    from a2ats.kernels.ops import huge_page_copy

    g = torch.Generator().manual_seed(6)
    for t in (torch.randn(3, 2, 100, 16, generator=g), torch.randn(5, 7, generator=g).bfloat16(), torch.zeros(0)):
        c = isa_ext.huge_page_copy(t)
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() % (2 << 20) == 0 or t.numel() == 0  # aligned to a huge page
    t = torch.randn(4, 8, generator=g)[:, ::2]  # not contiguous: copied as its values
    assert torch.equal(isa_ext.huge_page_copy(t), t)
    monkeypatch.setenv("A2ATS_KERNELS", "0")
    assert huge_page_copy(t) is t  # without the kernels: the tensor itself
