"""`a2ats bench serve`'s load generator against a tiny server: its figures, and a soak run in which every request is
answered exactly once (as the client counts and as the server counts)."""

from __future__ import annotations

from http_harness import MODEL, PROMPTS, running, tokenizer

from a2ats.bench import serve as load


def test_load_and_soak():
    tok = tokenizer()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    with running(slots=4, max_context=256, max_queue=16, dense=False) as s:
        row = load.load(s.url, MODEL, prompts[:8], clients=4, max_tokens=6, system="tiny")
        assert row["ok"] == row["requests"] == 8 and row["errors"] == []
        assert row["output_tokens"] == 48 and row["requests_per_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"]
        assert row["engine_decode_tokens_per_s"] > 0 and row["engine_prefill_tokens_per_s"] > 0
        many = [prompts[i % len(prompts)] for i in range(200)]
        soak = load.soak(s.url, MODEL, many, clients=12, max_tokens=3, system="tiny")
        assert soak["exactly_once"] and soak["ok"] == soak["server_answered"] == soak["unique_ids"] == 200
    table = load.table([row, soak])
    assert "| tiny | 4 | 8 (8) |" in table and "every request answered exactly once" in table


def test_percentile():
    assert load.percentile([], 50) is None
    xs = list(range(1, 101))
    assert load.percentile(xs, 50) == 50 and load.percentile(xs, 99) == 99 and load.percentile(xs, 100) == 100
    assert load.percentile([3.0], 99) == 3.0
