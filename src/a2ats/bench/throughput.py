"""Decode throughput against batch size and context: the serving engine with A²ATS (K/V in host memory,
selection on the accelerator) against full attention with the cache where the model runs.

Two measurements:
- *steady decode*: every slot holds a sequence of the given context and all decode together. The
  caches are synthesized (:mod:`.synthetic`): one real dense prefill of ``base`` tokens tiled along the
  token axis, given to every slot's request. Lengths may exceed the model's trained context (the default
  model's is 8192): speed only.
- *served workload*: a queue of real prompts through :meth:`Engine.serve`, prefills included, new
  sequences admitted as slots free up: what a user of the server sees.

On a CPU-only machine the accelerator is the CPU: the offload path runs (and is what is timed), but
no PCIe is crossed and both sides share the cores; say so wherever the figures go.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from a2ats.bench.synthetic import decode_steps, real_prefill, tile
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.runtime import Engine, PreflightError, Request

SYSTEMS = ("a2ats-offload", "full-local")
# Suffixes: "-xN" decode steps in N micro-batches (Engine(overlap=N)); "-kvbf16" / "-kvint8" K/V stored
# in bf16 / int8 with a scale per row.
SYSTEM_CHOICES = (f"choose from {SYSTEMS}, with -xN (a2ats-offload: N micro-batches) and/or -kvbf16 / -kvint8 "
                  "(K/V stored in bf16 / int8)")
PARTS = ("weights", "scoring", "transfers", "host attention", "rest")


@dataclass
class ThroughputRow:
    system: str
    context: int
    batch: int
    tokens_per_s: float  # decode tokens per second over all slots (median step)
    ms_per_step: float
    steps: int
    breakdown_ms: dict[str, float] = field(default_factory=dict)  # per step
    attended: float = 0.0  # tokens attended per layer-step, row and KV head (A²ATS)
    largest_batch: int = 0  # preflight: most slots that fit this machine at this context
    crossed_kib_per_step: float = 0.0  # bytes between the sides per decode step (PCIe on a GPU host)


def parse_system(system: str) -> tuple[str, int, torch.dtype | None] | None:
    """(base system, micro-batches, K/V dtype) of a system name, or None when it is not one."""
    parts = system.split("-")
    base, rest = "-".join(parts[:2]), parts[2:]
    overlap, kv = 1, None
    if rest and rest[-1] in ("kvbf16", "kvint8"):
        kv, rest = {"kvbf16": torch.bfloat16, "kvint8": torch.int8}[rest[-1]], rest[:-1]
    if rest and rest[0].startswith("x") and rest[0][1:].isdigit() and int(rest[0][1:]) >= 1:
        overlap, rest = int(rest[0][1:]), rest[1:]
    if base not in SYSTEMS or rest or (overlap > 1 and base != "a2ats-offload"):
        return None
    return base, overlap, kv


def engine_for(model, codebooks: Codebooks | None, config: A2ATSConfig, system: str, slots: int, capacity: int,
               decode_weights: str = "auto") -> Engine:
    """The engine a system name describes (see :func:`parse_system`), with ``slots`` x ``capacity`` allocated."""
    parsed = parse_system(system)
    if parsed is None:
        raise ValueError(f"unknown system {system!r}; {SYSTEM_CHOICES}")
    base, overlap, kv = parsed
    cb = codebooks if base.startswith("a2ats") else None
    placement = "offload" if base.endswith("offload") else "local"
    return Engine(model, cb, config, slots=slots, max_context=capacity, placement=placement, prefill_chunk=4096,
                  decode_weights=decode_weights, overlap=overlap, kv_dtype=kv, beyond_model_context=True)


def bench_throughput(model, tok, codebooks: Codebooks, config: A2ATSConfig, lengths=(8192, 32768),
                     batches=(1, 2, 4, 8), systems=SYSTEMS, steps: int = 6, warmup: int = 2, base: int = 4096,
                     decode_weights: str = "auto", text_ids: torch.Tensor | None = None,
                     log=print) -> list[ThroughputRow]:
    """One row per (system, context, batch); a batch that does not fit this machine is skipped (logged).
    ``text_ids`` (1, n): the real prompt to prefill (default: a State of the Union speech)."""
    unknown = [s for s in systems if parse_system(s) is None]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; {SYSTEM_CHOICES}")
    ids = text_ids
    if ids is None:
        from a2ats.assets.corpus import speeches

        text = next(s for s in speeches()[150:] if len(s) > 6 * base)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:base]])
    state, seconds = real_prefill(Engine(model, codebooks, config), ids)
    log(f"real prefill of {ids.shape[1]} tokens in {seconds:.1f} s; tiled into every slot")
    rows: list[ThroughputRow] = []
    for length in lengths:
        for system in systems:
            for B in batches:
                t = time.perf_counter()
                try:
                    engine = engine_for(model, codebooks, config, system, B, length + warmup + steps + 2, decode_weights)
                except PreflightError as e:
                    log(f"{system} {length} x {B}: skipped: {e}")
                    continue
                fits = engine.plan.largest_batch()
                tiled = tile(state, length, codes=engine.method is not None)
                timed = decode_steps(engine, tiled, ids, B, steps, warmup)
                med = statistics.median(s.seconds for s in timed)
                row = ThroughputRow(system, length, B, B / med, 1e3 * med, len(timed),
                                    {p: round(1e3 * sum(s.breakdown.get(p, 0.0) for s in timed) / len(timed), 3)
                                     for p in PARTS},
                                    sum(s.attended for s in timed) / max(sum(s.heads for s in timed), 1), fits,
                                    sum(s.crossed for s in timed) / len(timed) / 1024)
                rows.append(row)
                del engine, tiled  # free this batch's cache before the next is allocated
                gc.collect()
                log(f"{system:14s} {length:6d} x {B:2d}: {row.tokens_per_s:7.1f} tokens/s ({row.ms_per_step:.1f} ms/step) "
                    f"{row.breakdown_ms}  fits {fits}  [{time.perf_counter() - t:.0f} s]")
    return rows


def bench_served(model, tok, codebooks: Codebooks, config: A2ATSConfig, slots: int = 4, requests: int = 8,
                 prompt_tokens: int = 2048, new_tokens: int = 32, systems=SYSTEMS, decode_weights: str = "auto",
                 prompts: list[list[int]] | None = None, log=print) -> list[dict]:
    """A queue of ``requests`` real prompts (State of the Union texts, of slightly different lengths up to
    ``prompt_tokens``; or ``prompts``) through ``slots`` slots, per system."""
    if prompts is None:
        from a2ats.assets.corpus import speeches

        texts = [s for s in speeches() if len(s) > 6 * prompt_tokens][:requests]
        prompts = [tok.encode(s, add_special_tokens=False)[: prompt_tokens - 17 * i] for i, s in enumerate(texts)]
    prompt_tokens = max(len(p) for p in prompts)
    out = []
    for system in systems:
        engine = engine_for(model, codebooks, config, system, slots, prompt_tokens + new_tokens, decode_weights)
        res = engine.serve([Request(p, new_tokens) for p in prompts])
        out.append({"system": system, "slots": slots, "requests": len(prompts), "prompt_tokens": prompt_tokens,
                    "new_tokens": new_tokens, "prefill_s": res.prefill_seconds, "decode_s": res.decode_seconds,
                    "decode_tokens_per_s": res.tokens_per_s, "served_tokens_per_s": res.served_tokens_per_s})
        log(f"served {system}: {res.tokens_per_s:.1f} decode tokens/s, {res.served_tokens_per_s:.1f} tokens/s with "
            f"prefills ({res.prefill_seconds:.0f} s prefill, {res.decode_seconds:.0f} s decode)")
    return out


def rows_to_json(rows: list[ThroughputRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def random_model(shape_name: str, dtype: torch.dtype, device: str, centroids: int = 4096, max_context: int = 131072):
    """A Llama of a preset shape (:data:`a2ats.bench.project.SHAPES`) with random weights, and random
    codebooks for it: speed only (the selection is as costly as with trained ones; the text is noise)."""
    import transformers as T

    from a2ats.bench.project import SHAPES
    from a2ats.core.codebook import CodebookSettings, model_fingerprint, weights_digest

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; choose from {sorted(SHAPES)}")
    s = SHAPES[shape_name]
    cfg = T.LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                        num_hidden_layers=s.layers, num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads,
                        head_dim=s.head_dim, max_position_embeddings=max_context,
                        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: an 8B model in fp32 would need twice the memory
    try:
        with torch.device(device):
            model = T.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(0)
    L, H, d = s.layers, s.kv_heads, s.head_dim
    cb = Codebooks(torch.randn(L, H, centroids, d, generator=g), torch.eye(d).expand(L, H, d, d).contiguous(),
                   model_fingerprint(cfg), CodebookSettings(n_centroids=centroids), weights_digest(model))
    return model, cb
