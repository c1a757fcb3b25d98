import pytest
import torch
from transformers import DynamicCache

from a2ats import A2ATS, A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.methods import A2ATSMethod, OracleMethod
from conftest import FAMILIES, padded_batch, random_codebooks, tiny_model

GEN = dict(do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def _gen(model, ids, mask, n=12):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **GEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_dense(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    ref = _gen(model, ids, mask)
    with A2ATS(model, random_codebooks(model), A2ATSConfig(budget=1.0, sinks=4, window=8)) as a2:
        out = _gen(model, ids, mask)
        assert a2.stats.mean_fraction == pytest.approx(1.0)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reduction", ["union", "max"])
def test_padded_batch_rows_equal_their_own_runs(family, reduction):
    """At a real (small) budget, each left-padded row selects and generates as it would alone."""
    model = tiny_model(family)
    ids, mask = padded_batch(seed=1)
    cfg = A2ATSConfig(budget=0.1, sinks=4, window=8, reduction=reduction)
    with A2ATS(model, random_codebooks(model), cfg) as a2:
        batched = _gen(model, ids, mask)
        assert 0.1 < a2.stats.mean_fraction < 0.6  # it really selected
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            alone = _gen(model, ids[i : i + 1, keep], mask[i : i + 1, keep])
            mine = alone.sequences[0, keep.sum() :]  # stops at EOS; the batch pads after it
            assert torch.equal(batched.sequences[i, ids.shape[1] : ids.shape[1] + len(mine)], mine)
            for a, b in zip(batched.scores, alone.scores):
                torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)


def test_small_budget_really_selects():
    """The selection is applied: at 5% the decode-step logits move away from dense (prefill stays dense)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seed=2, lengths=(300,))
    full = _gen(model, ids, mask, n=4).scores
    with A2ATS(model, random_codebooks(model), A2ATSConfig(budget=0.05, sinks=2, window=4)):
        vq = _gen(model, ids, mask, n=4).scores
    assert torch.equal(vq[0], full[0])
    assert all(float((a - b).abs().max()) > 1e-4 for a, b in zip(vq[1:], full[1:]))


def test_oracle_captures_at_least_the_mass_of_any_method():
    """Per query head (no GQA sharing), exact top-K is the most mass any K tokens can hold."""
    import transformers as T

    from a2ats.eval.attention_metrics import attention_mass

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (400,), generator=torch.Generator().manual_seed(3))
    conf = A2ATSConfig(budget=0.05, sinks=2, window=4)
    oracle = attention_mass(model, OracleMethod(), conf, ids, decode_last=6)
    vq_method = A2ATSMethod(random_codebooks(model), WRoPE(find_rotary_embedding(model), 2048))
    vq = attention_mass(model, vq_method, conf, ids, decode_last=6)
    full = attention_mass(model, OracleMethod(), A2ATSConfig(budget=1.0), ids, decode_last=3)
    assert full.mean() == pytest.approx(1.0, abs=1e-5)
    per_o = [v for vs in oracle.mass.values() for v in vs]
    per_v = [v for vs in vq.mass.values() for v in vs]
    assert len(per_o) == len(per_v) == 2 * 6 * 4
    assert all(o >= v - 1e-6 for o, v in zip(per_o, per_v))
    assert oracle.mean() > vq.mean()


def test_context_manager_restores_the_model():
    model = tiny_model("qwen2")
    before = model.config._attn_implementation
    with A2ATS(model, random_codebooks(model)):
        assert model.config._attn_implementation == "a2ats"
        assert "generate" in vars(model)
    assert model.config._attn_implementation == before
    assert "generate" not in vars(model)
    assert not any(hasattr(m, "_a2ats_patch") for m in model.modules())
    ids, mask = padded_batch()
    _gen(model, ids, mask, n=2)  # still a plain working model


def test_errors_are_clear():
    model = tiny_model("llama")
    cb = random_codebooks(model)
    with A2ATS(model, cb) as a2:
        with pytest.raises(TypeError, match="own cache"):
            model(input_ids=torch.ones(1, 5, dtype=torch.long), past_key_values=DynamicCache())
        with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
            model.generate(input_ids=torch.ones(1, 1025, dtype=torch.long), max_new_tokens=1)
        with pytest.raises(ValueError, match="exceeds"):
            a2.check_length(1000, max_new_tokens=30)
    with pytest.raises(ValueError, match="needs codebooks"):
        A2ATS(model)


def test_manual_loop_with_new_cache_matches_generate():
    model = tiny_model("qwen3")
    cb = random_codebooks(model)
    ids, mask = padded_batch(lengths=(120,))
    with A2ATS(model, cb, A2ATSConfig(budget=0.1, sinks=2, window=8)) as a2, torch.inference_mode():
        ref = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = a2.new_cache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        toks = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(5):
            out = model(input_ids=toks[-1], past_key_values=cache, use_cache=True)
            toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        assert cache.layers[0].extra("codes").shape == (1, 2, 125)
    assert torch.equal(ref[0, 120:], torch.cat(toks, -1)[0])


def test_bfloat16_model_full_budget_matches_dense():
    model = tiny_model("qwen3").to(torch.bfloat16)
    ids, mask = padded_batch(seed=4, lengths=(70, 50))
    ref = _gen(model, ids, mask, n=6)
    with A2ATS(model, random_codebooks(model), A2ATSConfig(budget=1.0, sinks=2, window=4)):
        out = _gen(model, ids, mask, n=6)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_banded_wrope_padded_rows_equal_their_own_runs(family):
    """Banded WRoPE scores by distance from each row's newest token: padding must not shift the bands."""
    import dataclasses

    from a2ats.core.codebook import CodebookError

    model = tiny_model(family)
    cb = random_codebooks(model)  # banded (ratio 2), the default; the paper's single distance needs its own
    assert cb.settings.wrope_band_ratio == 2.0
    with pytest.raises(CodebookError, match="bands of ratio 2.*the paper's single distance"):
        A2ATS(model, cb, A2ATSConfig(wrope_band_ratio=None))
    banded = cb.settings
    cb.settings = dataclasses.replace(banded, wrope_band_ratio=None)  # as if calibrated for the paper's WRoPE
    with pytest.raises(CodebookError, match="single distance.*bands of ratio 2"):
        A2ATS(model, cb, A2ATSConfig())
    cb.settings = banded
    ids, mask = padded_batch(seed=2, lengths=(300, 201, 257))  # bands from 64: [0, 128), [128, 256), [256, 512)
    cfg = A2ATSConfig(budget=0.1, sinks=2, window=8, wrope_band_ratio=2.0)
    with A2ATS(model, cb, cfg) as a2:
        assert a2.method.name == "a2ats-banded"
        batched = _gen(model, ids, mask)
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            alone = _gen(model, ids[i : i + 1, keep], mask[i : i + 1, keep])
            mine = alone.sequences[0, keep.sum() :]
            assert torch.equal(batched.sequences[i, ids.shape[1] : ids.shape[1] + len(mine)], mine)


@pytest.mark.parametrize("family,bands,reduction", [("llama", None, "union"), ("llama", 2.0, "union"),
                                                    ("qwen3", None, "union"), ("qwen3", 2.0, "max"), ("llama", None, "max")])
def test_fast_path_equals_reference_path(family, bands, reduction):
    """Kernel selection + sparse attention inside model.generate: same tokens, same selections, close logits."""
    import dataclasses

    from a2ats import kernels

    if kernels.cpu_backend() is None:
        pytest.skip("CPU kernels could not be built here")
    model = tiny_model(family)
    cb = random_codebooks(model)
    cb.settings = dataclasses.replace(cb.settings, wrope_band_ratio=bands)
    ids, mask = padded_batch(seed=8, lengths=(300, 201, 257))
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8, wrope_band_ratio=bands, reduction=reduction)
    runs = {}
    for path in ("reference", "fast"):
        with A2ATS(model, cb, cfg, path=path, trace=True) as a2:
            assert a2.path == path
            runs[path] = (_gen(model, ids, mask), a2.trace)
    (ref, ref_trace), (fast, fast_trace) = runs["reference"], runs["fast"]
    assert torch.equal(ref.sequences, fast.sequences)
    assert ref_trace.steps() > 0 and fast_trace.sets == ref_trace.sets  # token for token, every step and layer
    assert any(len(s) < 100 for sets in ref_trace.sets.values() for step in sets for s in step)  # it selected
    for a, b in zip(ref.scores, fast.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fast_path_refuses_what_it_does_not_serve():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="path must be one of"):
        A2ATS(model, random_codebooks(model), path="gpu")
    with pytest.raises(ValueError, match=r"fast path \(the kernels\) serves"):
        A2ATS(model, method=OracleMethod(), path="fast")
    with A2ATS(model, method=OracleMethod()) as a2:
        assert a2.path == "reference"
