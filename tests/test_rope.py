import pytest
import torch

from a2ats.rope import WRoPE, apply_rotation, find_rotary_embedding, rotary_at, undo_rotation

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
