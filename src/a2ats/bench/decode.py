"""Decode speed against context length: A²ATS fast path, A²ATS reference path, dense (transformers SDPA),
and dense through the lean engine, on the same model, dtype and cache contents.

The long caches are *synthesized*: one real dense prefill of ``base`` tokens (a State of the Union text)
is tiled along the token axis up to each length, keys, values and codes alike. Decode cost depends on
the length and on how spread the selection is, not on what the text says, and a real 32K prefill costs
~6 minutes on 2 cores. Positions continue from the synthesized length.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from a2ats.bench import DEFAULT_VARIANTS, VARIANTS
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.hf import A2ATS
from a2ats.hf.cache import A2ATSCache
from a2ats.methods import A2ATSMethod
from a2ats.runtime import Engine
from a2ats.runtime.step import Timer


@dataclass
class DecodeRow:
    variant: str
    context: int
    ms_per_token: float  # median over the timed steps
    tokens_per_s: float
    steps: int
    breakdown_ms: dict[str, float] = field(default_factory=dict)  # per step, fast path only
    attended: float = 0.0  # tokens attended per layer and KV head (A²ATS)


def _real_prefill(engine: Engine, ids: torch.Tensor):
    """Dense prefill of ``ids`` (1, n) through the engine; returns per-layer K, V, codes (views of its cache)."""
    out = engine.generate(ids, max_new_tokens=1)
    del out
    c = engine.runner.cache
    return [c.keys(i) for i in range(c.num_layers)], [c.values(i) for i in range(c.num_layers)], \
        [c.layer_codes(i) for i in range(c.num_layers)] if c.with_codes else None


def _tile(x: torch.Tensor, length: int) -> torch.Tensor:
    reps = -(-length // x.shape[2])
    return x.repeat(1, 1, reps, *[1] * (x.dim() - 3))[:, :, :length].contiguous()


def _fill_engine(engine: Engine, k, v, codes, length: int, steps: int) -> None:
    runner = engine.runner
    cache = runner.new_cache(1, length + steps + 1)
    cache.advance(torch.ones(1, length, dtype=torch.bool))
    for i in range(cache.num_layers):
        cache.write(i, 0, _tile(k[i], length), _tile(v[i], length),
                    _tile(codes[i], length) if codes is not None and cache.with_codes else None)
    cache.encoded = length


def _time_engine(engine: Engine, length: int, steps: int, warmup: int, profile: bool) -> tuple[list[float], Timer | None]:
    runner, lean = engine.runner, engine.lean
    token = torch.tensor([[42]])
    pos = torch.tensor([[length]])
    one = torch.ones(1, 1, dtype=torch.bool)
    times, timer = [], None
    with torch.inference_mode():
        for s in range(warmup + steps):
            if s == warmup:
                runner.reset_counts()  # count the timed steps only
            timer = Timer() if (profile and s == warmup) else timer
            runner.timer = timer if s >= warmup else None
            t = time.perf_counter()
            if runner.timer is not None:
                timer.start()
            runner.begin_step(one, decode=True)
            if runner.timer is not None:
                timer.lap("rest")
            logits = lean.forward(token, pos, runner.attend, timer=runner.timer)
            token = logits[:, -1].argmax(-1, keepdim=True)
            if runner.timer is not None:
                timer.lap("rest")
            if s >= warmup:
                times.append(time.perf_counter() - t)
            pos = pos + 1
    runner.timer = None
    return times, timer


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


def _hf_cache(k, v, codes, length: int, a2ats: bool):
    cache = A2ATSCache(len(k)) if a2ats else DynamicCache()
    for i in range(len(k)):
        kk, vv = _tile(k[i], length), _tile(v[i], length)
        if a2ats:
            cache.layers[i].update(kk, vv)
            cache.layers[i].write_extra("codes", _tile(codes[i], length))
        else:
            cache.update(kk, vv, i)
    return cache


def _row(variant, length, times, timer=None, attended=0.0) -> DecodeRow:
    med = statistics.median(times)
    row = DecodeRow(variant, length, 1e3 * med, 1.0 / med, len(times), attended=attended)
    if timer is not None:
        per = {k: 1e3 * v / len(times) for k, v in timer.totals.items()}  # every timed step is profiled
        row.breakdown_ms = {k: round(per.get(k, 0.0), 3) for k in ("weights", "scoring", "attention", "rest")}
    return row


def bench_decode(model, tok, codebooks: Codebooks, config: A2ATSConfig, lengths=(2048, 8192, 16384, 32768),
                 variants=DEFAULT_VARIANTS, steps: int = 8, warmup: int = 2, base: int = 4096, text_ids=None,
                 gguf: str | None = None, log=print) -> tuple[list[DecodeRow], dict]:
    """One row per (variant, length), and prefill facts (the cost of encoding keys at prefill).
    ``text_ids``: the real prompt to prefill (default: a State of the Union speech); ``gguf``: the file llama.cpp
    runs (default: the default model's)."""
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
    fast = Engine(model, codebooks, config, path="fast")
    dense = Engine(model)
    # *-bf16w: the same engines reading bf16 copies of the projection weights at decode (fp32 models).
    lean = {"a2ats-fast": fast, "dense-lean": dense}
    if any(v.endswith("-bf16w") for v in variants):
        lean["a2ats-fast-bf16w"] = Engine(model, codebooks, config, path="fast", decode_weights="bf16")
        lean["dense-lean-bf16w"] = Engine(model, decode_weights="bf16")
    if "a2ats-fast-paper" in variants:
        paper = Engine(model, codebooks, config, path="fast")
        paper.runner.method = A2ATSMethod(codebooks, WRoPE(find_rotary_embedding(model), config.wrope_distance, None))
        lean["a2ats-fast-paper"] = paper
    t = time.perf_counter()
    k, v, codes = _real_prefill(fast, text_ids)
    with_codes = time.perf_counter() - t
    t = time.perf_counter()
    dense.generate(text_ids, max_new_tokens=1)
    plain = time.perf_counter() - t
    dense.runner.cache = None
    prefill = {"tokens": int(text_ids.shape[1]), "seconds_dense": plain, "seconds_with_encoding": with_codes,
               "encoding_share": max(with_codes - plain, 0.0) / with_codes}
    log(f"real prefill of {text_ids.shape[1]} tokens: {with_codes:.1f} s with key encoding, {plain:.1f} s without "
        f"(encoding {prefill['encoding_share']:.1%}); tiled to each length")
    rows: list[DecodeRow] = []
    for length in lengths:
        for variant in variants:
            t = time.perf_counter()
            if variant in lean:
                eng = lean[variant]
                sparse = eng.runner.method is not None
                _fill_engine(eng, k, v, codes if sparse else None, length, warmup + steps)
                times, timer = _time_engine(eng, length, steps, warmup, profile=True)
                row = _row(variant, length, times, timer,
                           float(eng.runner.attended) / max(eng.runner.heads, 1) if sparse else 0.0)
                eng.runner.cache = None
            elif variant == "a2ats-reference":
                cache = _hf_cache(k, v, codes, length, a2ats=True)
                with A2ATS(model, codebooks, config, path="reference"):
                    row = _row(variant, length, _time_hf(model, cache, length, steps, warmup))
                del cache
            elif variant == "llama.cpp":
                from a2ats.bench.llamacpp import bench_llamacpp

                (_, times), = bench_llamacpp(text_ids, [length], steps, warmup, gguf=gguf, log=log)
                row = _row(variant, length, times)
            elif variant == "dense-hf":
                cache = _hf_cache(k, v, None, length, a2ats=False)
                row = _row(variant, length, _time_hf(model, cache, length, steps, warmup))
                del cache
            rows.append(row)
            log(f"{variant:16s} {length:6d} tokens: {row.ms_per_token:7.1f} ms/token "
                f"({row.tokens_per_s:5.1f} tokens/s) {row.breakdown_ms or ''}  [{time.perf_counter() - t:.0f} s]")
    return rows, prefill


def rows_to_json(rows: list[DecodeRow]) -> list[dict]:
    return [asdict(r) for r in rows]
