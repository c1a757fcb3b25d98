"""The decode step against what it must read: repeated same-run `bench decode` files (``RUNS``), each recording the
host's read bandwidth measured in that run and every lean-engine row's bytes per part. The spread between runs
is measured here, not assumed: two speeds whose ranges over the runs overlap are a tie."""

from __future__ import annotations

from pathlib import Path

from blocks import block, expect
from formatting import k, ms, paragraphs, ratio, table
from sources import load_json, same_machine, source_line

RUNS = [f"docs/bench/speed/amd-smollm2/run{i}/decode.json" for i in (1, 2)]
WANT = ("a2ats-fast", "a2ats-fast-paper", "dense-lean")


def _runs(root: Path) -> list[dict]:
    runs = [load_json(root, rel) for rel in RUNS]
    for rel, d in zip(RUNS, runs):
        expect(d.get("model") == "smollm2-135m" and d.get("budget") == "rho=0.1 per KV head (max)"
               and d.get("wrope_bands") == 2.0 and d.get("dtype") == "float32",
               f"{rel}: not the default model and selection at float32")
        expect(not d["provenance"].get("backfilled") and "host_read_gbps" in d, f"{rel}: not a same-run record")
        expect({r["variant"] for r in d["rows"]} >= set(WANT), f"{rel}: lacks one of {WANT}")
    same_machine(*(d["provenance"] for d in runs))
    return runs


def _span(xs: list[float]) -> str:
    return ms(xs[0]) if len(set(xs)) == 1 else f"{ms(min(xs))}–{ms(max(xs))}"


@block("speed-floor")
def speed_floor(root: Path) -> str:
    runs = _runs(root)
    at = [{(r["variant"], r["context"]): r for r in d["rows"]} for d in runs]
    lengths = sorted({n for (v, n) in at[0] if v == "a2ats-fast"})
    rows = []
    for n in lengths:
        t = {v: [a[v, n]["ms_per_token"] for a in at] for v in WANT}
        fast, dense = t["a2ats-fast"], t["dense-lean"]
        overlap = max(min(fast), min(dense)) <= min(max(fast), max(dense))
        r = sorted(d / f for d, f in zip(dense, fast))[len(fast) // 2]
        verdict = "a tie" if overlap else ("faster" if min(dense) > max(fast) else "slower")
        acc = at[0]["a2ats-fast", n]["accounting"]
        mb = " / ".join(f"{acc['bytes'][p] / 1e6:.0f}" for p in ("weights", "scoring", "attention"))
        share = [a["a2ats-fast", n]["accounting"]["share_of_floor"] for a in at]
        dshare = [a["dense-lean", n]["accounting"]["share_of_floor"] for a in at]
        rows.append([k(n), _span(fast), _span(t["a2ats-fast-paper"]), _span(dense), f"{ratio(r)} ({verdict})", mb,
                     f"{min(share):.2f}–{max(share):.2f}", f"{min(dshare):.2f}–{max(dshare):.2f}"])
    gbps = " and ".join(f"{d['host_read_gbps']:.1f}" for d in runs)
    head = ["context", "default, ms", "paper's selection, ms", "dense, same engine, ms", "default over dense",
            "default reads: weights / scoring / attention, MB", "default: share of its floor",
            "dense: share of its floor"]
    return "\n".join([
        f"SmolLM2-135M-Instruct, batch 1, int8 decode weights, fp32 K/V, {len(runs)} runs of the same command "
        f"(ranges are min–max over the runs; a ratio whose ranges overlap is a tie). Host read bandwidth measured in "
        f"each run: {gbps} GB/s. A step's floor is the bytes it must read at that bandwidth; its share of the floor "
        "is the floor over the step's time (1.00: at the machine's limit).", "",
        table(head, rows), ""] + paragraphs([source_line(rel, d["provenance"]) for rel, d in zip(RUNS, runs)]))
