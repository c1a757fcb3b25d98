"""The lean engine against the transformers reference path: same tokens, same selections, close logits."""

import dataclasses

import pytest
import torch

from a2ats import A2ATS, A2ATSConfig, kernels
from a2ats.core.rope import find_rotary_embedding, undo_rotation
from a2ats.kernels import weights as packed_weights
from a2ats.runtime import Engine, Request
from conftest import FAMILIES, padded_batch, random_codebooks, tiny_model

GEN = dict(do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
PATHS = ["reference", pytest.param("fast", marks=pytest.mark.skipif(
    kernels.cpu_backend() is None, reason="CPU kernels could not be built here"))]


def _hf(model, ids, mask, n):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **GEN)


def _assert_logits_close(ours, theirs, tol: float = 1e-4):
    """Per new token, the rows still running (a row that ended has NaN logits here; transformers goes on
    computing its padding's)."""
    for a, b in zip(ours, theirs, strict=True):
        live = ~a.isnan().any(-1)
        assert live.any()
        torch.testing.assert_close(a[live], b[live], rtol=tol, atol=tol)


def _codebooks(model, bands):
    """Random codebooks, marked as calibrated for ``bands`` (the default is banded, ratio 2)."""
    cb = random_codebooks(model)
    cb.settings = dataclasses.replace(cb.settings, wrope_band_ratio=bands)
    return cb


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bands", [None, 2.0])
def test_engine_equals_reference_path(family, path, bands):
    """Left-padded batch, odd lengths, a budget that really selects: tokens equal, logits close."""
    # GQA reduction "max" (K per KV head) on half the cases
    reduction = "max" if (FAMILIES.index(family) + (bands is None)) % 2 else "union"
    model = tiny_model(family)
    ids, mask = padded_batch(seed=3, lengths=(300, 201, 257))
    cb = _codebooks(model, bands)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8, wrope_band_ratio=bands, reduction=reduction)
    with A2ATS(model, cb, cfg, trace=True) as a2:
        ref = _hf(model, ids, mask, 10)
    eng = Engine(model, cb, cfg, path=path, dense_below=0, decode_weights="model", prefill_dtype="model")
    out = eng.generate(ids, mask, max_new_tokens=10, eos_token_id=model.generation_config.eos_token_id,
                       pad_token_id=0, keep_logits=True, trace=True)
    assert eng.path == path
    assert torch.equal(out.tokens, ref.sequences[:, ids.shape[1]:])
    _assert_logits_close(out.logits, ref.scores)
    # the same selections: every decode step's token set, per layer, row and KV head
    # (transformers goes on decoding a row's padding after its EOS; the engine stops it there)
    assert out.trace.steps() == 9 and out.trace.sets.keys() == a2.trace.sets.keys()
    for (layer, row), sets in out.trace.sets.items():
        assert len(sets) == out.new_tokens[row] - 1 and sets == a2.trace.sets[(layer, row)][: len(sets)]
    assert 0 < out.attended < 0.5 * 300


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [1, 3])
def test_deferred_key_encoding_matches_per_step_encoding(path, window):
    """Decode keys are encoded in batches when they leave the window: many flushes, same tokens and codes."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seed=5, lengths=(120, 77))
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.1, sinks=2, window=window)
    with A2ATS(model, cb, cfg):
        ref = _hf(model, ids, mask, 17)
    eng = Engine(model, cb, cfg, path=path, dense_below=0, decode_weights="model", prefill_dtype="model")
    out = eng.generate(ids, mask, max_new_tokens=17, eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    assert torch.equal(out.tokens, ref.sequences[:, ids.shape[1]:])
    # The codes the slot holds equal a direct encoding of its (un-rotated) keys, prompt and decoded alike.
    prompt = ids[1][mask[1].bool()].tolist()
    done = eng.serve([Request(prompt, 17, keep_kv=True)]).completions[0]
    kv = done.kv
    assert kv.length == len(prompt) + 16  # the last token is produced, never cached
    encoded = kv.length - window  # keys still in the window may wait for their codes
    positions = torch.arange(kv.length)[None]
    cos, sin = find_rotary_embedding(model)(kv.k[0][None], positions)
    for layer in (0, len(kv.k) - 1):
        k_pre = undo_rotation(kv.k[layer][None], cos, sin)
        want = cb.encode(layer, k_pre)[0]
        assert torch.equal(kv.codes[layer][:, :encoded], want[:, :encoded])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", packed_weights.FORMATS)
def test_compact_decode_weights_equal_the_model_with_those_weights(family, path, fmt):
    """decode_weights=fmt is the model with its projection and LM-head weights replaced by what the format
    stores (weights.unpack), computing as the format computes (weights.reference: int8 and int4 quantize a decode
    step's activations): on a model whose weights already are such values, the engine matches the transformers
    reference path computing the same way, token for token."""
    model = tiny_model(family)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(packed_weights.unpack(packed_weights.pack(m.weight, fmt)))
    ids, mask = padded_batch(seed=4, lengths=(150, 99))
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.1, sinks=2, window=8)

    def as_the_format(module, args):  # int8/int4 quantize a decode step's activations (one token a row)
        return (packed_weights.activations(args[0], fmt),) if args[0].shape[-2] == 1 else None

    hooks = [m.register_forward_pre_hook(as_the_format) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with A2ATS(model, cb, cfg):
            ref = _hf(model, ids, mask, 8)
    finally:
        for h in hooks:
            h.remove()
    eng = Engine(model, cb, cfg, path=path, dense_below=0, decode_weights=fmt, prefill_dtype="model")
    assert eng.lean.decode_weights == fmt and eng.lean.layers[0].packed["qkv"].fmt == fmt
    out = eng.generate(ids, mask, max_new_tokens=8, eos_token_id=model.generation_config.eos_token_id,
                       pad_token_id=0, keep_logits=True)
    assert torch.equal(out.tokens, ref.sequences[:, ids.shape[1]:])
    # quantized activations: a last-bit difference in a block's input (fused vs separate projections) can move a
    # value across a rounding step of the int8 grid, so the logits agree to that step, not to fp32 rounding
    _assert_logits_close(out.logits, ref.scores, 1e-4 if fmt == "bf16" else 2e-2)


def test_bf16_prefill_is_the_fp32_prefill_within_bf16_rounding(monkeypatch):
    """prefill_dtype="bf16": the prompt's keys and values (and so every later token) within bf16 rounding of the
    fp32 prefill's; decode steps stay fp32. "auto" picks bf16 only where the CPU multiplies bf16 natively."""
    from a2ats.runtime import model as lean_model

    model = tiny_model("qwen2")
    ids, mask = padded_batch(seed=6, lengths=(150, 99))
    runs = {}
    for dtype in ("model", "bf16"):
        eng = Engine(model, decode_weights="model", prefill_dtype=dtype)
        assert eng.lean.prefill_dtype == dtype
        runs[dtype] = eng.serve([Request(ids[0][mask[0]].tolist(), 1, keep_kv=True)]).completions[0].kv
    for kv_dtype in (torch.float32, torch.bfloat16):  # chunks after the first read the slot's rows as stored
        eng = Engine(model, decode_weights="model", prefill_dtype="bf16", prefill_chunk=40, kv_dtype=kv_dtype)
        runs[kv_dtype] = eng.serve([Request(ids[0][mask[0]].tolist(), 1, keep_kv=True)]).completions[0].kv
    exact, low = runs["model"], runs["bf16"]
    for layer in range(model.config.num_hidden_layers):
        for a, b in ((exact.k[layer], low.k[layer]), (exact.v[layer], low.v[layer])):
            assert not torch.equal(a, b)  # really computed in bf16
            torch.testing.assert_close(b, a, atol=0.05 * float(a.abs().max()), rtol=0.05)
        for chunked in (runs[torch.float32], runs[torch.bfloat16]):
            for a, b in ((low.k[layer], chunked.k[layer]), (low.v[layer], chunked.v[layer])):
                torch.testing.assert_close(b.float(), a.float(), atol=0.02 * float(a.abs().max()), rtol=0.02)
    monkeypatch.setattr(lean_model, "native_bf16", lambda: False)
    assert Engine(model, decode_weights="model").lean.prefill_dtype == "model"
    monkeypatch.setattr(lean_model, "native_bf16", lambda: True)
    assert Engine(model, decode_weights="model").lean.prefill_dtype == "bf16"
    with pytest.raises(ValueError, match="prefill_dtype"):
        Engine(tiny_model("llama").to(torch.bfloat16), prefill_dtype="bf16")
    with pytest.raises(ValueError, match="prefill_dtype"):
        Engine(model, prefill_dtype="fp16")


def test_decode_weight_formats_are_checked():
    model = tiny_model("llama")
    assert Engine(model).lean.decode_weights == "int8"  # auto, on a float32 model
    assert Engine(tiny_model("llama").to(torch.bfloat16)).lean.decode_weights == "model"  # auto keeps a bf16 model's
    with pytest.raises(ValueError, match="float32 models"):
        Engine(tiny_model("llama").to(torch.bfloat16), decode_weights="int8")
    with pytest.raises(ValueError, match="decode_weights"):
        Engine(model, decode_weights="int3")
    odd = tiny_model("llama")
    odd.config.hidden_size = 96  # the projections' input sizes decide; make one not divisible by 32
    odd.model.layers[0].mlp.down_proj = torch.nn.Linear(120, 96, bias=False)
    with pytest.raises(ValueError, match="divisible by 32"):
        Engine(odd, decode_weights="int4")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dense_engine_equals_transformers(family):
    model = tiny_model(family)
    ids, mask = padded_batch(seed=4)
    ref = _hf(model, ids, mask, 8)
    out = Engine(model, decode_weights="model", prefill_dtype="model").generate(ids, mask, max_new_tokens=8, keep_logits=True,
                                 eos_token_id=model.generation_config.eos_token_id)
    assert torch.equal(out.tokens, ref.sequences[:, ids.shape[1]:])
    _assert_logits_close(out.logits, ref.scores)


def test_chunked_prefill_and_cache_growth_change_nothing():
    model = tiny_model("llama")
    ids, mask = padded_batch(seed=5, lengths=(150, 97))
    cb, cfg = random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8)
    one = Engine(model, cb, cfg, path="reference", decode_weights="model", prefill_dtype="model").generate(ids, mask, max_new_tokens=6, keep_logits=True)
    eng = Engine(model, cb, cfg, path="reference", prefill_chunk=37, decode_weights="model", prefill_dtype="model")
    eng.generate(ids[1:, -20:], max_new_tokens=2)  # a small run first: the cache grows for the next
    small = eng.cache.capacity
    chunked = eng.generate(ids, mask, max_new_tokens=6, keep_logits=True)
    assert eng.cache.capacity > small
    assert torch.equal(one.tokens, chunked.tokens)
    for a, b in zip(one.logits, chunked.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padding_on_either_side_and_a_given_cache_change_nothing():
    """Right padding equals left padding; a request whose prompt's cache is given (taken from an earlier run)
    continues exactly as the full prefill does."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seed=8, lengths=(90, 61))
    cb, cfg = random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8)
    eng = Engine(model, cb, cfg, dense_below=0, decode_weights="model", prefill_dtype="model")
    left = eng.generate(ids, mask, max_new_tokens=7, keep_logits=True)
    right_ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right = eng.generate(right_ids, mask.flip(-1), max_new_tokens=7, keep_logits=True)
    assert torch.equal(left.tokens, right.tokens)
    prompt = ids[0].tolist()
    kv = eng.serve([Request(prompt[:70], 1, keep_kv=True)]).completions[0].kv
    assert kv.length == 70
    resumed = eng.serve([Request(prompt, 7, kv=kv)], keep_logits=True).completions[0]
    assert resumed.tokens == left.tokens[0].tolist()
    for a, b in zip(resumed.logits, left.logits):
        torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="all but the prompt's last token"):
        Request(prompt[:70], 3, kv=kv)
    with pytest.raises(ValueError, match="has none"):
        eng.serve([Request(prompt, 3, kv=Engine(model, decode_weights="model", prefill_dtype="model").serve([Request(prompt[:70], 1, keep_kv=True)]).completions[0].kv)])


def test_eos_stops_rows_and_pads_them():
    model = tiny_model("llama")
    ids, mask = padded_batch(seed=6, lengths=(40, 33))
    free = Engine(model, decode_weights="model", prefill_dtype="model").generate(ids, mask, max_new_tokens=6)
    eos = int(free.tokens[0, 2])
    out = Engine(model, decode_weights="model", prefill_dtype="model").generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out.new_tokens[0] <= 3 and int(out.tokens[0, out.new_tokens[0] - 1]) == eos
    assert (out.tokens[0, out.new_tokens[0]:] == 0).all()


def test_engine_errors_are_clear():
    model = tiny_model("llama")
    ids, mask = padded_batch(seed=7, lengths=(20, 10))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the batch hold no tokens"):
        Engine(model, decode_weights="model", prefill_dtype="model").generate(ids, torch.stack([mask[0], torch.zeros_like(mask[1])]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(model, decode_weights="model", prefill_dtype="model").generate(torch.ones(1, 1000, dtype=torch.long), max_new_tokens=100)
    with pytest.raises(ValueError, match="path must be one of"):
        Engine(model, path="gpu", decode_weights="model", prefill_dtype="model")
    import transformers as T
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="lean engine supports"):
        Engine(gpt2, decode_weights="model", prefill_dtype="model")


def test_step_by_step_is_serve():
    """The public step(): a prefill step admits, decode steps produce one token per busy slot; a request added
    while others run and too long for the cache as sized waits until the engine is idle, then the cache grows.
    Tokens equal serve()'s, request by request."""
    model = tiny_model("llama")
    cb, cfg = random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8)
    ids, mask = padded_batch(seed=9, lengths=(80, 51, 140))
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(3)]
    want = [Engine(model, cb, cfg, dense_below=0, decode_weights="model", prefill_dtype="model").serve([Request(p, 6)]).completions[0].tokens for p in prompts]
    eng = Engine(model, cb, cfg, dense_below=0, decode_weights="model", prefill_dtype="model")
    a, b = eng.add(Request(prompts[0], 6)), eng.add(Request(prompts[1], 6))
    first = eng.step()
    assert first.prefill and set(first.tokens) == {a, b} and eng.slots == 2
    small = eng.cache.capacity
    got: dict[int, list[int]] = {a: [first.tokens[a]], b: [first.tokens[b]]}
    c = eng.add(Request(prompts[2], 6))  # 146 tokens: more than the cache as sized for the first two
    seen_c_at = None
    while eng.has_work:
        res = eng.step()
        for i, token in res.tokens.items():
            got.setdefault(i, []).append(token)
        if c in res.tokens and seen_c_at is None:
            seen_c_at = res
    assert seen_c_at.prefill and eng.cache.capacity > small  # admitted only once the engine was idle
    assert [got[a], got[b], got[c]] == want
    assert not eng.step().tokens  # nothing left: an empty step
