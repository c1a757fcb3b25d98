import json

import pytest
import torch

from a2ats.core.codebook import (
    CodebookError,
    Codebooks,
    CodebookSettings,
    query_aware_factor,
)
from a2ats.core.kmeans import assign, kmeans
from conftest import random_codebooks, tiny_model


def test_transformed_distance_is_the_score_error():
    """|kL - cL|^2 == (k - c) H (k - c)^T with H = L L^T (up to H's RMS normalization)."""
    g = torch.Generator().manual_seed(0)
    d = 12
    q = torch.randn(500, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    h = q.T @ q / 500
    L = query_aware_factor(h, eps=0.0).double()
    rms = h.pow(2).mean().sqrt()
    k, c = torch.randn(7, d, generator=g, dtype=torch.float64), torch.randn(7, d, generator=g, dtype=torch.float64)
    lhs = ((k @ L - c @ L) ** 2).sum(-1)
    rhs = torch.einsum("nd,de,ne->n", k - c, h / rms, k - c)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-6)
    # and the mean squared score error over those queries is exactly that quadratic form
    err = (((k - c) @ q.T) ** 2).mean(-1)
    torch.testing.assert_close(err, torch.einsum("nd,de,ne->n", k - c, h, k - c))


def test_kmeans_finds_separated_clusters_and_reseeds_empty_ones():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(2, 5, 3, generator=g) * 20
    x = (centers.repeat_interleave(40, dim=1) + 0.1 * torch.randn(2, 200, 3, generator=g)).contiguous()
    res = kmeans(x, 5, max_iter=50, tol=1e-8, seed=0)
    for gi in range(2):
        d = torch.cdist(centers[gi], res.centroids[gi]).min(-1).values
        assert d.max() < 0.5
    # Force empty clusters: duplicated initial centroids must be re-seeded with real points.
    from a2ats.core.kmeans import lloyd

    init = x[:, :1].repeat(1, 5, 1)
    res = lloyd(x, init, max_iter=30, tol=1e-10)
    assert res.reseeded > 0
    best, _ = assign(x, res.centroids)
    assert all(torch.bincount(best[gi], minlength=5).min() > 0 for gi in range(2))


def test_fitted_centroids_are_the_key_space_means_of_their_clusters():
    """The back-transform from the query-aware space, checked without it: k-means in z = k L converges to cluster
    means there, and since z is linear in k, each centroid brought back to key space must be the plain mean of its
    members' keys (computed here from the keys alone, members found by the transformed distance)."""
    g = torch.Generator().manual_seed(3)
    Hkv, d, C = 2, 6, 4
    centers = torch.randn(Hkv, C, d, generator=g) * 10
    keys = (centers.repeat_interleave(50, dim=1) + 0.3 * torch.randn(Hkv, 50 * C, d, generator=g)).contiguous()
    a = torch.randn(Hkv, d, d, generator=g)
    h = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d)
    cent, chol, _ = Codebooks.fit_layer(keys, h, CodebookSettings(n_centroids=C, max_iter=50))
    members = torch.cdist(keys @ chol, cent @ chol).argmin(-1)  # (Hkv, N)
    for head in range(Hkv):
        for c in range(C):
            mine = keys[head][members[head] == c]
            assert len(mine) == 50  # the clusters were found
            torch.testing.assert_close(cent[head, c], mine.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 37, 1500])
def test_encode_matches_brute_force(n):
    model = tiny_model("llama")
    cb = random_codebooks(model, n_centroids=23)
    k = torch.randn(2, 2, n, 16)
    codes = cb.encode(1, k)
    assert codes.dtype == torch.int16
    z = torch.einsum("bhnd,hde->bhne", k, cb.chol[1])
    ref = torch.cdist(z, cb.transformed[1].unsqueeze(0).expand(2, -1, -1, -1)).argmin(-1)
    assert torch.equal(codes.long(), ref)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("llama")
    cb = random_codebooks(model)
    path = cb.save(tmp_path / "cb.safetensors")
    cb2 = Codebooks.load(path)
    assert torch.equal(cb.centroids, cb2.centroids) and torch.equal(cb.chol, cb2.chol)
    assert cb2.fingerprint == cb.fingerprint and cb2.settings == cb.settings and cb2.digest == cb.digest
    cb2.check_compatible(model, wrope_distance=2048)


def test_codebooks_of_another_model_are_refused(tmp_path):
    cb = random_codebooks(tiny_model("llama"))
    with pytest.raises(CodebookError, match="another model.*num_attention_heads"):
        cb.check_compatible(tiny_model("qwen3"))
    with pytest.raises(CodebookError, match="other weights"):
        cb.check_compatible(tiny_model("llama", seed=1))
    with pytest.raises(CodebookError, match="WRoPE distance 2048.*1024"):
        cb.check_compatible(tiny_model("llama"), wrope_distance=1024)
    # the default codebooks are banded (ratio 2): another ratio, or the paper's single distance, is refused with the flag
    with pytest.raises(CodebookError, match="bands of ratio 2, but the config asks for bands of ratio 4.*--wrope-bands 4"):
        cb.check_compatible(tiny_model("llama"), band_ratio=4.0)
    with pytest.raises(CodebookError, match="ratio 2, but the config asks for the paper's single distance.*--wrope-bands 0"):
        cb.check_compatible(tiny_model("llama"), band_ratio=None)
    cb.check_compatible(tiny_model("llama"), band_ratio=2.0)


def test_banded_calibration_pools_every_band():
    """H recorded with bands is the sum of the single-distance H at each band's distance."""
    from a2ats.core.rope import WRoPE, find_rotary_embedding
    from a2ats.hf.calibrate import fit, record

    model = tiny_model("llama")  # 1024 positions: bands of ratio 4 are [0, 256) and [256, 1024)
    seqs = [torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    banded = record(model, seqs, progress=False, band_ratio=4.0)
    w = WRoPE(find_rotary_embedding(model), band_ratio=4.0)
    assert w.bands_for(1024) == 2
    singles = [record(model, seqs, w.band_distance(i), progress=False) for i in range(2)]
    for layer in range(len(banded.h)):
        torch.testing.assert_close(banded.h[layer], singles[0].h[layer] + singles[1].h[layer], rtol=1e-4, atol=1e-4)
        assert torch.equal(banded.keys[layer], singles[0].keys[layer])
    with pytest.raises(ValueError, match=r"band ratio\(s\) \[4.0\].*for 2.0"):
        fit(banded, CodebookSettings(n_centroids=8))
    # one pass can serve several band ratios: the same keys, H per ratio
    both = record(model, seqs, progress=False, band_ratio=4.0, more_band_ratios=(None,))
    paper = record(model, seqs, progress=False)
    for layer in range(len(banded.h)):
        torch.testing.assert_close(both.h_for(4.0)[layer], banded.h[layer])
        torch.testing.assert_close(both.h_for(None)[layer], paper.h[layer])
    cb = fit(banded, CodebookSettings(n_centroids=8, wrope_band_ratio=4.0, max_iter=2, seq_len=16384), progress=False)
    assert cb.settings.tag == "c8-bands4-qa-s16k"


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    cb = random_codebooks(tiny_model("llama"))
    path = cb.save(tmp_path / "cb.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CodebookError, match="corrupt or truncated"):
        Codebooks.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CodebookError, match="corrupt or truncated"):
        Codebooks.load(tmp_path / "junk.safetensors")
    with pytest.raises(CodebookError, match="no codebook file"):
        Codebooks.load(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CodebookError, match="not an a2ats codebook"):
        Codebooks.load(tmp_path / "other.safetensors")
    # Valid container, tampered settings: shapes no longer agree.
    meta = cb.metadata()
    meta["settings"] = json.dumps({**json.loads(meta["settings"]), "n_centroids": 99})
    save_file({"centroids": cb.centroids, "chol": cb.chol}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CodebookError, match="holds 16 centroids but its settings say 99"):
        Codebooks.load(tmp_path / "bad.safetensors")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="int16"):
        CodebookSettings(n_centroids=40000)
    with pytest.raises(ValueError, match="positive number"):
        CodebookSettings(text_tokens=0, uuid_tokens=0)


@pytest.mark.parametrize("family", ["llama", "yarn"])
@pytest.mark.parametrize("band_ratio", [None, 4.0])
def test_rotated_h_equals_h_of_rotated_queries(family, band_ratio):
    """Calibration rotates H once; that must equal H accumulated over the WRoPE-rotated queries themselves."""
    from a2ats.core.rope import WRoPE, find_rotary_embedding
    from a2ats.hf.calibrate import _Recorder

    model = tiny_model(family)
    rec = _Recorder(model, 2048)
    d = model.config.hidden_size // model.config.num_attention_heads
    q = torch.randn(500, d, generator=torch.Generator().manual_seed(0))
    rec.h = [(q.T @ q).double()]
    wrope = WRoPE(find_rotary_embedding(model), 2048, band_ratio)
    bands = wrope.bands_for(model.config.max_position_embeddings)
    rotated = wrope.queries(q, bands).reshape(-1, d).double()
    torch.testing.assert_close(rec.wrope_h(band_ratio)[0], rotated.T @ rotated, rtol=1e-4, atol=1e-3)  # fp32 rotation of q
    assert bands == (1 if band_ratio is None else 2)


def _clustered(seed: int, G: int = 2, clusters: int = 60, per: int = 25, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(G, clusters, d, generator=g) * 3
    return (centers.repeat_interleave(per, dim=1) + torch.randn(G, clusters * per, d, generator=g)).contiguous()


def test_neighbour_lists_hold_each_centroid_first_then_its_nearest():
    from a2ats.core.kmeans import neighbour_lists

    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 50, 7, generator=g)
    lists = neighbour_lists(c, 6)
    assert lists.shape == (2, 50, 6) and lists.dtype == torch.int32
    for gi in range(2):
        dist = torch.cdist(c[gi], c[gi])
        for a in range(50):
            assert int(lists[gi, a, 0]) == a
            assert set(lists[gi, a].tolist()) == set(dist[a].topk(6, largest=False).indices.tolist())
    assert neighbour_lists(c, 80).shape == (2, 50, 50)  # never more candidates than centroids


def test_lloyd_with_neighbour_passes_ends_exactly_and_nearly_as_low_as_full_passes():
    """Neighbour passes search few centroids, the last passes all: the final assignment is each point's nearest
    centroid, and the inertia is within a few percent of Lloyd over all centroids from the same start; with as
    many neighbours as centroids it is Lloyd itself."""
    from a2ats.core.kmeans import kmeans_pp_init, lloyd, sqdist

    x = _clustered(1)
    init = kmeans_pp_init(x, 64, torch.Generator().manual_seed(0))
    full = lloyd(x, init, max_iter=12, tol=0)
    near = lloyd(x, init, max_iter=12, tol=0, neighbours=8)
    assert near.iterations == 12
    best, _ = assign(x, near.centroids)
    torch.testing.assert_close(near.inertia, sqdist(x, near.centroids, best).mean(-1))  # the final pass is exact
    assert bool((near.inertia <= full.inertia * 1.05).all())
    same = lloyd(x, init, max_iter=12, tol=0, neighbours=64)
    torch.testing.assert_close(same.centroids, full.centroids)
    # converged during a neighbour pass: an exact pass still follows (and, converged too, ends the run)
    early = lloyd(x, init, max_iter=50, tol=1e3, neighbours=8)
    assert early.iterations == 2
    best, _ = assign(x, early.centroids)
    torch.testing.assert_close(early.inertia, sqdist(x, early.centroids, best).mean(-1))


def test_codebook_settings_refuse_negative_neighbours():
    with pytest.raises(ValueError, match="kmeans_neighbours"):
        CodebookSettings(kmeans_neighbours=-1)
