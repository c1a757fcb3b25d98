"""k-means' assignment over every centroid (kernels.kmeans_nearest): the nearest centroid up to fp32 rounding of a
near-tie, against float64 scores, on every ISA build this CPU runs (the AVX-512 BF16 build shortlists in bf16 and
decides in fp32; the others score in fp32)."""

from __future__ import annotations

import pytest
import torch

from a2ats import kernels
from a2ats.core.kmeans import assign
from a2ats.kernels import reference_encode_nearest


def scores64(x, c, half):
    """x . c - half in float64 (G, N, k)."""
    return torch.einsum("gnd,gkd->gnk", x.double(), c.double()) - half.double().unsqueeze(1)


def assert_nearest(got, x, c, half, tol=1e-5):
    """Each pick's float64 score is the best, or within fp32 rounding of it (tol x |x| x max |c|, per point)."""
    s = scores64(x, c, half)
    best = s.amax(-1)
    picked = torch.gather(s, 2, got.unsqueeze(-1)).squeeze(-1)
    scale = x.double().norm(dim=-1) * c.double().norm(dim=-1).amax(-1, keepdim=True) + half.double().abs().amax(
        -1, keepdim=True)
    assert got.dtype == torch.int64 and got.shape == x.shape[:2]
    assert bool((got >= 0).all() and (got < c.shape[1]).all())
    assert bool((picked >= best - tol * scale).all()), float((best - picked).max())
    return (got == s.argmax(-1)).float().mean().item()


def make(kind, G, N, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, d)
    if kind == "scaled":  # dims of very different scales
        x = torch.randn(G, N, d, generator=g) * scales
        c = torch.randn(G, k, d, generator=g) * scales
    elif kind == "offset":  # far from the origin: |x| |c| dwarfs the scores' differences
        x = torch.randn(G, N, d, generator=g) * scales + 100.0
        c = torch.randn(G, k, d, generator=g) * scales + 100.0
    else:  # clustered: few centres, centroids within 1e-3 of them (many near-ties), points around them
        centres = torch.randn(G, 5, d, generator=g) * scales * 3 + 2.0
        c = centres[:, torch.arange(k) % 5] + 1e-3 * torch.randn(G, k, d, generator=g)
        x = centres[:, torch.randint(5, (N,), generator=g)] + 0.3 * torch.randn(G, N, d, generator=g) * scales
    return x, c, 0.5 * (c * c).sum(-1)


SHAPES = [(1, 1, 1, 7), (2, 17, 15, 24), (3, 1001, 37, 64), (1, 1001, 37, 63), (3, 17, 4096, 63), (2, 100, 4096, 64),
          (1, 33, 15, 7)]


@pytest.mark.parametrize("kind", ["scaled", "offset", "clustered"])
@pytest.mark.parametrize("G,N,k,d", SHAPES)
def test_the_pick_is_the_float64_nearest_up_to_fp32_rounding(isa_ext, kind, G, N, k, d):
    """Sizes not multiples of 16 or of the kernel's blocks (points, centroids, dims, odd dims), raw and centred."""
    x, c, half = make(kind, G, N, k, d, seed=G * 1000 + N + k + d)
    exact = assert_nearest(isa_ext.kmeans_nearest(x, c, half), x, c, half)
    mu = x.mean(1, keepdim=True)
    xc, cc = x - mu, c - mu
    hc = 0.5 * (cc * cc).sum(-1)
    exact_c = assert_nearest(isa_ext.kmeans_nearest(xc, cc, hc), xc, cc, hc)
    if kind == "scaled":  # no near-ties: the float64 argmax itself
        assert exact == 1.0 and exact_c == 1.0


def test_exact_ties_go_to_the_first_centroid(isa_ext):
    """Small integers: every score is exact in fp32 in any summation order, so duplicate centroids tie exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (2, 300, 24), generator=g).float()
    base = torch.randint(-4, 5, (2, 20, 24), generator=g).float()
    c = torch.cat([base, base.flip(1), base], 1)  # centroid j, 39 - j and 40 + j are the same
    half = 0.5 * (c * c).sum(-1)
    got = isa_ext.kmeans_nearest(x, c, half)
    s = scores64(x, c, half)
    assert torch.equal(got, s.argmax(-1))  # torch.argmax: the first maximum
    assert bool((got < 20).all())


def test_half_is_the_kernels_not_recomputed(isa_ext):
    """The bias is ``half`` as given: lowering one centroid's half makes it every point's pick."""
    x, c, half = make("scaled", 2, 50, 37, 24, seed=8)
    half = half.clone()
    half[:, 11] -= 1e4
    assert bool((isa_ext.kmeans_nearest(x, c, half) == 11).all())


def test_equals_the_fp32_reference_on_separated_data(isa_ext):
    """Well separated clusters (no near-ties): exactly the torch fp32 reference's codes, and key encoding's (which
    takes this kernel for many keys)."""
    g = torch.Generator().manual_seed(4)
    G, N, k, d = 3, 2000, 300, 64
    c = torch.randn(G, k, d, generator=g) * 10
    x = c[:, torch.randint(k, (N,), generator=g)] + 0.5 * torch.randn(G, N, d, generator=g)
    half = 0.5 * (c * c).sum(-1)
    ref = reference_encode_nearest(x.unsqueeze(0), c, half).squeeze(0).long()
    assert torch.equal(isa_ext.kmeans_nearest(x, c, half), ref)
    assert torch.equal(isa_ext.encode_nearest(x.unsqueeze(0), c, half).squeeze(0).long(), ref)


def test_bad_shapes_raise(isa_ext):
    x, c, half = make("scaled", 2, 10, 5, 8, seed=1)
    for args in [(x[0], c, half), (x, c[:1], half[:1]), (x, c[..., :7], half), (x, c, half[:, :4]), (x, c, half[0])]:
        with pytest.raises(ValueError):
            kernels.kmeans_nearest(*args)
        with pytest.raises(RuntimeError):
            isa_ext.kmeans_nearest(*args)
    with pytest.raises(ValueError, match="no centroids"):
        kernels.kmeans_nearest(x, c[:, :0], half[:, :0])
    assert kernels.kmeans_nearest(x[:, :0], c, half).shape == (2, 0)


def test_public_entry_point_and_its_fallback(monkeypatch):
    x, c, half = make("scaled", 2, 300, 37, 24, seed=2)
    ref = assign(x, c)[0]
    assert torch.equal(kernels.kmeans_nearest(x, c, half), ref)
    monkeypatch.setenv("A2ATS_KERNELS", "0")  # no kernels: the torch reference
    assert torch.equal(kernels.kmeans_nearest(x, c, half), ref)


@pytest.mark.skipif(kernels.cpu_backend() is None, reason="CPU kernels could not be built here")
@pytest.mark.parametrize("kind", ["scaled", "offset", "clustered"])
def test_kernel_nearest_centres_and_picks_the_nearest(kind):
    """Calibration's assignment: the float64 nearest of the raw points up to fp32 rounding of their scores (the
    kernel centres for its bound, and decides on the points as given), and torch's matmul path's pick where there
    are no near-ties."""
    from a2ats.hf.calibrate import kernel_nearest

    x, c, half = make(kind, 3, 1001, 37, 64, seed=6)
    got = kernel_nearest(x, c)
    exact = assert_nearest(got, x, c, half)
    if kind == "scaled":
        assert exact == 1.0 and torch.equal(got, assign(x, c)[0])
