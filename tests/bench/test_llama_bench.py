"""`bench decode --llama-bench PATH`: llama-bench's JSON read into rows, the best flash-attention setting kept, and
clear errors for a wrong path or a tree without the converter. A stand-in script plays llama-bench: its output
format is llama-bench's own (-o json), the figures are made up for the parser."""

import json
import stat

import pytest

from a2ats.bench.llamacpp import converter_for, llama_bench, weight_type


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
