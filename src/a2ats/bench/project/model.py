"""The projection's arithmetic: per-step time of full attention and of A²ATS offload for a batch at a context,
the largest batch each fits, the improvement variants, and the whole projection (plain dicts, for JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from a2ats.bench.project.inputs import (
    GB,
    GIB,
    LABEL,
    MAX_BATCH,
    TARGET_CONTEXT,
    TARGET_RATIO,
    Efficiencies,
    Hardware,
    ModelShape,
    Workload,
    default_union_inflation,
)


def _tok_s(batch: int, seconds: float) -> float:
    return batch / seconds


def _codebook_bytes(shape: ModelShape, wl: Workload) -> float:
    return shape.layers * shape.kv_heads * wl.centroids * shape.head_dim * 2.0  # bf16


def _a2ats_gpu_per_seq(shape: ModelShape, wl: Workload, n: int) -> float:
    """Accelerator bytes per sequence: its codes, one layer's fp32 scores and its index buffer."""
    codes = n * wl.code_bytes * shape.kv_heads * shape.layers
    scores = shape.q_heads * n * 4.0
    idx = wl.rows(n, shape.group) * shape.kv_heads * wl.index_bytes
    return codes + scores + idx


def full_max_batch(shape: ModelShape, hw: Hardware, wl: Workload, n: int) -> int:
    """Largest batch whose bf16 KV fits in accelerator memory beside the weights and the reserve."""
    reserve = hw.host_reserve_gib if hw.unified else hw.gpu_reserve_gib
    free = hw.gpu_memory_gib * GIB - reserve * GIB - shape.weight_bytes_resident
    return max(0, min(MAX_BATCH, int(free // (n * shape.kv_bytes_per_token(wl.kv_bytes)))))


def _a2ats_free(shape: ModelShape, hw: Hardware, wl: Workload, n: int, batch: int) -> tuple[float, float]:
    """(host bytes free for KV, accelerator bytes free after codes/scores) at this batch."""
    fixed_gpu = shape.weight_bytes_resident + _codebook_bytes(shape, wl) + batch * _a2ats_gpu_per_seq(shape, wl, n)
    if hw.unified:  # one memory: weights, codes and KV share host RAM
        return (hw.host_ram_gib - hw.host_reserve_gib) * GIB - fixed_gpu, 0.0
    return (hw.host_ram_gib - hw.host_reserve_gib) * GIB, (hw.gpu_memory_gib - hw.gpu_reserve_gib) * GIB - fixed_gpu


def a2ats_fits(shape: ModelShape, hw: Hardware, wl: Workload, n: int, batch: int) -> bool:
    host_free, gpu_free = _a2ats_free(shape, hw, wl, n, batch)
    if gpu_free < 0:
        return False
    kv = batch * n * shape.kv_bytes_per_token(wl.host_bytes)
    cap = host_free + (gpu_free if wl.gpu_tier else 0.0)
    return kv <= cap


def a2ats_max_batch(shape: ModelShape, hw: Hardware, wl: Workload, n: int) -> int:
    """Largest batch that fits: host RAM for the KV (plus the GPU's free memory with a second tier),
    accelerator memory for the codes and score buffers."""
    b = 0
    while b < MAX_BATCH and a2ats_fits(shape, hw, wl, n, b + 1):
        b += 1
    return b


def full_step(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, n: int, batch: int) -> dict:
    """Full attention, KV on the accelerator: one decode step of ``batch`` sequences at context ``n``."""
    bw = hw.hbm_gbps * GB
    t_w = shape.weight_bytes_read / (bw * eff.gpu_weights)
    t_kv = batch * n * shape.kv_bytes_per_token(wl.kv_bytes) / (bw * eff.gpu_attention)
    flops = batch * (shape.weight_flops_per_token + 4.0 * n * shape.head_dim * shape.q_heads * shape.layers)
    t_c = flops / (hw.gpu_tflops * 1e12)
    mem = t_w + t_kv
    t = max(mem, t_c) + eff.step_overhead_ms / 1e3
    acc = hw.accel
    if t_c > mem:
        neck = f"{acc} compute"
    else:
        neck = f"{acc} memory bandwidth ({'KV cache' if t_kv >= t_w else 'weights'})"
    return {
        "system": "full", "context": n, "batch": batch, "step_ms": t * 1e3, "tokens_per_s": _tok_s(batch, t),
        "bottleneck": neck,
        "ms": {"weights": t_w * 1e3, "kv": t_kv * 1e3, "compute": t_c * 1e3, "overhead": eff.step_overhead_ms},
    }


def a2ats_step(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, n: int, batch: int) -> dict:
    """A²ATS offload: one decode step of ``batch`` sequences at context ``n`` (see the module doc)."""
    L, Hkv, Hq, d, G = shape.layers, shape.kv_heads, shape.q_heads, shape.head_dim, shape.group
    rows = wl.rows(n, G)
    row_bytes = 2 * d * wl.host_bytes  # one K and one V row
    # Share of the selected rows the GPU tier serves: the share of the KV it holds.
    frac_gpu = 0.0
    if wl.gpu_tier and not hw.unified:
        _, gpu_free = _a2ats_free(shape, hw, wl, n, batch)
        kv_total = batch * n * shape.kv_bytes_per_token(wl.host_bytes)
        frac_gpu = min(1.0, max(0.0, gpu_free) / kv_total)
    sel_rows = batch * rows * Hkv * L  # selected rows per step over the batch
    bw = hw.hbm_gbps * GB
    # Accelerator: weights, codebooks (LUT build), codes, score passes, tier gather.
    t_w = (shape.weight_bytes_read + _codebook_bytes(shape, wl)) / (bw * eff.gpu_weights)
    scoring_bytes = batch * L * (n * wl.code_bytes * Hkv + eff.topk_passes * Hq * n * 4.0)
    t_s = scoring_bytes / (bw * eff.gpu_scoring)
    if hw.unified and eff.cpu_score_token_heads_per_s:  # the fused CPU kernel: no score passes in memory
        scoring_bytes = batch * L * n * wl.code_bytes * Hkv
        t_s = batch * L * Hq * n / eff.cpu_score_token_heads_per_s
    t_g = frac_gpu * sel_rows * row_bytes / (bw * eff.gpu_gather)
    gpu_flops = batch * (shape.weight_flops_per_token + 2.0 * Hq * wl.centroids * d * L) \
        + frac_gpu * sel_rows * G * 4.0 * d
    t_gc = gpu_flops / (hw.gpu_tflops * 1e12)
    gpu_parts = {"weights": t_w, "scoring/top-K": t_s, "tier gather": t_g}
    t_gpu = max(t_w + t_s + t_g, t_gc)
    # Host: the selected K/V rows at the measured fraction of host read bandwidth.
    host_rows = (1.0 - frac_gpu) * sel_rows
    t_hm = host_rows * row_bytes / (hw.host_read_gbps * GB * eff.host_attention)
    t_hc = host_rows * G * 4.0 * d / (hw.host_cores * eff.host_gflops_per_core * 1e9)
    t_host = max(t_hm, t_hc)
    # PCIe per layer and sequence: q, indices, new k/v out; the attention output back.
    if hw.unified:
        d2h = h2d = t_pcie = 0.0
    else:
        d2h = batch * L * (Hq * d * 2.0 + (1.0 - frac_gpu) * rows * Hkv * wl.index_bytes + 2 * Hkv * d * 2.0)
        h2d = batch * L * Hq * d * 2.0
        t_pcie = max(d2h / (hw.pcie_d2h_gbps * GB), h2d / (hw.pcie_h2d_gbps * GB)) + 2 * L * eff.pcie_latency_us / 1e6
    ovh = eff.step_overhead_ms / 1e3
    serial = t_gpu + t_host + t_pcie + ovh
    overlapped, can_overlap = serial, False
    if batch >= 2 and not hw.unified:  # each micro-batch streams the weights (and codebooks) again
        m = min(eff.micro_batches, batch)
        t_gpu_pipe = max(m * t_w + t_s + t_g, t_gc)
        pipelined = max(t_gpu_pipe, t_host, t_pcie) + ovh
        if pipelined < serial:  # a scheduler pipelines only when it pays
            overlapped, can_overlap, t_gpu = pipelined, True, t_gpu_pipe
            gpu_parts["weights"] = m * t_w
    acc = hw.accel
    if t_gc > sum(gpu_parts.values()):
        gpu_neck = f"{acc} compute"
    else:
        gpu_neck = f"{acc} memory bandwidth ({max(gpu_parts, key=gpu_parts.get)})"
    host_neck = "host memory bandwidth (sparse attention)" if t_hm >= t_hc else "host compute (sparse attention)"
    if hw.unified:
        busy = {gpu_neck: t_gpu, host_neck: t_host}
    else:
        busy = {gpu_neck: t_gpu, host_neck: t_host, "PCIe": t_pcie}
    neck = max(busy, key=busy.get)
    return {
        "system": "a2ats", "context": n, "batch": batch, "rows_per_kv_head": rows, "gpu_tier_share": frac_gpu,
        "step_ms": overlapped * 1e3, "step_ms_serial": serial * 1e3,
        "tokens_per_s": _tok_s(batch, overlapped), "tokens_per_s_serial": _tok_s(batch, serial),
        "overlapped": can_overlap, "bottleneck": neck,
        "ms": {"gpu": t_gpu * 1e3, "gpu_weights": gpu_parts["weights"] * 1e3, "gpu_scoring": t_s * 1e3, "gpu_tier_gather": t_g * 1e3,
               "gpu_compute": t_gc * 1e3, "host": t_host * 1e3, "host_memory": t_hm * 1e3,
               "host_compute": t_hc * 1e3, "pcie": t_pcie * 1e3, "overhead": eff.step_overhead_ms},
        "bytes": {"host_read": host_rows * row_bytes, "gpu_scoring": scoring_bytes, "pcie_d2h": d2h, "pcie_h2d": h2d},
        "busy": {"gpu": t_gpu / overlapped, "host": t_host / overlapped, "pcie": t_pcie / overlapped},
    }


def _batches(*maxima: int) -> list[int]:
    top = max(maxima)
    out = {b for b in (2**i for i in range(11)) if b <= top} | {m for m in maxima if m > 0}
    return sorted(out)


def _best(rows: list[dict], key: str) -> dict | None:
    return max(rows, key=lambda r: r[key]) if rows else None


def context_projection(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, n: int) -> dict:
    """Every listed batch at one context, each system's largest batch, and the ratio at the best batch of each."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"context must be a positive integer, got {n!r}")
    wl.inflation(shape.group)  # validates the union against G
    fmax, amax = full_max_batch(shape, hw, wl, n), a2ats_max_batch(shape, hw, wl, n)
    if fmax == 0 and amax == 0:
        seq = n * shape.kv_bytes_per_token(wl.kv_bytes) / GIB
        raise ValueError(
            f"context {n} fits neither system on {hw.name}: one {shape.name} sequence holds {seq:.2f} GiB of KV; "
            f"{hw.accel} memory {hw.gpu_memory_gib:g} GiB less the weights "
            f"({shape.weight_bytes_resident / GIB:.2f} GiB) and reserve, host RAM {hw.host_ram_gib:g} GiB less "
            f"{hw.host_reserve_gib:g} GiB reserve; give a shorter --contexts")
    full = [full_step(shape, hw, eff, wl, n, b) for b in range(1, fmax + 1)]
    a2 = [a2ats_step(shape, hw, eff, wl, n, b) for b in range(1, amax + 1)]
    fb, ab, abs_ = _best(full, "tokens_per_s"), _best(a2, "tokens_per_s"), _best(a2, "tokens_per_s_serial")
    table = []
    for b in _batches(fmax, amax):
        f = full[b - 1] if b <= fmax else None
        a = a2[b - 1] if b <= amax else None
        table.append({
            "batch": b,
            "full_tokens_per_s": f and f["tokens_per_s"], "full_bottleneck": f and f["bottleneck"],
            "a2ats_tokens_per_s": a and a["tokens_per_s"], "a2ats_tokens_per_s_serial": a and a["tokens_per_s_serial"],
            "a2ats_bottleneck": a and a["bottleneck"],
            "a2ats_busy": a and a["busy"],
            "ratio": (a["tokens_per_s"] / f["tokens_per_s"]) if (a and f) else None,
        })
    summary = {
        "full_max_batch": fmax, "a2ats_max_batch": amax,
        "full_best": fb, "a2ats_best": ab, "a2ats_best_serial": abs_,
        "full_at_max": full[-1] if full else None, "a2ats_at_max": a2[-1] if a2 else None,
        "ratio_best": (ab["tokens_per_s"] / fb["tokens_per_s"]) if (ab and fb) else None,
        "ratio_best_serial": (abs_["tokens_per_s_serial"] / fb["tokens_per_s"]) if (abs_ and fb) else None,
        "rows_per_kv_head": wl.rows(n, shape.group), "budget_per_head": wl.budget(n),
        "union_inflation": wl.inflation(shape.group),
        "kv_gib_per_sequence": n * shape.kv_bytes_per_token(wl.kv_bytes) / GIB,
    }
    return {"context": n, "rows": table, "summary": summary}




def variant_specs(shape: ModelShape, wl: Workload, eff: Efficiencies) -> list[tuple[str, str, Workload, Efficiencies, Workload | None]]:
    """(name, description, A²ATS workload, efficiencies, full-attention workload or None for the default)."""
    int8 = 1.0 + 2.0 / shape.head_dim  # 8-bit elements plus one bf16 scale per row of head_dim
    g = wl.inflation(shape.group)
    if wl.budget_tokens is not None:  # a token budget: halve the count
        half = dict(budget_tokens=wl.budget_tokens // 2)
        cur, half_s = f"K={wl.budget_tokens}", f"K={wl.budget_tokens // 2}"
    else:
        half = dict(rho=wl.rho / 2)
        cur, half_s = f"rho={wl.rho:g}", f"rho={wl.rho / 2:g}"
    low = dict(half, union_inflation=1.0)
    return [
        ("paper design", f"{cur}, GQA union x{g:g}, bf16 host cache", wl, eff, None),
        ("host kernel at the read ceiling", "sensitivity: CPU sparse attention at 100% of host read bandwidth",
         wl, replace(eff, host_attention=1.0), None),
        ("host kernel at the cold in-step rate", "sensitivity: 21% of host read bandwidth (docs/bench/decode.json: "
         "6.2 of 29.7 GB/s inside a real 32K step, rows cold)", wl, replace(eff, host_attention=0.21), None),
        ("lower budget, half", f"{half_s} with the GQA union", replace(wl, **half), eff, None),
        ("no union inflation", f"{cur}, K per KV head (e.g. --reduction max)",
         replace(wl, union_inflation=1.0), eff, None),
        ("lower effective budget", f"{half_s}, K per KV head", replace(wl, **low), eff, None),
        ("GPU free memory as a second KV tier", f"{cur}, union; the GPU's free memory holds part of every "
         "sequence's KV, its rows gathered on the GPU", replace(wl, gpu_tier=True), eff, None),
        ("compact host layout (8-bit KV)", f"{cur}, union; host K/V in 8 bits + a bf16 scale per row",
         replace(wl, host_kv_bytes=int8), eff, None),
        ("8-bit KV + lower effective budget", f"{half_s}, K per KV head, 8-bit host K/V",
         replace(wl, host_kv_bytes=int8, **low), eff, None),
        ("all three", f"{half_s}, K per KV head, 8-bit K/V, GPU second tier",
         replace(wl, host_kv_bytes=int8, gpu_tier=True, **low), eff, None),
        ("8-bit KV + lower budget, vs full with 8-bit KV", "the fair check: full attention given the same 8-bit "
         "cache (twice the batch, half the KV bytes)", replace(wl, host_kv_bytes=int8, **low), eff,
         replace(wl, kv_bytes=int8)),
    ]


def variant_rows(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, contexts: list[int]) -> list[dict]:
    out = []
    for name, desc, vwl, veff, fwl in variant_specs(shape, wl, eff):
        if hw.unified and vwl.gpu_tier:
            continue  # no GPU memory to tier into
        for n in contexts:
            fw = fwl or wl
            fmax, amax = full_max_batch(shape, hw, fw, n), a2ats_max_batch(shape, hw, vwl, n)
            fb = _best([full_step(shape, hw, veff, fw, n, b) for b in range(1, fmax + 1)], "tokens_per_s")
            a2 = [a2ats_step(shape, hw, veff, vwl, n, b) for b in range(1, amax + 1)]
            ab, abs_ = _best(a2, "tokens_per_s"), _best(a2, "tokens_per_s_serial")
            out.append({
                "variant": name, "description": desc, "context": n,
                "rows_per_kv_head": vwl.rows(n, shape.group),
                "full_batch": fb and fb["batch"], "full_tokens_per_s": fb and fb["tokens_per_s"],
                "a2ats_max_batch": amax, "a2ats_batch": ab and ab["batch"],
                "a2ats_tokens_per_s": ab and ab["tokens_per_s"],
                "a2ats_tokens_per_s_serial": abs_ and abs_["tokens_per_s_serial"],
                "a2ats_bottleneck": ab and ab["bottleneck"], "gpu_tier_share": ab and ab["gpu_tier_share"],
                "ratio": (ab["tokens_per_s"] / fb["tokens_per_s"]) if (ab and fb) else None,
                "ratio_serial": (abs_["tokens_per_s_serial"] / fb["tokens_per_s"]) if (abs_ and fb) else None,
            })
    return out




def assumptions(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload) -> list[dict]:
    """Every input number and where it comes from (docs/design.md §2.1, a measurement, or an assumption)."""
    out = []
    for k, v in asdict(hw).items():
        if k in ("name", "sources", "unified"):
            continue
        out.append({"name": f"hardware.{k}", "value": v, "source": hw.sources.get(k, "given")})
    for k, v in asdict(eff).items():
        if k == "sources" or v is None:  # None: not used on this profile
            continue
        out.append({"name": f"efficiency.{k}", "value": v, "source": eff.sources.get(k, "given")})
    u, usrc = (wl.union_inflation, "given") if wl.union_inflation is not None else default_union_inflation(shape.group)
    per = "KV head (max reduction)" if wl.union_inflation == 1.0 else "query head"
    budget = (f"{wl.budget_tokens} tokens per {per}" if wl.budget_tokens is not None
              else f"rho={wl.rho:g} of the context per {per}")
    out += [
        {"name": "workload.budget", "value": wl.budget_tokens if wl.budget_tokens is not None else wl.rho,
         "source": f"{budget} (paper: rho=0.03)"},
        {"name": "workload.sinks", "value": wl.sinks, "source": "paper (always kept)"},
        {"name": "workload.window", "value": wl.window, "source": "paper (always kept)"},
        {"name": "workload.union_inflation", "value": u, "source": usrc},
        {"name": "workload.centroids", "value": wl.centroids, "source": "paper (bf16 codebooks on the GPU)"},
        {"name": "workload.code_bytes", "value": wl.code_bytes, "source": "docs/design.md §1.2 (int16 codes)"},
        {"name": "workload.kv_bytes", "value": wl.kv_bytes, "source": "bf16 K/V"},
        {"name": "workload.index_bytes", "value": wl.index_bytes, "source": "assumption: int32 indices cross PCIe"},
        {"name": "model.overlap", "value": "max(GPU, host, PCIe) for B >= 2; the serial sum also given",
         "source": "assumption: micro-batches pipeline GPU, PCIe and host perfectly; at B = 1 and on a unified "
                   "host nothing overlaps (a layer's attention waits for its query)"},
        {"name": "model.batch_cap", "value": MAX_BATCH, "source": "assumption: scheduler cap"},
    ]
    return out


def load_measured(path: str | Path) -> list[dict]:
    """Measured throughput rows: a list of {"context", "batch", "system", "tokens_per_s"} objects
    (or an object with such a list under "rows", as `bench throughput --json` writes); system is "full" or
    "a2ats", or a name starting so (full-local, a2ats-offload-x2)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no measured-throughput file {p}")
    data = json.loads(p.read_text())
    if isinstance(data, dict):
        data = data.get("rows")
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a list of {{context, batch, system, tokens_per_s}} objects")
    out = []
    for i, r in enumerate(data):
        try:
            row = {"context": int(r["context"]), "batch": int(r["batch"]), "system": str(r["system"]),
                   "tokens_per_s": float(r["tokens_per_s"])}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{p}: row {i} needs context, batch, system and tokens_per_s: {r!r}") from None
        name = row["system"]
        kind = "a2ats" if name.startswith("a2ats") else "full" if name.startswith("full") else None
        if kind is None:
            raise ValueError(f"{p}: row {i}: system must be 'full' or 'a2ats' (or a name starting so, as "
                             f"`bench throughput` writes: full-local, a2ats-offload), got {name!r}")
        out.append({**row, "system": kind, "measured_system": name})
    return out


def beside_measured(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, measured: list[dict]) -> list[dict]:
    """Each measured row with the projection at the same context, batch and system."""
    out = []
    for m in measured:
        n, b = m["context"], m["batch"]
        if m["system"] == "full":
            fits = 1 <= b <= full_max_batch(shape, hw, wl, n)
            p = full_step(shape, hw, eff, wl, n, b)["tokens_per_s"] if b >= 1 else None
        else:
            fits = b >= 1 and a2ats_fits(shape, hw, wl, n, b)
            p = a2ats_step(shape, hw, eff, wl, n, b)["tokens_per_s"] if b >= 1 else None
        out.append({**m, "projected_tokens_per_s": p, "fits_in_model": fits,
                    "measured_over_projected": (m["tokens_per_s"] / p) if p else None})
    return out


def _target(contexts: list[dict], variants: list[dict], hw: Hardware, eff: Efficiencies, shape: ModelShape,
            wl: Workload) -> dict | None:
    at = {c["context"]: c for c in contexts}
    n = TARGET_CONTEXT if TARGET_CONTEXT in at else max(at)
    s = at[n]["summary"]
    if s["full_best"] is None or s["a2ats_best"] is None:
        return None
    need = TARGET_RATIO * s["full_best"]["tokens_per_s"]
    # With the host the bound: bytes per generated token the host may read at the measured efficiency.
    host_bw = hw.host_read_gbps * GB * eff.host_attention
    budget_bytes = host_bw / need
    per_row = shape.kv_heads * shape.layers * 2 * shape.head_dim
    rows_bf16 = budget_bytes / (per_row * 2.0)
    rows_int8 = budget_bytes / (per_row * (1.0 + 2.0 / shape.head_dim))
    reach = [v["variant"] for v in variants if v["context"] == n and v["ratio"] is not None and v["ratio"] >= TARGET_RATIO]
    reach_serial = [v["variant"] for v in variants
                    if v["context"] == n and v["ratio_serial"] is not None and v["ratio_serial"] >= TARGET_RATIO]
    return {
        "context": n, "target_ratio": TARGET_RATIO, "ratio": s["ratio_best"], "ratio_serial": s["ratio_best_serial"],
        "reached": s["ratio_best"] >= TARGET_RATIO, "bottleneck": s["a2ats_best"]["bottleneck"],
        "needed_tokens_per_s": need, "host_bytes_per_token_allowed": budget_bytes,
        "host_bytes_per_token_now": s["a2ats_best"]["bytes"]["host_read"] / s["a2ats_best"]["batch"],
        "rows_per_kv_head_allowed_bf16": rows_bf16, "rows_per_kv_head_allowed_int8": rows_int8,
        "rows_per_kv_head_now": s["rows_per_kv_head"],
        "variants_reaching": reach, "variants_reaching_serial": reach_serial,
    }


def sweep(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, n: int, read_gbps: list[float],
          ram_gib: list[float]) -> dict:
    """The best-batch ratio (A²ATS over full attention, overlapped and serial) at context ``n`` over a grid of
    host read bandwidths and host RAM sizes, everything else as ``hw``: where the paper's 2.7x (and 4x) is
    reached. Full attention does not depend on the host, so only A²ATS moves."""
    cells = []
    for bw in read_gbps:
        for ram in ram_gib:
            h = replace(hw, name=f"{hw.name}, {bw:g} GB/s, {ram:g} GiB", host_read_gbps=float(bw), host_ram_gib=float(ram))
            try:
                s = context_projection(shape, h, eff, wl, n)["summary"]
            except ValueError:
                cells.append({"host_read_gbps": bw, "host_ram_gib": ram, "ratio": None, "ratio_serial": None})
                continue
            cells.append({"host_read_gbps": bw, "host_ram_gib": ram, "ratio": s["ratio_best"],
                          "ratio_serial": s["ratio_best_serial"], "a2ats_max_batch": s["a2ats_max_batch"],
                          "a2ats_best_batch": s["a2ats_best"]["batch"] if s["a2ats_best"] else None,
                          "bottleneck": s["a2ats_best"]["bottleneck"] if s["a2ats_best"] else None})
    return {"context": n, "read_gbps": list(read_gbps), "ram_gib": list(ram_gib), "cells": cells}


def project(shape: ModelShape, hw: Hardware, eff: Efficiencies, wl: Workload, contexts: list[int] | tuple[int, ...],
            measured: list[dict] | None = None, command: str | None = None, sweep_grid: tuple | None = None) -> dict:
    """The whole projection as one JSON-ready dict."""
    contexts = list(contexts)
    if not contexts:
        raise ValueError("give at least one context length")
    ctx, skipped = [], []
    for n in contexts:
        try:
            ctx.append(context_projection(shape, hw, eff, wl, n))
        except ValueError as e:
            if "fits neither system" not in str(e):
                raise
            skipped.append({"context": n, "reason": str(e)})
    if not ctx:  # nothing fits: the first context's reason
        raise ValueError(skipped[0]["reason"])
    variants = variant_rows(shape, hw, eff, wl, [c["context"] for c in ctx])
    res = {
        "label": LABEL, "command": command,
        "shape": {**asdict(shape), "group": shape.group, "params": shape.params,
                  "weight_gib": shape.weight_bytes_resident / GIB,
                  "kv_kib_per_token": shape.kv_bytes_per_token(wl.kv_bytes) / 1024},
        "hardware": {k: v for k, v in asdict(hw).items() if k != "sources"},
        "efficiencies": {k: v for k, v in asdict(eff).items() if k != "sources"},
        "workload": asdict(wl),
        "assumptions": assumptions(shape, hw, eff, wl),
        "contexts": ctx, "skipped": skipped, "variants": variants,
        "target": _target(ctx, variants, hw, eff, shape, wl),
        "measured": beside_measured(shape, hw, eff, wl, measured) if measured else [],
    }
    if sweep_grid is not None:
        res["sweep"] = sweep(shape, hw, eff, wl, max(c["context"] for c in ctx), *sweep_grid)
    return res
