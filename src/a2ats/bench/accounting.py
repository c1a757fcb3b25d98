"""What a decode step must read, part by part, and the machine's read bandwidth measured in the same run: the
floor a step's time is held to. A step of the lean engine reads every decode weight once, the codes of every
cached token and every codebook's centroids (scoring), and the K/V rows it attends to (attention); on a CPU
those bytes over the read bandwidth bound its time from below."""

from __future__ import annotations

import time

import torch

PARTS = ("weights", "scoring", "attention")


def host_read_gbps(mib: int = 512, repeats: int = 3) -> float:
    """GB/s of ``torch.sum`` over ``mib`` MiB of fp32, best of ``repeats`` after a warm-up (first touch)."""
    big = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)
    big.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return big.numel() * 4 / best / 1e9


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def weight_bytes(lean) -> int:
    """The bytes of every decode projection and the LM head, in the format decode steps read them."""
    total = 0
    for w in lean.layers:
        if w.packed is not None:
            total += sum(p.nbytes() for p in w.packed.values())
        else:
            total += _nbytes(w.qkv, w.o, w.gate_up, w.down)
        total += _nbytes(w.qkv_bias, w.o_bias, w.gate_up_bias, w.down_bias, w.in_norm, w.post_norm)
    return total + (lean.lm_head_packed.nbytes() if lean.lm_head_packed is not None else _nbytes(lean.lm_head))


def step_bytes(engine, context: int, attended: float, batch: int = 1) -> dict[str, int]:
    """Bytes a decode step of ``engine`` reads with ``batch`` rows of ``context`` tokens each, per part. ``attended``:
    tokens attended per layer, row and KV head (all ``context`` for full attention). The weights and the codebooks'
    centroids are read once for the whole batch; every row's int16 codes (scoring) and its attended K/V rows, in the
    cache's dtype, are its own."""
    lean = engine.lean
    heads = lean.num_layers * lean.kv_heads
    row = 2 * lean.head_dim * torch.empty(0, dtype=engine.kv_dtype).element_size()  # one token's K and V
    scoring = 0
    if engine.method is not None:
        centroids = engine.method.codebooks.settings.n_centroids * lean.head_dim * 4
        scoring = heads * (batch * 2 * context + centroids)
    return {"weights": weight_bytes(lean), "scoring": scoring, "attention": round(batch * heads * attended * row)}


def account(bytes_by_part: dict[str, int], ms_by_part: dict[str, float], ms_per_token: float, gbps: float) -> dict:
    """Each part's GB/s against ``gbps``, and the whole step's floor (its bytes at ``gbps``) as a share of its
    time: 1.0 is a step at the machine's read bandwidth."""
    total = sum(bytes_by_part.values())
    floor_ms = 1e3 * total / (gbps * 1e9)
    return {
        "bytes": dict(bytes_by_part),
        "gbps": {p: round(b / (ms_by_part[p] * 1e6), 2) for p, b in bytes_by_part.items() if ms_by_part.get(p)},
        "floor_ms": round(floor_ms, 3),
        "share_of_floor": round(floor_ms / ms_per_token, 3),
    }
