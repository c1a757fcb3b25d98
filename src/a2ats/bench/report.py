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
    for fast_v in ("a2ats-fast", "a2ats-fast-bf16w"):
        for base in ("dense-hf", "dense-lean", "dense-lean-bf16w"):
            if not any((fast_v, n) in at and (base, n) in at for n in lengths):
                continue
            cells = [f"{at[base, n]['ms_per_token'] / at[fast_v, n]['ms_per_token']:.2f}x"
                     if (base, n) in at and (fast_v, n) in at else "" for n in lengths]
            lines.append(f"| speedup of {fast_v} over {base} | " + " | ".join(cells) + " |")
    for fast_v in ("a2ats-fast", "a2ats-fast-bf16w"):
        fast = [at[fast_v, n] for n in lengths if (fast_v, n) in at]
        if not fast or not fast[0].get("breakdown_ms"):
            continue
        parts = list(fast[0]["breakdown_ms"])
        lines += ["", f"{fast_v} per step, ms: " + ", ".join(parts) + "; tokens attended per layer and KV head", "",
                  "| context | " + " | ".join(parts) + " | attended |", "|---" * (len(parts) + 2) + "|"]
        for r in fast:
            lines.append(f"| {r['context'] // 1024}K | " + " | ".join(f"{r['breakdown_ms'][p]:.1f}" for p in parts)
                         + f" | {r['attended']:.0f} |")
    return "\n".join(lines) + "\n"


def decode_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["context"], r["tokens_per_s"]) for r in rows if r["variant"] == v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
