"""The weight-format quality measure: the model computing as each format's decode kernels do, then its own weights
back."""

import torch

from a2ats.bench.weights import decode_bytes, perplexity, weights_as
from a2ats.kernels import weights as packed_weights
from conftest import tiny_model


def test_weights_as_swaps_every_decode_linear_and_restores_them():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2 and Qwen2.5-0.5B are
    windows = [torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    own = perplexity(model, windows)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with weights_as(model, "model"):
        assert perplexity(model, windows) == own
    down = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, down.in_features, generator=torch.Generator().manual_seed(9))
    own_down = down(x)
    for fmt in packed_weights.FORMATS:
        with weights_as(model, fmt):
            p = packed_weights.pack(before["model.layers.1.mlp.down_proj.weight"], fmt)
            assert torch.equal(down.weight, packed_weights.unpack(p))
            # the linear computes what the decode kernels do: int8 and int4 quantize its input too
            assert torch.equal(down(x), packed_weights.reference(x, p))
            # the LM head is swapped, the embedding it was tied to is not (the engine's embedding reads the model's)
            assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
            assert not torch.equal(model.lm_head.weight, before["model.embed_tokens.weight"])
            ppl = perplexity(model, windows)
        assert ppl != own and abs(ppl / own - 1) < 0.5
    for n, p in model.named_parameters():  # all restored, the tie included
        assert torch.equal(p, before[n]), n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(down(x), own_down)  # the input quantization is gone too
    assert decode_bytes(model, "int8") * 4 == decode_bytes(model, "model")
