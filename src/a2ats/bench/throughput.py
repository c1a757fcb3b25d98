"""Decode throughput against batch size and context: the serving engine with A²ATS (K/V in host memory,
selection on the accelerator) against full attention with the cache where the model runs.

Two measurements:
- *steady decode*: every slot holds a sequence of the given context and all decode together. The
  caches are synthesized: one real dense prefill of ``base`` tokens is tiled along the token axis into
  every slot (as ``bench decode`` does): decode cost depends on lengths and selection spread, not text.
  Lengths may exceed the model's trained context (the default model's is 8192): speed only.
- *served workload*: a queue of real prompts through :meth:`Server.serve`, prefills included, new
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

from a2ats.bench.decode import _tile
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.runtime.preflight import PreflightError
from a2ats.runtime.server import Request, Server
from a2ats.runtime.step import Timer

SYSTEMS = ("a2ats-offload", "full-local")
# Suffixes: "-xN" decode steps in N micro-batches (Server(overlap=N)); "-kvbf16" / "-kvint8" K/V stored
# in bf16 / int8 with a scale per row.
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


def _server(model, codebooks, config, system, slots, capacity, decode_weights) -> Server:
    base, overlap, kv = parse_system(system)
    cb = codebooks if base.startswith("a2ats") else None
    placement = "offload" if base.endswith("offload") else "local"
    return Server(model, cb, config, slots=slots, max_context=capacity, placement=placement, prefill_chunk=4096,
                  decode_weights=decode_weights, overlap=overlap, kv_dtype=kv, beyond_model_context=True)


def _fill(server: Server, k, v, codes, length: int) -> None:
    cache = server.cache
    for i in range(cache.num_layers):
        cache.put(i, (slice(None), slice(None), slice(0, length)), _tile(k[i], length), _tile(v[i], length))
        if cache.codes is not None:
            cache.codes[i][:, :, :length] = _tile(codes[i], length).to(cache.accelerator)
    for slot in range(cache.slots):
        cache.filled(slot, length)


def _time_steps(server: Server, steps: int, warmup: int) -> tuple[list[float], Timer]:
    runner, lean, S = server.runner, server.lean, server.slots
    device = lean.device
    active = torch.ones(S, dtype=torch.bool, device=device)
    host_active = [True] * S
    token = torch.full((S, 1), 42, device=device)
    times, timer = [], Timer()
    runner.attended.zero_()
    runner.context.zero_()
    runner.heads, runner.crossed = 0, 0
    with torch.inference_mode():
        for s in range(warmup + steps):
            if s == warmup:
                runner.attended.zero_()
                runner.heads, runner.crossed = 0, 0
                timer = Timer()
            runner.timer = timer if s >= warmup else None
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            timer.start()
            step = runner.begin_decode(active, host_active)
            timer.lap("rest")
            logits = lean.forward(token, step.pos[:, None], runner.attend, timer=runner.timer)
            token = logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()  # the step ends when its tokens are known (a device sync on a GPU)
            timer.lap("rest")
            if s >= warmup:
                times.append(time.perf_counter() - t)
    runner.timer = None
    return times, timer


def bench_throughput(model, tok, codebooks: Codebooks, config: A2ATSConfig, lengths=(8192, 32768),
                     batches=(1, 2, 4, 8), systems=SYSTEMS, steps: int = 6, warmup: int = 2, base: int = 4096,
                     decode_weights: str = "model", text_ids: torch.Tensor | None = None,
                     log=print) -> list[ThroughputRow]:
    """One row per (system, context, batch); a batch that does not fit this machine is skipped (logged).
    ``text_ids`` (1, n): the real prompt to prefill (default: a State of the Union speech)."""
    from a2ats.bench.decode import _real_prefill
    from a2ats.runtime import Engine

    unknown = [s for s in systems if parse_system(s) is None]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {SYSTEMS}, with -xN (a2ats-offload: N micro-batches) "
                         "and/or -kvbf16 / -kvint8 (K/V stored in bf16 / int8)")
    ids = text_ids
    if ids is None:
        from a2ats.assets.corpus import speeches

        text = next(s for s in speeches()[150:] if len(s) > 6 * base)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:base]])
    t = time.perf_counter()
    k, v, codes = _real_prefill(Engine(model, codebooks, config, path="fast"), ids)
    log(f"real prefill of {ids.shape[1]} tokens in {time.perf_counter() - t:.1f} s; tiled into every slot")
    rows: list[ThroughputRow] = []
    for length in lengths:
        for system in systems:
            for B in batches:
                t = time.perf_counter()
                try:
                    server = _server(model, codebooks, config, system, B, length + warmup + steps + 1, decode_weights)
                except PreflightError as e:
                    log(f"{system} {length} x {B}: skipped: {e}")
                    continue
                fits = server.plan.largest_batch()
                _fill(server, k, v, codes, length)
                times, timer = _time_steps(server, steps, warmup)
                med = statistics.median(times)
                runner = server.runner
                row = ThroughputRow(system, length, B, B / med, 1e3 * med, len(times),
                                    {p: round(1e3 * timer.totals.get(p, 0.0) / len(times), 3) for p in PARTS},
                                    float(runner.attended) / max(runner.heads, 1) if runner.method else 0.0, fits,
                                    runner.crossed / len(times) / 1024)
                rows.append(row)
                del server, runner  # free this batch's cache before the next is allocated
                gc.collect()
                log(f"{system:14s} {length:6d} x {B:2d}: {row.tokens_per_s:7.1f} tokens/s ({row.ms_per_step:.1f} ms/step) "
                    f"{row.breakdown_ms}  fits {fits}  [{time.perf_counter() - t:.0f} s]")
    return rows


def bench_served(model, tok, codebooks: Codebooks, config: A2ATSConfig, slots: int = 4, requests: int = 8,
                 prompt_tokens: int = 2048, new_tokens: int = 32, systems=SYSTEMS, decode_weights: str = "model",
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
        server = _server(model, codebooks, config, system, slots, prompt_tokens + new_tokens, decode_weights)
        res = server.serve([Request(p, new_tokens) for p in prompts])
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
