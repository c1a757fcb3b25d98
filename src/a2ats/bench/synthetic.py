"""Long caches for the speed benchmarks, synthesized through the engine's public API.

One real dense prefill of ``base`` tokens (a State of the Union text) gives a sequence's cache
(:class:`~a2ats.runtime.KVState`); it is tiled along the token axis to each length, keys, values and
codes alike, and handed to the engine as a request's given cache (``Request(kv=...)``), so only the
last prompt token is prefilled. Decode cost depends on the length and on how spread the selection is,
not on what the text says, and a real 32K prefill costs ~6 minutes on 2 cores.
"""

from __future__ import annotations

import torch

from a2ats.runtime import Engine, KVState, Request, StepResult

# Engine settings for a steady-state decode measurement: every prompt (here one token over a given cache) runs
# whole before decoding starts, so all the batch's sequences decode together from the first step.
STEADY = {"prefill_budget": None, "prefill_stall": None, "prefill_step_seconds": None}


def real_prefill(engine: Engine, ids: torch.Tensor) -> tuple[KVState, float]:
    """The cache of prompt ``ids`` (1, n) as ``engine`` prefills it, and the prefill's seconds."""
    res = engine.serve([Request(ids[0].tolist(), 1, keep_kv=True)])
    return res.completions[0].kv, res.prefill_seconds


def _tile(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` (Hkv, n, ...) repeated along its token axis to ``length`` tokens."""
    reps = -(-length // x.shape[1])
    return x.repeat(1, reps, *[1] * (x.dim() - 2))[:, :length].contiguous()


def tile(state: KVState, length: int, codes: bool = True) -> KVState:
    """``state`` repeated along the token axis to ``length`` tokens (``codes=False``: without its codes)."""
    return KVState([_tile(k, length) for k in state.k], [_tile(v, length) for v in state.v],
                   [_tile(c, length) for c in state.codes] if codes and state.codes is not None else None)


def decode_steps(engine: Engine, state: KVState, ids: torch.Tensor, rows: int, steps: int, warmup: int,
                 profile: bool = True) -> list[StepResult]:
    """``rows`` sequences, each the cache ``state`` plus one new token, decoded together for ``warmup + steps``
    steps; the last ``steps`` decode steps' results (each with its wall time, per-part breakdown and counts).

    Only steps that decoded all ``rows`` sequences and prefilled nothing count: the steady state the bench
    reports. ``engine`` should take whole prompts before decoding (see :data:`STEADY`), or too few such steps
    remain and this raises."""
    n = state.length
    prompt = ids[0].tolist() * -(-n // ids.shape[1])
    prompt = prompt[:n] + [prompt[n % len(prompt)]]
    seen: list[StepResult] = []
    engine.serve([Request(prompt, steps + warmup + 1, kv=state) for _ in range(rows)], profile=profile,
                 on_step=seen.append)
    full = [r for r in seen if r.decode_rows == rows and r.prefill_tokens == 0]
    if len(full) < warmup + steps:
        raise RuntimeError(f"only {len(full)} of {len(seen)} steps decoded all {rows} sequences alone (wanted "
                           f"{warmup + steps}): build the engine with the STEADY settings (whole prompts first)")
    return full[warmup:warmup + steps]
