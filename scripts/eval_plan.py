"""CPU time of an evaluation plan, projected from the rows of a run already made (e.g. its first sample).

    .venv/bin/python scripts/eval_plan.py eval-qwen/results.jsonl --preset long [--samples 4 --task-samples common_words=2]

Per (task, length): the measured prefill seconds and the decode seconds of every method and budget, averaged over
the samples done, times the samples the plan asks for; a cell not measured yet is extrapolated from the same task
at its longest shorter length, by the growth per doubling measured between two lengths (marked as such); the text
metrics as measured (they run once per length).
"""

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from a2ats.eval.harness import PRESETS, EvalConfig

p = argparse.ArgumentParser()
p.add_argument("results")
p.add_argument("--preset", default="long")
p.add_argument("--samples", type=int)
p.add_argument("--task-samples", default="", help="task=N,task=N")
a = p.parse_args()

cfg = dict(PRESETS[a.preset])
if a.samples:
    cfg["samples"] = a.samples
if a.task_samples:
    cfg["task_samples"] = {k: int(v) for k, v in (x.split("=") for x in a.task_samples.split(","))}
cfg = EvalConfig(**cfg)
rows = [json.loads(x) for x in Path(a.results).read_text().splitlines() if x.strip()]
task_rows = [r for r in rows if "score" in r]
planned = set(cfg.runs(tasks=True))  # decode time of the runs this plan makes, not of every row a run has written
prefill = defaultdict(dict)  # (task, length) -> seed -> seconds
decode = defaultdict(lambda: defaultdict(float))  # (task, length) -> seed -> seconds
for r in task_rows:
    prefill[(r["task"], r["length"])][r["seed"]] = r["prefill_seconds"]
    if (r["method"], r["budget"]) in planned:
        decode[(r["task"], r["length"])][r["seed"]] += r["decode_seconds"]
measured = {c: mean(prefill[c].values()) + mean(decode[c].values()) for c in prefill}


def growth(task):
    """Measured growth of a sample's time per doubling of the length: the task's two longest measured lengths,
    else the median over the tasks that have two."""
    def of(t):
        ns = sorted(n for tt, n in measured if tt == t)
        if len(ns) < 2:
            return None
        n0, n1 = ns[-2:]
        return (measured[(t, n1)] / measured[(t, n0)]) ** (1 / math.log2(n1 / n0))
    g = of(task)
    if g is None:
        gs = sorted(x for x in (of(t) for t in {t for t, _ in measured}) if x is not None)
        g = gs[len(gs) // 2] if gs else None
    return g


total, estimated, lines = 0.0, 0.0, []
for task, length in sorted({(t, n) for t, n, _ in cfg.jobs()}, key=lambda c: (c[1], c[0])):
    n = cfg.samples_for(task)
    cell = (task, length)
    if cell in measured:
        per = measured[cell]
        total += n * per
        lines.append(f"{task:28s} {length:6d}: {per / 60:5.1f} min per sample x {n} = {n * per / 60:6.1f} min")
        continue
    shorter = sorted(m for t, m in measured if t == task and m < length)
    g = growth(task)
    if not shorter or g is None:
        lines.append(f"{task:28s} {length:6d}: no measurement yet")
        continue
    per = measured[(task, shorter[-1])] * g ** math.log2(length / shorter[-1])
    estimated += n * per
    lines.append(f"{task:28s} {length:6d}: {per / 60:5.1f} min per sample x {n} = {n * per / 60:6.1f} min "
                 f"(extrapolated from {shorter[-1]}: x{g:.2f} per doubling)")
text = sum(r.get("seconds", 0) for r in rows if r["task"] in ("attention", "perplexity"))
print("\n".join(lines))
print(f"tasks: {total / 3600:.2f} h from measured cells, {estimated / 3600:.2f} h extrapolated, "
      f"{(total + estimated) / 3600:.2f} h for {len(cfg.jobs())} prompts")
if text:
    print(f"text metrics: {text / 3600:.2f} h measured")
by_method = defaultdict(list)
for r in task_rows:
    if r["new_tokens"] > 1:
        by_method[(r["method"].split("+")[0] if r["method"] != "full" else "full", r["length"], r["path"])].append(
            r["decode_seconds"] / r["new_tokens"])
print("seconds per generated token (fork and first token included):")
for (m, n, path), v in sorted(by_method.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"  {m:18s} {n:6d} {path:9s} {mean(v):.3f} s ({len(v)} runs)")
