"""The benchmarks run end to end on a tiny model (their figures are not checked here: speed lives in `a2ats bench`)."""

import torch

from a2ats import A2ATSConfig
from a2ats.bench import VARIANTS
from a2ats.bench.decode import bench_decode, rows_to_json
from a2ats.bench.report import decode_plot, decode_table

from conftest import random_codebooks, tiny_model


def test_decode_bench_runs_every_variant(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    rows, prefill = bench_decode(model, None, random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8),
                                 lengths=(200, 333), variants=VARIANTS, steps=2, warmup=1, text_ids=ids,
                                 log=lambda *_: None)
    assert {(r.variant, r.context) for r in rows} == {(v, n) for v in VARIANTS for n in (200, 333)}
    assert all(r.ms_per_token > 0 and r.steps == 2 for r in rows)
    fast = [r for r in rows if r.variant.startswith("a2ats-fast")]
    # sinks + window + a union of 3 heads' top-10% at most: fewer than the context, more than sinks + window
    assert all(10 < r.attended < r.context for r in fast)
    assert set(fast[0].breakdown_ms) == {"weights", "scoring", "attention", "rest"}
    assert prefill["tokens"] == 150 and 0 <= prefill["encoding_share"] < 1
    table = decode_table(rows_to_json(rows))
    assert "speedup of a2ats-fast over dense-hf" in table and "a2ats-fast-bf16w per step" in table
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
