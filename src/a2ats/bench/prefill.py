"""Prefill speed: tokens per second of a real prompt at each length, ours (the engine's chunked dense prefill,
with and without A²ATS key encoding, in each prefill dtype) against llama.cpp's on the same token ids.

The prompt is State of the Union text repeated to the length: prefill cost depends on the length, not on
what the text says. Each figure is one prefill (a long prefill is its own average).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from a2ats import factory, kernels
from a2ats.bench.output import emit, machine
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.factory import options
from a2ats.runtime import Request
from a2ats.runtime.settings import PREFILL_CHUNK

# a2ats: the default prefill dtype; -fp32: the model's own; -torch-attention: the default with torch's attention in
# place of the bf16 attention kernel (its baseline)
SYSTEMS = ("a2ats", "a2ats-fp32", "a2ats-torch-attention", "dense", "llama.cpp")
DEFAULT_SYSTEMS = ("a2ats", "a2ats-fp32", "dense")
LENGTHS = (4096, 16384)


@dataclass
class PrefillRow:
    system: str
    tokens: int
    seconds: float
    tokens_per_s: float
    chunk: int = PREFILL_CHUNK  # prompt tokens per forward (ours)


def _prompt(text_ids: torch.Tensor, length: int) -> list[int]:
    base = text_ids[0].tolist()
    return (base * -(-length // len(base)))[:length]


def bench_prefill(model, codebooks: Codebooks, config: A2ATSConfig, text_ids: torch.Tensor, lengths=LENGTHS,
                  systems=SYSTEMS, gguf: str | None = None, log=print,
                  chunks: tuple[int, ...] = (PREFILL_CHUNK,)) -> list[PrefillRow]:
    """One prefill per length, system and (ours) ``chunks`` size: prompt tokens per forward, as a step prefills
    a prompt beside running sequences (the engine's ``prefill_budget``)."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown prefill system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if not chunks or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chunks):
        raise ValueError(f"chunks must be prompt token counts >= 1, got {chunks}")
    rows = []
    for length in lengths:
        prompt = _prompt(text_ids, length)
        for system in systems:
            for chunk in (chunks if system != "llama.cpp" else (PREFILL_CHUNK,)):
                if system == "llama.cpp":
                    from a2ats.bench.llamacpp import prefill_seconds

                    seconds = prefill_seconds(prompt, gguf=gguf)
                else:
                    cb = codebooks if system.startswith("a2ats") else None
                    engine = factory.decoder(model, cb, config, runtime="engine", slots=1, max_context=length + 2,
                                             beyond_model_context=True, prefill_chunk=chunk,
                                             prefill_dtype="model" if system.endswith("-fp32") else "auto")
                    with kernels.torch_attention() if system.endswith("-torch-attention") else nullcontext():
                        t = time.perf_counter()
                        engine.serve([Request(prompt, 1)])
                        seconds = time.perf_counter() - t
                    del engine
                rows.append(PrefillRow(system, length, seconds, length / seconds, chunk))
                log(f"{system:11s} {length:6d} tokens, chunks of {chunk:5d}: prefill {seconds:6.1f} s, "
                    f"{length / seconds:6.0f} tokens/s")
    return rows


def rows_to_json(rows: list[PrefillRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def prefill_table(rows: list[dict]) -> str:
    lengths = sorted({r["tokens"] for r in rows})
    chunked = len({r.get("chunk", PREFILL_CHUNK) for r in rows}) > 1
    name = (lambda r: f"{r['system']}, chunks of {r.get('chunk', PREFILL_CHUNK)}") if chunked else (lambda r: r["system"])
    systems = list(dict.fromkeys(name(r) for r in rows))
    at = {(name(r), r["tokens"]): r for r in rows}
    lines = ["prefill tokens/s (seconds in brackets)", "",
             "| system | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for s in systems:
        cells = [f"{at[s, n]['tokens_per_s']:.0f} ({at[s, n]['seconds']:.1f} s)" if (s, n) in at else "" for n in lengths]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    options.add_model_args(p)
    options.add_selection_args(p)
    options.add_codebook_args(p)
    p.add_argument("--lengths", type=options.csv(int), help=f"prompt lengths (default {','.join(map(str, LENGTHS))})")
    p.add_argument("--prefill-systems", type=options.csv(str), default=DEFAULT_SYSTEMS,
                   help="a2ats (default prefill dtype), a2ats-fp32 (the model's dtype), a2ats-torch-attention (the "
                        "default with torch's attention, the bf16 attention kernel's baseline), dense (no key encoding), "
                        f"llama.cpp (its own prefill of the same ids, when installed); default {','.join(DEFAULT_SYSTEMS)}")
    p.add_argument("--chunks", type=options.csv(int), default=(PREFILL_CHUNK,),
                   help=f"prompt tokens per forward, ours (default {PREFILL_CHUNK}): a step's prefill beside running "
                        "sequences is a chunk of the engine's prefill_budget")
    p.add_argument("--out", help="folder for prefill.json and prefill.md")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def main(a) -> int:
    """Prefill tokens/s at each length: ours (default dtype and fp32, with and without key encoding) and llama.cpp's."""
    from a2ats.assets.corpus import speeches
    from a2ats.bench.llamacpp import available, gguf_for

    systems = a.prefill_systems
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown prefill system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if "llama.cpp" in systems and not available():
        raise ValueError("the llama.cpp system needs llama-cpp-python (see docs/bench/README.md), or leave it out")
    gguf = gguf_for(a.model, log=options.log) if "llama.cpp" in systems else None
    model, tok = options.load(a)
    text = next(s for s in speeches()[150:] if len(s) > 6 * 4096)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:4096]])
    rows = rows_to_json(bench_prefill(model, options.codebooks(a, model, tok), options.config(a), ids,
                                      a.lengths or LENGTHS, systems, gguf=gguf, log=options.log,
                                      chunks=tuple(a.chunks)))
    res = {"machine": machine(), "model": options.model_label(a), "dtype": a.dtype,
           "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows}
    emit(res, prefill_table(rows), "prefill", a.out, None, a.json, options.log)
    return 0
