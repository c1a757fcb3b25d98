"""The decode step against what it must read: repeated same-run `bench decode` files (``RUNS``), each recording the
host's read bandwidth measured in that run and every lean-engine row's bytes per part, the first also llama.cpp's
llama-bench at the same depths. The spread between runs is measured here, not assumed: two speeds whose ranges
over the runs overlap are a tie. ``BEFORE``: the same command's runs at an earlier commit, on the same machine."""

from __future__ import annotations

from pathlib import Path

from blocks import block, expect
from formatting import k, ms, paragraphs, ratio, table
from sources import load_json, same_machine, source_line
from speed_sources import SPREAD as RELATIVE_SPREAD

RUNS = ["docs/bench/speed/amd-smollm2/run9/decode.json"]
BEFORE = [f"docs/bench/speed/amd-smollm2/run{i}/decode.json" for i in (7, 8)]
QWEN_RUNS = ["docs/bench/speed/amd-qwen/run5/decode.json"]
QWEN_BEFORE = [f"docs/bench/speed/amd-qwen/run{i}/decode.json" for i in (3, 4)]
WANT = ("a2ats-fast", "a2ats-fast-paper", "dense-lean")
LLAMA = ("llama.cpp-q8_0", "llama.cpp-q4_1", "llama.cpp-q4_k_m")
SPREAD = 1 + RELATIVE_SPREAD  # one run has no spread of its own: the one these machines showed between runs


def _runs(root: Path, rels: list[str], model: str = "smollm2-135m") -> list[dict]:
    runs = [load_json(root, rel) for rel in rels]
    for rel, d in zip(rels, runs):
        expect(d.get("model") == model and d.get("budget") == "rho=0.1 per KV head (max)"
               and d.get("wrope_bands") == 2.0 and d.get("dtype") == "float32",
               f"{rel}: not the default model and selection at float32")
        expect(not d["provenance"].get("backfilled") and "host_read_gbps" in d, f"{rel}: not a same-run record")
        expect({r["variant"] for r in d["rows"]} >= set(WANT), f"{rel}: lacks one of {WANT}")
    same_machine(*(d["provenance"] for d in runs))
    return runs


def _span(xs: list[float]) -> str:
    return ms(xs[0]) if len(set(xs)) == 1 else f"{ms(min(xs))}–{ms(max(xs))}"


def _versus(ours: list[float], theirs: list[float]) -> str:
    """Their time over ours (above 1: ours faster), run by run, read against the overlap of the two ranges (one
    run: against ``SPREAD``)."""
    rs = sorted(t / o for t, o in zip(theirs, ours))
    if len(ours) == 1:
        overlap = 1 / SPREAD <= rs[0] <= SPREAD
    else:
        overlap = max(min(ours), min(theirs)) <= min(max(ours), max(theirs))
    verdict = "a tie" if overlap else ("faster" if min(theirs) > max(ours) else "slower")
    return (ratio(rs[0]) if len(set(rs)) == 1 else f"{ratio(rs[0])}–{ratio(rs[-1])}") + f" ({verdict})"


def _versus_llama(ours: list[float], llama: dict) -> str:
    """llama.cpp's time over ours in the run that measured both (the first); a tie where it lies within our
    run-to-run spread (max over min of our runs) or llama-bench's own."""
    r = llama["ms_per_token"] / ours[0]
    spread = max(max(ours) / min(ours) if len(ours) > 1 else SPREAD, (llama["ms_per_token"] + llama["spread_ms"]) /
                 max(llama["ms_per_token"] - llama["spread_ms"], 1e-9))
    verdict = "a tie" if 1 / spread <= r <= spread else ("faster" if r > 1 else "slower")
    return f"{ratio(r)} ({verdict})"


def _flash(runs: list[dict]) -> str:
    """The flash-attention settings llama-bench ran in the first run: both (the better kept) or one."""
    kept = {f for r in runs[0]["rows"] if r["variant"] in LLAMA for f in r.get("ms_by_flash", {})}
    return "its better of flash attention off and on" if kept >= {"off", "on"} else \
        f"flash attention {'/'.join(sorted(kept)) or 'as built'} only"


def _path(row: dict) -> str:
    """What the default's timed steps did: selected, or attended densely (the measured rule's fallback)."""
    if row.get("dense_steps", 0) >= row["steps"]:
        return "dense"
    return "selects" if not row.get("dense_steps") else "mixed"


@block("speed-floor")
def speed_floor(root: Path) -> str:
    return _floor(root, RUNS, BEFORE, "smollm2-135m", "SmolLM2-135M-Instruct")


@block("speed-floor-qwen")
def speed_floor_qwen(root: Path) -> str:
    return _floor(root, QWEN_RUNS, QWEN_BEFORE, "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct")


def _floor(root: Path, run_rels: list[str], before_rels: list[str], model: str, name: str) -> str:
    runs = _runs(root, run_rels, model)
    before = _runs(root, before_rels, model) if before_rels else []
    if before:
        same_machine(runs[0]["provenance"], before[0]["provenance"])
    at = [{(r["variant"], r["context"]): r for r in d["rows"]} for d in runs]
    was = [{(r["variant"], r["context"]): r for r in d["rows"]} for d in before]
    lengths = sorted({n for (v, n) in at[0] if v == "a2ats-fast"})
    rows = []
    for n in lengths:
        t = {v: [a[v, n]["ms_per_token"] for a in at] for v in WANT}
        fast, dense = t["a2ats-fast"], t["dense-lean"]
        old = [w["a2ats-fast", n]["ms_per_token"] for w in was if ("a2ats-fast", n) in w]
        llama = {v: at[0].get((v, n)) for v in LLAMA}
        q8 = llama["llama.cpp-q8_0"]
        q4 = llama["llama.cpp-q4_1"] or llama["llama.cpp-q4_k_m"]
        acc = at[0]["a2ats-fast", n]["accounting"]
        mb = " / ".join(f"{acc['bytes'][p] / 1e6:.0f}" for p in ("weights", "scoring", "attention"))
        share = [a["a2ats-fast", n]["accounting"]["share_of_floor"] for a in at]
        paths = sorted({_path(a["a2ats-fast", n]) for a in at})
        rows.append([k(n), _span(fast) + f" ({'/'.join(paths)})"] + ([_span(old) if old else "—"] if before else [])
                    + [_span(t["a2ats-fast-paper"]), _span(dense), ms(q8["ms_per_token"]) if q8 else "—",
                       ms(q4["ms_per_token"]) if q4 else "—",
                     _versus(fast, dense), _versus_llama(fast, q8) if q8 else "—", mb,
                     f"{min(share):.2f}" if len(set(share)) == 1 else f"{min(share):.2f}–{max(share):.2f}"])
    gbps = " and ".join(f"{d['host_read_gbps']:.1f}" for d in runs)
    kv = {d.get("kv_dtype", "float32") for d in runs}
    q4_name = "Q4_1" if model == "smollm2-135m" else "Q4_K_M"
    head = (["context", "default, ms (its steps)"]
            + ([f"default at {before[0]['provenance']['commit'][:7]}, ms"] if before else [])
            + ["paper's selection, ms", "dense, same engine, ms", "llama.cpp Q8_0, ms", f"llama.cpp {q4_name}, ms",
            "default over dense, run by run", "default over llama.cpp Q8_0, same run",
            "default reads: weights / scoring / attention, MB", "default: share of its floor"])
    rule = "; ".join((f"run {i + 1}: " if len(runs) > 1 else "") + d["crossover"]
                     for i, d in enumerate(runs) if d.get("crossover"))
    return "\n".join([
        f"{name}, batch 1, int8 decode weights, {'/'.join(sorted(kv))} K/V, "
        + (f"{len(runs)} runs of the same command (ranges are min–max over the runs; a ratio whose ranges overlap is "
           "a tie)" if len(runs) > 1 else "one run (a ratio within ±15%, these machines' run-to-run spread, is a tie)")
        + f". llama.cpp: llama-bench in {'the first run' if len(runs) > 1 else 'the same run'}, right after ours at "
        f"each depth, {_flash(runs)}; its ratio is taken in that run and called a tie where it lies within our "
        "run-to-run spread. "
        f"Host read bandwidth measured in {'each run' if len(runs) > 1 else 'the run'}: {gbps} GB/s. A step's floor is the bytes it must read at that bandwidth; its share of the floor is the floor over "
        "the step's time (1.00: at the machine's limit). \"dense\" in the default's column: its steps attended to "
        "every token, as the start-up measurement decided (selection measured not to pay at that length)."
        + (f" The default's start-up measurement, {rule}." if rule else ""), "",
        table(head, rows), ""] + paragraphs([source_line(rel, d["provenance"])
                                             for rel, d in zip(run_rels + before_rels, runs + before)]))
