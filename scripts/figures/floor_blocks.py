"""The decode step against what it must read: repeated same-run `bench decode` files (``RUNS``), each recording the
host's read bandwidth measured in that run and every lean-engine row's bytes per part, the first also llama.cpp's
llama-bench at the same depths. The spread between runs is measured here, not assumed: two speeds whose ranges
over the runs overlap are a tie. ``BEFORE``: the same command's runs at an earlier commit, on the same machine."""

from __future__ import annotations

from pathlib import Path

from blocks import block, expect
from formatting import k, ms, paragraphs, ratio, table
from sources import load_json, same_machine, source_line

RUNS = [f"docs/bench/speed/amd-smollm2/run{i}/decode.json" for i in (1, 2)]
BEFORE = [f"docs/bench/speed/amd-smollm2/before/run{i}/decode.json" for i in (1, 2)]
WANT = ("a2ats-fast", "a2ats-fast-paper", "dense-lean")
LLAMA = ("llama.cpp-q8_0", "llama.cpp-q4_1")


def _runs(root: Path, rels: list[str]) -> list[dict]:
    runs = [load_json(root, rel) for rel in rels]
    for rel, d in zip(rels, runs):
        expect(d.get("model") == "smollm2-135m" and d.get("budget") == "rho=0.1 per KV head (max)"
               and d.get("wrope_bands") == 2.0 and d.get("dtype") == "float32",
               f"{rel}: not the default model and selection at float32")
        expect(not d["provenance"].get("backfilled") and "host_read_gbps" in d, f"{rel}: not a same-run record")
        expect({r["variant"] for r in d["rows"]} >= set(WANT), f"{rel}: lacks one of {WANT}")
    same_machine(*(d["provenance"] for d in runs))
    return runs


def _span(xs: list[float]) -> str:
    return ms(xs[0]) if len(set(xs)) == 1 else f"{ms(min(xs))}–{ms(max(xs))}"


def _versus(ours: list[float], theirs: list[float]) -> str:
    """Their time over ours (above 1: ours faster) at the middle pair, read against the overlap of the ranges."""
    overlap = max(min(ours), min(theirs)) <= min(max(ours), max(theirs))
    r = sorted(t / o for t, o in zip(theirs * len(ours) if len(theirs) == 1 else theirs, ours))[len(ours) // 2]
    verdict = "a tie" if overlap else ("faster" if min(theirs) > max(ours) else "slower")
    return f"{ratio(r)} ({verdict})"


def _path(row: dict) -> str:
    """What the default's timed steps did: selected, or attended densely (the measured rule's fallback)."""
    if row.get("dense_steps", 0) >= row["steps"]:
        return "dense"
    return "selects" if not row.get("dense_steps") else "mixed"


@block("speed-floor")
def speed_floor(root: Path) -> str:
    runs = _runs(root, RUNS)
    before = _runs(root, BEFORE)
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
        q8_span = [q8["ms_per_token"] - q8["spread_ms"], q8["ms_per_token"] + q8["spread_ms"]] if q8 else None
        acc = at[0]["a2ats-fast", n]["accounting"]
        mb = " / ".join(f"{acc['bytes'][p] / 1e6:.0f}" for p in ("weights", "scoring", "attention"))
        share = [a["a2ats-fast", n]["accounting"]["share_of_floor"] for a in at]
        paths = sorted({_path(a["a2ats-fast", n]) for a in at})
        rows.append([k(n), _span(fast) + f" ({'/'.join(paths)})", _span(old) if old else "—",
                     _span(t["a2ats-fast-paper"]), _span(dense),
                     ms(q8["ms_per_token"]) if q8 else "—",
                     ms(llama["llama.cpp-q4_1"]["ms_per_token"]) if llama["llama.cpp-q4_1"] else "—",
                     _versus(fast, dense), _versus(fast, q8_span) if q8 else "—", mb,
                     f"{min(share):.2f}–{max(share):.2f}"])
    gbps = " and ".join(f"{d['host_read_gbps']:.1f}" for d in runs)
    kv = {d.get("kv_dtype", "float32") for d in runs}
    head = ["context", "default, ms (its steps)", f"default at {before[0]['provenance']['commit'][:7]}, ms",
            "paper's selection, ms", "dense, same engine, ms", "llama.cpp Q8_0, ms", "llama.cpp Q4_1, ms",
            "default over dense", "default over llama.cpp Q8_0", "default reads: weights / scoring / attention, MB",
            "default: share of its floor"]
    rule = "; ".join(f"run {i + 1}: {d['crossover']}" for i, d in enumerate(runs) if d.get("crossover"))
    return "\n".join([
        f"SmolLM2-135M-Instruct, batch 1, int8 decode weights, {'/'.join(sorted(kv))} K/V, {len(runs)} runs of the "
        f"same command (ranges are min–max over the runs; a ratio whose ranges overlap is a tie). llama.cpp: "
        f"llama-bench in the first run, right after ours at each depth, its better of flash attention off and on, "
        f"its spread ± one standard deviation over its repetitions. Host read bandwidth measured in each run: {gbps} "
        "GB/s. A step's floor is the bytes it must read at that bandwidth; its share of the floor is the floor over "
        "the step's time (1.00: at the machine's limit). \"dense\" in the default's column: its steps attended to "
        "every token, as the start-up measurement decided (selection measured not to pay at that length)."
        + (f" The default's start-up measurement, {rule}." if rule else ""), "",
        table(head, rows), ""] + paragraphs([source_line(rel, d["provenance"]) for rel, d in zip(RUNS + BEFORE,
                                                                                                   runs + before)]))
