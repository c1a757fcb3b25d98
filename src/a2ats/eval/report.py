"""Summaries of harness results: a markdown table and plots (score vs budget per task; method x task heat map)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

from a2ats.methods import registry


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
    by_cell = defaultdict(lambda: defaultdict(list))  # the average: every (task, length) cell weighs the same
    toks = defaultdict(list)
    for r in rows:
        by[_key(r)][r["task"]].append(r["score"])
        by_cell[_key(r)][(r["task"], r["length"])].append(r["score"])
        toks[_key(r)].append(r["attended_per_kv_head"])
    full_avg = _cell_average(by_cell[("full", 1.0)]) if ("full", 1.0) in by_cell else None
    head = ["method", "budget", "attended/KV head"] + tasks + ["average", "vs full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by, key=lambda k: (k[0] != "full", k[1], k[0])):
        per = [mean(by[key][t]) if by[key][t] else float("nan") for t in tasks]
        avg = _cell_average(by_cell[key])
        rel = f"{avg / full_avg:.2f}" if full_avg else "n/a"
        cells = [key[0], f"{key[1]:g}", f"{mean(toks[key]):.0f}"] + [f"{100 * p:.0f}" for p in per] + [f"{100 * avg:.1f}", rel]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_average(cells: dict) -> float:
    """The suite's average: the mean over (task, length) cells of each cell's mean over its prompts, as the
    bootstrap intervals average (so a length that runs fewer tasks does not weigh more)."""
    return mean(mean(v) for v in cells.values())


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
        overall = _cell_average({(t, n): v for n, per in by[key].items() for t, v in per.items()})
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + f" | {100 * overall:.1f} |")
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


def _prompt(r: dict) -> tuple:
    return r["task"], r["length"], r.get("seed", 0)


def split_by_coverage(rows: list[dict]) -> tuple[list[dict], dict]:
    """What the tables compare: the task rows of the runs (method, budget) that decoded every prompt of the results
    but at most one (the prompt a stopped run was in the middle of), on the prompts they all decoded, with every
    other row (the prose metrics); and the runs that missed more (a plan cut for them), as ``{key: their rows}``.
    Averages over different prompts are not comparable, so the tables never mix them."""
    tasks = [r for r in rows if "score" in r]
    have = defaultdict(set)
    for r in tasks:
        have[_key(r)].add(_prompt(r))
    prompts = set().union(*have.values())
    partial = {k for k, v in have.items() if len(prompts - v) > 1}
    common = set.intersection(*[v for k, v in have.items() if k not in partial]) if len(partial) < len(have) else set()
    kept = [r for r in rows if "score" not in r or (_key(r) not in partial and _prompt(r) in common)]
    return kept, {k: [r for r in tasks if _key(r) == k] for k in sorted(partial, key=lambda k: (k[0], k[1]))}


def partial_table(partial: dict, rows: list[dict]) -> str:
    """Each run that decoded only some prompts: how many, its average x100 on them and full attention's average
    on the same prompts (each (task, length) cell weighing the same)."""
    full = {_prompt(r): r["score"] for r in rows if "score" in r and _key(r) == ("full", 1.0)}
    lines = ["| method | budget | prompts | cells | average | full, same prompts |", "|---|---|---|---|---|---|"]
    for (m, b), rs in partial.items():
        mine, theirs = defaultdict(list), defaultdict(list)
        for r in rs:
            mine[(r["task"], r["length"])].append(r["score"])
            if _prompt(r) in full:
                theirs[(r["task"], r["length"])].append(full[_prompt(r)])
        f = f"{100 * _cell_average(theirs):.1f}" if theirs and len(theirs) == len(mine) else "n/a"
        lines.append(f"| {m} | {b:g} | {len(rs)} | {len(mine)} | {100 * _cell_average(mine):.1f} | {f} |")
    return "\n".join(lines)


def write_summary(rows: list[dict], out_dir: Path, title: str, decode_last: int, ppl_tokens: int) -> str:
    """``summary.md`` (every table) and the plots in ``out_dir``; returns the markdown. The task tables and plots
    compare the runs that decoded every prompt; the others are listed apart (:func:`split_by_coverage`)."""
    rows, partial = split_by_coverage(rows)
    per_cell = Counter((r["method"], r["budget"], r["task"], r["length"]) for r in rows if "score" in r)
    samples = max(per_cell.values(), default=0)  # of any method: "full" need not be among the results
    md = (
        f"# {title}\n\nScores x100 (RULER string match), averaged over tasks, lengths and {samples} sample(s) per task "
        "and length. Budget: fraction of the context retrieved per query head, plus 8 sinks and 64 window tokens "
        "always kept; 'attended/KV head' counts all of it after the GQA union.\n\n"
        + summary_table(rows)
        + "\n\nAverage task score (x100) per context length; in brackets, its share of full attention's.\n\n"
        + length_table(rows)
        + _interval_sections(rows)
        + _goal_section(rows)
        + ("\n\nRuns that decoded only some of the prompts (a cut plan, a stopped run), left out of the tables above: "
           "their average on the prompts they ran, beside full attention's on the same prompts.\n\n"
           + partial_table(partial, rows) if partial else "")
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
        interval_plot(rows, out_dir / "score_intervals.png", title="all tasks")
        if any(r["task"].startswith("niah_") for r in rows if "score" in r):
            interval_plot(rows, out_dir / "needle_intervals.png", tasks=_needles(rows), title="needle tasks")
    bytes_plot(rows, out_dir / "quality_vs_bytes.png", title)
    return md


def _goal_section(rows: list[dict]) -> str:
    if not any(r.get("method") == "full" and "score" in r for r in rows):
        return ""
    return ("\n\nThe goal at the bytes of the paper's rho = 3%: share of full attention's average, needle tasks and "
            "whole suite, per length [95% interval; † as above]; the first method is the library's default selection "
            "(✓: reaches the goal), at 10% per KV head (max reduction), the others at 3% per query head (GQA union).\n\n"
            + goal_table(rows))


def _needles(rows: list[dict]) -> set[str]:
    return {r["task"] for r in rows if "score" in r and r["task"].startswith("niah_")}


def _interval_sections(rows: list[dict]) -> str:
    """Averages with 95% bootstrap intervals over prompts (all tasks, then the needle tasks alone), and their
    share of full attention's; overlapping intervals are ties."""
    if not any("score" in r for r in rows):
        return ""
    out = ("\n\nAverage score x100 with its 95% bootstrap interval over prompts (each (task, length) cell's "
           "prompts redrawn 2,000 times, the same for every method); overlapping intervals are ties. † some cells "
           "hold one prompt (a task cut to one sample): the interval counts the spread of the others only.\n\n"
           + interval_table(rows)
           + "\n\nShare of full attention's average, same prompts, with its 95% interval.\n\n"
           + interval_table(rows, ratio=True))
    budgets = sorted({r["budget"] for r in rows if "score" in r and r["method"] != "full"})
    if budgets:
        mid = 0.03 if 0.03 in budgets else budgets[len(budgets) // 2]
        out += (f"\n\nPer task at budget {mid:g} (lengths pooled): average x100 [95% interval]\n\n"
                + task_interval_table(rows, mid))
    needles = _needles(rows)
    if needles and needles != {r["task"] for r in rows if "score" in r}:
        out += ("\n\nNeedle tasks only (" + ", ".join(sorted(needles)) + "): average x100 [95% interval]\n\n"
                + interval_table(rows, needles)
                + "\n\nNeedle tasks only: share of full attention's average [95% interval]\n\n"
                + interval_table(rows, needles, ratio=True))
    return out


GOAL = {"needles": 0.97, "suite": 0.95}  # shares of full attention's average the default selection must keep
# The library's default selection (A2ATSConfig: banded WRoPE, max reduction at 10% per KV head), first in the goal,
# then the others at the paper's rho = 3%: on a 7-head GQA group the paper's union reads the same bytes there.
DEFAULT_METHOD = ("a2ats-banded+max", 0.1)
GOAL_METHODS = (DEFAULT_METHOD, *((m, 0.03) for m in registry.names("library", "paper", "ceiling", "retrieval")))


def goal_table(rows: list[dict], methods=GOAL_METHODS) -> str:
    """The accuracy goal: each (method, budget)'s share of full attention's average on the needle tasks and on the
    whole suite, per length, with its 95% interval; the first method passes a cell when it reaches ``GOAL``."""
    parts = [("needles", _needles(rows)), ("suite", None)]
    lengths = sorted({r["length"] for r in rows if "score" in r})
    lines = ["| method | tasks | goal | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|" + "---|" * (3 + len(lengths))]
    for what, tasks in parts:
        if tasks is not None and not tasks:
            continue
        res = bootstrap(rows, tasks)
        spread = {n: _spread(rows, tasks, n) for n in lengths}
        for m, budget in methods:
            per = res.get((m, budget))
            if per is None:
                continue
            cells = []
            for n in lengths:
                v = per.get(n)
                if v is None or v[3] is None:
                    cells.append("n/a")
                    continue
                ci = _ci(spread[n], v[4], v[5], "{:.2f}")
                mark = " ✓" if v[3] >= GOAL[what] else " ✗"
                cells.append(f"{v[3]:.2f}{ci}{mark if (m, budget) == methods[0] else ''}")
            lines.append(f"| {m} @ {budget:g} | {what} | {GOAL[what]:.2f} | " + " | ".join(cells) + " |")
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
    p1 = _save(fig, out_dir / "score_vs_budget.png")

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
    return [p1, _save(fig, out_dir / "heatmap.png")]


# -- intervals --------------------------------------------------------------------------------------------

def bootstrap(rows: list[dict], tasks=None, resamples: int = 2000, seed: int = 0) -> dict:
    """Average task score with a 95% bootstrap interval over prompts, per (method, budget), per length and overall,
    and its ratio to full attention's on the same resampled prompts.

    The average is over (task, length) cells, each the mean over its prompts; a resample redraws each cell's
    prompts with replacement, the same prompts for every method (paired). Returns
    ``{(method, budget): {length or "all": (mean, lo, hi, ratio, ratio_lo, ratio_hi)}}`` (ratios None without full).
    """
    import numpy as np

    rows = [r for r in rows if "score" in r and (tasks is None or r["task"] in tasks)]
    keys = sorted({_key(r) for r in rows}, key=lambda k: (k[0] != "full", k[1], k[0]))
    cells = sorted({(r["task"], r["length"]) for r in rows})
    if not keys:
        return {}
    index = {k: i for i, k in enumerate(keys)}
    rng = np.random.default_rng(seed)
    per_cell = {}  # cell -> (M, R) mean score of each method over that cell's resampled prompts (+ the point estimate)
    for cell in cells:
        seeds = sorted({r.get("seed", 0) for r in rows if (r["task"], r["length"]) == cell})
        col = {s: j for j, s in enumerate(seeds)}
        grid = np.full((len(keys), len(seeds)), np.nan)
        for r in rows:
            if (r["task"], r["length"]) == cell:
                grid[index[_key(r)], col[r.get("seed", 0)]] = r["score"]
        draws = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
        with np.errstate(all="ignore"):
            boot = np.nanmean(grid[:, draws], axis=-1)  # (M, R)
            point = np.nanmean(grid, axis=-1)  # (M,)
        per_cell[cell] = (point, boot)
    full = index.get(("full", 1.0))
    out = {k: {} for k in keys}
    groups = {n: [c for c in cells if c[1] == n] for n in sorted({c[1] for c in cells})}
    groups["all"] = cells
    for group, members in groups.items():
        with np.errstate(all="ignore"):
            point = np.nanmean(np.stack([per_cell[c][0] for c in members]), axis=0)  # (M,)
            boot = np.nanmean(np.stack([per_cell[c][1] for c in members]), axis=0)  # (M, R)
        lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=-1)
        for k, i in index.items():
            if np.isnan(point[i]):
                continue
            ratio = (None,) * 3
            if full is not None and point[full] > 0:
                with np.errstate(all="ignore"):
                    rb = boot[i] / boot[full]
                rb = rb[np.isfinite(rb)]
                ratio = (float(point[i] / point[full]), *(float(x) for x in np.percentile(rb, [2.5, 97.5])))
            out[k][group] = (float(point[i]), float(lo[i]), float(hi[i]), *ratio)
    return out


def interval_table(rows: list[dict], tasks=None, ratio: bool = False) -> str:
    """Average score x100 [95% interval] per method and budget at each length and overall (``ratio``: the share of
    full attention's average instead, on the same prompts)."""
    res = bootstrap(rows, tasks)
    if not res:
        return "(no task rows)"
    groups = sorted({g for v in res.values() for g in v if g != "all"}) + ["all"]
    spread = {g: _spread(rows, tasks, g) for g in groups}
    head = ["method", "budget"] + [f"{g} tokens" if g != "all" else "all" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, per in res.items():
        if ratio and key[0] == "full":
            continue
        cells = []
        for g in groups:
            v = per.get(g)
            if v is None or (ratio and v[3] is None):
                cells.append("n/a")
            elif ratio:
                cells.append(f"{v[3]:.2f}" + _ci(spread[g], v[4], v[5], "{:.2f}"))
            else:
                cells.append(f"{100 * v[0]:.1f}" + _ci(spread[g], 100 * v[1], 100 * v[2], "{:.0f}"))
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(rows: list[dict], tasks, group) -> str:
    """How much of ``group`` (a length or "all") the bootstrap can resample: "none" when every (task, length) cell
    holds one prompt (the interval would have zero width and say nothing), "some" when some cells do (a task cut
    to one sample: the interval counts the others' spread only), "" when every cell holds two or more."""
    seeds = defaultdict(set)
    for r in rows:
        if "score" in r and (tasks is None or r["task"] in tasks) and (group == "all" or r["length"] == group):
            seeds[(r["task"], r["length"])].add(r.get("seed", 0))
    counts = [len(v) for v in seeds.values()] or [0]
    return "none" if max(counts) < 2 else "some" if min(counts) < 2 else ""


def _ci(spread: str, lo: float, hi: float, fmt: str) -> str:
    """An interval as the tables print it: ``[1 prompt]`` where nothing can be resampled, † where part can."""
    if spread == "none":
        return " [1 prompt]"
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]" + ("†" if spread == "some" else "")


def interval_plot(rows: list[dict], path: Path, tasks=None, title: str = "") -> Path:
    """Average score vs budget per method with 95% intervals, a panel per length (and one for all lengths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = bootstrap(rows, tasks)
    groups = sorted({g for v in res.values() for g in v if g != "all"}) + ["all"]
    methods = sorted({k[0] for k in res} - {"full"})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.0 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for j, m in enumerate(methods):
            pts = sorted((b, res[(m, b)][g]) for (mm, b) in res if mm == m and g in res[(m, b)])
            if not pts:
                continue
            xs = [100 * b * (1 + 0.03 * (j - len(methods) / 2)) for b, _ in pts]  # small offsets: bars stay apart
            ys = [v[0] for _, v in pts]
            err = [[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, lw=1, label=m)
        if ("full", 1.0) in res and g in res[("full", 1.0)]:
            f = res[("full", 1.0)][g]
            ax.axhspan(f[1], f[2], color="k", alpha=0.08)
            ax.axhline(f[0], color="k", ls="--", lw=1, label="full")
        ax.set_xscale("log")
        ax.set_title(f"{g} tokens" if g != "all" else "all lengths", fontsize=9)
        ax.set_xlabel("budget (% of context per query head)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("average score (95% interval)")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    return _save(fig, path, title, 10)


def _save(fig, path: Path, title: str = "", title_size: int = 9) -> Path:
    """Every figure of the report ends the same way: optional title, tight layout, 110 dpi PNG, closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def bytes_plot(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Retrieval quality against bytes read per step: attention mass kept (held-out prose), needle-task and
    whole-suite average scores, each against KiB read per step per sequence and KV head (rows' ``bytes_per_step``;
    the A²ATS codebook, shared by the batch, not counted); a line per method (GQA reduction included)."""
    rows = [r for r in rows if "bytes_per_step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needles = _needles(rows)
    panels = [("mass", "share of true attention mass kept", [r for r in rows if r["task"] == "attention"], "mass"),
              ("needles", "needle tasks: average score", [r for r in rows if r["task"] in needles], "score"),
              ("suite", "all tasks: average score", [r for r in rows if "score" in r], "score")]
    panels = [p for p in panels if p[2]]
    names = sorted({_key(r)[0] for _, _, rs, _ in panels for r in rs} - {"full"})
    colors = dict(zip(names, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, (_, label, rs, field) in zip(axes[0], panels):
        cells = defaultdict(lambda: defaultdict(list))  # key -> (task, length) -> values
        byts = defaultdict(list)
        for r in rs:
            cells[_key(r)][(r["task"], r["length"])].append(r[field])
            byts[_key(r)].append(r["bytes_per_step"])
        lines = defaultdict(list)
        for key, per in cells.items():
            lines[key[0]].append((mean(byts[key]) / 1024, _cell_average(per), key[1]))
        # a method far below the rest (StreamingLLM's 0 on retrieval) would squash every other line: named instead
        ys = sorted(y for name, pts in lines.items() if name != "full" for _, y, _ in pts)
        low = {name: max(y for _, y, _ in pts) for name, pts in lines.items()
               if name != "full" and ys and max(y for _, y, _ in pts) < 0.5 * ys[len(ys) // 2]}
        if low:
            ax.set_title("off the scale: " + ", ".join(f"{n} (at most {v:.2f})" for n, v in sorted(low.items())),
                         fontsize=7)
        for name, pts in sorted(lines.items()):
            if name in low:
                continue
            if name == "full":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="full")
                continue
            pts.sort()
            ls = ":" if name.endswith("+max") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, ls=ls, label=name, color=colors[name])
            for x, y, b in pts:
                ax.annotate(f"{b:g}", (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("KiB read per step, per sequence and KV head")
        ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path, title, 9)


def task_interval_table(rows: list[dict], budget: float, methods=None) -> str:
    """Per task (all lengths pooled): average score x100 [95% interval] of each method at ``budget`` and of full
    attention: the "on every task, within the intervals" comparison."""
    rows = [r for r in rows if "score" in r]
    tasks = sorted({r["task"] for r in rows})
    keys = [k for k in sorted({_key(r) for r in rows}, key=lambda k: (k[0] != "full", k[0]))
            if k == ("full", 1.0) or (k[1] == budget and (methods is None or k[0] in methods))]
    if not keys:
        return "(no rows at this budget)"
    per_task = {t: bootstrap(rows, {t}) for t in tasks}
    lines = ["| task | " + " | ".join(k[0] for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for t in tasks:
        cells, spread = [], _spread(rows, {t}, "all")  # the task's prompts, the same for every method
        for k in keys:
            v = per_task[t].get(k, {}).get("all")
            cells.append("n/a" if v is None else f"{100 * v[0]:.0f}" + _ci(spread, 100 * v[1], 100 * v[2], "{:.0f}"))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
