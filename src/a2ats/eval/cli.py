"""``a2ats eval`` (the accuracy suite) and ``a2ats report`` (tables and plots from its results): options and runs."""

from __future__ import annotations

import json
from pathlib import Path

from a2ats.assets.models import EVAL_MODEL
from a2ats.eval import harness, report
from a2ats.factory import options
from a2ats.factory.options import csv, log
from a2ats.methods.registry import KNOWN


def add_eval_arguments(p) -> None:
    options.add_model_args(p)
    p.add_argument("--preset", choices=list(harness.PRESETS), default="quick",
                   help=f"long: {EVAL_MODEL} (unless --model), every task at 4K/8K/16K and the needles at 32K")
    p.add_argument("--tasks", type=csv(str), help="comma-separated task names (default: the preset's)")
    p.add_argument("--lengths", type=csv(int), help="comma-separated context lengths in tokens")
    p.add_argument("--needle-lengths", type=csv(int), help="comma-separated lengths at which only the needle tasks run")
    p.add_argument("--text-lengths", type=csv(int), help="comma-separated lengths of the held-out prose metrics (attention "
                   "mass, top-K recall, perplexity); default: the preset's")
    p.add_argument("--only", choices=["tasks", "text"], help="run only the task samples, or only the held-out prose "
                   "metrics (a long run in parts, on the same --out)")
    p.add_argument("--prefill-dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype of the shared prefills (autocast; decode stays in --dtype)")
    p.add_argument("--methods", type=csv(str), help=f"comma-separated: {KNOWN}".replace("%", "%%"))
    p.add_argument("--budgets", type=csv(float), help="comma-separated fractions, e.g. 0.015,0.03,0.06")
    p.add_argument("--samples", type=int, help="samples per task and length")
    p.add_argument("--centroids", type=int, help="codebook size for the a2ats methods")
    p.add_argument("--out", default="eval-out", help="output folder (a run started again on it resumes: rows there are kept)")


def run_eval(a) -> int:
    """Every method at equal budgets on the preset's tasks (shared prefills), then the summary."""
    preset = dict(harness.PRESETS[a.preset])
    for k in ("tasks", "lengths", "needle_lengths", "text_lengths", "methods", "budgets", "samples", "centroids",
              "prefill_dtype"):
        if getattr(a, k) is not None:
            preset[k] = getattr(a, k)
    if a.samples is not None:  # one count for every task, as asked
        preset["task_samples"] = {}
    for key in ("method_budgets", "task_budgets"):  # the preset's per-method budgets, for the methods kept
        preset[key] = {m: b for m, b in preset.get(key, {}).items() if m in preset["methods"]}
    if a.model is None and a.preset == "long":
        a.model = EVAL_MODEL  # the long-context preset is meant for the model that uses long context
    cfg = harness.EvalConfig(**preset, model=a.model or "")
    model, tok = options.load(a)
    out = Path(a.out)
    rows = harness.run(model, tok, cfg, out, log=log, only=a.only)
    print(report.write_summary(rows, out, f"a2ats eval ({a.preset} preset)", cfg.decode_last, cfg.ppl_tokens))
    log(f"wrote {out}/results.jsonl, summary.md, score_vs_budget.png, heatmap.png")
    return 0


def add_report_arguments(p) -> None:
    p.add_argument("results", nargs="+", help="results.jsonl files written by `a2ats eval`")
    p.add_argument("--out", required=True, help="folder for summary.md and the plots")
    p.add_argument("--title", default="a2ats eval")


def run_report(a) -> int:
    """Tables and plots from one or more results files (the config beside each, where there is one)."""
    rows, cfg = [], {}
    paths = [Path(p) for p in a.results]
    for p in paths:  # every file named before any is read
        if not p.is_file():
            raise ValueError(f"no results file {p}: give the results.jsonl that `a2ats eval --out DIR` wrote in DIR")
    for p in paths:
        rows += report.load_rows(p)
        if (p.parent / "config.json").is_file():
            cfg = {**json.loads((p.parent / "config.json").read_text()), **cfg}
    print(report.write_summary(rows, Path(a.out), a.title, cfg.get("decode_last", 32), cfg.get("ppl_tokens", 128)))
    return 0
