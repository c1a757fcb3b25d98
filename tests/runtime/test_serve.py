"""Engine.serve (continuous batching, K/V on the host) against the engine's reference path,
sequence by sequence: same tokens, same selections, close logits; preflight and failure handling."""

import dataclasses

import pytest
import torch

from a2ats import A2ATSConfig
from a2ats.runtime import Engine, Request, ServeError
from a2ats.runtime.preflight import GiB, PreflightError, plan
from agreement import assert_paths_agree
from conftest import FAMILIES, padded_batch, random_codebooks, tiny_model

LENGTHS = (300, 201, 257, 45, 130)


def _requests(lengths=LENGTHS, seed=3, new=(5, 9, 3, 7, 4)):
    ids, mask = padded_batch(seed=seed, lengths=lengths)
    return [Request(ids[i][mask[i].bool()].tolist(), max_new_tokens=new[i % len(new)]) for i in range(len(lengths))]


def _alone(engine, r, eos=None):
    """The reference: the sequence decoded alone (batch of one) by the lean engine."""
    return engine.generate(torch.tensor([r.prompt]), max_new_tokens=r.max_new_tokens, eos_token_id=eos, keep_logits=True,
                           trace=True)


def _assert_same_sets(trace, request: int, alone):
    """Request ``request``'s selections in the server equal those of its sequence decoded alone, step for step."""
    layers = {layer for layer, _ in alone.sets}
    assert alone.steps() > 0
    for layer in layers:
        assert trace.sets[(layer, request)] == alone.sets[(layer, 0)]


def _assert_same(completion, out):
    assert completion.tokens == out.tokens[0, : out.new_tokens[0]].tolist()
    assert len(completion.logits) == len(completion.tokens)
    for a, b in zip(completion.logits, out.logits):
        torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-4)


CASES = [(f, 2, 128, "offload", 1) for f in FAMILIES] + [
    ("llama", 1, 4096, "offload", 1), ("llama", 3, 77, "offload", 2), ("llama3", 3, 77, "local", 3),
    ("qwen2", 1, 64, "local", 2), ("qwen3", 4, 100, "offload", 3)]


@pytest.mark.parametrize("family,slots,chunk,placement,overlap", CASES)
def test_serve_equals_reference_path_per_sequence(family, slots, chunk, placement, overlap):
    """Five prompts of odd lengths through fewer slots (admission as slots free up), chunked prefill,
    decode steps split into micro-batches (``overlap``)."""
    model = tiny_model(family)
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8, reduction="max" if overlap == 3 else "union")
    reqs = _requests()
    srv = Engine(model, cb, cfg, slots=slots, max_context=320, prefill_chunk=chunk, placement=placement, overlap=overlap, dense_below=0, decode_weights="model", prefill_dtype="model")
    if overlap == 2:  # the selection thread a CUDA accelerator uses for overlap, forced on here
        from concurrent.futures import ThreadPoolExecutor

        srv.runner.pool = ThreadPoolExecutor(1)
    finished = []
    res = srv.serve(reqs, keep_logits=True, on_finish=lambda i, c: finished.append(i), trace=True)
    assert sorted(finished) == list(range(len(reqs)))
    ref = Engine(model, cb, cfg, path="reference", decode_weights="model", prefill_dtype="model")
    for i, (r, c) in enumerate(zip(reqs, res.completions)):
        out = _alone(ref, r)
        _assert_same(c, out)
        assert c.finish_reason == "length" and c.prompt_tokens == len(r.prompt)
        _assert_same_sets(res.trace, i, out.trace)
    assert res.decode_tokens == sum(r.max_new_tokens - 1 for r in reqs)
    assert res.tokens_per_s > 0 and res.crossed_bytes > 0


@pytest.mark.parametrize("window,slots", [(1, 2), (2, 3), (5, 2)])
def test_deferred_key_encoding_across_slots_out_of_phase(window, slots):
    """Generations much longer than the window: keys are encoded in batches as they near the window's
    edge, with slots admitted at different steps (out of phase); same tokens and selections as alone."""
    model = tiny_model("llama")
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=window)
    reqs = _requests(new=(12, 7, 15, 5, 10))
    res = Engine(model, cb, cfg, placement="offload", slots=slots, max_context=320, prefill_chunk=128, dense_below=0, decode_weights="model", prefill_dtype="model").serve(reqs, keep_logits=True, trace=True)
    ref = Engine(model, cb, cfg, path="reference", decode_weights="model", prefill_dtype="model")
    for i, (r, c) in enumerate(zip(reqs, res.completions)):
        out = _alone(ref, r)
        _assert_same(c, out)
        _assert_same_sets(res.trace, i, out.trace)


def test_serve_banded_and_eos():
    """Banded WRoPE offsets per slot; a sequence ending on EOS frees its slot for the next at once."""
    model = tiny_model("llama")
    cb = random_codebooks(model)
    cb.settings = dataclasses.replace(cb.settings, wrope_band_ratio=2.0)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8, wrope_band_ratio=2.0)
    reqs = _requests(new=(12,))
    ref = Engine(model, cb, cfg, path="reference", decode_weights="model", prefill_dtype="model")
    outs = [_alone(ref, r) for r in reqs]
    eos = outs[1].tokens[0, 3].item()  # a token the second sequence produces at its 4th step
    srv = Engine(model, cb, cfg, placement="offload", slots=2, max_context=320, prefill_chunk=100, dense_below=0, decode_weights="model", prefill_dtype="model")
    res = srv.serve(reqs, eos_token_id=eos, keep_logits=True)
    for r, c in zip(reqs, res.completions):
        out = _alone(ref, r, eos)
        _assert_same(c, out)
        assert c.finish_reason == ("eos" if c.tokens[-1] == eos else "length")
    assert res.completions[1].finish_reason == "eos" and len(res.completions[1].tokens) <= 4


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_compact_host_cache_keeps_selections_and_stays_close(dense, kv_dtype):
    """K/V stored in bf16, or int8 with a scale per row, under an fp32 model: while the tokens agree, the same
    selections up to near-ties (codes come from fp32 keys; only the queries move) and logits within the rounding
    of the fp32 cache's. A random tiny model's top two logits can sit closer than that rounding, so a greedy
    token may differ there, and only there."""
    model = tiny_model("qwen2")
    cb = None if dense else random_codebooks(model)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8)
    reqs = _requests(new=(6,))
    runs = [Engine(model, cb, cfg, placement="offload", slots=2, max_context=320, prefill_chunk=100, kv_dtype=dt, dense_below=0, decode_weights="model", prefill_dtype="model").serve(reqs, keep_logits=True,
                                                                                                   trace=True)
            for dt in (None, kv_dtype)]
    assert Engine(model, cb, cfg, placement="offload", slots=1, max_context=320, kv_dtype=kv_dtype, dense_below=0, decode_weights="model", prefill_dtype="model").cache.k[0].dtype == kv_dtype
    tokens = [torch.tensor([c.tokens for c in r.completions]) for r in runs]
    logits = [[torch.stack(step) for step in zip(*[c.logits for c in r.completions])] for r in runs]
    traces = [None if dense else r.trace for r in runs]
    report = assert_paths_agree(tokens[0], logits[0], traces[0], tokens[1], logits[1], traces[1], logit_tol=0.05,
                                logit_rtol=0)
    # decode steps really read the compact cache (the first token comes from the prefill's own k/v)
    same_inputs = [(b, i) for b, r in report.items() for i in range(1, min(r["token_diff"] + 1, len(logits[0])))]
    assert same_inputs
    assert all(not torch.equal(logits[0][i][b], logits[1][i][b]) for b, i in same_inputs)


def test_dense_serve_equals_dense_generate():
    model = tiny_model("qwen3")
    reqs = _requests()
    res = Engine(model, None, placement="offload", slots=3, max_context=320, prefill_chunk=64, decode_weights="model", prefill_dtype="model").serve(reqs, keep_logits=True)
    ref = Engine(model, decode_weights="model", prefill_dtype="model")
    for r, c in zip(reqs, res.completions):
        _assert_same(c, _alone(ref, r))
    assert res.stats is None


def test_left_padded_batch_through_generate():
    model = tiny_model("mistral")
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8)
    ids, mask = padded_batch(seed=5, lengths=(120, 33, 97))
    res = Engine(model, cb, cfg, placement="offload", slots=2, max_context=200, dense_below=0, decode_weights="model", prefill_dtype="model").generate(ids, mask, max_new_tokens=6)
    ref = Engine(model, cb, cfg, path="reference", decode_weights="model", prefill_dtype="model").generate(ids, mask, max_new_tokens=6)
    assert torch.equal(res.tokens, ref.tokens)


def test_failure_mid_run_keeps_finished_sequences(monkeypatch):
    model = tiny_model("llama")
    srv = Engine(model, random_codebooks(model), A2ATSConfig(budget=0.05, sinks=2, window=8), placement="offload", slots=1, max_context=320, dense_below=0, decode_weights="model", prefill_dtype="model")
    reqs = _requests(new=(3,))
    calls = {"n": 0}
    forward = srv.lean.forward

    def flaky(ids, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # a decode step of the third sequence (two for each before it; prefill runs by layers)
            raise RuntimeError("device lost")
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(srv.lean, "forward", flaky)
    with pytest.raises(ServeError, match="after 2 of 5 sequences finished: device lost") as e:
        srv.serve(reqs)
    got = e.value.completions
    assert [c is not None for c in got] == [True, True, False, False, False]
    assert all(len(c.tokens) == 3 for c in got[:2])
    monkeypatch.setattr(srv.lean, "forward", forward)
    assert srv.serve(reqs[:2]).completions[0].tokens == got[0].tokens  # the server is usable again


def test_preflight_refuses_with_the_largest_batch_that_fits():
    model = tiny_model("llama")
    p = plan(2, 8, 2, 6, 16, 1024, torch.float32, torch.device("cpu"), torch.device("cpu"), 256, host_free=GiB)
    assert p.largest_batch() > 8
    p.check()
    per = p.per_slot.host + p.per_slot.accelerator
    free = p.workspace + 3 * per + per // 2
    with pytest.raises(PreflightError, match="does not fit in host memory.*largest batch that fits is 3"):
        Engine(model, random_codebooks(model), placement="offload", slots=8, max_context=1024, prefill_chunk=256, host_free=free, dense_below=0, decode_weights="model", prefill_dtype="model")
    Engine(model, random_codebooks(model), placement="offload", slots=3, max_context=1024, prefill_chunk=256, host_free=free, dense_below=0, decode_weights="model", prefill_dtype="model")
    # a separate accelerator: codes there, K/V on the host; each side bounds the batch
    p = plan(2, 8, 2, 6, 16, 1024, torch.float32, torch.device("cuda"), torch.device("cpu"), 256,
             host_free=10 * p.per_slot.host, accelerator_free=p.workspace + 2 * p.per_slot.accelerator)
    assert p.largest_batch() == 2
    with pytest.raises(PreflightError, match="accelerator needs"):
        p.check()


def test_serve_errors_are_clear():
    model = tiny_model("llama")
    srv = Engine(model, random_codebooks(model), placement="offload", slots=2, max_context=128, dense_below=0, decode_weights="model", prefill_dtype="model")
    with pytest.raises(ValueError, match="exceeds the engine's max_context of 128"):
        srv.serve([Request([5] * 100, max_new_tokens=40)])
    with pytest.raises(ValueError, match="non-empty prompt"):
        Request([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([3], max_new_tokens=0)
    with pytest.raises(ValueError, match="overlap"):
        Engine(model, placement="offload", slots=1, overlap=0, decode_weights="model", prefill_dtype="model")
    with pytest.raises(ValueError, match="placement"):
        Engine(model, slots=1, placement="gpu", decode_weights="model", prefill_dtype="model")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(model, placement="offload", slots=1, max_context=4096, decode_weights="model", prefill_dtype="model")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serve_on_cuda_equals_cpu():
    model = tiny_model("llama")
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.05, sinks=2, window=8)
    reqs = _requests()
    cpu = Engine(model, cb, cfg, placement="offload", slots=2, max_context=320, dense_below=0, decode_weights="model", prefill_dtype="model").serve(reqs)
    gpu = Engine(model.cuda(), cb, cfg, placement="offload", slots=2, max_context=320, dense_below=0, decode_weights="model", prefill_dtype="model").serve(reqs)
    assert [c.tokens for c in gpu.completions] == [c.tokens for c in cpu.completions]
