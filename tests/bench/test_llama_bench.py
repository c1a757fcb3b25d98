"""`bench decode --llama-bench PATH` and `bench throughput --llama-batched-bench PATH`: llama-bench's JSON (and
llama-batched-bench's JSON lines) read into rows, the best flash-attention setting kept, and
clear errors for a wrong path or a tree without the converter. A stand-in script plays llama-bench: its output
format is llama-bench's own (-o json), the figures are made up for the parser."""

import json
import stat

import pytest

from a2ats.bench.llamacpp import batched_bench, converter_for, llama_bench, weight_type


def _fake_llama_bench(tmp_path, results):
    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\ncat <<'EOF'\n" + json.dumps(results) + "\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def _result(name, kind, flash, ts, sd=0.0):
    return {"model_filename": name, "model_type": f"llama 135M {kind}", "flash_attn": flash, "n_gen": 16,
            "n_depth": 2048, "avg_ts": ts, "stddev_ts": sd}


def test_rows_keep_each_gguf_at_its_best_flash_setting(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    binary = _fake_llama_bench(tmp_path, [_result(a, "Q8_0", False, 50.0, 1.0), _result(a, "Q8_0", True, 40.0),
                                          _result(b, "Q4_1", False, 40.0), _result(b, "Q4_1", True, 80.0, 2.0)])
    rows = llama_bench(binary, [a, b], 2048, threads=2, gen=16, repeats=3, log=lambda *_: None)
    by = {r.variant: r for r in rows}
    assert set(by) == {"llama.cpp-q8_0", "llama.cpp-q4_1"}
    assert by["llama.cpp-q8_0"].flash_attn == "off" and by["llama.cpp-q8_0"].ms_per_token == pytest.approx(20.0)
    assert by["llama.cpp-q8_0"].ms_by_flash == {"off": 20.0, "on": 25.0}
    assert by["llama.cpp-q8_0"].spread_ms == pytest.approx(1e3 * 1.0 / 50.0**2)
    assert by["llama.cpp-q4_1"].flash_attn == "on" and by["llama.cpp-q4_1"].ms_per_token == pytest.approx(12.5)
    assert all(r.context == 2048 for r in rows)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-d") + 1] == "2048" and args[args.index("-t") + 1] == "2"
    assert args[args.index("-fa") + 1] == "off,on" and args[args.index("-r") + 1] == "3"
    assert args[args.index("-p") + 1] == "0" and args[args.index("-o") + 1] == "json"


def test_one_flash_setting_and_the_repetitions_reach_llama_bench(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    a = str(tmp_path / "a.gguf")
    binary = _fake_llama_bench(tmp_path, [_result(a, "Q8_0", False, 50.0)])
    (row,) = llama_bench(binary, [a], 16384, repeats=1, flash="off", log=lambda *_: None)
    assert row.flash_attn == "off" and row.ms_by_flash == {"off": 20.0}
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-fa") + 1] == "off" and args[args.index("-r") + 1] == "1"
    with pytest.raises(ValueError, match="choose one of off,on, off, on"):
        llama_bench(binary, [a], 2048, flash="maybe")
    with pytest.raises(ValueError, match="integer >= 1"):
        llama_bench(binary, [a], 2048, repeats=0)


def test_weight_type_is_spelled_as_gguf_file_names_spell_it():
    assert weight_type("qwen2 0.5B Q4_K - Medium") == "q4_k_m"
    assert weight_type("llama 135M Q8_0") == "q8_0"
    assert weight_type("") == "gguf"


def test_a_wrong_binary_or_a_missing_gguf_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not an executable llama-bench"):
        llama_bench(tmp_path / "nope", [], 2048)
    binary = _fake_llama_bench(tmp_path, [])
    with pytest.raises(ValueError, match="not found"):
        llama_bench(binary, [str(tmp_path / "missing.gguf")], 2048)


def test_a_failing_run_names_its_command(tmp_path):
    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\necho 'illegal instruction' >&2\nexit 132\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(RuntimeError, match="illegal instruction"):
        llama_bench(script, [str(tmp_path / "a.gguf")], 1024)


def test_the_converter_is_found_in_the_binarys_source_tree(tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    assert converter_for(tree / "build" / "bin" / "llama-bench") == tree / "convert_hf_to_gguf.py"
    with pytest.raises(ValueError, match="convert_hf_to_gguf.py"):
        converter_for(tmp_path / "elsewhere" / "llama-bench")


def test_decode_bench_runs_llama_bench_right_after_ours_at_the_lengths_asked(tmp_path):
    import torch

    from a2ats.bench.decode import bench_decode
    from a2ats.core.config import A2ATSConfig
    from conftest import random_codebooks, tiny_model

    (tmp_path / "a.gguf").write_bytes(b"")
    a = str(tmp_path / "a.gguf")
    binary = _fake_llama_bench(tmp_path, [_result(a, "Q8_0", False, 50.0), _result(a, "Q8_0", True, 40.0)])
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    rows, _ = bench_decode(model, None, random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8),
                           lengths=(200, 333), variants=("dense-lean",), steps=1, warmup=1, text_ids=ids,
                           log=lambda *_: None, llama_bench=str(binary), llama_ggufs=[a], llama_lengths=[333])
    assert [(r.variant, r.context) for r in rows] == [("dense-lean", 200), ("dense-lean", 333),
                                                      ("llama.cpp-q8_0", 333)]


def test_batched_bench_reads_its_json_line_and_copies_the_prompt_per_sequence(tmp_path):
    """llama-batched-bench's -pps: one prompt prefilled, copied into each sequence's own cache; the decode speed is
    its speed_tg (log lines around the result are skipped)."""
    (tmp_path / "q.gguf").write_bytes(b"")
    line = {"n_kv_max": 8 * 32785, "pp": 32768, "tg": 16, "pl": 8, "n_kv": 8 * 32784, "t_pp": 900.0,
            "speed_pp": 36.4, "t_tg": 4.0, "speed_tg": 32.0, "t": 904.0, "speed": 36.4}
    script = tmp_path / "llama-batched-bench"
    script.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\necho 'main: loading' >&2\n"
                      f"echo '{json.dumps(line)}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    r = batched_bench(script, str(tmp_path / "q.gguf"), 32768, 8, threads=2, log=lambda *_: None)
    assert r["tokens_per_s"] == 32.0 and r["ms_per_step"] == pytest.approx(250.0) and r["prefill_s"] == 900.0
    args = (tmp_path / "args").read_text().split()
    assert "-pps" in args and args[args.index("-npp") + 1] == "32768" and args[args.index("-npl") + 1] == "8"
    assert args[args.index("-fa") + 1] == "off" and int(args[args.index("-c") + 1]) >= 8 * (32768 + 16)
    with pytest.raises(ValueError, match="choose off or on"):
        batched_bench(script, str(tmp_path / "q.gguf"), 1024, 2, flash="off,on")
    with pytest.raises(ValueError, match="not an executable llama-batched-bench"):
        batched_bench(tmp_path / "nope", str(tmp_path / "q.gguf"), 1024, 2)
    script.write_text("#!/bin/sh\necho 'no result'\n")
    with pytest.raises(RuntimeError, match="expected one result line, got 0"):
        batched_bench(script, str(tmp_path / "q.gguf"), 1024, 2)
