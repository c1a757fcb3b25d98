"""Summaries of harness results: a markdown table and plots (score vs budget per task; method x task heat map)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _key(r: dict) -> tuple[str, float]:
    return r["method"], r["budget"]


def summary_table(rows: list[dict]) -> str:
    """Per method and budget: mean score (x100) per task, the average, and that average relative to full."""
    rows = [r for r in rows if "score" in r]
    if not rows:
        return "(no task rows)"
    tasks = sorted({r["task"] for r in rows})
    by = defaultdict(lambda: defaultdict(list))
    toks = defaultdict(list)
    for r in rows:
        by[_key(r)][r["task"]].append(r["score"])
        toks[_key(r)].append(r["attended_per_kv_head"])
    full = [mean(v) for v in by[("full", 1.0)].values()]
    full_avg = mean(full) if full else None
    head = ["method", "budget", "attended/KV head"] + tasks + ["average", "vs full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by, key=lambda k: (k[0] != "full", k[1], k[0])):
        per = [mean(by[key][t]) if by[key][t] else float("nan") for t in tasks]
        avg = mean(per)
        rel = f"{avg / full_avg:.2f}" if full_avg else "n/a"
        cells = [key[0], f"{key[1]:g}", f"{mean(toks[key]):.0f}"] + [f"{100 * p:.0f}" for p in per] + [f"{100 * avg:.1f}", rel]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_metrics_table(rows: list[dict]) -> str:
    """Per method and budget: attention mass captured, recall of the true top-K, continuation perplexity."""
    att = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task"] == "attention":
            att[_key(r)]["mass"].append(r["mass"])
            att[_key(r)]["recall"].append(r["recall"])
        elif r["task"] == "perplexity":
            att[_key(r)]["ppl"].append(r["perplexity"])
    if not att:
        return "(no attention or perplexity rows)"
    lines = ["| method | budget | attention mass | top-K recall | perplexity |", "|---|---|---|---|---|"]
    for key in sorted(att, key=lambda k: (k[0] != "full", k[1], k[0])):
        cells = [f"{mean(att[key][n]):.{p}f}" if att[key][n] else "n/a" for n, p in (("mass", 3), ("recall", 3), ("ppl", 2))]
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Score vs budget per task (a line per method), and a method x task heat map at the middle budget."""
    rows = [r for r in rows if "score" in r]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows} - {"full"})
    budgets = sorted({r["budget"] for r in rows if r["method"] != "full"})
    score = defaultdict(list)
    for r in rows:
        score[(r["method"], r["budget"], r["task"])].append(r["score"])
    cols = min(3, len(tasks))
    nrow = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4.2 * cols, 3.2 * nrow), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m in methods:
            ys = [mean(score[(m, b, task)]) if score[(m, b, task)] else float("nan") for b in budgets]
            ax.plot([100 * b for b in budgets], ys, marker="o", label=m)
        if score[("full", 1.0, task)]:
            ax.axhline(mean(score[("full", 1.0, task)]), color="k", ls="--", lw=1, label="full")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("budget (% of context per query head)")
        ax.set_ylim(-0.05, 1.05)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    p1 = out_dir / "score_vs_budget.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    mid = budgets[len(budgets) // 2] if budgets else 1.0
    names = (["full"] if score[("full", 1.0, tasks[0])] else []) + methods
    grid = [[mean(score[(m, 1.0 if m == "full" else mid, t)] or [float("nan")]) for t in tasks] for m in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), 0.8 + 0.45 * len(names)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_title(f"score per task at budget {mid:g} (full: every token)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    p2 = out_dir / "heatmap.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]
