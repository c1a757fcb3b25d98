"""Calibration's k-means kernels (k-means++ seeding, the neighbour search) against the torch code they replace,
on every ISA build this CPU runs (the assignment kernel's test: tests/hf/test_calibrate.py)."""

from __future__ import annotations

import pytest
import torch

from a2ats import kernels
from a2ats.core.kmeans import assign, kmeans, nearest_among, neighbour_lists, pp_picks


@pytest.mark.parametrize("G,S,d,k", [(3, 1001, 24, 37), (1, 257, 64, 100), (2, 50, 7, 50)])
def test_kmeans_pp_seeding_kernel_draws_the_reference_picks(isa_ext, G, S, d, k):
    """The same draws as the torch loop given the same uniform numbers, distinct points (a pick is at distance 0
    and never drawn again), down to as many picks as points."""
    g = torch.Generator().manual_seed(11)
    pts = torch.randn(G, S, d, generator=g) * torch.linspace(0.3, 3.0, d)
    first = torch.randint(S, (G,), generator=g)
    u = torch.rand(G, k - 1, generator=g, dtype=torch.float64)
    picks = isa_ext.kmeans_pp_picks(pts, first, u)
    assert torch.equal(picks, pp_picks(pts, first, u))
    assert all(len(set(row.tolist())) == k for row in picks)


def test_kmeans_seeded_by_the_kernel_equals_the_torch_seeding():
    g = torch.Generator().manual_seed(2)
    pts = torch.randn(3, 1001, 24, generator=g)
    ref = kmeans(pts, 37, max_iter=3, tol=0, seed=2)
    fast = kmeans(pts, 37, max_iter=3, tol=0, seed=2, seed_picks=kernels.kmeans_pp_picks)
    torch.testing.assert_close(fast.centroids, ref.centroids)


@pytest.mark.parametrize("G,N,d,k,m", [(3, 1001, 24, 37, 5), (1, 257, 64, 100, 1), (2, 50, 7, 13, 13), (2, 333, 19, 64, 32)])
def test_neighbour_search_kernel_picks_the_reference_centroid(isa_ext, G, N, d, k, m):
    """Each point's nearest centroid among its current centroid's candidates: the torch reference's choice, on odd
    sizes (dims not a multiple of the kernel's 16 sums, one candidate, every centroid a candidate)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(G, N, d, generator=g) * torch.linspace(0.5, 2.0, d)
    c = torch.randn(G, k, d, generator=g)
    half = 0.5 * (c * c).sum(-1)
    cand = neighbour_lists(c, m)
    cur = torch.randint(k, (G, N), generator=g)
    got = isa_ext.kmeans_nearest_among(x, c, half, cand, cur)
    ref = nearest_among(x, c, half, cand, cur)
    assert torch.equal(got, ref)
    for gi in range(G):  # the choice is a candidate of the current centroid, and the best of them
        assert all(int(got[gi, i]) in cand[gi, int(cur[gi, i])].tolist() for i in range(N))
    if m == k:  # every centroid a candidate: the exact nearest
        assert torch.equal(got, assign(x, c)[0])


def test_neighbour_search_kernel_refuses_candidates_out_of_range(isa_ext):
    x, c = torch.randn(1, 10, 8), torch.randn(1, 4, 8)
    cand = torch.zeros(1, 4, 2, dtype=torch.int32)
    cand[0, 1, 1] = 4
    with pytest.raises(RuntimeError, match="out of range"):
        isa_ext.kmeans_nearest_among(x, c, torch.zeros(1, 4), cand, torch.zeros(1, 10, dtype=torch.long))


def test_kmeans_with_neighbour_passes_by_the_kernel_equals_the_torch_search():
    g = torch.Generator().manual_seed(4)
    pts = torch.randn(2, 1001, 24, generator=g)
    ref = kmeans(pts, 37, max_iter=8, tol=0, seed=2, neighbours=6)
    fast = kmeans(pts, 37, max_iter=8, tol=0, seed=2, neighbours=6, among=kernels.kmeans_nearest_among)
    torch.testing.assert_close(fast.centroids, ref.centroids)
