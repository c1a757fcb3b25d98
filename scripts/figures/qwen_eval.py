"""The Qwen2.5-Coder-0.5B evaluation suite as the blocks read it: its rows from one machine, the selections compared,
the cells of a table (share of full attention, bytes read per step), and what "the default" means."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from blocks import expect
from sources import load_eval, machine_of, same_machine


def library_default() -> tuple[str, float]:
    """The eval method name and budget of the library's default selection (A2ATSConfig()), checked to be the one the
    eval files call the default: banded WRoPE (ratio 2), the max reduction, 10% per KV head."""
    from a2ats.core.config import A2ATSConfig
    from a2ats.eval.report import DEFAULT_METHOD

    c = A2ATSConfig()
    expect(c.wrope_band_ratio == 2.0 and c.reduction == "max" and c.budget.fraction == 0.1,
           f"A2ATSConfig() is no longer banded/max/10% ({c}): the blocks that call a2ats-banded+max@0.1 the default "
           "must be re-stated")
    expect(DEFAULT_METHOD == ("a2ats-banded+max", 0.1), f"eval.report.DEFAULT_METHOD changed: {DEFAULT_METHOD}")
    return DEFAULT_METHOD


QWEN = "docs/eval/qwen/suite"
PAPER = ("a2ats", 0.03)
BANDED_UNION = ("a2ats-banded", 0.03)
QWEN_METHODS = [(None, "default: banded WRoPE, max reduction, 10% per KV head"),
                (BANDED_UNION, "banded WRoPE, GQA union, ρ = 3% per query head"),
                (PAPER, "the paper's A²ATS (single WRoPE distance, GQA union, ρ = 3%)"),
                (("oracle", 0.03), "oracle: exact top-K, ρ = 3%"),
                (("quest", 0.03), "Quest, ρ = 3%"),
                (("pqcache", 0.03), "PQCache, ρ = 3%")]


def qwen_rows(root: Path, machine: str = "AMD EPYC") -> tuple[list[dict], list[dict], dict, list[int]]:
    """The suite's rows written on ``machine`` (as each run's record states it), the runs, the config, and the runs
    left out (written on another machine: one machine per table)."""
    rows, runs, config = load_eval(root, QWEN)
    expect(config.get("model") == "qwen2.5-coder-0.5b", f"{QWEN}/config.json: model {config.get('model')!r}")
    expect(config.get("prefill_dtype") == "bfloat16", f"{QWEN}/config.json: prefill_dtype {config.get('prefill_dtype')}")
    on = [i for i, r in enumerate(runs) if machine in machine_of(r)]
    expect(bool(on), f"{QWEN}: no run on {machine}")
    return [r for r in rows if r["_run"] in on], runs, config, [i for i in range(len(runs)) if i not in on]


def qwen_source(root: Path, runs: list[dict], used: list[int]) -> str:
    first, last = runs[used[0]], runs[used[-1]]
    same_machine(*(runs[i] for i in used))
    return (f"Source: `{QWEN}/results.jsonl`, written in {len(used)} parts (`provenance.json`; backfilled from git "
            f"history: committed {first['date'][:10]} to {last['date'][:10]}, commits {first['commit'][:12]} to "
            f"{last['commit'][:12]}). Machine: {machine_of(last)}. Command: {last.get('command_source')}.")


def task_cells(rows: list[dict], lengths) -> tuple[list[dict], set]:
    from a2ats.eval.report import split_by_coverage

    rows = [r for r in rows if "score" in r and r["length"] in lengths]
    kept, _ = split_by_coverage(rows)
    needles = {r["task"] for r in kept if r["task"].startswith("niah_")}
    return kept, needles


def share_cell(res: dict, key, n, spread: str) -> str:
    from a2ats.eval.report import _ci

    v = res.get(key, {}).get(n)
    if v is None or v[3] is None:
        return "n/a"
    return f"{v[3]:.2f}" + _ci(spread, v[4], v[5], "{:.2f}")


def kib_per_step(rows: list[dict], key, n) -> float:
    vals = [r["bytes_per_step"] for r in rows if (r["method"], r["budget"]) == key and r["length"] == n
            and "score" in r]
    expect(bool(vals), f"no task rows of {key} at {n}")
    return mean(vals) / 1024
