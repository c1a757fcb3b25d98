"""The evaluation harness on a tiny random model with the default model's tokenizer."""

import json

import pytest
import torch
import transformers as T

from a2ats import A2ATS, A2ATSConfig
from a2ats.eval import harness, report
from a2ats.eval.prefill import greedy_decode, prefill
from a2ats.hf.generate import encode_prompt
from a2ats.methods import PQCacheMethod, QuestMethod, registry

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def tiny(default_model):
    _, tok = default_model
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return T.LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("method", [QuestMethod(), PQCacheMethod(bits=4)])
def test_shared_prefill_fork_equals_a_fresh_run(tiny, method):
    """Decoding from a fork of the shared dense prefill gives the tokens a fresh generate() gives."""
    model, tok = tiny
    ids = encode_prompt(tok, "alpha beta gamma delta " * 60)
    cfg = A2ATSConfig(budget=0.1)
    pre = prefill(model, ids)
    with A2ATS(model, config=cfg, method=method) as a2:
        forked, why = greedy_decode(model, a2, pre, 8, eos=set())
        fresh = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                               do_sample=False, pad_token_id=tok.pad_token_id)
    assert forked == fresh[0, ids.shape[1]:].tolist() and why == "length"
    # a second fork for the same method copies what the first built (codes, PQ fit) instead of rebuilding it
    assert pre.built[id(method)][0] is method
    keys_seen = []
    real = method.on_append
    method.on_append = lambda layer, store, k_pre, *rest: keys_seen.append(k_pre.shape[2]) or real(layer, store, k_pre, *rest)
    try:
        with A2ATS(model, config=cfg, method=method) as a2:
            again, _ = greedy_decode(model, a2, pre, 8, eos=set())
    finally:
        del method.on_append
    assert again == forked
    assert keys_seen and set(keys_seen) == {1}  # only each decode step's new key, never the prompt's again


def test_decoding_stops_when_the_answer_is_complete_or_at_eos(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "alpha beta gamma delta " * 20)
    pre = prefill(model, ids)
    with A2ATS(model, config=A2ATSConfig(budget=1.0), method=QuestMethod()) as a2:
        full, _ = greedy_decode(model, a2, pre, 10, eos=set())
        three, why = greedy_decode(model, a2, pre, 10, eos=set(), stop=lambda toks: len(toks) >= 3)
        assert (three, why) == (full[:3], "answered")
        at_eos, why = greedy_decode(model, a2, pre, 10, eos={full[4]})
        assert why == "eos" and at_eos == full[: full.index(full[4]) + 1]


def test_bf16_prefill_keeps_the_cache_in_the_models_dtype(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "alpha beta gamma delta " * 30)
    pre32, pre16 = prefill(model, ids), prefill(model, ids, torch.bfloat16)
    for a, b in zip(pre32.cache.layers, pre16.cache.layers):
        assert b.keys.dtype == b.values.dtype == torch.float32
        torch.testing.assert_close(b.keys, a.keys, rtol=0.05, atol=0.05)  # bf16 rounding, not another result
    assert pre16.last_logits.dtype == torch.float32
    with A2ATS(model, config=A2ATSConfig(budget=1.0), method=QuestMethod()) as a2:
        toks, _ = greedy_decode(model, a2, pre16, 4, eos=set())
    assert len(toks) == 4


def test_sweep_writes_rows_table_and_plots(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    cfg = harness.EvalConfig(
        tasks=("niah_single_number_essay", "common_words"), lengths=(700,), budgets=(0.05, 1.0), samples=1,
        methods=("full", "oracle", "streaming", "quest", "pqcache", "a2ats", "a2ats-rerank3"), centroids=16,
        calibration={"text_tokens": 1024, "uuid_tokens": 256, "max_iter": 2},
        attention=True, perplexity=True, decode_last=4, ppl_tokens=6,
    )
    all_rows = harness.run(model, tok, cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    rows = [r for r in all_rows if "score" in r]
    assert len(rows) == 2 * (1 + 6 * 2)
    text = [r for r in all_rows if "score" not in r]
    assert len(text) == 2 * (1 + 6 * 2)  # attention and perplexity rows, per method and budget
    # the re-rank reads its shortlist's keys (3 x K per query head) on top of what the same selection size costs
    for r in (r for r in all_rows if r["method"] == "a2ats-rerank3" and r["budget"] == 0.05 and "bytes_per_step" in r):
        own = harness._bytes("a2ats", r["context_tokens"], r["attended_per_kv_head"], 16)
        assert r["bytes_per_step"] >= own + r["budget_tokens"] * 3 * 16 * 2
    for r in text:
        if r["budget"] == 1.0 and r["task"] == "attention":
            assert r["mass"] == pytest.approx(1.0, abs=1e-5) and r["recall"] == pytest.approx(1.0)
    ppl = {r["method"]: r["perplexity"] for r in text if r["task"] == "perplexity" and r["budget"] == 1.0}
    assert len(set(round(v, 4) for v in ppl.values())) == 1  # every method at full budget = full attention
    assert "| full | 1 |" in report.text_metrics_table(all_rows)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == len(all_rows)
    for task in cfg.tasks:
        full = next(r for r in rows if r["task"] == task and r["method"] == "full")
        # at a budget covering everything, every method decodes exactly what full attention decodes
        for r in rows:
            if r["task"] == task and r["budget"] == 1.0:
                assert r["output"] == full["output"], r["method"]
        small = [r for r in rows if r["task"] == task and r["budget"] == 0.05]
        assert all(r["attended_fraction"] < 0.6 for r in small)
        assert all(r["budget_tokens"] == int(0.05 * r["context_tokens"]) for r in small)
    table = report.summary_table(rows)
    for m in cfg.methods:
        assert f"| {m} |" in table
    paths = report.plots(rows, tmp_path / "out")
    assert all(p.stat().st_size > 1000 for p in paths)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["methods"][0] == "full"


def test_a_run_started_again_resumes_and_adds_only_missing_rows(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    base = dict(tasks=("niah_single_number_essay",), lengths=(500,), budgets=(0.1,), samples=1,
                methods=("full", "streaming"))
    out = tmp_path / "out"
    first = harness.run(model, tok, harness.EvalConfig(**base), out, progress=False, log=lambda *_: None)
    assert [(r["method"], r["seed"]) for r in first] == [("full", 0), ("streaming", 0)]
    calls = []
    real = harness.prefill
    monkeypatch.setattr(harness, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    # same config: nothing is recomputed
    again = harness.run(model, tok, harness.EvalConfig(**base), out, progress=False, log=lambda *_: None)
    assert again == first and not calls
    # a second sample and a '+max' variant: only those rows are added, one prefill per sample that needs one
    more = harness.EvalConfig(**{**base, "samples": 2, "methods": ("full", "streaming", "streaming+max")})
    rows = harness.run(model, tok, more, out, progress=False, log=lambda *_: None)
    assert len(calls) == 2
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        [(m, s) for m in ("full", "streaming", "streaming+max") for s in (0, 1)])
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    # a run with other results-changing settings refuses the folder rather than mixing rows
    with pytest.raises(ValueError, match="other prefill_dtype"):
        harness.run(model, tok, harness.EvalConfig(**{**base, "prefill_dtype": "bfloat16"}), out, progress=False)


def test_jobs_put_samples_outermost_and_needles_alone_at_needle_lengths():
    cfg = harness.EvalConfig(tasks=("niah_multikey", "common_words"), lengths=(100,), needle_lengths=(900,),
                             methods=("full",), budgets=(0.1,), samples=2, task_samples={"common_words": 1})
    assert cfg.jobs() == [("niah_multikey", 100, 0), ("common_words", 100, 0), ("niah_multikey", 900, 0),
                          ("niah_multikey", 100, 1), ("niah_multikey", 900, 1)]
    assert registry.parse_method("a2ats+max") == ("a2ats", "max")
    assert registry.parse_method("a2ats-hybrid0.25") == ("a2ats-hybrid0.25", "union")
    assert registry.parse_method("a2ats-banded-rerank4+max") == ("a2ats-banded-rerank4", "max")
    assert registry.rerank("a2ats-banded-rerank") == ("a2ats-banded", 2.0)
    assert registry.rerank("a2ats-rerank2.5") == ("a2ats", 2.5)
    for bad in ("a2ats+min", "magic+max", "a2ats-rerank0.5", "quest-rerank2", "a2ats-euclid-rerank"):
        with pytest.raises(ValueError, match="unknown method"):
            registry.parse_method(bad)


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown methods"):
        harness.EvalConfig(tasks=("common_words",), lengths=(100,), methods=("magic",), budgets=(0.1,))
    with pytest.raises(ValueError, match="unknown tasks"):
        harness.EvalConfig(tasks=("nope",), lengths=(100,), methods=("full",), budgets=(0.1,))
    with pytest.raises(ValueError, match="fractions"):
        harness.EvalConfig(tasks=("common_words",), lengths=(100,), methods=("full",), budgets=(3.0,))
    for bad in ("a2ats-hybrid2", "a2ats-hybrid-0.5", "a2ats-hybridx"):
        with pytest.raises(ValueError, match="unknown methods"):
            harness.EvalConfig(tasks=("common_words",), lengths=(100,), methods=(bad,), budgets=(0.1,))
    assert [registry.hybrid_share(m) for m in ("a2ats-hybrid", "a2ats-hybrid0.25", "a2ats-hybrid.75", "a2ats-hybrid1")] == [0.5, 0.25, 0.75, 1.0]


def test_task_budgets_cut_the_task_runs_and_keep_every_prose_run():
    cfg = harness.EvalConfig(tasks=("common_words",), lengths=(100,), methods=("full", "oracle", "a2ats"),
                             budgets=(0.1, 0.2), task_budgets={"oracle": (0.2,), "a2ats": ()})
    assert cfg.runs() == [("full", 1.0), ("oracle", 0.1), ("oracle", 0.2), ("a2ats", 0.1), ("a2ats", 0.2)]
    assert cfg.runs(tasks=True) == [("full", 1.0), ("oracle", 0.2)]
    skip_full = harness.EvalConfig(**{**cfg.__dict__, "task_budgets": {"full": ()}})
    assert [m for m, _ in skip_full.runs(tasks=True)] == ["oracle", "oracle", "a2ats", "a2ats"]
    with pytest.raises(ValueError, match="task_budgets names methods not in the run"):
        harness.EvalConfig(**{**cfg.__dict__, "task_budgets": {"quest": (0.1,)}})
    with pytest.raises(ValueError, match="fractions"):
        harness.EvalConfig(**{**cfg.__dict__, "task_budgets": {"oracle": (0.0,)}})


def test_a_method_cut_from_the_tasks_is_not_calibrated_for_them(tiny, tmp_path, monkeypatch):
    """Codebooks cost a forward pass and a k-means: a task run must not build a method it will not decode with."""
    model, tok = tiny
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    cfg = harness.EvalConfig(tasks=("niah_single_number_essay",), lengths=(300,), budgets=(0.1,),
                             methods=("full", "oracle", "a2ats"), task_budgets={"a2ats": ()}, attention=True)
    rows = harness.run(model, tok, cfg, tmp_path / "out", only="tasks", progress=False, log=lambda *_: None)
    assert sorted((r["method"], r["budget"]) for r in rows) == [("full", 1.0), ("oracle", 0.1)]
    assert not (tmp_path / "cache" / "codebooks").exists()


def test_report_compares_runs_on_the_prompts_they_share():
    """x and full decoded four prompts; z three of them (a run stopped part-way: one prompt short); y one (a run
    cut from the plan). The tables compare full, x and z on the three shared prompts; y is listed apart, beside
    full on its prompt."""
    seeds = {"full": 4, "x": 4, "z": 3, "y": 1}
    rows = [_row("a", 100, m, 1.0 if m == "full" else 0.1, 1.0 if m != "x" or s else 0.0, seed=s)
            for m, n in seeds.items() for s in range(n)]
    rows.append({"task": "attention", "length": 100, "method": "y", "budget": 0.1, "mass": 0.5, "recall": 0.5})
    kept, partial = report.split_by_coverage(rows)
    assert {(r["method"], r["seed"]) for r in kept if "score" in r} == {(m, s) for m in ("full", "x", "z") for s in range(3)}
    assert any(r["task"] == "attention" for r in kept) and list(partial) == [("y", 0.1)]
    assert "| y | 0.1 | 1 | 1 | 100.0 | 100.0 |" in report.partial_table(partial, kept)
    assert "| x | 0.1 | 10 | 67 | 66.7 | 0.67 |" in report.summary_table(kept)


def _row(task, length, method, budget, score, **kw):
    return {"task": task, "length": length, "method": method, "budget": budget, "score": score,
            "attended_per_kv_head": 10.0, **kw}


def test_tables_by_hand_and_report_merges_runs(tmp_path):
    from a2ats.cli import main

    a = [_row("t1", 100, "full", 1.0, 1.0), _row("t2", 100, "full", 1.0, 0.5),
         _row("t1", 200, "full", 1.0, 0.0), _row("t2", 200, "full", 1.0, 1.0),
         {"task": "attention", "length": 100, "method": "full", "budget": 1.0, "mass": 1.0, "recall": 1.0},
         {"task": "perplexity", "length": 100, "method": "full", "budget": 1.0, "perplexity": 9.5}]
    b = [_row("t1", 100, "x", 0.1, 1.0), _row("t2", 100, "x", 0.1, 0.0),
         _row("t1", 200, "x", 0.1, 0.0), _row("t2", 200, "x", 0.1, 0.5),
         {"task": "attention", "length": 100, "method": "x", "budget": 0.1, "mass": 0.75, "recall": 0.5}]
    lt = report.length_table(a + b)
    assert "| full | 1 | 75.0 | 50.0 | 62.5 |" in lt
    assert "| x | 0.1 | 50.0 (0.67) | 25.0 (0.50) | 37.5 |" in lt
    tm = report.text_metrics_table(a + b)
    assert "| x | 0.1 | 0.750 | 0.500 | n/a |" in tm and "| full | 1 | 1.000 | 1.000 | 9.50 |" in tm
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(tmp_path / "a" / "results.jsonl"), str(tmp_path / "b" / "results.jsonl"), "--out", str(tmp_path / "m")]) == 0
    md = (tmp_path / "m" / "summary.md").read_text()
    assert lt in md and "| x | 0.1 | 10 | 50 | 25 | 37.5 | 0.60 |" in md
    assert (tmp_path / "m" / "heatmap.png").stat().st_size > 1000
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m")]) == 2
    # a run of one method alone (no "full" rows) reports too, with its own sample count
    two = b + [_row("t1", 100, "x", 0.1, 0.0)]
    assert main(["report", str(tmp_path / "b" / "results.jsonl"), "--out", str(tmp_path / "x")]) == 0
    md = report.write_summary(two, tmp_path / "y", "t", 32, 128)
    assert "2 sample(s)" in md and "| x | 0.1 | 10 |" in md and "| full |" not in md


def test_bootstrap_intervals_by_hand():
    """Two cells of two prompts each. full scores 1 everywhere: a point interval. x scores (1, 0) in one cell and
    (1, 1) in the other: its mean is 0.75 and each resample's mean is one of 0.5, 0.75, 1.0."""
    rows = [_row(t, 100, "full", 1.0, 1.0, seed=s) for t in ("a", "b") for s in (0, 1)]
    rows += [_row("a", 100, "x", 0.1, 1.0, seed=0), _row("a", 100, "x", 0.1, 0.0, seed=1),
             _row("b", 100, "x", 0.1, 1.0, seed=0), _row("b", 100, "x", 0.1, 1.0, seed=1)]
    res = report.bootstrap(rows, resamples=4000)
    assert res[("full", 1.0)]["all"][:3] == (1.0, 1.0, 1.0)
    mean, lo, hi, ratio, rlo, rhi = res[("x", 0.1)]["all"]
    assert (mean, lo, hi) == (0.75, 0.5, 1.0) and (ratio, rlo, rhi) == (0.75, 0.5, 1.0)
    assert "| x | 0.1 | 75.0 [50, 100] | 75.0 [50, 100] |" in report.interval_table(rows)
    assert "| x | 0.1 | 0.75 [0.50, 1.00] | 0.75 [0.50, 1.00] |" in report.interval_table(rows, ratio=True)
    # only task "a": x's prompts score 1 and 0, so an interval from 0 to 1
    assert report.bootstrap(rows, tasks={"a"})[("x", 0.1)]["all"][:3] == (0.5, 0.0, 1.0)
    per_task = report.task_interval_table(rows, 0.1)
    assert "| task | full | x |" in per_task
    assert "| a | 100 [100, 100] | 50 [0, 100] |" in per_task and "| b | 100 [100, 100] | 100 [100, 100] |" in per_task


def test_one_prompt_per_cell_has_no_interval_and_lengths_weigh_by_cell():
    """One prompt per cell: the bootstrap cannot resample anything, so the tables say so instead of printing a
    zero-width interval. The average weighs every (task, length) cell the same in every table: here x scores
    1 on two cells at 100 tokens and 0 on the one cell at 200, so 2/3 (not the mean of per-length means, 1/2)."""
    rows = [_row(t, n, m, b, s) for t, n, s in (("a", 100, 1.0), ("b", 100, 1.0), ("a", 200, 0.0))
            for m, b in (("full", 1.0), ("x", 0.1))]
    table = report.interval_table(rows)
    assert "| x | 0.1 | 100.0 [1 prompt] | 0.0 [1 prompt] | 66.7 [1 prompt] |" in table
    assert "| x | 0.1 | 100.0 (1.00) | 0.0 | 66.7 |" in report.length_table(rows)
    assert "| 66.7 | 1.00 |" in report.summary_table(rows)
    more = rows + [_row("a", 200, m, b, 1.0, seed=1) for m, b in (("full", 1.0), ("x", 0.1))]
    assert report.interval_table(more, tasks={"a"}).split("\n")[-1].split("|")[4].strip() == "50.0 [0, 100]"
    # over both lengths one cell holds two prompts and one a single prompt: an interval from the first alone, marked †
    assert report.interval_table(more, tasks={"a"}).split("\n")[-1].split("|")[5].strip() == "75.0 [50, 100]†"


def test_a_run_in_parts_tasks_then_text(tiny, tmp_path, monkeypatch):
    """A run split in two on one folder: its task samples alone, then its held-out prose metrics alone, give the
    rows one run gives."""
    model, tok = tiny
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    cfg = harness.EvalConfig(tasks=("niah_single_number_essay",), lengths=(500,), budgets=(0.1,), samples=1,
                             methods=("full", "oracle"), attention=True, perplexity=True, decode_last=2, ppl_tokens=3)
    quiet = dict(progress=False, log=lambda *_: None)
    tasks = harness.run(model, tok, cfg, tmp_path / "parts", only="tasks", **quiet)
    assert {r["task"] for r in tasks} == {"niah_single_number_essay"} and len(tasks) == 2
    both = harness.run(model, tok, cfg, tmp_path / "parts", only="text", **quiet)
    assert both[:2] == tasks and sorted(r["task"] for r in both[2:]) == ["attention"] * 2 + ["perplexity"] * 2
    whole = harness.run(model, tok, cfg, tmp_path / "whole", **quiet)
    assert [harness._row_key(r) for r in whole] == [harness._row_key(r) for r in both]
    with pytest.raises(ValueError, match="'tasks' or 'text'"):
        harness.run(model, tok, cfg, tmp_path / "x", only="both", **quiet)
    with pytest.raises(ValueError, match="measures none"):
        harness.run(model, tok, harness.EvalConfig(**{**cfg.__dict__, "attention": False, "perplexity": False}),
                    tmp_path / "x", only="text", **quiet)


def test_goal_table_by_hand():
    """Needles: x finds 1 of 2 at 100 tokens (0.50 of full's, short of 0.97) and both at 200 (1.00). The suite adds
    a task both miss half of: x keeps (0.5 + 0.5) / (1 + 0.5) of full's at 100 tokens."""
    rows = []
    for seed in (0, 1):
        for n in (100, 200):
            rows += [_row("niah_a", n, "full", 1.0, 1.0, seed=seed),
                     _row("niah_a", n, "x", 0.03, 1.0 if (n == 200 or seed == 0) else 0.0, seed=seed)]
        rows += [_row("words", 100, m, b, float(seed == 0), seed=seed) for m, b in (("full", 1.0), ("x", 0.03))]
    table = report.goal_table(rows, methods=(("x", 0.03),))
    assert "| x @ 0.03 | needles | 0.97 | 0.50 [0.00, 1.00] ✗ | 1.00 [1.00, 1.00] ✓ |" in table
    assert "| x @ 0.03 | suite | 0.95 | 0.67 [" in table
