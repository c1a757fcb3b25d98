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

import contextlib
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from a2ats import factory
from a2ats.bench.accounting import account, host_read_gbps, step_bytes
from a2ats.bench.output import emit, machine, served_table
from a2ats.bench.project.inputs import DEFAULT_SHAPE, SHAPES
from a2ats.bench.synthetic import STEADY, decode_steps, real_prefill, tile
from a2ats.core.codebook import Codebooks, CodebookSettings
from a2ats.core.config import A2ATSConfig
from a2ats.factory import options
from a2ats.kernels import weights as packed_weights
from a2ats.runtime import Engine, PreflightError, Request

SYSTEMS = ("a2ats-offload", "full-local")
LENGTHS = (8192, 32768)
BATCHES = (1, 2, 4, 8)
# Suffixes: "-xN" decode steps in N micro-batches (Engine(overlap=N)); "-kvbf16" / "-kvint8" K/V stored
# in bf16 / int8 with a scale per row; "-int8rows" int8 decode weights kept by rows where the build would tile them
# (the tiles' baseline: weights.rows_only).
SYSTEM_CHOICES = (f"choose from {SYSTEMS}, with -xN (a2ats-offload: N micro-batches), -kvbf16 / -kvint8 "
                  "(K/V stored in bf16 / int8) and/or -int8rows (int8 decode weights by rows, not in tiles)")
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
    # What the step must read (the weights once, each sequence's codes and attended K/V) against the read bandwidth
    # measured in the same run (:func:`a2ats.bench.accounting.account`)
    floor: dict = field(default_factory=dict)


def parse_system(system: str) -> tuple[str, int, torch.dtype | None, bool] | None:
    """(base system, micro-batches, K/V dtype, int8 weights by rows) of a system name, or None when it is not one."""
    parts = system.split("-")
    base, rest = "-".join(parts[:2]), parts[2:]
    overlap, kv, rows = 1, None, False
    if rest and rest[-1] == "int8rows":
        rows, rest = True, rest[:-1]
    if rest and rest[-1] in ("kvbf16", "kvint8"):
        kv, rest = {"kvbf16": torch.bfloat16, "kvint8": torch.int8}[rest[-1]], rest[:-1]
    if rest and rest[0].startswith("x") and rest[0][1:].isdigit() and int(rest[0][1:]) >= 1:
        overlap, rest = int(rest[0][1:]), rest[1:]
    if base not in SYSTEMS or rest or (overlap > 1 and base != "a2ats-offload"):
        return None
    return base, overlap, kv, rows


def engine_for(model, codebooks: Codebooks | None, config: A2ATSConfig, system: str, slots: int, capacity: int,
               decode_weights: str = "auto", **settings) -> Engine:
    """The engine a system name describes (see :func:`parse_system`), with ``slots`` x ``capacity`` allocated;
    ``settings``: further engine settings (e.g. :data:`~a2ats.bench.synthetic.STEADY`)."""
    parsed = parse_system(system)
    if parsed is None:
        raise ValueError(f"unknown system {system!r}; {SYSTEM_CHOICES}")
    base, overlap, kv, rows = parsed
    cb = codebooks if base.startswith("a2ats") else None
    placement = "offload" if base.endswith("offload") else "local"
    # A²ATS systems select at every step (no dense fallback): the table compares the two ways of attending
    select = {"dense_below": 0} if cb is not None else {}
    with packed_weights.rows_only() if rows else contextlib.nullcontext():
        return factory.decoder(model, cb, config, runtime="engine", slots=slots, max_context=capacity,
                               placement=placement, prefill_chunk=4096, decode_weights=decode_weights, overlap=overlap,
                               kv_dtype=kv, beyond_model_context=True, **select, **settings)


def bench_throughput(model, tok, codebooks: Codebooks, config: A2ATSConfig, lengths=LENGTHS,
                     batches=BATCHES, systems=SYSTEMS, steps: int = 6, warmup: int = 2, base: int = 4096,
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
    state, seconds = real_prefill(factory.decoder(model, codebooks, config, runtime="engine"), ids)
    log(f"real prefill of {ids.shape[1]} tokens in {seconds:.1f} s; tiled into every slot")
    gbps = host_read_gbps() if model.device.type == "cpu" else None  # the floor's bandwidth, measured in this run
    rows: list[ThroughputRow] = []
    for length in lengths:
        for system in systems:
            for B in batches:
                t = time.perf_counter()
                try:
                    engine = engine_for(model, codebooks, config, system, B, length + warmup + steps + 2, decode_weights,
                                        **STEADY)
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
                if gbps is not None:
                    row.floor = batch_floor(engine, row, gbps)
                rows.append(row)
                del engine, tiled  # free this batch's cache before the next is allocated
                gc.collect()
                log(f"{system:14s} {length:6d} x {B:2d}: {row.tokens_per_s:7.1f} tokens/s ({row.ms_per_step:.1f} ms/step) "
                    f"{row.breakdown_ms}  fits {fits}  [{time.perf_counter() - t:.0f} s]")
    return rows


def batch_floor(engine, row: ThroughputRow, gbps: float) -> dict:
    """The bytes a step of ``row`` must read, part by part (the weights and codebooks once for the batch; every
    sequence's codes and the rows it attends), their GB/s, and the step's time at ``gbps`` as a share of its
    measured time."""
    bytes_by_part = step_bytes(engine, row.context, row.attended if engine.method is not None else row.context,
                               row.batch)
    ms = row.breakdown_ms
    return {"host_gbps": round(gbps, 1), **account(bytes_by_part, {"weights": ms.get("weights", 0.0),
                                                                   "scoring": ms.get("scoring", 0.0),
                                                                   "attention": ms.get("host attention", 0.0)},
                                                  row.ms_per_step, gbps)}


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


def _q8_0(a) -> str:
    """The model's Q8_0 GGUF, converted once by the converter in the llama-batched-bench's source tree."""
    from a2ats.assets.models import DEFAULT_MODEL, cache_dir, model_path
    from a2ats.bench.llamacpp import gguf_for, q8_0_gguf

    gguf_for(a.model, log=options.log)  # refuses a model that is not a named one
    name = a.model or DEFAULT_MODEL
    return q8_0_gguf(a.llama_batched_bench, model_path(name, log=options.log), cache_dir() / "gguf", log=options.log)


def rows_to_json(rows: list[ThroughputRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def random_model(shape_name: str, dtype: torch.dtype, device: str, centroids: int = CodebookSettings.n_centroids,
                 max_context: int = 131072):
    """A Llama of a preset shape (:data:`a2ats.bench.project.SHAPES`) with random weights, and random
    codebooks for it: speed only (the selection is as costly as with trained ones; the text is noise)."""
    import transformers as T

    from a2ats.core.codebook import model_fingerprint, weights_digest

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


# calibration's own options: random codebooks are not calibrated, so with --random-weights these do nothing
CALIBRATION_FLAGS = ("codebooks", "text_tokens", "uuid_tokens", "max_iter", "calib_seq_len", "seed", "euclidean",
                     "no_sink_prefix")


def add_arguments(p) -> None:
    options.add_model_args(p)
    options.add_selection_args(p)
    options.add_runtime_args(p, "decode_weights")
    options.add_codebook_args(p)
    p.add_argument("--lengths", type=options.csv(int), help=f"context lengths (default {','.join(map(str, LENGTHS))})")
    p.add_argument("--batches", type=options.csv(int), default=BATCHES, help="batch sizes (slots)")
    p.add_argument("--systems", type=options.csv(str), default=SYSTEMS,
                   help="a2ats-offload (K/V in host memory), full-local (full attention, cache beside the model), "
                        "suffixes: -xN (a2ats-offload: decode steps in N micro-batches), -kvbf16 / -kvint8 (K/V stored "
                        "in bf16 / int8 with a scale per row)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per system, length and batch (median reported)")
    p.add_argument("--random-weights", action="store_true",
                   help="a model of --shape with random weights and codebooks (e.g. Llama-3.1-8B on a GPU): speed only")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help=f"--random-weights: the model's shape (default {DEFAULT_SHAPE})")
    p.add_argument("--requests", type=int, default=0, help="also serve this many real prompts through a queue")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="--requests: tokens per prompt (at most)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="--requests: new tokens per prompt")
    p.add_argument("--llama-batched-bench", metavar="PATH",
                   help="a natively built llama.cpp llama-batched-bench: after our systems, the same contexts and "
                        "batches decoded by llama.cpp (its prompt prefilled once and copied into every sequence's own "
                        "cache), on --llama-gguf")
    p.add_argument("--llama-gguf", metavar="FILE",
                   help="the GGUF for --llama-batched-bench (default: a Q8_0 converted once from the model's bf16 copy "
                        "by the converter in that tool's source tree: our int8 weights' bits)")
    p.add_argument("--llama-flash", choices=("off", "on"), default="off",
                   help="--llama-batched-bench's flash attention (default off: its faster decode setting on our CPUs)")
    p.add_argument("--out", help="folder for throughput.json, throughput.md and throughput.png")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def main(a) -> int:
    """Decode tokens/s against batch and context (and with --requests a served queue): a table (or JSON), with
    --out the files."""
    from a2ats.bench.report import throughput_plot, throughput_table

    unknown = [s for s in a.systems if parse_system(s) is None]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; {SYSTEM_CHOICES}")
    if a.random_weights:
        idle = [f"--{f.replace('_', '-')}" for f in CALIBRATION_FLAGS if getattr(a, f) not in (None, False)]
        if idle:
            raise ValueError(f"--random-weights makes random codebooks: {', '.join(idle)} would do nothing; drop them")
        if a.requests:
            raise ValueError("--requests serves real prompts: it needs the embedded model, not --random-weights")
    elif a.shape is not None:
        raise ValueError("--shape is the shape of --random-weights' model: give --random-weights, or drop --shape")
    gguf = None
    if a.llama_batched_bench:
        if a.random_weights:
            raise ValueError("--llama-batched-bench runs llama.cpp on the model's weights: drop --random-weights")
        gguf = a.llama_gguf or _q8_0(a)
    elif a.llama_gguf:
        raise ValueError("--llama-gguf is the file --llama-batched-bench runs: give --llama-batched-bench too")
    cfg = options.config(a)
    lengths = a.lengths or LENGTHS
    text_ids = None
    if a.random_weights:
        a.shape = a.shape or DEFAULT_SHAPE
        model, cb = random_model(a.shape, options.DTYPES[a.dtype], a.device, options.settings(a).n_centroids,
                                 max_context=max(lengths) + 4096)
        tok, text_ids = None, torch.randint(3, model.config.vocab_size, (1, 4096))
        options.log(f"{a.shape} shape with RANDOM weights and codebooks on {a.device} ({a.dtype}): speed only")
    else:
        model, tok = options.load(a)
        cb = options.codebooks(a, model, tok)
    rows = rows_to_json(bench_throughput(model, tok, cb, cfg, lengths=lengths, batches=a.batches, systems=a.systems,
                                         steps=a.steps, decode_weights=a.decode_weights, text_ids=text_ids,
                                         log=options.log))
    if a.llama_batched_bench:
        from a2ats.bench.llamacpp import batched_bench

        for length in lengths:
            for B in a.batches:
                r = batched_bench(a.llama_batched_bench, gguf, length, B, flash=a.llama_flash, log=options.log)
                rows.append(asdict(ThroughputRow("llama.cpp-q8_0", length, B, r["tokens_per_s"], r["ms_per_step"],
                                                 r["gen"])) | {"llama": r})
    served = bench_served(model, tok, cb, cfg, slots=max(a.batches), requests=a.requests, prompt_tokens=a.prompt_tokens,
                          new_tokens=a.max_new_tokens, decode_weights=a.decode_weights,
                          log=options.log) if a.requests else []
    res = {"machine": machine(), "dtype": a.dtype, "budget": cfg.budget_label, "decode_weights": a.decode_weights,
           "model": f"{a.shape}, random weights" if a.random_weights else options.model_label(a),
           "accelerator": str(model.device) + (" (the CPU stands in for the accelerator: no PCIe, shared cores)"
                                               if model.device.type == "cpu" else ""),
           "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows, "served": served}
    title = f"{res['machine']}, {a.dtype}, {res['budget']}"
    emit(res, throughput_table(rows) + served_table(served), "throughput", a.out,
         lambda p: throughput_plot(rows, p, title), a.json, options.log)
    return 0
