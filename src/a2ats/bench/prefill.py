"""Prefill speed: tokens per second of a real prompt at each length, ours (the engine's chunked dense prefill,
with and without A²ATS key encoding, in each prefill dtype) against llama.cpp's on the same token ids.

The prompt is State of the Union text repeated to the length: prefill cost depends on the length, not on
what the text says. Each figure is one prefill (a long prefill is its own average).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.runtime import Engine, Request

SYSTEMS = ("a2ats", "a2ats-fp32", "dense", "llama.cpp")  # a2ats: the default prefill dtype; -fp32: the model's own


@dataclass
class PrefillRow:
    system: str
    tokens: int
    seconds: float
    tokens_per_s: float


def _prompt(text_ids: torch.Tensor, length: int) -> list[int]:
    base = text_ids[0].tolist()
    return (base * -(-length // len(base)))[:length]


def bench_prefill(model, codebooks: Codebooks, config: A2ATSConfig, text_ids: torch.Tensor, lengths=(4096, 16384),
                  systems=SYSTEMS, gguf: str | None = None, log=print) -> list[PrefillRow]:
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown prefill system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    rows = []
    for length in lengths:
        prompt = _prompt(text_ids, length)
        for system in systems:
            if system == "llama.cpp":
                from a2ats.bench.llamacpp import prefill_seconds

                seconds = prefill_seconds(prompt, gguf=gguf)
            else:
                cb = codebooks if system.startswith("a2ats") else None
                engine = Engine(model, cb, config, slots=1, max_context=length + 2, beyond_model_context=True,
                                prefill_dtype="model" if system.endswith("-fp32") else "auto")
                t = time.perf_counter()
                engine.serve([Request(prompt, 1)])
                seconds = time.perf_counter() - t
                del engine
            rows.append(PrefillRow(system, length, seconds, length / seconds))
            log(f"{system:11s} {length:6d} tokens: prefill {seconds:6.1f} s, {length / seconds:6.0f} tokens/s")
    return rows


def rows_to_json(rows: list[PrefillRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def prefill_table(rows: list[dict]) -> str:
    lengths = sorted({r["tokens"] for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    at = {(r["system"], r["tokens"]): r for r in rows}
    lines = ["prefill tokens/s (seconds in brackets)", "",
             "| system | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for s in systems:
        cells = [f"{at[s, n]['tokens_per_s']:.0f} ({at[s, n]['seconds']:.1f} s)" if (s, n) in at else "" for n in lengths]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
