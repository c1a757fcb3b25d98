"""Summaries of harness results: a markdown table and plots (score vs budget per task; method x task heat map)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
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
    full = [mean(v) for v in by.get(("full", 1.0), {}).values()]  # .get: no empty "full" row
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


def length_table(rows: list[dict]) -> str:
    """Per method and budget: the average task score (x100) at each context length, and its share of full's."""
    rows = [r for r in rows if "score" in r]
    if not rows:
        return "(no task rows)"
    lengths = sorted({r["length"] for r in rows})
    by = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # key -> length -> task -> scores
    for r in rows:
        by[_key(r)][r["length"]][r["task"]].append(r["score"])

    def avg(key, n):
        per = [mean(v) for v in by[key][n].values()]
        return mean(per) if per else None

    head = ["method", "budget"] + [f"{n} tokens" for n in lengths] + ["all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by, key=lambda k: (k[0] != "full", k[1], k[0])):
        cells = []
        for n in lengths:
            a, f = avg(key, n), avg(("full", 1.0), n)
            cells.append("n/a" if a is None else f"{100 * a:.1f}" + (f" ({a / f:.2f})" if f and key[0] != "full" else ""))
        vals = [avg(key, n) for n in lengths if avg(key, n) is not None]
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + f" | {100 * mean(vals):.1f} |")
    return "\n".join(lines)


def text_metrics_table(rows: list[dict]) -> str:
    """Per method and budget: attention mass captured and recall of the true top-K (mean over layers, heads,
    positions), and continuation perplexity, at each context length."""
    att = defaultdict(lambda: defaultdict(list))
    lengths = sorted({r["length"] for r in rows if r["task"] in ("attention", "perplexity")})
    for r in rows:
        if r["task"] == "attention":
            att[_key(r)][("mass", r["length"])].append(r["mass"])
            att[_key(r)][("recall", r["length"])].append(r["recall"])
        elif r["task"] == "perplexity":
            att[_key(r)][("ppl", r["length"])].append(r["perplexity"])
    if not att:
        return "(no attention or perplexity rows)"
    cols = [(what, n) for what in ("mass", "recall", "ppl") for n in lengths]
    names = {"mass": "attention mass", "recall": "top-K recall", "ppl": "perplexity"}
    head = ["method", "budget"] + [f"{names[w]} @{n}" for w, n in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(att, key=lambda k: (k[0] != "full", k[1], k[0])):
        cells = [f"{mean(att[key][c]):.{2 if c[0] == 'ppl' else 3}f}" if att[key][c] else "n/a" for c in cols]
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(rows: list[dict], out_dir: Path, title: str, decode_last: int, ppl_tokens: int) -> str:
    """``summary.md`` (every table) and the plots in ``out_dir``; returns the markdown."""
    per_cell = Counter((r["method"], r["budget"], r["task"], r["length"]) for r in rows if "score" in r)
    samples = max(per_cell.values(), default=0)  # of any method: "full" need not be among the results
    md = (
        f"# {title}\n\nScores x100 (RULER string match), averaged over tasks, lengths and {samples} sample(s) per task "
        "and length. Budget: fraction of the context retrieved per query head, plus 8 sinks and 64 window tokens "
        "always kept; 'attended/KV head' counts all of it after the GQA union.\n\n"
        + summary_table(rows)
        + "\n\nAverage task score (x100) per context length; in brackets, its share of full attention's.\n\n"
        + length_table(rows)
        + "\n\nHeld-out State of the Union prose: share of the true attention mass kept and recall of the true "
        f"top-K over the last {decode_last} positions (mean over layers and heads), and the perplexity of "
        f"a {ppl_tokens}-token continuation decoded under each method.\n\n"
        + text_metrics_table(rows)
        + "\n"
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(md)
    if any("score" in r for r in rows):
        plots(rows, out_dir)
    return md


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
