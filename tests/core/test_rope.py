import pytest
import torch

from a2ats.core.rope import (
    WRoPE,
    apply_rotation,
    find_rotary_embedding,
    rotary_at,
    undo_rotation,
)
from conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "llama3", "yarn", "linear", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("m", [2048, 2100, 5000])
def test_wrope_identity(family, m):
    """(R_b q) . k_pre == (R_m q) . (R_{m-b} k_pre): scoring at distance b is true RoPE at distance b."""
    model = tiny_model(family)
    rot = find_rotary_embedding(model)
    b = 2048
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    g = torch.Generator().manual_seed(m)
    q, k = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(5, d, generator=g, dtype=torch.float64)
    lhs = (WRoPE(rot, b).query(q.float()).double() * k).sum(-1)
    cm, sm = rotary_at(rot, m, "cpu")
    cj, sj = rotary_at(rot, m - b, "cpu")
    rhs = (apply_rotation(q.float(), cm[0, 0], sm[0, 0]) * apply_rotation(k.float(), cj[0, 0], sj[0, 0])).sum(-1)
    torch.testing.assert_close(lhs.float(), rhs, rtol=1e-4, atol=1e-4)


def test_undo_rotation_inverts_the_model_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama3")
    rot = find_rotary_embedding(model)
    x = torch.randn(2, 3, 7, 16)
    pos = torch.tensor([[0, 5, 9, 100, 700, 701, 1000], [3, 4, 5, 6, 7, 8, 9]])
    cos, sin = rot(x, position_ids=pos)
    post, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(undo_rotation(post, cos, sin), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotation(x, cos, sin), post, rtol=1e-5, atol=1e-5)


def test_partial_rotary_leaves_the_rest_alone():
    x = torch.randn(4, 10)
    ang = torch.rand(3)
    cos, sin = torch.cat([ang.cos()] * 2), torch.cat([ang.sin()] * 2)  # rot_dim 6 < 10
    y = apply_rotation(x, cos, sin)
    assert torch.equal(y[:, 6:], x[:, 6:])
    torch.testing.assert_close(undo_rotation(y, cos, sin), x)


def test_model_without_rope_is_refused():
    import transformers as T

    from a2ats import A2ATS

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="rotary position embedding"):
        A2ATS(gpt2, method=object())


def test_bands_cut_distances_geometrically():
    w = WRoPE(find_rotary_embedding(tiny_model("llama")), band_ratio=4, first_edge=64)
    d = torch.tensor([0, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 20000])
    assert w.band_of(d).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 4]
    assert [w.band_distance(i) for i in range(4)] == [128, 512, 2048, 8192]
    assert [w.bands_for(n) for n in (1, 256, 257, 1025, 4097)] == [1, 1, 2, 3, 4]
    paper = WRoPE(w.rotary, 2048)
    assert paper.band_of(d).eq(0).all() and paper.bands_for(10**6) == 1 and paper.band_distance(3) == 2048
    with pytest.raises(ValueError, match="band_ratio"):
        WRoPE(w.rotary, band_ratio=1.0)


@pytest.mark.parametrize("family", ["llama", "yarn", "qwen3"])
def test_each_band_is_true_rope_at_its_distance(family):
    model = tiny_model(family)
    rot = find_rotary_embedding(model)
    w = WRoPE(rot, band_ratio=2, first_edge=8)
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    q = torch.randn(3, d, generator=torch.Generator().manual_seed(1))
    qs = w.queries(q, 4)
    assert qs.shape == (3, 4, d)
    for i in range(4):
        torch.testing.assert_close(qs[:, i], WRoPE(rot, w.band_distance(i)).query(q))


@pytest.mark.parametrize("family", ["llama", "yarn", "linear", "qwen3"])
def test_stacked_band_queries_equal_one_rotation_per_band_bit_for_bit(family):
    """The decode step rotates a query for every band at once; the values are the per-band rotations' exactly
    for every rope type the tiny models carry."""
    model = tiny_model(family)
    w = WRoPE(find_rotary_embedding(model), band_ratio=2, first_edge=8)
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    q = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(2))
    for bands in (1, 3, 7):
        got = w.queries(q, bands)
        assert got.shape == (2, 5, bands, d)
        assert torch.equal(got, torch.stack([w.query(q, i) for i in range(bands)], dim=-2))
