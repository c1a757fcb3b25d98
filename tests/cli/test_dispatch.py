"""Each command's flags reach what it runs, a flag a command cannot honour is refused by name, and a flag left out
takes its dataclass's default. What a command runs is replaced by a recorder that stops the run, so no model is
loaded or calibrated (a tiny random model stands in where one is needed)."""

import pytest
import torch

from a2ats import factory
from a2ats.assets.models import DEFAULT_MODEL
from a2ats.cli import build_parser, main
from a2ats.core.codebook import CodebookSettings
from a2ats.core.config import A2ATSConfig, Budget
from a2ats.factory import commands, options
from a2ats.server import ServerConfig
from a2ats.server import cli as server
from conftest import random_codebooks, tiny_model


class Reached(Exception):
    """What a command ran, with what."""

    def __init__(self, what, *args, **kwargs):
        super().__init__(what)
        self.what, self.args_, self.kwargs = what, args, kwargs


def stop(what):
    def record(*args, **kwargs):
        raise Reached(what, *args, **kwargs)

    return record


# flags every decoding command shares: each one set away from its default
SELECTION = ["--budget", "0.2", "--reduction", "union", "--sinks", "3", "--window", "17", "--wrope-distance", "1024",
             "--wrope-bands", "3"]
CODEBOOK = ["--centroids", "64", "--text-tokens", "1000", "--uuid-tokens", "200", "--max-iter", "4", "--seed", "7",
            "--kmeans-neighbours", "5",
            "--calib-seq-len", "512", "--no-sink-prefix", "--euclidean"]


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """A tiny model for every load; calibration recorded (random codebooks returned); the cache in tmp_path."""
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    calibrations = []

    def calibrate(model, tok, path, settings, log=None, compute_dtype=None):
        calibrations.append(settings)
        return random_codebooks(model)

    monkeypatch.setattr(options, "load", lambda a: (model, None))
    monkeypatch.setattr(options, "load_or_calibrate", calibrate)
    monkeypatch.setattr(commands, "encode_prompt", lambda tok, text, chat_template=True: torch.ones(1, 20, dtype=torch.long))
    monkeypatch.setattr(server, "encode_prompt", lambda tok, text, chat_template=True: torch.ones(1, 20, dtype=torch.long))
    monkeypatch.setattr(factory, "decoder", stop("decoder"))
    return calibrations


def check_selection(config: A2ATSConfig):
    assert (config.budget, config.reduction, config.sinks, config.window) == (Budget(fraction=0.2), "union", 3, 17)
    assert (config.wrope_distance, config.wrope_band_ratio) == (1024, 3.0)


def check_codebook(settings: CodebookSettings):
    assert settings == CodebookSettings(n_centroids=64, wrope_distance=1024, wrope_band_ratio=3.0, query_aware=False,
                                        text_tokens=1000, uuid_tokens=200, seq_len=512, sink_prefix=False,
                                        max_iter=4, kmeans_neighbours=5, seed=7)


RUNTIME = ["--path", "reference", "--decode-weights", "bf16", "--prefill-dtype", "model"]


@pytest.mark.parametrize("cmd", ["generate", "demo"])
def test_generate_and_demo_reach_the_factory(cmd, recorded, tmp_path, monkeypatch):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a question")
    monkeypatch.setattr(commands, "needle_prompt", lambda tok, n, depth, seed: ("haystack\nQ: the number?", "1234567"))
    extra = ["--prompt-file", str(prompt)] if cmd == "generate" else ["--context", "300"]
    with pytest.raises(Reached) as got:
        main([cmd, *SELECTION, *CODEBOOK, *RUNTIME, "--runtime", "transformers", *extra])
    (_, cb, config), kw = got.value.args_, got.value.kwargs
    check_selection(config)
    check_codebook(recorded[-1])
    assert cb is not None and kw["method"] is None
    assert {k: kw[k] for k in ("path", "runtime", "decode_weights", "prefill_dtype")} == {
        "path": "reference", "runtime": "transformers", "decode_weights": "bf16", "prefill_dtype": "model"}


def test_serve_builds_its_engine_through_the_factory(recorded, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello", "max_new_tokens": 5}\n')
    with pytest.raises(Reached) as got:
        main(["serve", str(prompts), *SELECTION, *CODEBOOK, *RUNTIME, "--slots", "3", "--placement", "local",
              "--kv-dtype", "int8", "--max-context", "300"])
    (_, cb, config), kw = got.value.args_, got.value.kwargs
    check_selection(config)
    check_codebook(recorded[-1])
    assert cb is not None and {k: kw[k] for k in ("path", "decode_weights", "prefill_dtype", "slots", "placement", "kv_dtype", "max_context")} \
        == {"path": "reference", "decode_weights": "bf16", "prefill_dtype": "model", "slots": 3, "placement": "local",
            "kv_dtype": torch.int8, "max_context": 300}
    assert "runtime" not in kw  # the engine serves: the factory's default, never transformers
    with pytest.raises(Reached) as got:  # --dense: no codebooks, no calibration
        main(["serve", str(prompts), "--dense", "--slots", "2"])
    assert got.value.args_[1] is None and len(recorded) == 1


def test_serve_http_builds_its_engine_and_server_config_from_the_flags(recorded):
    with pytest.raises(Reached) as got:
        main(["serve", "--http", *SELECTION, *RUNTIME, "--slots", "2", "--max-context", "256", "--port", "0"])
    (_, cb, config), kw = got.value.args_, got.value.kwargs
    check_selection(config)
    assert cb is not None and (kw["path"], kw["decode_weights"], kw["slots"], kw["max_context"]) == (
        "reference", "bf16", 2, 256)
    p = build_parser()
    given = server.server_config(p.parse_args(["serve", "--http", "--port", "0", "--max-queue", "3", "--host", "0.0.0.0",
                                               "--max-body-bytes", "4096", "--drain-seconds", "1.5",
                                               "--max-new-tokens", "9"]))
    assert (given.port, given.max_queue, given.host, given.max_body_bytes, given.drain_seconds,
            given.default_max_tokens) == (0, 3, "0.0.0.0", 4096, 1.5, 9)


def test_bench_decode_prefill_throughput_reach_their_runs(recorded, monkeypatch):
    from a2ats.bench import decode, prefill, throughput

    monkeypatch.setattr(decode, "bench_decode", stop("decode"))
    with pytest.raises(Reached) as got:
        main(["bench", "decode", *SELECTION, *CODEBOOK, "--lengths", "512,1024", "--variants", "a2ats-fast,dense-lean",
              "--steps", "3"])
    check_selection(got.value.args_[3])
    check_codebook(recorded[-1])
    assert (got.value.kwargs["lengths"], got.value.kwargs["variants"], got.value.kwargs["steps"]) == (
        (512, 1024), ("a2ats-fast", "dense-lean"), 3)

    monkeypatch.setattr(prefill, "bench_prefill", stop("prefill"))
    monkeypatch.setattr("a2ats.assets.corpus.speeches", lambda: ["word " * 30000] * 200)
    monkeypatch.setattr(options, "load", lambda a: (tiny_model("llama"), type("Tok", (), {"encode": lambda s, t, **k: [5] * 5000})()))
    with pytest.raises(Reached) as got:
        main(["bench", "prefill", *SELECTION, "--lengths", "700", "--prefill-systems", "dense"])
    check_selection(got.value.args_[2])
    assert got.value.args_[4:] == ((700,), ("dense",))

    monkeypatch.setattr(throughput, "bench_throughput", stop("throughput"))
    with pytest.raises(Reached) as got:
        main(["bench", "throughput", *SELECTION, *CODEBOOK, "--decode-weights", "int4", "--lengths", "600",
              "--batches", "1,3", "--systems", "full-local", "--steps", "2"])
    check_selection(got.value.args_[3])
    kw = got.value.kwargs
    assert (kw["decode_weights"], kw["lengths"], kw["batches"], kw["systems"], kw["steps"]) == (
        "int4", (600,), (1, 3), ("full-local",), 2)
    assert main(["bench", "throughput", "--llama-gguf", "q.gguf"]) == 2  # the file of a tool not given
    assert main(["bench", "throughput", "--random-weights", "--llama-batched-bench", "/bin/true"]) == 2


def test_bench_kernels_weights_serve_reach_their_runs(recorded, monkeypatch):
    from a2ats.bench import kernels, weights
    from a2ats.bench import serve as load

    monkeypatch.setattr(kernels, "bench_kernels", stop("kernels"))
    with pytest.raises(Reached) as got:
        main(["bench", "kernels", "--context", "4096", "--dtype", "bfloat16"])
    assert got.value.kwargs == {"n": 4096, "dtype": torch.bfloat16}

    monkeypatch.setattr(weights, "compare_formats", stop("weights"))
    with pytest.raises(Reached) as got:
        main(["bench", "weights", "--ppl-tokens", "2048"])
    assert got.value.kwargs["tokens"] == 2048

    # bench serve: the HTTP server it loads is built from its flags, its engine through the factory
    monkeypatch.setattr(load, "prompts_for", lambda tok, lengths, count, new_tokens, skip=0: [[5] * 10] * count)
    with pytest.raises(Reached) as got:
        main(["bench", "serve", *SELECTION, "--path", "reference", "--decode-weights", "int8", "--serve-systems", "a2ats",
              "--slots", "3", "--max-new-tokens", "5"])
    (_, cb, config), kw = got.value.args_, got.value.kwargs
    check_selection(config)
    assert cb is not None and (kw["path"], kw["decode_weights"], kw["slots"], kw["placement"], kw["max_context"]) == (
        "reference", "int8", 3, "offload", 15)


def test_eval_and_calibrate_reach_their_runs(recorded, monkeypatch, tmp_path):
    from a2ats.assets import models
    from a2ats.eval import harness

    monkeypatch.setattr(harness, "run", stop("eval"))
    with pytest.raises(Reached) as got:
        main(["eval", "--methods", "full,a2ats-banded+max", "--budgets", "0.1", "--centroids", "32", "--samples", "2",
              "--out", str(tmp_path / "e")])
    cfg = got.value.args_[2]
    assert (cfg.methods, cfg.budgets, cfg.centroids, cfg.samples) == (("full", "a2ats-banded+max"), (0.1,), 32, 2)

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (tiny_model("llama"), None))
    monkeypatch.setattr(commands, "fit_codebooks", stop("calibrate"))
    with pytest.raises(Reached) as got:
        main(["calibrate", "--wrope-distance", "1024", "--wrope-bands", "3", *CODEBOOK, "--out", str(tmp_path / "cb")])
    check_codebook(got.value.args_[2])


def test_defaults_are_the_dataclasses():
    p = build_parser()
    for cmd in (["generate"], ["demo"], ["serve", "x"], ["bench", "decode"], ["bench", "throughput"], ["bench", "serve"]):
        a = p.parse_args(cmd)
        assert options.config(a) == A2ATSConfig() and options.settings(a) == CodebookSettings()
    assert server.server_config(p.parse_args(["serve", "--http"])) == ServerConfig(DEFAULT_MODEL)
    assert options.model_label(p.parse_args(["bench", "decode"])) == DEFAULT_MODEL


@pytest.mark.parametrize("argv, words", [
    (["bench", "kernels", "--soak", "5"], "unrecognized arguments: --soak 5"),
    (["bench", "decode", "--path", "fast"], "unrecognized arguments: --path fast"),
    (["bench", "decode", "--decode-weights", "bf16"], "unrecognized arguments: --decode-weights bf16"),
    (["bench", "weights", "--budget", "0.1"], "unrecognized arguments: --budget 0.1"),
    (["bench", "project", "--centroids", "64"], "unrecognized arguments: --centroids 64"),
    (["calibrate", "--budget", "0.1"], "unrecognized arguments: --budget 0.1"),
    (["serve", "p.jsonl", "--runtime", "transformers"], "--runtime: `a2ats serve` runs the lean engine"),
    (["serve", "p.jsonl", "--runtime", "engine"], "a2ats generate --runtime transformers"),
])
def test_a_flag_a_command_cannot_honour_is_a_usage_error(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["bench", "throughput", "--shape", "llama-3.1-8b"], "--shape is the shape of --random-weights' model"),
    (["bench", "throughput", "--random-weights", "--text-tokens", "9"], "--text-tokens would do nothing"),
    (["bench", "serve", "--serve-systems", "vllm"], "unknown system"),
    (["bench", "prefill", "--prefill-systems", "vllm"], "unknown prefill system"),
    (["generate", "--wrope-bands", "1"], "wrope_band_ratio must be > 1"),
])
def test_a_setting_a_command_cannot_honour_is_refused_before_any_model_loads(argv, words, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    monkeypatch.setattr(options, "load", stop("load"))
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_runtime_options_the_engine_alone_honours_are_refused_in_transformers(tmp_path, monkeypatch, capsys):
    """The real factory here: it refuses the engine's weight formats under --runtime transformers."""
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    monkeypatch.setattr(options, "load", lambda a: (model, None))
    monkeypatch.setattr(options, "load_or_calibrate", lambda model, *a, **k: random_codebooks(model))
    monkeypatch.setattr(commands, "encode_prompt", lambda tok, text, chat_template=True: torch.ones(1, 20, dtype=torch.long))
    prompt = tmp_path / "p.txt"
    prompt.write_text("a question")
    assert main(["generate", "--prompt-file", str(prompt), "--runtime", "transformers", "--decode-weights", "bf16"]) == 2
    assert "decode weights 'bf16' are the lean engine's" in capsys.readouterr().err
