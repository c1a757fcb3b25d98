"""The decode-speed targets read off the same-run records of the floor tables (``floor_blocks``): each target with
the figure that decides it, and, for the step's parts, the bytes each read and the speed it read them at against
the host's read bandwidth measured in the same run: where a target is missed, the part that misses it."""

from __future__ import annotations

from pathlib import Path

from blocks import block
from floor_blocks import QWEN_RUNS, RUNS, SPREAD, _runs
from formatting import k, ms, ratio, table

PARTS = ("weights", "scoring", "attention")
MODELS = (("smollm2-135m", "SmolLM2-135M", RUNS), ("qwen2.5-coder-0.5b", "Qwen2.5-0.5B", QWEN_RUNS))
# (model, context, ratio over llama.cpp Q8_0 at least): the targets above the every-length floor
LLAMA_FLOOR = 1.2
LLAMA_TARGETS = (("smollm2-135m", 8192, 2.0), ("smollm2-135m", 16384, 3.0), ("qwen2.5-coder-0.5b", 32768, 1.5))
FLOOR_SHARE = 0.60
SCORING_SHARE = 0.15


def _rows(root: Path) -> dict[str, dict]:
    """Per model: its first run's rows by (variant, context) and the run itself."""
    out = {}
    for model, _, rels in MODELS:
        run = _runs(root, rels, model)[0]
        out[model] = {"run": run, "at": {(r["variant"], r["context"]): r for r in run["rows"]}}
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


@block("speed-targets")
def speed_targets(root: Path) -> str:
    data = _rows(root)
    name = {m: n for m, n, _ in MODELS}
    targets = []

    def over_llama(model: str) -> list[tuple[int, float]]:
        at = data[model]["at"]
        return [(n, at["llama.cpp-q8_0", n]["ms_per_token"] / at["a2ats-fast", n]["ms_per_token"])
                for (v, n) in sorted(at) if v == "llama.cpp-q8_0" and ("a2ats-fast", n) in at]

    every = [(m, n, r) for m in data for n, r in over_llama(m)]
    targets.append([f"≥ {ratio(LLAMA_FLOOR)} llama.cpp Q8_0 at every length from 2K",
                    "; ".join(f"{name[m]} {k(n)} {ratio(r)}" for m, n, r in every),
                    _verdict(all(r >= LLAMA_FLOOR for _, _, r in every)) + " at the depths llama.cpp ran"])
    for model, n, want in LLAMA_TARGETS:
        got = dict(over_llama(model)).get(n)
        targets.append([f"{name[model]}: ≥ {ratio(want)} llama.cpp Q8_0 at {k(n)}",
                        ratio(got) if got is not None else "not measured",
                        _verdict(got is not None and got >= want) if got is not None else "—"])
    vs_dense = []
    for m in data:
        at = data[m]["at"]
        vs_dense += [(m, n, at["dense-lean", n]["ms_per_token"] / at["a2ats-fast", n]["ms_per_token"])
                     for (v, n) in sorted(at) if v == "a2ats-fast"]
    slowest = min(vs_dense, key=lambda x: x[2])
    targets.append(["never slower than the same engine's dense step",
                    f"lowest: {name[slowest[0]]} {k(slowest[1])} {ratio(slowest[2])}",
                    _verdict(slowest[2] >= 1 / SPREAD) + f" (within ±{round(100 * (SPREAD - 1))}% is a tie)"])
    shares = [(m, r["context"], r["accounting"]["share_of_floor"]) for m in data for (v, _), r in
              data[m]["at"].items() if v == "a2ats-fast"]
    targets.append([f"the whole step at ≥ {FLOOR_SHARE:.0%} of its floor",
                    "; ".join(f"{name[m]} {min(s for mm, _, s in shares if mm == m):.2f}–"
                              f"{max(s for mm, _, s in shares if mm == m):.2f}" for m in data),
                    _verdict(min(s for *_, s in shares) >= FLOOR_SHARE)])
    scoring = [(m, r["context"], r["breakdown_ms"]["scoring"] / r["ms_per_token"]) for m in data
               for (v, _), r in data[m]["at"].items() if v == "a2ats-fast"]
    worst = max(scoring, key=lambda x: x[2])
    targets.append([f"scoring ≤ {SCORING_SHARE:.0%} of the step at every length",
                    f"highest: {name[worst[0]]} {k(worst[1])} {worst[2]:.0%}", _verdict(worst[2] <= SCORING_SHARE)])

    parts = []
    for m in data:
        gbps = data[m]["run"]["host_read_gbps"]
        for (v, n), r in sorted(data[m]["at"].items(), key=lambda x: x[0][1]):
            if v != "a2ats-fast":
                continue
            acc, bd = r["accounting"], r["breakdown_ms"]
            cells = [f"{ms(bd[p])} ms, {acc['bytes'][p] / 1e6:.0f} MB at {acc['gbps'][p]:.0f} GB/s"
                     if acc["bytes"][p] else f"{ms(bd[p])} ms, —" for p in PARTS]
            parts.append([f"{name[m]} {k(n)}", "dense" if r.get("dense_steps", 0) >= r["steps"] else "selects",
                          ms(r["ms_per_token"]), *cells, ms(bd["rest"]), f"{gbps:.1f}"])
    return "\n".join([
        "Each target of the decode step, read off the runs of the two tables above (AMD EPYC, the same runs):", "",
        table(["target", "figure", "verdict"], targets), "",
        "The default's step part by part in the same runs: milliseconds, the bytes the part must read, and the "
        "speed it read them at (bytes over its time) against the host's read bandwidth measured in that run. "
        "A dense step's scoring is the encoding of the keys that leave the window (it must read nothing more); "
        "*rest* is the step's Python and sampling.", "",
        table(["model, context", "steps", "step, ms", "weights", "scoring", "attention", "rest, ms",
               "host read, GB/s"], parts)])
