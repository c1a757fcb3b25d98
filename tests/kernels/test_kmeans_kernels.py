"""Calibration's k-means++ seeding kernel against the torch loop it replaces, on every ISA build this CPU runs (the
assignment kernel's test: tests/hf/test_calibrate.py)."""

from __future__ import annotations

import pytest
import torch

from a2ats import kernels
from a2ats.core.kmeans import kmeans, pp_picks


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
