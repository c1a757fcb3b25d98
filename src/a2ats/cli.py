"""Command line: ``a2ats demo | generate | calibrate | eval | report | bench`` (``python -m a2ats`` is the same)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .bench import DEFAULT_VARIANTS, VARIANTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _budget(text: str):
    from .config import Budget

    try:
        return Budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _log(msg: str) -> None:
    print(f"[a2ats] {msg}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32: fastest on CPUs here)")
    p.add_argument("--device", default="cpu")


def _add_codebook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--centroids", type=int, default=4096, help="centroids per layer per KV head (paper: 4096)")
    p.add_argument("--wrope-distance", type=int, default=2048, help="WRoPE distance b (paper: 2048)")
    p.add_argument("--wrope-bands", type=float, default=None, metavar="RATIO",
                   help="banded WRoPE (not in the paper): score each geometric band of distances, ratio RATIO (e.g. 4), at its own distance")
    p.add_argument("--text-tokens", type=int, default=65536, help="calibration prose tokens (paper: ~64K)")
    p.add_argument("--uuid-tokens", type=int, default=16384, help="calibration UUID-string tokens (paper: ~16K)")
    p.add_argument("--max-iter", type=int, default=10, help="Lloyd iterations at most (paper: 300; see README)")
    p.add_argument("--euclidean", action="store_true", help="plain k-means on pre-RoPE keys (ablation), not query-aware")
    p.add_argument("--seed", type=int, default=0)


def _settings(a):
    from .codebook import CodebookSettings

    return CodebookSettings(
        n_centroids=a.centroids,
        wrope_distance=a.wrope_distance,
        wrope_band_ratio=a.wrope_bands,
        query_aware=not a.euclidean,
        text_tokens=a.text_tokens,
        uuid_tokens=a.uuid_tokens,
        max_iter=a.max_iter,
        seed=a.seed,
    )


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebooks", help="codebook file, or folder holding one (default: the user cache; built on first use)")
    p.add_argument("--budget", type=_budget, default="0.03", help="0.03 = 3%% of the context per query head; 512 = 512 tokens; 1.0 = all")
    p.add_argument("--reduction", choices=["union", "max"], default="union", help="GQA: union of per-head top-K (paper) or max score per KV head")
    p.add_argument("--sinks", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--path", choices=["auto", "fast", "reference"], default="auto",
                   help="fast: the lean engine with the CPU kernels (default on a CPU where they build); "
                        "reference: transformers' generate with the selection applied as a mask (for accuracy)")
    p.add_argument("--decode-weights", choices=["model", "bf16"], default="model",
                   help="fast path, float32 models: bf16 reads decode steps' projection weights from bf16 copies "
                        "(fp32 math; about half the weight bytes per token, outputs of the model with bf16-rounded "
                        "weights)")
    _add_codebook_args(p)


def _load(a):
    from .assets import load_model

    t = time.perf_counter()
    model, tok = load_model(a.model, DTYPES[a.dtype], a.device, log=_log)
    _log(f"loaded {a.model or 'the default model (SmolLM2-135M-Instruct)'} in {time.perf_counter() - t:.1f} s")
    return model, tok


def _config(a):
    from .config import A2ATSConfig

    return A2ATSConfig(budget=a.budget, sinks=a.sinks, window=a.window, wrope_distance=a.wrope_distance,
                       wrope_band_ratio=a.wrope_bands, reduction=a.reduction)


def _codebooks(a, model, tok):
    from .calibrate import load_or_calibrate

    return load_or_calibrate(model, tok, a.codebooks, _settings(a), log=_log)


def _a2ats(a, model, tok):
    """The A²ATS wrapper from parsed arguments (codebooks calibrated on first use)."""
    from .hf import A2ATS

    return A2ATS(model, _codebooks(a, model, tok), _config(a), path="reference" if a.path == "reference" else "auto")


def _run(a, model, tok, ids):
    """Generate with the path asked for: the lean engine + kernels, or transformers' generate."""
    from . import kernels
    from .engine import Engine
    from .engine.model import SUPPORTED
    from .generate import generate, generate_lean

    fast = a.path == "fast" or (a.path == "auto" and a.device == "cpu" and kernels.cpu_backend() is not None)
    if fast and type(model).__name__ in SUPPORTED and a.reduction == "union":
        bf16 = a.decode_weights == "bf16" and model.dtype == torch.float32
        engine = Engine(model, _codebooks(a, model, tok), _config(a), path="fast",
                        decode_weights="bf16" if bf16 else "model")
        res = generate_lean(engine, tok, ids, a.max_new_tokens)
        if res.stats is not None:
            _log(res.stats.summary())
        _log(f"prompt {res.prompt_tokens} tokens, prefill {res.prefill_seconds:.1f} s (dense); {res.new_tokens} new "
             f"tokens at {res.decode_tokens_per_second:.1f} tokens/s (fast path: lean engine + CPU kernels)")
        return res
    if fast:
        _log("the lean engine does not serve this model or reduction: using transformers' generate")
    a2 = _a2ats(a, model, tok)
    with a2:
        res = generate(model, tok, a2, ids, a.max_new_tokens)
    _log(a2.stats.summary())
    kind = ("fast path: transformers' generate + CPU kernels" if a2.path == "fast" else
            "reference path: selection applied as a mask on one device, for accuracy, not speed")
    _log(f"prompt {res.prompt_tokens} tokens, prefill {res.prefill_seconds:.1f} s (dense); "
         f"{res.new_tokens} new tokens at {res.decode_tokens_per_second:.1f} tokens/s ({kind})")
    return res


def cmd_generate(a) -> int:
    from .generate import encode_prompt

    text = open(a.prompt_file, encoding="utf-8").read() if a.prompt_file else sys.stdin.read()
    if not text.strip():
        raise SystemExit("a2ats generate: the prompt is empty (give --prompt-file F or text on stdin)")
    from .hf import check_context

    model, tok = _load(a)
    ids = encode_prompt(tok, text, chat_template=not a.no_chat_template)
    check_context(model, ids.shape[-1], a.max_new_tokens)  # before any work (calibration included)
    _run(a, model, tok, ids)
    return 0


def cmd_demo(a) -> int:
    from .corpus import needle_prompt
    from .generate import encode_prompt

    from .hf import check_context

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
    from .assets import load_model
    from .calibrate import calibrate, default_codebook_path

    settings = _settings(a)
    model, tok = load_model(a.model, DTYPES[a.dtype], a.device, log=_log)
    out = a.out
    if out is None:
        out = default_codebook_path(model, settings)
    elif not out.endswith(".safetensors"):
        out = f"{out.rstrip('/')}/{settings.tag}.safetensors"
    t = time.perf_counter()
    cb = calibrate(model, tok, settings)
    path = cb.save(out)
    _log(f"wrote {path} in {time.perf_counter() - t:.1f} s: {cb.info}")
    return 0


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def cmd_eval(a) -> int:
    from pathlib import Path

    from .eval import harness, report

    preset = dict(harness.PRESETS[a.preset])
    for k in ("tasks", "lengths", "methods", "budgets", "samples", "centroids"):
        if getattr(a, k) is not None:
            preset[k] = getattr(a, k)
    cfg = harness.EvalConfig(**preset)
    model, tok = _load(a)
    out = Path(a.out)
    rows = harness.run(model, tok, cfg, out, log=_log)
    print(report.write_summary(rows, out, f"a2ats eval ({a.preset} preset)", cfg.decode_last, cfg.ppl_tokens))
    _log(f"wrote {out}/results.jsonl, summary.md, score_vs_budget.png, heatmap.png")
    return 0


def cmd_report(a) -> int:
    import json
    from pathlib import Path

    from .eval import report

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


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def cmd_bench(a) -> int:
    import json
    from pathlib import Path

    if a.what == "kernels":
        from .bench.kernels import bench_kernels

        res = {"machine": _machine(), **bench_kernels(n=a.context, dtype=DTYPES[a.dtype])}
        if a.json:
            print(json.dumps(res))
        else:
            for k, v in res.items():
                print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
        return 0
    from .bench.decode import bench_decode, rows_to_json
    from .bench.report import decode_plot, decode_table

    model, tok = _load(a)
    rows, prefill = bench_decode(model, tok, _codebooks(a, model, tok), _config(a), lengths=a.lengths,
                                 variants=a.variants, steps=a.steps, log=_log)
    rows = rows_to_json(rows)
    res = {"machine": _machine(), "dtype": a.dtype, "budget": str(a.budget), "wrope_bands": a.wrope_bands,
           "command": "a2ats " + " ".join(sys.argv[1:]), "prefill": prefill, "rows": rows}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps(res, indent=1))
        (out / "decode.md").write_text(decode_table(rows))
        decode_plot(rows, out / "decode.png", f"{res['machine']}, {a.dtype}, {res['budget']}")
        _log(f"wrote {out}/decode.json, decode.md, decode.png")
    print(json.dumps(res) if a.json else decode_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2ats", description="A²ATS retrieval attention for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="answer a prompt (file or stdin), streaming tokens, with A²ATS decoding")
    _add_model_args(g)
    _add_decode_args(g)
    g.add_argument("--prompt-file", help="file holding the prompt (default: read stdin)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is, without the chat template")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="a needle-in-a-haystack question over essays, answered with A²ATS")
    _add_model_args(d)
    _add_decode_args(d)
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
    e.add_argument("--preset", choices=["quick", "standard"], default="quick")
    e.add_argument("--tasks", type=_csv(str), help="comma-separated task names (default: the preset's)")
    e.add_argument("--lengths", type=_csv(int), help="comma-separated context lengths in tokens")
    e.add_argument("--methods", type=_csv(str), help="comma-separated: full,oracle,streaming,quest,pqcache,a2ats,a2ats-euclid,a2ats-postrope,a2ats-banded")
    e.add_argument("--budgets", type=_csv(float), help="comma-separated fractions, e.g. 0.015,0.03,0.06")
    e.add_argument("--samples", type=int, help="samples per task and length")
    e.add_argument("--centroids", type=int, help="codebook size for the a2ats methods")
    e.add_argument("--out", default="eval-out", help="output folder")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="tables and plots from one or more eval results.jsonl files (e.g. runs of other methods on the same prompts)")
    r.add_argument("results", nargs="+", help="results.jsonl files written by `a2ats eval`")
    r.add_argument("--out", required=True, help="folder for summary.md and the plots")
    r.add_argument("--title", default="a2ats eval")
    r.set_defaults(fn=cmd_report)

    b = sub.add_parser("bench", help="speed: `bench kernels` (the CPU kernels vs read bandwidth), `bench decode` (ms/token vs context)")
    b.add_argument("what", choices=["kernels", "decode"])
    _add_model_args(b)
    _add_decode_args(b)
    b.add_argument("--context", type=int, default=32768, help="kernels: tokens in the synthetic cache")
    b.add_argument("--lengths", type=_csv(int), default=(2048, 8192, 16384, 32768), help="decode: context lengths")
    b.add_argument("--variants", type=_csv(str), default=DEFAULT_VARIANTS,
                   help=f"decode, comma-separated: {', '.join(VARIANTS)} (*-bf16w: decode reads bf16 weight copies)")
    b.add_argument("--steps", type=int, default=8, help="decode: timed steps per variant and length (median reported)")
    b.add_argument("--out", help="decode: folder for decode.json, decode.md and decode.png")
    b.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from .assets import AssetError
    from .codebook import CodebookError

    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (AssetError, CodebookError, ValueError) as e:
        print(f"a2ats {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
