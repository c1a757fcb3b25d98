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
        # a third of the streamed ones dropped mid-stream: the rest answered once each, no slot or queue place kept
        dropped = load.soak(s.url, MODEL, [p * 2 for p in many[:120]], clients=12, max_tokens=30, system="tiny",
                            disconnect=0.35, seed=1)
        assert dropped["left"] > 5 and dropped["leaked"] == 0 and dropped["exactly_once"]
        assert dropped["ok"] == 120 - dropped["left"] and dropped["server_answered"] == 120
    table = load.table([row, soak])
    assert "| tiny | 4 | 8 (8) |" in table and "every request answered exactly once" in table


def test_percentile():
    assert load.percentile([], 50) is None
    xs = list(range(1, 101))
    assert load.percentile(xs, 50) == 50 and load.percentile(xs, 99) == 99 and load.percentile(xs, 100) == 100
    assert load.percentile([3.0], 99) == 3.0


def test_docqa_and_chat_workloads_through_the_openai_client():
    """The long-context workloads on a tiny server with a prefix cache: every request answered, the latencies
    recorded per chunk, and the prefix cache hit by every question after a document's first (one slot: the
    questions run in order), by the other document's first (their prompts open alike: the chat template) and by
    every chat turn after a conversation's first."""
    import asyncio

    from a2ats.bench import workloads as w

    tok = tokenizer()
    requests = w.docqa_requests(tok, docs=2, doc_tokens=300, questions=2)
    assert [d for d, _ in requests] == [0, 1, 0, 1]
    assert requests[0][1][1]["content"].split("\n\nQuestion")[0] == requests[2][1][1]["content"].split("\n\nQuestion")[0]
    with running(slots=1, max_context=512, prefix_cache=1 << 30) as s:
        before = load.server_metrics(s.url)
        exchanges, wall = asyncio.run(w.run_docqa(s.url, MODEL, requests, rate=50.0, max_tokens=6))
        row = w.summarize("tiny", "docqa", exchanges, wall)
        row.update(w.prefix_rates(before, load.server_metrics(s.url)))
    assert row["ok"] == row["requests"] == 4 and row["output_tokens"] == 24
    assert row["prefix_hit_rate"] == 0.75 and row["prefix_tokens_reused"] > 2 * 300  # each document whole, twice
    assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert all(len(e["gaps"]) == 5 for e in row["exchanges"])
    # warmed: each document asked once first (not one of its questions), then every question finds it cached
    warm_requests = w.warm_requests(requests)
    assert [d for d, _ in warm_requests] == [0, 1] and all("ready" in m[-1]["content"] for _, m in warm_requests)
    with running(slots=1, max_context=512, prefix_cache=1 << 30) as s:
        warm = asyncio.run(w.warm_docqa(s.url, MODEL, requests))
        before = load.server_metrics(s.url)
        exchanges, wall = asyncio.run(w.run_docqa(s.url, MODEL, requests, rate=50.0, max_tokens=6))
        warmed = w.prefix_rates(before, load.server_metrics(s.url))
    assert [e.status for e in warm] == ["ok", "ok"] and all(e.ttft > 0 and e.tokens == 1 for e in warm)
    assert warmed["prefix_hit_rate"] == 1.0 and all(e.status == "ok" for e in exchanges)
    conversations = w.chat_turns(tok, conversations=2, turns=3, first_tokens=280)
    with running(slots=2, max_context=512, prefix_cache=1 << 30) as s:
        before = load.server_metrics(s.url)
        exchanges, wall = asyncio.run(w.run_chat(s.url, MODEL, conversations, rate=50.0, max_tokens=5))
        chat = w.summarize("tiny", "chat", exchanges, wall)
        chat.update(w.prefix_rates(before, load.server_metrics(s.url)))
    # every later turn hits; the second conversation's first turn hits too (the template's opening) when it arrives
    # after the first one's rows are in (the arrivals are random)
    assert chat["ok"] == chat["requests"] == 6 and chat["prefix_hit_rate"] in (4 / 6, 5 / 6)
    assert sorted((e["conversation"], e["turn"]) for e in chat["exchanges"]) == [(c, t) for c in (0, 1) for t in range(3)]
    table = w.workload_table([row, chat])
    assert "| tiny | docqa | 4 (4) |" in table and "| 0.75 |" in table
