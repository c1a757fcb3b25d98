"""`a2ats bench kernels`: micro-benchmark of the CPU kernels at a decode-like shape, next to the host's read
bandwidth."""

from __future__ import annotations

import json
import time

import torch

from a2ats.bench.accounting import host_read_gbps
from a2ats.bench.output import machine, with_provenance
from a2ats.factory.options import DTYPES
from a2ats.kernels import cpu_backend

CONTEXT = 32768  # tokens in the synthetic cache


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch, caches, thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_kernels(n: int = CONTEXT, B: int = 1, Hkv: int = 3, G: int = 3, d: int = 64, rho: float = 0.03,
                  dtype: torch.dtype = torch.float32, repeats: int = 20, C: int = 4096) -> dict:
    """Best-of-``repeats`` timings (seconds) and rates of the kernels, plus host read bandwidth (GB/s).

    ``attention_gbps`` counts only the selected K and V rows (rows x d x 2 x itemsize), the bytes a
    sparse step must read (the rows stay cache-warm across repeats: `a2ats bench decode` gives the cold
    figure); ``lookup_tables_*`` build one table per layer over 30 layers' centroids, as a decode step
    does; ``host_read_gbps`` is ``torch.sum`` over ~512 MB of fp32, best of 3.
    """
    ext = cpu_backend()
    if ext is None:
        raise RuntimeError("the CPU kernels are not available")
    g = torch.Generator().manual_seed(0)
    k_tok = int(rho * n)
    lut = torch.randn(B, Hkv, G, C, generator=g)
    codes = torch.randint(0, C, (B, Hkv, n), generator=g, dtype=torch.int16)
    valid = torch.ones(B, n, dtype=torch.bool)
    k = torch.full((B,), k_tok, dtype=torch.long)
    sinks, window = 4, 64
    t_sel = _best(lambda: ext.score_select(lut, codes, None, valid, k, sinks, window), repeats)
    idx, count = ext.score_select(lut, codes, None, valid, k, sinks, window)

    q = torch.randn(B, Hkv * G, d, generator=g).to(dtype)
    kbuf = torch.randn(B, Hkv, n, d, generator=g).to(dtype)
    vbuf = torch.randn(B, Hkv, n, d, generator=g).to(dtype)
    t_att = _best(lambda: ext.sparse_attention(q, kbuf, vbuf, idx, count, d**-0.5), repeats)
    rows = int(count.sum())
    att_bytes = rows * d * 2 * kbuf.element_size()

    # Lookup tables as a decode step builds them: one per layer, 30 layers' centroids (not cache-resident).
    layers = 30
    cents = [torch.randn(Hkv, C, d, generator=g) for _ in range(layers)]
    tiles = [ext.tile_centroids(c) for c in cents]
    qg = torch.randn(B, Hkv, G, d, generator=g)
    t_lut = _best(lambda: [ext.lookup_tables(qg, t, C) for t in tiles], max(repeats // 4, 3))
    lut_bytes = layers * Hkv * C * d * 4
    # Key encoding as at prefill: 4096 keys per KV head against C centroids.
    z = torch.randn(B, Hkv, 4096, d, generator=g)
    half = 0.5 * (cents[0] * cents[0]).sum(-1)
    t_enc = _best(lambda: ext.encode_nearest(z, cents[0], half), 3)

    return {
        "threads": float(torch.get_num_threads()),
        "score_select_s": t_sel,
        "score_select_token_heads_per_s": B * Hkv * G * n / t_sel,
        "score_select_ms_per_row": t_sel * 1e3 / (B * Hkv * G),
        "attention_s": t_att,
        "attention_rows": float(rows),
        "attention_gbps": att_bytes / t_att / 1e9,
        "lookup_tables_ms_per_step": t_lut * 1e3,
        "lookup_tables_gbps": lut_bytes / t_lut / 1e9,
        "encode_keys_per_s": B * Hkv * 4096 / t_enc,
        "host_read_gbps": host_read_gbps(),
    }


def add_arguments(p) -> None:
    p.add_argument("--context", type=int, default=CONTEXT, help="tokens in the synthetic cache")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the K/V rows attended")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def main(a) -> int:
    res = {"machine": machine(), **bench_kernels(n=a.context, dtype=DTYPES[a.dtype])}
    if a.json:  # the file `bench project --kernels-json` reads: it records what produced it
        print(json.dumps(with_provenance({**res, "context": a.context, "dtype": a.dtype})))
    else:
        for k, v in res.items():
            print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    return 0
