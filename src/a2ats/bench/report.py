"""Tables and plots of benchmark rows (markdown for docs/, PNG via matplotlib)."""

from __future__ import annotations

from pathlib import Path


def decode_table(rows: list[dict]) -> str:
    """ms per token by variant (rows) and context (columns), then the fast path's per-step breakdown."""
    lengths = sorted({r["context"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    at = {(r["variant"], r["context"]): r for r in rows}
    head = "| variant | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |"
    lines = ["ms per token (median; tokens/s in brackets)", "", head, "|---" * (len(lengths) + 1) + "|"]
    for v in variants:
        cells = [f"{at[v, n]['ms_per_token']:.1f} ({at[v, n]['tokens_per_s']:.1f})" if (v, n) in at else "" for n in lengths]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    fast_variants = [v for v in variants if v.startswith("a2ats-fast") and v != "a2ats-fast-paper"]
    for fast_v in fast_variants:
        for base in ("dense-hf", "dense-lean", *(v for v in variants if v.startswith("llama.cpp"))):
            if not any((fast_v, n) in at and (base, n) in at for n in lengths):
                continue
            cells = [f"{at[base, n]['ms_per_token'] / at[fast_v, n]['ms_per_token']:.2f}x"
                     if (base, n) in at and (fast_v, n) in at else "" for n in lengths]
            lines.append(f"| speedup of {fast_v} over {base} | " + " | ".join(cells) + " |")
    for fast_v in fast_variants:
        fast = [at[fast_v, n] for n in lengths if (fast_v, n) in at]
        if not fast or not fast[0].get("breakdown_ms"):
            continue
        parts = list(fast[0]["breakdown_ms"])
        lines += ["", f"{fast_v} per step, ms: " + ", ".join(parts) + "; tokens attended per layer and KV head", "",
                  "| context | " + " | ".join(parts) + " | attended |", "|---" * (len(parts) + 2) + "|"]
        for r in fast:
            lines.append(f"| {r['context'] // 1024}K | " + " | ".join(f"{r['breakdown_ms'][p]:.1f}" for p in parts)
                         + f" | {r['attended']:.0f} |")
    accounted = [v for v in variants if any(at[v, n].get("accounting") for n in lengths if (v, n) in at)]
    if accounted:
        lines += ["", "what a step must read (weights + scoring + attention, MB) at the read bandwidth measured in the "
                  "same run, as a share of the step's time (1.00: at the machine's limit)", "",
                  head.replace("variant", "variant: MB, share of the floor"), "|---" * (len(lengths) + 1) + "|"]
        for v in accounted:
            cells = []
            for n in lengths:
                acc = at[v, n].get("accounting") if (v, n) in at else None
                cells.append(f"{sum(acc['bytes'].values()) / 1e6:.0f} MB, {acc['share_of_floor']:.2f}" if acc else "")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _line_plot(series: list[tuple[str, list, list, str]], path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """One line per (label, xs, ys, linestyle), log2 x axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, xs, ys, style in series:
        ax.plot(xs, ys, marker="o", linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decode_plot(rows: list[dict], path: Path, title: str) -> None:
    series = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["context"], r["tokens_per_s"]) for r in rows if r["variant"] == v)
        series.append((v, [p[0] for p in pts], [p[1] for p in pts], "-"))
    _line_plot(series, path, title, "context (tokens)", "decode tokens/s (batch 1)")


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def throughput_table(rows: list[dict]) -> str:
    """Decode tokens/s by (context, batch), one column per system; then the A²ATS per-step breakdown."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    at = {(r["system"], r["context"], r["batch"]): r for r in rows}
    keys = sorted({(r["context"], r["batch"]) for r in rows})
    first, others = systems[0], systems[1:]
    lines = ["decode tokens/s over all slots (median step; ms per step in brackets)", "",
             "| context | batch | " + " | ".join(systems) + "".join(f" | {first} over {o}" for o in others) + " |",
             "|---" * (2 * len(systems) + 1) + "|"]
    for n, B in keys:
        cells = [f"{at[s, n, B]['tokens_per_s']:.1f} ({at[s, n, B]['ms_per_step']:.0f})" if (s, n, B) in at else ""
                 for s in systems]
        cells += [f"{at[first, n, B]['tokens_per_s'] / at[o, n, B]['tokens_per_s']:.2f}x"
                  if (first, n, B) in at and (o, n, B) in at else "" for o in others]
        lines.append(f"| {_ctx(n)} | {B} | " + " | ".join(cells) + " |")
    for s in systems:
        sub = [at[s, n, B] for n, B in keys if (s, n, B) in at and at[s, n, B].get("breakdown_ms")]
        if not sub:
            continue
        parts = list(sub[0]["breakdown_ms"])
        lines += ["", f"{s} per step, ms: " + ", ".join(parts) + "; the bytes a step must read (MB) and the share of "
                  "the floor (those bytes at the read bandwidth measured in the run, over the step's time)", "",
                  "| context | batch | " + " | ".join(parts) + " | attended | crossed KiB | fits | MB read | of floor |",
                  "|---" * (len(parts) + 7) + "|"]
        for r in sub:
            floor = r.get("floor") or {}
            mb = f"{sum(floor['bytes'].values()) / 1e6:.0f}" if floor else ""
            share = f"{floor['share_of_floor']:.2f} of {floor['host_gbps']:g} GB/s" if floor else ""
            lines.append(f"| {_ctx(r['context'])} | {r['batch']} | " + " | ".join(f"{r['breakdown_ms'][p]:.1f}" for p in parts)
                         + f" | {r['attended']:.0f} | {r['crossed_kib_per_step']:.0f} | {r['largest_batch']} | {mb} | {share} |")
    return "\n".join(lines) + "\n"


def throughput_plot(rows: list[dict], path: Path, title: str) -> None:
    series = []
    for s in dict.fromkeys(r["system"] for r in rows):
        for n in sorted({r["context"] for r in rows if r["system"] == s}):
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["system"] == s and r["context"] == n)
            series.append((f"{s}, {_ctx(n)}", [p[0] for p in pts], [p[1] for p in pts],
                           "-" if s.startswith("a2ats") else "--"))
    _line_plot(series, path, title, "batch (sequences decoding together)", "decode tokens/s")
