"""The benchmarks run end to end on a tiny model (their figures are not checked here: speed lives in `a2ats bench`)."""

import torch

from a2ats import A2ATSConfig
from a2ats.bench import VARIANTS as ALL_VARIANTS
from a2ats.bench.decode import bench_decode, rows_to_json
from a2ats.bench.report import decode_plot, decode_table
from conftest import random_codebooks, tiny_model

VARIANTS = [v for v in ALL_VARIANTS if v != "llama.cpp"]  # llama.cpp runs the real GGUF: tested below


def test_decode_bench_runs_every_variant(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    rows, prefill = bench_decode(model, None, random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8),
                                 lengths=(200, 333), variants=VARIANTS, steps=2, warmup=1, text_ids=ids,
                                 log=lambda *_: None, dense_below=0)  # selection timed at every length
    assert {(r.variant, r.context) for r in rows} == {(v, n) for v in VARIANTS for n in (200, 333)}
    assert all(r.ms_per_token > 0 and r.steps == 2 for r in rows)
    fast = [r for r in rows if r.variant.startswith("a2ats-fast")]
    # sinks + window + a union of 3 heads' top-10% at most: fewer than the context, more than sinks + window
    assert all(10 < r.attended < r.context for r in fast)
    assert set(fast[0].breakdown_ms) == {"weights", "scoring", "attention", "rest"}
    assert prefill["tokens"] == 150 and 0 <= prefill["encoding_share"] < 1 and prefill["host_read_gbps"] > 0
    # every lean-engine row accounts for its bytes against the bandwidth measured in the run; the others cannot
    accounted = {r.variant for r in rows if r.accounting}
    assert accounted == {v for v in VARIANTS if v.startswith(("a2ats-fast", "dense-lean"))}
    # a tiny model's floor is microseconds: its share of a loaded machine's step may round to 0 at three decimals
    assert all(r.accounting["share_of_floor"] >= 0 and r.accounting["bytes"]["weights"] > 0 for r in rows if r.accounting)
    assert all(r.accounting["bytes"]["scoring"] == 0 for r in rows if r.variant.startswith("dense-lean"))
    table = decode_table(rows_to_json(rows))
    assert "speedup of a2ats-fast over dense-hf" in table and "a2ats-fast-bf16w per step" in table
    assert "share of the floor" in table
    decode_plot(rows_to_json(rows), tmp_path / "d.png", "t")
    assert (tmp_path / "d.png").stat().st_size > 0


def test_kernel_bench_runs_and_reports_every_rate():
    import pytest

    from a2ats.kernels import cpu_backend

    if cpu_backend() is None:
        pytest.skip("CPU kernels not built here")
    from a2ats.bench.kernels import bench_kernels

    res = bench_kernels(n=1000, repeats=2, C=64)
    for key in ("score_select_token_heads_per_s", "attention_gbps", "lookup_tables_gbps", "encode_keys_per_s",
                "host_read_gbps"):
        assert res[key] > 0, key


def test_throughput_bench_runs_both_systems(tmp_path):
    from a2ats.bench.report import throughput_plot, throughput_table
    from a2ats.bench.throughput import SYSTEMS, bench_served, bench_throughput
    from a2ats.bench.throughput import rows_to_json as throughput_json

    model = tiny_model("llama")
    cb = random_codebooks(model)
    cfg = A2ATSConfig(budget=0.1, sinks=2, window=8)
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    rows = bench_throughput(model, None, cb, cfg, lengths=(200, 333), batches=(1, 3), steps=2, warmup=1, text_ids=ids,
                            log=lambda *_: None)
    assert {(r.system, r.context, r.batch) for r in rows} == {(s, n, b) for s in SYSTEMS for n in (200, 333) for b in (1, 3)}
    a2 = [r for r in rows if r.system == "a2ats-offload"]
    assert all(10 < r.attended < r.context and r.crossed_kib_per_step > 0 and r.largest_batch >= r.batch for r in a2)
    assert all(r.tokens_per_s > 0 and set(r.breakdown_ms) >= {"scoring", "host attention", "transfers"} for r in rows)
    # the floor: the weights read once per step whatever the batch; every sequence's K/V (full attention: all of it)
    at = {(r.system, r.context, r.batch): r.floor for r in rows}
    d = model.config.hidden_size // model.config.num_attention_heads
    rows_as = {2 * d * 2, 2 * d * 4}  # a token's K and V as the cache stores them (bf16, or the model's fp32)
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    for n in (200, 333):
        full1, full3 = at["full-local", n, 1], at["full-local", n, 3]
        assert full1["bytes"]["weights"] == full3["bytes"]["weights"] > 0 and full1["bytes"]["scoring"] == 0
        assert full3["bytes"]["attention"] == 3 * full1["bytes"]["attention"]
        assert full1["bytes"]["attention"] / (heads * n) in rows_as
        a1, a3 = at["a2ats-offload", n, 1], at["a2ats-offload", n, 3]
        assert a1["bytes"]["scoring"] < a3["bytes"]["scoring"] < 3 * a1["bytes"]["scoring"]  # centroids once
        assert 0 < a1["bytes"]["attention"] < full1["bytes"]["attention"]
        assert all(0 <= f["share_of_floor"] < 1 and f["host_gbps"] > 0 for f in (full1, full3, a1, a3))  # tiny: ~0
    table = throughput_table(throughput_json(rows))
    assert "| 333 | 3 |" in table and "a2ats-offload per step" in table and " GB/s |" in table
    throughput_plot(throughput_json(rows), tmp_path / "t.png", "t")
    assert (tmp_path / "t.png").stat().st_size > 0
    prompts = [ids[0, : 100 + 7 * i].tolist() for i in range(4)]
    served = bench_served(model, None, cb, cfg, slots=2, new_tokens=4, prompts=prompts, log=lambda *_: None)
    assert [s["system"] for s in served] == list(SYSTEMS)
    assert all(s["served_tokens_per_s"] > 0 and s["requests"] == 4 for s in served)
    # variants by name: micro-batches, bf16 K/V; nonsense is refused by name
    rows = bench_throughput(model, None, cb, cfg, lengths=(200,), batches=(3,), steps=1, warmup=0, text_ids=ids,
                            systems=("a2ats-offload-x2-kvbf16", "full-local-kvbf16", "a2ats-offload-kvint8"),
                            log=lambda *_: None)
    assert [r.system for r in rows] == ["a2ats-offload-x2-kvbf16", "full-local-kvbf16", "a2ats-offload-kvint8"]
    # a compact cache is filled through its quantizer: it holds the tiled prefill, not a cast of it
    from a2ats.bench.synthetic import real_prefill, tile
    from a2ats.bench.throughput import engine_for
    from a2ats.runtime import Engine, Request

    state, _ = real_prefill(Engine(model, cb, cfg, decode_weights="model", prefill_dtype="model"), ids)
    tiled = tile(state, 180)
    assert torch.equal(tiled.k[1][:, 150:], state.k[1][:, :30]) and torch.equal(tiled.codes[0][:, :150], state.codes[0])
    eng = engine_for(model, cb, cfg, "a2ats-offload-kvint8", 2, 200)
    prompt = ids[0].tolist() + ids[0, :31].tolist()
    held = eng.serve([Request(prompt, 1, kv=tiled, keep_kv=True) for _ in range(2)]).completions
    for c in held:
        torch.testing.assert_close(c.kv.k[1][:, :180], tiled.k[1], atol=0.05, rtol=0.02)
        torch.testing.assert_close(c.kv.v[1][:, :180], tiled.v[1], atol=0.05, rtol=0.02)
        assert not torch.equal(c.kv.k[1][:, :180], tiled.k[1])  # rounded through int8, not a copy
        assert torch.equal(c.kv.codes[1][:, :180], tiled.codes[1])
    import pytest

    # the tiles' baseline: int8 decode weights kept by rows in that engine alone
    from a2ats.kernels import weights as packed_weights

    rows_eng = engine_for(model, cb, cfg, "a2ats-offload-kvint8-int8rows", 2, 200, decode_weights="int8")
    assert rows_eng.lean.lm_head_packed.layout == "rows" and not packed_weights._rows_only
    assert engine_for(model, cb, cfg, "a2ats-offload", 2, 200, decode_weights="int8").lean.lm_head_packed.layout == (
        packed_weights.for_kernel(packed_weights.pack(torch.ones(2, 32), "int8")).layout)
    with pytest.raises(ValueError, match="full-local-x2"):
        bench_throughput(model, None, cb, cfg, lengths=(200,), batches=(1,), text_ids=ids, systems=("full-local-x2",))


def test_llamacpp_variant_is_optional_and_runs_when_installed():
    import pytest

    from a2ats.bench import llamacpp

    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    if not llamacpp.available():
        with pytest.raises(ValueError, match="pip install llama-cpp-python"):
            bench_decode(model, None, random_codebooks(model), A2ATSConfig(), lengths=(200,), variants=("llama.cpp",),
                         text_ids=ids, log=lambda *_: None)
        return
    # the embedded GGUF (SmolLM2-135M), a short context: it runs and times every step
    (length, times), = llamacpp.bench_llamacpp(ids, [300], steps=2, warmup=1, log=lambda *_: None)
    assert length == 300 and len(times) == 2 and all(t > 0 for t in times)


def test_prefill_bench_times_each_system():
    from a2ats.bench.prefill import bench_prefill, prefill_table, rows_to_json

    model = tiny_model("qwen2")
    ids = torch.randint(3, 97, (1, 50), generator=torch.Generator().manual_seed(1))
    rows = bench_prefill(model, random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8), ids,
                         lengths=(120, 300), systems=("a2ats", "a2ats-fp32", "dense"), log=lambda *_: None)
    assert [(r.system, r.tokens) for r in rows] == [(s, n) for n in (120, 300) for s in ("a2ats", "a2ats-fp32", "dense")]
    assert all(r.seconds > 0 and abs(r.tokens_per_s * r.seconds - r.tokens) < 1e-6 * r.tokens for r in rows)
    assert "| a2ats-fp32 |" in prefill_table(rows_to_json(rows))
    import pytest

    with pytest.raises(ValueError, match="unknown prefill system"):
        bench_prefill(model, None, A2ATSConfig(), ids, systems=("vllm",))
