"""Command line: ``a2ats demo | generate | serve | calibrate | eval | report | bench`` (``python -m a2ats`` is the same)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

import torch

from a2ats.bench import DEFAULT_VARIANTS, VARIANTS
from a2ats.core.config import DEFAULT_BAND_RATIO
from a2ats.runtime.model import DECODE_WEIGHTS

DECODE_LENGTHS = (2048, 8192, 16384, 32768)
THROUGHPUT_LENGTHS = (8192, 32768)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_settings():
    from a2ats.core.codebook import CodebookSettings

    return CodebookSettings()


_DEFAULT_SETTINGS = _default_settings()


def _budget(text: str):
    from a2ats.core.config import Budget

    try:
        return Budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _log(msg: str) -> None:
    if _QUIET:
        return
    print(f"[a2ats] {msg}", file=sys.stderr, flush=True)


_QUIET = False  # a torchrun rank other than 0: rank 0 alone prints (every rank computes the same tokens)
TORCHRUN_COMMANDS = ("generate", "demo")  # commands that run sharded over torchrun's ranks


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a named model (smollm2-135m, the default; qwen2.5-coder-0.5b, 32K context) or a local "
                                   "Hugging Face checkpoint folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32: fastest on CPUs here)")
    p.add_argument("--device", default="cpu")


def _add_codebook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--centroids", type=int, default=4096, help="centroids per layer per KV head (paper: 4096)")
    p.add_argument("--wrope-distance", type=int, default=2048, help="WRoPE distance b (paper: 2048)")
    p.add_argument("--wrope-bands", type=float, default=None, metavar="RATIO",
                   help="banded WRoPE: score each geometric band of distances, ratio RATIO, at its own distance "
                        f"(default {DEFAULT_BAND_RATIO:g}, the library's selection); 0: the paper's single distance b")
    p.add_argument("--text-tokens", type=int, default=65536, help="calibration prose tokens (paper: ~64K)")
    p.add_argument("--uuid-tokens", type=int, default=16384, help="calibration UUID-string tokens (paper: ~16K)")
    p.add_argument("--max-iter", type=int, default=10, help="Lloyd iterations at most (paper: 300; see README)")
    p.add_argument("--euclidean", action="store_true", help="plain k-means on pre-RoPE keys (ablation), not query-aware")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help=f"calibration sequence length in tokens (default {_DEFAULT_SETTINGS.seq_len}; capped at the model's context)")
    p.add_argument("--no-sink-prefix", action="store_true",
                   help="calibration sequences without the token real prompts start with (the first recipe: "
                        "--calib-seq-len 2048 --no-sink-prefix)")
    p.add_argument("--forward-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype of the calibration forward (autocast); auto: bfloat16 on CPUs with native bf16 "
                        "(AVX-512 BF16, AMX), where it is ~2x faster, else the model's")
    p.add_argument("--seed", type=int, default=0)


def _band_ratio(a) -> float | None:
    """``--wrope-bands``: unset is the library's default ratio, 0 the paper's single distance."""
    if a.wrope_bands is None:
        return DEFAULT_BAND_RATIO
    if a.wrope_bands == 0:
        return None
    if not a.wrope_bands > 1:
        raise ValueError(f"--wrope-bands must be 0 (the paper's single distance) or a ratio > 1, got {a.wrope_bands:g}")
    return a.wrope_bands


def _settings(a):
    from a2ats.core.codebook import CodebookSettings

    return CodebookSettings(
        n_centroids=a.centroids,
        wrope_distance=a.wrope_distance,
        wrope_band_ratio=_band_ratio(a),
        query_aware=not a.euclidean,
        text_tokens=a.text_tokens,
        uuid_tokens=a.uuid_tokens,
        max_iter=a.max_iter,
        seed=a.seed,
        seq_len=a.calib_seq_len or _DEFAULT_SETTINGS.seq_len,
        sink_prefix=_DEFAULT_SETTINGS.sink_prefix and not a.no_sink_prefix,
    )


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebooks", help="codebook file, or folder holding one (default: the user cache; built on first use)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="0.1 = 10%% of the context per KV head (max) or per query head (union); 512 = 512 tokens; "
                        "1.0 = all (default: 0.1 with max, the paper's 0.03 with union)")
    p.add_argument("--reduction", choices=["max", "union"], default=None,
                   help="GQA: one top-K per KV head by the max of its heads' scores (the default), or the union of "
                        "each query head's top-K (the paper's; `bench project`'s default, the paper's design)")
    p.add_argument("--sinks", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--path", choices=["auto", "fast", "reference"], default="auto",
                   help="fast: selection and attention by the kernels (default on a CPU where they build); "
                        "reference: the torch definition, the selection applied as a mask (for accuracy; in transformers)")
    p.add_argument("--runtime", choices=["auto", "engine", "transformers"], default="auto",
                   help="what runs the model: the lean engine (default where it runs the model and method, unless "
                        "--path reference) or transformers' own forward with A²ATS patched in")
    p.add_argument("--decode-weights", choices=list(DECODE_WEIGHTS), default="auto",
                   help="engine, float32 models: what decode steps read for the projection weights, with fp32 math: "
                        "auto (int8), int8 (a scale per output row), int4 (groups of 32), bf16, or model (its own "
                        "fp32 weights). Perplexity of each: `a2ats bench weights`")
    p.add_argument("--prefill-dtype", choices=["auto", "model", "bf16"], default="auto",
                   help="engine, float32 models: the prompt's projections and attention in bf16 (fp32 out; auto: where "
                        "the CPU multiplies bf16 natively, ~2.5x faster) or in the model's dtype")
    _add_codebook_args(p)


def _add_hybrid_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hybrid", type=float, default=None, metavar="SHARE",
                   help="hybrid WRoPE (not in the paper; reference path): SHARE of each head's budget by the paper's "
                        "score, the rest by banded WRoPE (ratio 2), over the paper's codebook (see docs/retrieval)")


def _load(a):
    from a2ats.assets.models import load_model
    from a2ats.hf import tp

    t = time.perf_counter()
    if tp.launched():  # under torchrun: each rank loads its shards (transformers' tensor-parallel plan)
        model, tok = tp.load(a.model, DTYPES[a.dtype], a.device, log=_log)
    else:
        model, tok = load_model(a.model, DTYPES[a.dtype], a.device, log=_log)
    _log(f"loaded {a.model or 'the default model (smollm2-135m)'} in {time.perf_counter() - t:.1f} s")
    return model, tok


def _config(a):
    from a2ats.core.config import A2ATSConfig

    given = {"reduction": a.reduction} if a.reduction else {}  # None: the library's default (max)
    return A2ATSConfig(budget=a.budget, sinks=a.sinks, window=a.window, wrope_distance=a.wrope_distance,
                       wrope_band_ratio=_band_ratio(a), **given)


def _codebooks(a, model, tok):
    from a2ats.hf.calibrate import load_or_calibrate

    return load_or_calibrate(model, tok, a.codebooks, _settings(a), log=_log, compute_dtype=_forward_dtype(a))


def _forward_dtype(a):
    """The calibration forward's autocast dtype; ``auto`` only lowers an fp32 model on the CPU."""
    from a2ats.hf.precision import parse_dtype

    if a.forward_dtype == "auto" and (a.device != "cpu" or a.dtype != "float32"):
        return None
    return parse_dtype(a.forward_dtype)


def _run(a, model, tok, ids):
    """Generate with the runtime and path asked for (:func:`a2ats.factory.decoder` decides what runs)."""
    from a2ats import factory

    method = None
    if getattr(a, "hybrid", None) is not None:
        from a2ats.methods.registry import build_method

        if a.path == "fast" or a.wrope_bands not in (None, 0):
            raise ValueError("--hybrid runs on the reference path over the paper's codebook: drop --path fast and --wrope-bands")
        a.wrope_bands = 0  # its codebook is the paper's; it bands half the budget itself
        method = build_method(f"a2ats-hybrid{a.hybrid:g}", model, _codebooks(a, model, tok))
    dec = factory.decoder(model, None if method else _codebooks(a, model, tok), _config(a), method=method, path=a.path,
                          runtime=a.runtime, decode_weights=a.decode_weights, prefill_dtype=a.prefill_dtype, log=_log)
    res = factory.generate_text(dec, tok, ids, a.max_new_tokens)
    if res.stats is not None:
        _log(res.stats.summary())
    _log(f"prompt {res.prompt_tokens} tokens, prefill {res.prefill_seconds:.1f} s (dense); {res.new_tokens} new "
         f"tokens at {res.decode_tokens_per_second:.1f} tokens/s ({factory.describe(dec)})")
    return res


def cmd_generate(a) -> int:
    from a2ats.hf.generate import encode_prompt

    text = open(a.prompt_file, encoding="utf-8").read() if a.prompt_file else sys.stdin.read()
    if not text.strip():
        raise SystemExit("a2ats generate: the prompt is empty (give --prompt-file F or text on stdin)")
    from a2ats.core.support import check_context

    model, tok = _load(a)
    ids = encode_prompt(tok, text, chat_template=not a.no_chat_template)
    check_context(model, ids.shape[-1], a.max_new_tokens)  # before any work (calibration included)
    _run(a, model, tok, ids)
    return 0


def _read_prompts(path: str, default_new: int) -> list[dict]:
    """JSON lines ({"prompt": ..., "max_new_tokens": ..., "id": ...}) or, for other files, one prompt per line."""
    import json

    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); give one JSON object or one plain prompt per line") from None
                if not isinstance(obj.get("prompt"), str):
                    raise ValueError(f'{path}:{n}: a JSON line needs a "prompt" string')
            else:
                obj = {"prompt": line.rstrip("\n")}
            obj.setdefault("max_new_tokens", default_new)
            obj.setdefault("id", len(items))
            items.append(obj)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _kv_dtype(a):
    return {"model": None, "bfloat16": torch.bfloat16, "int8": torch.int8}[a.kv_dtype]


def _server_engine(a, model, tok, dense: bool, placement: str, slots: int, max_context: int):
    """The fixed-size engine a server runs (its cache allocated now, after the memory preflight)."""
    from a2ats.runtime import Engine

    cb = None if dense else _codebooks(a, model, tok)
    return Engine(model, cb, _config(a), slots=slots, max_context=max_context, placement=placement,
                  decode_weights=a.decode_weights, prefill_dtype=a.prefill_dtype, kv_dtype=_kv_dtype(a))


def _model_name(a) -> str:
    from pathlib import Path

    from a2ats.assets.models import DEFAULT_MODEL, MODELS

    return a.model if a.model in MODELS else Path(a.model).name if a.model else DEFAULT_MODEL


def _server_config(a, port: int):
    import os

    try:
        from a2ats.server import API_KEY_ENV, ServerConfig
    except ImportError as e:
        raise ValueError(f"the HTTP server needs fastapi and uvicorn ({e}): pip install 'a2ats[serve]'") from None
    return ServerConfig(_model_name(a), host=a.host, port=port, api_key=a.api_key or os.environ.get(API_KEY_ENV),
                        max_queue=a.max_queue, max_body_bytes=a.max_body_bytes, default_max_tokens=a.max_new_tokens,
                        drain_seconds=a.drain_seconds)


def _http_server(a, model, tok, dense: bool, placement: str, max_context: int, port: int, log_level: str):
    from a2ats.server import HttpServer, stop_token_ids

    config = _server_config(a, port)
    engine = _server_engine(a, model, tok, dense, placement, a.slots, max_context)
    return HttpServer(engine, tok, config, stop_token_ids(tok, model), log_level=log_level)


def _serve_http(a) -> int:
    model, tok = _load(a)
    limit = getattr(model.config, "max_position_embeddings", None) or 8192
    max_context = a.max_context or min(limit, 8192)
    server = _http_server(a, model, tok, a.dense, a.placement, max_context, a.port, "info")
    engine, config = server.service.engine, server.config
    _log(f"serving {config.model_name} ({engine.method_name}, {engine.slots} slots x {engine.max_context} tokens, "
         f"up to {config.max_queue} waiting) on http://{config.host}:{config.port}/v1; API key "
         f"{'required' if config.api_key else 'not required'}; SIGTERM drains")
    return server.run()


def cmd_serve(a) -> int:
    import json

    from a2ats.hf.generate import encode_prompt
    from a2ats.runtime import Engine, Request

    if a.http:
        return _serve_http(a)
    items = _read_prompts(a.prompts, a.max_new_tokens)
    model, tok = _load(a)
    reqs = [Request(encode_prompt(tok, it["prompt"], chat_template=not a.no_chat_template)[0], int(it["max_new_tokens"]),
                    it["id"]) for it in items]
    need = max(len(r.prompt) + r.max_new_tokens for r in reqs)
    cb = None if a.dense else _codebooks(a, model, tok)
    server = Engine(model, cb, _config(a), slots=a.slots, max_context=a.max_context or need, placement=a.placement,
                    decode_weights=a.decode_weights, prefill_dtype=a.prefill_dtype,
                    kv_dtype={"model": None, "bfloat16": torch.bfloat16, "int8": torch.int8}[a.kv_dtype])
    out = open(a.out, "a", encoding="utf-8") if a.out else sys.stdout
    eos = tok.eos_token_id

    def write(i, c):  # each completion is written (and flushed) as it finishes: a later failure loses nothing
        text = tok.decode(c.tokens[:-1] if c.finish_reason == "eos" else c.tokens)
        out.write(json.dumps({"id": c.id, "completion": text, "prompt_tokens": c.prompt_tokens,
                              "new_tokens": len(c.tokens), "finish_reason": c.finish_reason,
                              **({"error": c.error} if c.error else {})}) + "\n")
        out.flush()

    _log(f"serving {len(reqs)} prompts through {a.slots} slots of {server.max_context} tokens "
         f"({server.method_name}, K/V {'in host memory' if a.placement == 'offload' else 'beside the model'})")
    res = server.serve(reqs, eos_token_id=eos, on_finish=write)
    if res.stats is not None:
        _log(res.stats.summary())
    _log(f"{sum(len(c.tokens) for c in res.completions)} tokens: {res.tokens_per_s:.1f} decode tokens/s, "
         f"{res.served_tokens_per_s:.1f} tokens/s with prefills ({res.prefill_seconds:.1f} s prefill, "
         f"{res.decode_seconds:.1f} s decode)")
    if a.out:
        out.close()
    return 0


def cmd_demo(a) -> int:
    from a2ats.assets.corpus import needle_prompt
    from a2ats.core.support import check_context
    from a2ats.hf.generate import encode_prompt

    model, tok = _load(a)
    prompt, answer = needle_prompt(tok, a.context, depth=a.depth, seed=a.seed)
    ids = encode_prompt(tok, prompt)
    check_context(model, ids.shape[-1], a.max_new_tokens)
    _log(f"needle-in-a-haystack: a 7-digit number hidden at depth {a.depth:.0%} of ~{a.context} tokens of essays")
    _codebooks(a, model, tok)  # calibrate (once) before the question is printed
    print(f"Q: {prompt.strip().splitlines()[-1]}\nA: ", end="", flush=True)
    res = _run(a, model, tok, ids)
    found = answer in res.text
    _log(f"expected {answer}: {'found' if found else 'NOT found'} in the answer")
    return 0


def cmd_calibrate(a) -> int:
    from a2ats.assets.models import load_model
    from a2ats.hf.calibrate import calibrate, default_codebook_path

    settings = _settings(a)
    model, tok = load_model(a.model, DTYPES[a.dtype], a.device, log=_log)
    out = a.out
    if out is None:
        out = default_codebook_path(model, settings)
    elif not out.endswith(".safetensors"):
        out = f"{out.rstrip('/')}/{settings.tag}.safetensors"
    t = time.perf_counter()
    cb = calibrate(model, tok, settings, compute_dtype=_forward_dtype(a))
    path = cb.save(out)
    _log(f"wrote {path} in {time.perf_counter() - t:.1f} s: {cb.info}")
    return 0


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def cmd_eval(a) -> int:
    from pathlib import Path

    from a2ats.assets.models import EVAL_MODEL
    from a2ats.eval import harness, report

    preset = dict(harness.PRESETS[a.preset])
    for k in ("tasks", "lengths", "needle_lengths", "text_lengths", "methods", "budgets", "samples", "centroids",
              "prefill_dtype"):
        if getattr(a, k) is not None:
            preset[k] = getattr(a, k)
    if a.samples is not None:  # one count for every task, as asked
        preset["task_samples"] = {}
    for key in ("method_budgets", "task_budgets"):  # the preset's per-method budgets, for the methods kept
        preset[key] = {m: b for m, b in preset.get(key, {}).items() if m in preset["methods"]}
    if a.model is None and a.preset == "long":
        a.model = EVAL_MODEL  # the long-context preset is meant for the model that uses long context
    cfg = harness.EvalConfig(**preset, model=a.model or "")
    model, tok = _load(a)
    out = Path(a.out)
    rows = harness.run(model, tok, cfg, out, log=_log, only=a.only)
    print(report.write_summary(rows, out, f"a2ats eval ({a.preset} preset)", cfg.decode_last, cfg.ppl_tokens))
    _log(f"wrote {out}/results.jsonl, summary.md, score_vs_budget.png, heatmap.png")
    return 0


def cmd_report(a) -> int:
    import json
    from pathlib import Path

    from a2ats.eval import report

    rows, cfg = [], {}
    for path in a.results:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"no results file {p}: give the results.jsonl that `a2ats eval --out DIR` wrote in DIR")
        rows += report.load_rows(p)
        if (p.parent / "config.json").is_file():
            cfg = {**json.loads((p.parent / "config.json").read_text()), **cfg}
    print(report.write_summary(rows, Path(a.out), a.title, cfg.get("decode_last", 32), cfg.get("ppl_tokens", 128)))
    return 0


def cmd_bench(a) -> int:
    import json

    if a.what == "project":  # a performance model: no model to load
        from a2ats.bench.project import run_cli

        return run_cli(a)
    from a2ats.bench.output import emit, machine

    if a.what == "kernels":
        from a2ats.bench.kernels import bench_kernels

        res = {"machine": machine(), **bench_kernels(n=a.context, dtype=DTYPES[a.dtype])}
        if a.json:
            print(json.dumps(res))
        else:
            for k, v in res.items():
                print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
        return 0
    if a.what == "throughput":
        return _bench_throughput(a)
    if a.what == "serve":
        return _bench_serve(a)
    if a.what == "weights":
        return _bench_weights(a)
    if a.what == "prefill":
        return _bench_prefill(a)
    from a2ats.bench.decode import bench_decode, rows_to_json
    from a2ats.bench.report import decode_plot, decode_table

    gguf = _llamacpp_gguf(a) if "llama.cpp" in a.variants else None  # the named model's own GGUF (verified)
    model, tok = _load(a)
    cfg = _config(a)
    rows, prefill = bench_decode(model, tok, _codebooks(a, model, tok), cfg, lengths=a.lengths or DECODE_LENGTHS,
                                 variants=a.variants, steps=a.steps, gguf=gguf, log=_log)
    rows = rows_to_json(rows)
    res = {"machine": machine(), "model": a.model or "smollm2-135m", "dtype": a.dtype, "budget": cfg.budget_label,
           "wrope_bands": _band_ratio(a),
           "command": "a2ats " + " ".join(sys.argv[1:]), "prefill": prefill, "rows": rows}
    title = f"{res['machine']}, {a.dtype}, {res['budget']}"
    emit(res, decode_table(rows), "decode", a.out, lambda p: decode_plot(rows, p, title), a.json, _log)
    return 0


def _llamacpp_gguf(a) -> str:
    """The GGUF llama.cpp runs: the named model's own (verified)."""
    from a2ats.assets.models import DEFAULT_MODEL, MODELS, gguf_path, named_model

    if a.model is not None and a.model not in MODELS:
        raise ValueError("the llama.cpp variant runs a named model's GGUF: give --model "
                         f"{' or '.join(MODELS)}, or leave llama.cpp out")
    return str(gguf_path(named_model(a.model or DEFAULT_MODEL), log=_log))


def _bench_prefill(a) -> int:
    """Prefill tokens/s at each length: ours (default dtype and fp32, with and without key encoding) and llama.cpp's."""
    from a2ats.assets.corpus import speeches
    from a2ats.bench.llamacpp import available
    from a2ats.bench.output import emit, machine
    from a2ats.bench.prefill import bench_prefill, prefill_table, rows_to_json

    systems = a.prefill_systems
    if "llama.cpp" in systems and not available():
        raise ValueError("the llama.cpp system needs llama-cpp-python (see docs/bench/README.md), or leave it out")
    gguf = _llamacpp_gguf(a) if "llama.cpp" in systems else None
    model, tok = _load(a)
    text = next(s for s in speeches()[150:] if len(s) > 6 * 4096)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:4096]])
    rows = rows_to_json(bench_prefill(model, _codebooks(a, model, tok), _config(a), ids, a.lengths or (4096, 16384),
                                      systems, gguf=gguf, log=_log))
    res = {"machine": machine(), "model": a.model or "smollm2-135m", "dtype": a.dtype,
           "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows}
    emit(res, prefill_table(rows), "prefill", a.out, None, a.json, _log)
    return 0


def _bench_weights(a) -> int:
    """Perplexity of held-out prose per decode weight format (the quality beside `bench decode`'s speed)."""
    import json

    from a2ats.bench.output import machine
    from a2ats.eval.weights import compare_formats, rows_to_json

    model, tok = _load(a)
    rows = rows_to_json(compare_formats(model, tok, tokens=a.ppl_tokens, log=_log))
    res = {"machine": machine(), "model": a.model or "smollm2-135m", "dtype": a.dtype, "tokens": a.ppl_tokens,
           "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows}
    lines = [f"perplexity of {a.ppl_tokens} held-out tokens (2,048-token windows) per decode weight format", "",
             "| format | bits per weight | MB read per step | perplexity | change |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['bits']:.1f} | {r['decode_mb']:.0f} | {r['perplexity']:.3f} | {r['change']:+.2%} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    if a.out:
        from pathlib import Path

        folder = Path(a.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.json").write_text(json.dumps(res, indent=1))
        (folder / "weights.md").write_text(table)
    print(json.dumps(res) if a.json else table)
    return 0


def _bench_throughput(a) -> int:
    from a2ats.bench.output import emit, machine, served_table
    from a2ats.bench.report import throughput_plot, throughput_table
    from a2ats.bench.throughput import (
        bench_served,
        bench_throughput,
        random_model,
        rows_to_json,
    )

    cfg = _config(a)
    text_ids = None
    if a.random_weights:
        lengths = a.lengths or THROUGHPUT_LENGTHS
        model, cb = random_model(a.shape, DTYPES[a.dtype], a.device, max_context=max(lengths) + 4096)
        tok, text_ids = None, torch.randint(3, model.config.vocab_size, (1, 4096))
        _log(f"{a.shape} shape with RANDOM weights and codebooks on {a.device} ({a.dtype}): speed only")
        if a.requests:
            raise ValueError("--requests serves real prompts: it needs the embedded model, not --random-weights")
    else:
        model, tok = _load(a)
        cb = _codebooks(a, model, tok)
    rows = rows_to_json(bench_throughput(model, tok, cb, cfg, lengths=a.lengths or THROUGHPUT_LENGTHS, batches=a.batches,
                                         systems=a.systems, steps=a.steps, decode_weights=a.decode_weights,
                                         text_ids=text_ids, log=_log))
    served = bench_served(model, tok, cb, cfg, slots=max(a.batches), requests=a.requests, prompt_tokens=a.prompt_tokens,
                          new_tokens=a.max_new_tokens, decode_weights=a.decode_weights, log=_log) if a.requests else []
    res = {"machine": machine(), "dtype": a.dtype, "budget": cfg.budget_label, "decode_weights": a.decode_weights,
           "model": f"{a.shape}, random weights" if a.random_weights else (a.model or "smollm2-135m"),
           "accelerator": str(model.device) + (" (the CPU stands in for the accelerator: no PCIe, shared cores)"
                                               if model.device.type == "cpu" else ""),
           "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows, "served": served}
    title = f"{res['machine']}, {a.dtype}, {res['budget']}"
    emit(res, throughput_table(rows) + served_table(served), "throughput", a.out,
         lambda p: throughput_plot(rows, p, title), a.json, _log)
    return 0


SERVE_LENGTHS = (1024, 2048, 4096, 8192)


def _serve_prompts(tok, lengths, count: int, new_tokens: int, skip: int = 0) -> list[list[int]]:
    """``count`` chat prompts cycling through ``lengths``: a window of the essays to summarize, each its own, so
    that the prompt and ``new_tokens`` fill about (at most) that many tokens."""
    from a2ats.assets.corpus import essays
    from a2ats.hf.generate import encode_prompt

    ids = tok.encode("\n\n".join(essays()), add_special_tokens=False)
    ask = "\n\nSummarize the text above in a few sentences."
    margin = 64  # the chat template and the question
    prompts = []
    for i in range(count):
        n = lengths[i % len(lengths)] - new_tokens - margin
        at = (104729 * (skip + i)) % (len(ids) - n)  # windows spread over the essays
        prompts.append(encode_prompt(tok, tok.decode(ids[at : at + n]) + ask)[0].tolist())
    return prompts


def _bench_serve(a) -> int:
    """The HTTP server under load: N concurrent streaming clients, A²ATS and full attention, then a soak run."""
    from a2ats.bench import serve as load
    from a2ats.bench.output import emit, machine

    model, tok = _load(a)
    lengths = a.lengths or SERVE_LENGTHS
    requests = a.requests or 4 * a.clients
    prompts = _serve_prompts(tok, lengths, requests, a.max_new_tokens)
    short = _serve_prompts(tok, (128, 256), a.soak, 8, skip=requests)  # the soak's
    max_context = max([len(p) + a.max_new_tokens for p in prompts] + [len(p) + 8 for p in short])
    rows = []
    for n, system in enumerate(a.serve_systems):
        dense = system == "dense"
        placement = "local" if dense else "offload"
        server = _http_server(a, model, tok, dense, placement, max_context, 0, "warning").start()
        try:
            _log(f"{system}: {requests} requests of {min(lengths)}-{max(lengths)} tokens, {a.clients} clients, "
                 f"{a.slots} slots")
            rows.append(load.load(server.url, server.config.model_name, prompts, a.clients, a.max_new_tokens,
                                  f"{system} ({placement})", server.config.api_key))
            if a.soak and n == 0:  # on the first system
                _log(f"{system}: soak, {a.soak} short requests through {max(a.clients, 2 * a.slots)} clients")
                rows.append(load.soak(server.url, server.config.model_name, short, max(a.clients, 2 * a.slots), 8,
                                      f"{system} ({placement})", server.config.api_key))
        finally:
            server.stop()
    res = {"machine": machine(), "model": a.model or "smollm2-135m", "dtype": a.dtype, "budget": _config(a).budget_label,
           "slots": a.slots, "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows}
    emit(res, load.table(rows), "serve", a.out, None, a.json, _log)
    lost = [r for r in rows if r.get("soak") and not r["exactly_once"]]
    return 1 if lost else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2ats", description="A²ATS retrieval attention for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="answer a prompt (file or stdin), streaming tokens, with A²ATS decoding")
    _add_model_args(g)
    _add_decode_args(g)
    _add_hybrid_arg(g)
    g.add_argument("--prompt-file", help="file holding the prompt (default: read stdin)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is, without the chat template")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="answer many prompts with continuous batching, K/V in host memory (JSON lines out)")
    _add_model_args(s)
    _add_decode_args(s)
    s.add_argument("prompts", nargs="?", help='file of prompts: JSON lines {"prompt": ..., "max_new_tokens": ..., "id": ...} '
                   "or one per line (not with --http)")
    s.add_argument("--slots", type=int, default=4, help="sequences decoding together (the batch)")
    s.add_argument("--max-context", type=int, help="tokens per slot (default: the longest prompt + its new tokens; "
                                                   "--http: the model's context, at most 8192)")
    _add_http_args(s)
    s.add_argument("--placement", choices=["offload", "local"], default="offload",
                   help="offload: K/V in host memory, selection beside the model (the paper's system); local: K/V beside the model")
    s.add_argument("--kv-dtype", choices=["model", "bfloat16", "int8"], default="model",
                   help="how K/V are stored: the model's dtype, bf16 (half the host bytes of an fp32 model), or int8 "
                        "with a scale per row (a quarter)")
    s.add_argument("--dense", action="store_true", help="full attention instead of A²ATS (the baseline)")
    s.add_argument("--no-chat-template", action="store_true", help="feed prompts as they are, without the chat template")
    s.add_argument("--out", help="append completions to this file (default: stdout), one JSON line each, as they finish")
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="a needle-in-a-haystack question over essays, answered with A²ATS")
    _add_model_args(d)
    _add_decode_args(d)
    _add_hybrid_arg(d)
    d.add_argument("--context", type=int, default=4000, help="haystack length in tokens")
    d.add_argument("--depth", type=float, default=0.5, help="where the needle sits (0 = start, 1 = end)")
    d.set_defaults(fn=cmd_demo, max_new_tokens=32)

    c = sub.add_parser("calibrate", help="build query-aware codebooks for a model from the built-in offline corpus")
    _add_model_args(c)
    _add_codebook_args(c)
    c.add_argument("--out", help="output file (.safetensors) or folder (default: the user cache, where generate looks)")
    c.set_defaults(fn=cmd_calibrate)

    e = sub.add_parser("eval", help="accuracy suite: RULER-style tasks, every method at equal budgets, shared prefill")
    _add_model_args(e)
    e.add_argument("--preset", choices=["quick", "standard", "long"], default="quick",
                   help="long: Qwen2.5-Coder-0.5B (unless --model), every task at 4K/8K/16K and the needles at 32K")
    e.add_argument("--tasks", type=_csv(str), help="comma-separated task names (default: the preset's)")
    e.add_argument("--lengths", type=_csv(int), help="comma-separated context lengths in tokens")
    e.add_argument("--needle-lengths", type=_csv(int), help="comma-separated lengths at which only the needle tasks run")
    e.add_argument("--text-lengths", type=_csv(int), help="comma-separated lengths of the held-out prose metrics (attention "
                   "mass, top-K recall, perplexity); default: the preset's")
    e.add_argument("--only", choices=["tasks", "text"], help="run only the task samples, or only the held-out prose "
                   "metrics (a long run in parts, on the same --out)")
    e.add_argument("--prefill-dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype of the shared prefills (autocast; decode stays in --dtype)")
    e.add_argument("--methods", type=_csv(str), help="comma-separated: full,oracle,streaming,quest,pqcache,a2ats,a2ats-euclid,a2ats-postrope,a2ats-banded,a2ats-hybrid (a2ats-hybrid0.75: 75%% of the budget by the paper's score; a +max suffix: K per KV head)")
    e.add_argument("--budgets", type=_csv(float), help="comma-separated fractions, e.g. 0.015,0.03,0.06")
    e.add_argument("--samples", type=int, help="samples per task and length")
    e.add_argument("--centroids", type=int, help="codebook size for the a2ats methods")
    e.add_argument("--out", default="eval-out", help="output folder (a run started again on it resumes: rows there are kept)")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="tables and plots from one or more eval results.jsonl files (e.g. runs of other methods on the same prompts)")
    r.add_argument("results", nargs="+", help="results.jsonl files written by `a2ats eval`")
    r.add_argument("--out", required=True, help="folder for summary.md and the plots")
    r.add_argument("--title", default="a2ats eval")
    r.set_defaults(fn=cmd_report)

    b = sub.add_parser("bench", help="speed: `bench kernels` (the CPU kernels vs read bandwidth), `bench decode` (ms/token vs context), "
                       "`bench throughput` (tokens/s vs batch, serving engine), `bench weights` (perplexity per decode weight format), "
                       "`bench project` (performance model)")
    b.add_argument("what", choices=["kernels", "decode", "prefill", "throughput", "weights", "project", "serve"])
    _add_model_args(b)
    _add_decode_args(b)
    b.add_argument("--context", type=int, default=32768, help="kernels: tokens in the synthetic cache")
    b.add_argument("--lengths", type=_csv(int), help="decode, throughput: context lengths (default 2K,8K,16K,32K; throughput 8K,32K)")
    b.add_argument("--batches", type=_csv(int), default=(1, 2, 4, 8), help="throughput: batch sizes (slots)")
    b.add_argument("--systems", type=_csv(str), default=("a2ats-offload", "full-local"),
                   help="throughput: a2ats-offload (K/V in host memory), full-local (full attention, cache beside the model), "
                        "suffixes: -xN (a2ats-offload: decode steps in N micro-batches), -kvbf16 / -kvint8 (K/V stored "
                        "in bf16 / int8 with a scale per row)")
    b.add_argument("--random-weights", action="store_true",
                   help="throughput: a model of --shape with random weights and codebooks (e.g. Llama-3.1-8B on a GPU): speed only")
    b.add_argument("--prompt-tokens", type=int, default=4096, help="throughput --requests: tokens per prompt (at most)")
    b.add_argument("--requests", type=int, default=0, help="throughput: also serve this many real prompts through a queue")
    b.add_argument("--variants", type=_csv(str), default=DEFAULT_VARIANTS,
                   help=f"decode, comma-separated: {', '.join(VARIANTS)} (*-fp32w/-bf16w/-int8w/-int4w: decode reads that weight format; "
                        "a2ats-fast and dense-lean: the default, int8)")
    b.add_argument("--prefill-systems", type=_csv(str), default=("a2ats", "a2ats-fp32", "dense"),
                   help="prefill: a2ats (default prefill dtype), a2ats-fp32 (the model's dtype), dense (no key "
                        "encoding), llama.cpp (its own prefill of the same ids, when installed)")
    b.add_argument("--ppl-tokens", type=int, default=16384,
                   help="weights: held-out tokens scored per weight format (2,048-token windows)")
    b.add_argument("--steps", type=int, default=8, help="decode: timed steps per variant and length (median reported)")
    b.add_argument("--out", help="decode: folder for decode.json, decode.md and decode.png")
    b.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    b.add_argument("--clients", type=int, default=4, help="serve: concurrent clients, each streaming one request at a time")
    b.add_argument("--slots", type=int, default=4, help="serve: the server's slots")
    b.add_argument("--serve-systems", type=_csv(str), default=("a2ats", "dense"),
                   help="serve: a2ats (K/V in host memory) and/or dense (full attention, --dense)")
    b.add_argument("--soak", type=int, default=0, metavar="N",
                   help="serve: then N short requests (half streamed) to the first system, each checked answered exactly once")
    b.set_defaults(host="127.0.0.1", api_key=None, max_queue=64, max_body_bytes=2 << 20, drain_seconds=30.0,
                   kv_dtype="model")
    from a2ats.bench.project import add_arguments as _add_project_args

    _add_project_args(b)  # bench project: --shape, --hardware, --kernels-json, --contexts, --measured
    b.set_defaults(fn=cmd_bench)
    return p


def _add_http_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--http", action="store_true", help="an OpenAI-compatible HTTP server (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /health, /metrics) instead of a prompts file")
    s.add_argument("--host", default="127.0.0.1", help="--http: address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="--http: port (0: any free one)")
    s.add_argument("--api-key", help="--http: require 'Authorization: Bearer KEY' (default: $A2ATS_API_KEY, else none; "
                                     "the variable keeps the key out of the process list)")
    s.add_argument("--max-queue", type=int, default=64, help="--http: requests waiting for a slot before 429")
    s.add_argument("--max-body-bytes", type=int, default=2 << 20, help="--http: larger request bodies are answered 413")
    s.add_argument("--drain-seconds", type=float, default=30.0,
                   help="--http: after SIGTERM, how long requests in flight may finish before they are answered 503")


def _check_args(a) -> None:
    """Every argument, path and permission checked before a model loads or a calibration starts."""
    from pathlib import Path

    def need_file(path, what):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"no {what} at {path}: give an existing file")

    need_file(getattr(a, "prompt_file", None), "prompt file")
    need_file(getattr(a, "prompts", None), "prompts file")
    if a.cmd == "serve" and (a.prompts is None) != a.http:
        raise ValueError("give a prompts file (JSON lines mode) or --http (the HTTP server), not both" if a.http
                         else "give a prompts file, or --http for the HTTP server")
    if a.cmd == "serve" and a.http:
        _server_config(a, a.port)  # port, queue, limits, key: refused before the model loads
    if a.cmd == "bench" and getattr(a, "soak", 0) < 0:
        raise ValueError(f"--soak must be >= 0, got {a.soak}")
    if a.cmd == "report":
        for r in a.results:
            need_file(r, "results file (the results.jsonl that `a2ats eval --out DIR` wrote)")
    for name in ("slots", "steps", "max_new_tokens", "context", "samples", "centroids", "ppl_tokens", "clients"):
        value = getattr(a, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("batches", "lengths", "needle_lengths", "text_lengths"):
        bad = [v for v in getattr(a, name, None) or () if v < 1]
        if bad:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {bad}")
    if hasattr(a, "sinks"):
        _config(a)  # budget range, sinks, window, WRoPE settings
    if hasattr(a, "centroids") and hasattr(a, "wrope_bands"):
        _settings(a)
    if a.cmd == "bench":
        from a2ats.bench import VARIANTS
        from a2ats.bench.throughput import SYSTEMS, parse_system

        if a.what == "decode":
            unknown = [v for v in a.variants if v not in VARIANTS]
            if unknown:
                raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if a.what == "throughput":
            unknown = [s for s in a.systems if parse_system(s) is None]
            if unknown:
                raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}, with -xN and/or -kvbf16 / -kvint8")
    from a2ats.hf.calibrate import check_writable

    if a.cmd in ("eval", "bench") and getattr(a, "out", None):
        check_writable(Path(a.out) / "results")
    if a.cmd == "calibrate":
        out = a.out or ""
        check_writable(Path(out) if out.endswith(".safetensors") else Path(out) / "x" if out else _cache_file())
    elif hasattr(a, "codebooks") and not getattr(a, "dense", False):
        if a.codebooks is None:
            check_writable(_cache_file())
            return
        from a2ats.core.codebook import Codebooks
        from a2ats.hf.calibrate import codebook_file

        file = codebook_file(a.codebooks, _settings(a))
        if file.exists():
            Codebooks.load(file)  # a file that is not a codebook file is named now, not after the model loads
        else:
            check_writable(file)


@contextmanager
def _ranks(a):
    """Under torchrun: only the commands that run sharded, a prompt from a file (stdin reaches one rank only),
    rank 0 alone printing; the process group is left at the end. Otherwise nothing."""
    global _QUIET
    from a2ats.hf import tp

    if not tp.launched():
        yield
        return
    from a2ats.core.distributed import TensorParallelError

    _QUIET = int(os.environ.get("RANK", "0")) != 0
    if a.cmd not in TORCHRUN_COMMANDS:
        raise TensorParallelError(f"`a2ats {a.cmd}` runs in one process; under torchrun a2ats runs "
                                  f"{' and '.join(TORCHRUN_COMMANDS)}: drop torchrun")
    if a.cmd == "generate" and not a.prompt_file:
        raise TensorParallelError("under torchrun give the prompt with --prompt-file (stdin reaches one rank only)")
    # the file descriptor, not sys.stdout: writers that hold the stream from import time go quiet too
    saved = os.dup(1) if _QUIET else None
    if _QUIET:
        sys.stdout.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    try:
        yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tp.finish()


def _cache_file():
    """A file in the codebook cache (where codebooks are calibrated into when no --codebooks is given)."""
    from a2ats.assets.models import cache_dir

    return cache_dir() / "codebooks" / "model" / "codebook.safetensors"


def main(argv: list[str] | None = None) -> int:
    from a2ats.assets.models import AssetError
    from a2ats.core.codebook import CodebookError
    from a2ats.core.distributed import TensorParallelError
    from a2ats.runtime import ServeError

    a = build_parser().parse_args(argv)
    try:
        _check_args(a)
        with _ranks(a):
            return a.fn(a)
    except TensorParallelError as e:  # every rank refuses alike: said once
        if not _QUIET:
            print(f"a2ats {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (AssetError, CodebookError, ValueError, OSError) as e:
        who = f" (rank {os.environ.get('RANK')})" if _QUIET else ""  # a rank's own trouble is not hidden
        print(f"a2ats {a.cmd}{who}: error: {e}", file=sys.stderr)
        return 2
    except ServeError as e:  # the completions finished before it are already written
        print(f"a2ats {a.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
