"""The commands timed end to end (``scripts/record_run.py``): how long ``make test`` and ``make demo`` took, and what
``make demo`` printed."""

from __future__ import annotations

import re
from pathlib import Path

from blocks import block, expect
from formatting import k, table
from sources import load_json, machine_short, source_line


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def command_time(root: Path, name: str, want: str) -> str:
    """How long a recorded command took, inline: ``docs/bench/commands/NAME.json`` as ``scripts/record_run.py``
    writes it; "(not yet measured)" while there is none."""
    rel = f"docs/bench/commands/{name}.json"
    if not (root / rel).is_file():
        return "(not yet measured)"
    d = load_json(root, rel)
    expect(d.get("command") == want, f"{rel}: command {d.get('command')!r}, the block claims {want!r}")
    expect(d.get("returncode") == 0, f"{rel}: the command failed (exit {d.get('returncode')})")
    p = d["provenance"]
    return (f"{duration(d['seconds'])} (`{rel}`: {machine_short(p)}, {p['date'][:10]}, commit "
            f"{(p.get('commit') or 'unknown')[:12]}{', dirty tree' if p.get('dirty') else ''}"
            f"{_fresh(d)})")


def _fresh(d: dict) -> str:
    if d.get("fresh_clone"):
        return ", a fresh clone with empty caches, set-up included"
    return ", from an empty cache" if d.get("fresh_cache") else ""


@block("make-test")
def make_test(root: Path) -> str:
    return command_time(root, "test", "make test")


@block("make-demo")
def make_demo(root: Path) -> str:
    return command_time(root, "demo", "make demo")


# the demo's own lines: the question, the answer and its statistics (not set-up or progress output)
_DEMO_LINE = re.compile(r"^(Q: |A: |\[a2ats\] (context|prompt|expected|saved codebooks))")


DEMO = "docs/bench/commands/demo.json"


def _demo_run(root: Path) -> dict:
    """The recorded `make demo`, checked to be a successful one."""
    d = load_json(root, DEMO)
    expect(d.get("command") == "make demo" and d.get("returncode") == 0, f"{DEMO}: not a successful `make demo`")
    return d


@block("demo-output")
def demo_output(root: Path) -> str:
    """What `make demo` printed, from its recorded run, with the run's machine and date."""
    rel = DEMO
    if not (root / rel).is_file():
        return f"(not yet recorded: `python scripts/record_run.py --out {DEMO} --fresh-clone -- make demo`)"
    d = _demo_run(root)
    lines = [x for x in d["output_tail"] if _DEMO_LINE.match(x)]
    expect(any(x.startswith("A: ") for x in lines), f"{rel}: no answer in the recorded output")
    p = d["provenance"]
    return (f"`make demo` on {machine_short(p)}, {p['date'][:10]}, commit {(p.get('commit') or 'unknown')[:12]}"
            f"{' (dirty tree)' if p.get('dirty') else ''}{_fresh(d)} "
            f"(`{rel}`):\n\n```\n" + "\n".join(lines) + "\n```")


_PHASES = {"setup_s": "set-up (virtual environment, installs)", "calibration_forward_s": "calibration: forward pass",
           "calibration_kmeans_s": "calibration: k-means", "rest_s": "the rest (model conversion and load, C++ kernel "
           "build, the answer)"}


@block("first-run")
def first_run(root: Path) -> str:
    """A newcomer's first `make demo` (a fresh clone, empty caches) split into its phases."""
    rel = DEMO
    d = _demo_run(root)
    expect(bool(d.get("fresh_clone")), f"{rel}: not a fresh clone (record it with --fresh-clone)")
    ph = d.get("phases") or {}
    expect(set(ph) == set(_PHASES), f"{rel}: phases {sorted(ph)}, want {sorted(_PHASES)}")
    rows = [[name, duration(ph[key])] for key, name in _PHASES.items()] + [["**total**", f"**{duration(d['seconds'])}**"]]
    return "\n".join([table(["phase", "time"], rows), "", source_line(rel, d["provenance"])])


_RECIPE_NAMES = {"oracle": "oracle (exact top-K)",
                 "16k+sink/exact": "16K sequences, Lloyd over all centroids (before)",
                 "16k+sink": "16K sequences, neighbour passes",
                 "8k+sink/exact": "8K sequences, Lloyd over all centroids (before)",
                 "8k+sink": "8K sequences, neighbour passes", "4k+sink": "4K sequences, neighbour passes",
                 "2k+sink": "2K sequences, neighbour passes"}


def calibration_recipes(root: Path, rel: str, model: str) -> str:
    """Calibration recipes: each one's forward and k-means seconds beside the attention mass its codebooks keep on
    held-out prose (scripts/calibration_recipe.py)."""
    d = load_json(root, rel)
    expect(d.get("model") == model, f"{rel}: model {d.get('model')}, the block claims {model}")
    recipes = [r for r in _RECIPE_NAMES if r == "oracle" or r in d["calibration"]]
    expect(len(recipes) == len(d["calibration"]) + 1, f"{rel}: a recipe without a name here: {sorted(d['calibration'])}")
    cells = {(r["recipe"], r["length"], r["budget"]): r["mass"] for r in d["rows"]}
    lengths = sorted({r["length"] for r in d["rows"]})
    budgets = sorted({r["budget"] for r in d["rows"]})
    head = ["recipe", "forward", "k-means"] + [f"{k(n)} ρ = {100 * b:g}%" for n in lengths for b in budgets]
    rows = []
    for r in recipes:
        info = d["calibration"].get(r, {})
        secs = [f"{info['forward_seconds']:.0f} s", f"{info['fit_seconds']:.0f} s"] if info else ["", ""]
        rows.append([_RECIPE_NAMES[r]] + secs + [f"{cells[(r, n, b)]:.3f}" for n in lengths for b in budgets])
    band = d.get("band_ratio")
    how = f"banded WRoPE, ratio {band:g}" if band else "the paper's single WRoPE distance"
    return "\n".join([f"Attention mass kept on held-out prose ({how}, GQA union) with each recipe's codebooks, and "
                      "each recipe's calibration seconds (recipes of one corpus share their forward pass):", "",
                      table(head, rows), "", source_line(rel, d["provenance"])])


# Each calibration-recipe run's block: its name, its result file (under docs/bench/speed) and the model it ran.
_RECIPE_RUNS = {
    "calibration-recipes-smollm2": ("calibration-smollm2", "smollm2-135m"),
    "calibration-recipes-qwen": ("calibration-qwen", "qwen2.5-coder-0.5b"),
    "calibration-kernel-smollm2": ("calibration-smollm2-kernel", "smollm2-135m"),  # with the attention kernel
    "calibration-kernel-qwen": ("calibration-qwen-kernel", "qwen2.5-coder-0.5b"),
    "calibration-exact2-smollm2": ("calibration-smollm2-exact2", "smollm2-135m"),  # two exact k-means passes
    "calibration-exact2-qwen": ("calibration-qwen-exact2", "qwen2.5-coder-0.5b"),
}
for _name, (_folder, _model) in _RECIPE_RUNS.items():
    block(_name)(lambda root, rel=f"docs/bench/speed/{_folder}/calibration.json", model=_model:
                 calibration_recipes(root, rel, model))


@block("first-calibration-qwen")
def first_calibration_qwen(root: Path) -> str:
    """Qwen2.5-Coder-0.5B's first use from an empty cache: assembling and converting its GGUF, then calibrating, with
    the forward and k-means seconds the calibration printed."""
    rel = "docs/bench/commands/calibrate-qwen.json"
    d = load_json(root, rel)
    expect(d.get("returncode") == 0 and d.get("fresh_cache"), f"{rel}: not a successful run from an empty cache")
    expect(d["command"].endswith("a2ats calibrate --model qwen2.5-coder-0.5b"), f"{rel}: command {d['command']!r}")
    line = next((x for x in reversed(d["output_tail"]) if "forward_seconds" in x), None)
    expect(line is not None, f"{rel}: no line with the calibration's own seconds")
    forward = float(re.search(r"'forward_seconds': ([\d.]+)", line).group(1))
    fit = float(re.search(r"'fit_seconds': ([\d.]+)", line).group(1))
    rows = [["the rest: assembling and converting the GGUF, loading the model, tokenizing the corpus",
             duration(d["seconds"] - forward - fit)],
            ["calibration: forward pass", duration(forward)], ["calibration: k-means", duration(fit)],
            ["**total**", f"**{duration(d['seconds'])}**"]]
    p = d["provenance"]
    return "\n".join([table(["phase", "time"], rows), "",
                      source_line(rel, p) + " (written to a scratch path and committed here)"])
