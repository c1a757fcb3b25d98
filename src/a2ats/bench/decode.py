"""Decode speed against context length: A²ATS fast path, A²ATS reference path, dense (transformers SDPA),
and dense through the lean engine, on the same model, dtype and cache contents.

The long caches are *synthesized* (:mod:`.synthetic`): one real dense prefill of ``base`` tokens is tiled
along the token axis up to each length. Positions continue from the synthesized length.

The lean A²ATS engines run as they are built by default: a decode step where selection costs more than dense
attention (the engine's measured crossover, :mod:`a2ats.runtime.crossover`) attends densely, and its row says so
(``dense_steps``, ``note``); ``dense_below=0`` times selection at every length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from a2ats import factory
from a2ats.bench import DEFAULT_VARIANTS, VARIANTS, engine_variant
from a2ats.bench.accounting import account, host_read_gbps, step_bytes
from a2ats.bench.llamacpp import FLASH_SETTINGS
from a2ats.bench.output import emit, machine
from a2ats.bench.synthetic import STEADY, decode_steps, real_prefill, tile
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.factory import options
from a2ats.hf.cache import A2ATSCache
from a2ats.methods import A2ATSMethod
from a2ats.runtime import KVState, StepResult

LENGTHS = (2048, 8192, 16384, 32768)
KV_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def _dense_below(text: str) -> int | str:
    """``--dense-below``: "auto" or a context in tokens >= 0."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--dense-below takes auto or a context in tokens >= 0 (0: always select), "
                                         f"got {text!r}")
    return value


@dataclass
class DecodeRow:
    variant: str
    context: int
    ms_per_token: float  # median over the timed steps
    tokens_per_s: float
    steps: int
    breakdown_ms: dict[str, float] = field(default_factory=dict)  # per step, fast path only
    attended: float = 0.0  # tokens attended per layer and KV head (A²ATS)
    accounting: dict = field(default_factory=dict)  # lean engine only: bytes, GB/s per part, share of the floor
    dense_steps: int = 0  # A²ATS lean engines: timed steps that attended to every token (mostly: the dense fallback)
    note: str = ""  # which path the row ran where it is not the variant's own (the dense fallback, and why)


def _time_hf(model, cache, length: int, steps: int, warmup: int) -> list[float]:
    """transformers' forward, one token at a time, as generate runs it (greedy, no logits processors)."""
    token = torch.tensor([[42]])
    times = []
    with torch.inference_mode():
        for s in range(warmup + steps):
            n = length + s + 1
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, attention_mask=torch.ones(1, n, dtype=torch.long),
                        position_ids=torch.tensor([[n - 1]]), use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if s >= warmup:
                times.append(time.perf_counter() - t)
    return times


def _hf_cache(state: KVState, a2ats: bool):
    cache = A2ATSCache(len(state.k)) if a2ats else DynamicCache()
    for i, (k, v) in enumerate(zip(state.k, state.v)):
        if a2ats:
            cache.layers[i].update(k[None], v[None])
            cache.layers[i].write_extra("codes", state.codes[i][None])
        else:
            cache.update(k[None], v[None], i)
    return cache


def _row(variant, length, times, attended=0.0) -> DecodeRow:
    med = statistics.median(times)
    return DecodeRow(variant, length, 1e3 * med, 1.0 / med, len(times), attended=attended)


def _engine_row(variant: str, length: int, steps: list[StepResult]) -> DecodeRow:
    row = _row(variant, length, [s.seconds for s in steps],
               sum(s.attended for s in steps) / max(sum(s.heads for s in steps), 1))
    # an A²ATS step that attended to every token of every row: the dense fallback (or a budget covering the context)
    row.dense_steps = sum(1 for s in steps if s.heads and s.attended == s.context)
    parts = {k: 1e3 * sum(s.breakdown.get(k, 0.0) for s in steps) / len(steps)
             for k in ("weights", "scoring", "host attention", "transfers", "rest")}
    # one memory on a CPU: the runtime's "transfers" are no-ops there, counted with the rest
    row.breakdown_ms = {"weights": round(parts["weights"], 3), "scoring": round(parts["scoring"], 3),
                        "attention": round(parts["host attention"], 3),
                        "rest": round(parts["transfers"] + parts["rest"], 3)}
    return row


def _time_alternately(names: list[str], engines: dict, state, length: int, text_ids, steps: int,
                      warmup: int) -> dict[str, tuple[float, list[StepResult]]]:
    """The engines' timed steps at ``length``, in two rounds: the engines in order, then in reverse order, half the
    steps each (each with its own warm-up), so that no engine is always the one timed first (timed one after
    another, the first engine at each length read slower on the same work). Per engine: (seconds spent, steps)."""
    out = {name: (0.0, []) for name in names}
    halves = [(steps + 1) // 2, steps // 2]
    for order, n in zip((names, names[::-1]), halves):
        for name in order if n else ():
            eng, t = engines[name], time.perf_counter()
            got = decode_steps(eng, tile(state, length, codes=eng.method is not None), text_ids, 1, n, warmup)
            eng.release()
            spent, seen = out[name]
            out[name] = (spent + time.perf_counter() - t, seen + got)
    return out


def bench_decode(model, tok, codebooks: Codebooks, config: A2ATSConfig, lengths=LENGTHS,
                 variants=DEFAULT_VARIANTS, steps: int = 8, warmup: int = 2, base: int = 4096, text_ids=None,
                 gguf: str | None = None, read_gbps: float | None = None, log=print, kv_dtype: torch.dtype | None = None,
                 dense_below: int | str = "auto", llama_bench: str | None = None,
                 llama_ggufs: list[str] | None = None, llama_lengths: list[int] | None = None,
                 llama_flash: str = "off,on", llama_repeats: int = 2) -> tuple[list, dict]:
    """One row per (variant, length), and run facts: the prefill (the cost of encoding keys at prefill), the
    host's read bandwidth, measured here unless ``read_gbps`` is given, that each lean-engine row's bytes are
    held against (:mod:`.accounting`), and where the A²ATS engines start selecting (``crossover``). ``text_ids``:
    the real prompt to prefill (default: a State of the Union speech); ``gguf``: the file llama.cpp runs (default:
    the default model's). ``kv_dtype`` and ``dense_below``: the lean engines' (default: theirs). ``llama_bench``: a
    natively built llama-bench, run on ``llama_ggufs`` at each length (of ``llama_lengths``, default all) right
    after our variants (same run, same depth), one row per GGUF at its better flash-attention setting (of
    ``llama_flash``), ``llama_repeats`` repetitions each."""
    if text_ids is None:
        from a2ats.assets.corpus import speeches

        text = next(s for s in speeches()[150:] if len(s) > 6 * base)
        text_ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:base]])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    if "llama.cpp" in variants:
        from a2ats.bench import llamacpp

        if not llamacpp.available():
            raise ValueError("the llama.cpp variant needs llama-cpp-python: `pip install llama-cpp-python` "
                             "(builds from source, ~10-15 min on 2 cores), or leave llama.cpp out of --variants")
    def engine(cb=None, **kw):  # lengths past the model's context: speed only
        if cb is not None or "method" in kw:
            kw["dense_below"] = dense_below
        return factory.decoder(model, cb, config, runtime="engine", beyond_model_context=True, kv_dtype=kv_dtype,
                               **STEADY, **kw)

    fast = engine(codebooks, path="fast")
    dense = engine()
    # one engine per (variant, weight format) asked for: *-int8w etc. read that format at decode (fp32 models)
    lean = {"a2ats-fast": fast, "dense-lean": dense}
    for v in variants:
        parsed = engine_variant(v)
        if parsed is not None and v not in lean:
            base, fmt = parsed
            lean[v] = (engine(codebooks, path="fast", decode_weights=fmt) if base == "a2ats-fast"
                       else engine(decode_weights=fmt))
    if "a2ats-fast-paper" in variants:
        paper = A2ATSMethod(codebooks, WRoPE(find_rotary_embedding(model), config.wrope_distance, None))
        lean["a2ats-fast-paper"] = engine(method=paper, path="fast")
    state, with_codes = real_prefill(fast, text_ids)
    _, plain = real_prefill(dense, text_ids)
    dense.release()
    prefill = {"tokens": int(text_ids.shape[1]), "seconds_dense": plain, "seconds_with_encoding": with_codes,
               "encoding_share": max(with_codes - plain, 0.0) / with_codes,
               "host_read_gbps": read_gbps or host_read_gbps()}
    log(f"real prefill of {text_ids.shape[1]} tokens: {with_codes:.1f} s with key encoding, {plain:.1f} s without "
        f"(encoding {prefill['encoding_share']:.1%}); tiled to each length")
    prefill["kv_dtype"] = str(fast.kv_dtype).removeprefix("torch.")
    prefill["crossover"] = fast.dense_rule.describe() if fast.dense_rule is not None else "always selects"
    log(f"a2ats-fast ({prefill['kv_dtype']} K/V): {prefill['crossover']}")
    rows: list[DecodeRow] = []
    for length in lengths:
        timed = _time_alternately([v for v in variants if v in lean], lean, state, length, text_ids, steps, warmup)
        for variant in variants:
            t = time.perf_counter()
            if variant in lean:
                eng = lean[variant]
                row = _engine_row(variant, length, timed[variant][1])
                attended = row.attended if eng.method is not None else length
                read = step_bytes(eng, length, attended)
                if row.dense_steps:  # dense steps read no codes
                    read["scoring"] = round(read["scoring"] * (1 - row.dense_steps / row.steps))
                    what = f"dense fallback ({eng.dense_step})" if eng.dense_step else "selected every token"
                    row.note = what if row.dense_steps == row.steps else \
                        f"{what} on {row.dense_steps} of {row.steps} steps"
                row.accounting = account(read, row.breakdown_ms, row.ms_per_token, prefill["host_read_gbps"])
                t -= timed[variant][0]
            elif variant == "a2ats-reference":
                cache = _hf_cache(tile(state, length), a2ats=True)
                with factory.decoder(model, codebooks, config, path="reference", runtime="transformers"):
                    row = _row(variant, length, _time_hf(model, cache, length, steps, warmup))
                del cache
            elif variant == "llama.cpp":
                from a2ats.bench.llamacpp import bench_llamacpp

                (_, times), = bench_llamacpp(text_ids, [length], steps, warmup, gguf=gguf, log=log,
                                             prefills=prefill.setdefault("llama.cpp_seconds", {}))
                row = _row(variant, length, times)
            elif variant == "dense-hf":
                cache = _hf_cache(tile(state, length, codes=False), a2ats=False)
                row = _row(variant, length, _time_hf(model, cache, length, steps, warmup))
                del cache
            rows.append(row)
            log(f"{variant:16s} {length:6d} tokens: {row.ms_per_token:7.1f} ms/token "
                f"({row.tokens_per_s:5.1f} tokens/s) {row.breakdown_ms or ''}  [{time.perf_counter() - t:.0f} s]"
                + (f"  {row.note}" if row.note else ""))
        if llama_bench and (llama_lengths is None or length in llama_lengths):
            from a2ats.bench.llamacpp import llama_bench as run_llama_bench

            rows += run_llama_bench(llama_bench, llama_ggufs or [], length, repeats=llama_repeats, flash=llama_flash,
                                    log=log)
    return rows, prefill


def rows_to_json(rows: list[DecodeRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def add_arguments(p) -> None:
    options.add_model_args(p)
    options.add_selection_args(p)
    options.add_codebook_args(p)
    p.add_argument("--lengths", type=options.csv(int),
                   help=f"context lengths (default {','.join(map(str, LENGTHS))})")
    p.add_argument("--variants", type=options.csv(str), default=DEFAULT_VARIANTS,
                   help=f"comma-separated: {', '.join(VARIANTS)} (*-fp32w/-bf16w/-int8w/-int4w: decode reads that weight "
                        f"format; a2ats-fast and dense-lean: the default, int8); default {','.join(DEFAULT_VARIANTS)}")
    p.add_argument("--steps", type=int, default=8,
                   help="timed steps per variant and length (median reported); the engine variants run half of them "
                        "in the order given, then half in reverse order")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="auto",
                   help="how the lean engines store K/V (auto: the engine's default, bf16 for a float32 model from a "
                        "16-bit checkpoint)")
    p.add_argument("--dense-below", type=_dense_below, default="auto",
                   help="A²ATS lean engines: auto (dense where selection costs more, measured at start-up), or a context "
                        "in tokens below which steps attend densely (0: select at every length)")
    p.add_argument("--llama-bench", metavar="PATH",
                   help="a natively built llama.cpp llama-bench: run after our variants at each length (flash "
                        "attention as --llama-flash, the better kept) on --llama-gguf")
    p.add_argument("--llama-gguf", type=options.csv(str), metavar="FILES",
                   help="GGUFs for --llama-bench (default: a Q8_0 converted once from the model's bf16 copy by the "
                        "converter in llama-bench's source tree, our int8's bits; and the model's shipped 4-bit GGUF)")
    p.add_argument("--llama-lengths", type=options.csv(int), metavar="LENGTHS",
                   help="the lengths --llama-bench runs at (default: every --lengths; llama-bench prefills each depth "
                        "itself for every setting and repetition: on 2 cores a 16K depth takes ~3 min on SmolLM2)")
    p.add_argument("--llama-flash", choices=FLASH_SETTINGS, default="off,on",
                   help="--llama-bench's flash attention: off,on (both, the better kept; default), or one of them where "
                        "the other is known slower at shorter depths on this machine (each setting prefills the depth)")
    p.add_argument("--llama-repeats", type=int, default=2, metavar="N",
                   help="--llama-bench's repetitions per setting (default 2; each prefills the depth again)")
    p.add_argument("--out", help="folder for decode.json, decode.md and decode.png")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def main(a) -> int:
    """ms per token against context, one row per variant and length: a table (or JSON), with --out the files."""
    from a2ats.bench.llamacpp import gguf_for
    from a2ats.bench.report import decode_plot, decode_table

    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    gguf = gguf_for(a.model, log=options.log) if "llama.cpp" in a.variants else None  # the named model's (verified)
    ggufs = a.llama_gguf
    if a.llama_bench and not ggufs:
        from a2ats.assets.models import DEFAULT_MODEL, cache_dir, model_path
        from a2ats.bench.llamacpp import q8_0_gguf

        shipped = gguf_for(a.model, log=options.log)  # refuses a model that is not a named one
        name = a.model or DEFAULT_MODEL
        ggufs = [q8_0_gguf(a.llama_bench, model_path(name, log=options.log), cache_dir() / "gguf", log=options.log),
                 shipped]
    model, tok = options.load(a)
    cfg = options.config(a)
    rows, prefill = bench_decode(model, tok, options.codebooks(a, model, tok), cfg, lengths=a.lengths or LENGTHS,
                                 variants=a.variants, steps=a.steps, gguf=gguf, log=options.log,
                                 kv_dtype=KV_DTYPES[a.kv_dtype], dense_below=a.dense_below,
                                 llama_bench=a.llama_bench, llama_ggufs=ggufs, llama_lengths=a.llama_lengths,
                                 llama_flash=a.llama_flash, llama_repeats=a.llama_repeats)
    rows = rows_to_json(rows)
    res = {"machine": machine(), "model": options.model_label(a), "dtype": a.dtype, "budget": cfg.budget_label,
           "wrope_bands": cfg.wrope_band_ratio, "command": "a2ats " + " ".join(sys.argv[1:]),
           "host_read_gbps": prefill.pop("host_read_gbps"), "kv_dtype": prefill.pop("kv_dtype"),
           "crossover": prefill.pop("crossover"), "prefill": prefill, "rows": rows}
    title = f"{res['machine']}, {a.dtype}, {res['budget']}"
    emit(res, decode_table(rows), "decode", a.out, lambda p: decode_plot(rows, p, title), a.json, options.log)
    return 0
