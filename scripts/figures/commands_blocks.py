"""The commands timed end to end (``scripts/record_run.py``): how long ``make test`` and ``make demo`` took, and what
``make demo`` printed."""

from __future__ import annotations

import re
from pathlib import Path

from blocks import block, expect
from sources import load_json, machine_short


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
            f"{', from an empty cache' if d.get('fresh_cache') else ''})")


@block("make-test")
def make_test(root: Path) -> str:
    return command_time(root, "test", "make test")


@block("make-demo")
def make_demo(root: Path) -> str:
    return command_time(root, "demo", "make demo")


# the demo's own lines: the question, the answer and its statistics (not set-up or progress output)
_DEMO_LINE = re.compile(r"^(Q: |A: |\[a2ats\] (context|prompt|expected|saved codebooks))")


@block("demo-output")
def demo_output(root: Path) -> str:
    """What `make demo` printed, from its recorded run, with the run's machine and date."""
    rel = "docs/bench/commands/demo.json"
    if not (root / rel).is_file():
        return "(not yet recorded: `python scripts/record_run.py --out docs/bench/commands/demo.json --fresh-cache -- make demo`)"
    d = load_json(root, rel)
    expect(d.get("command") == "make demo" and d.get("returncode") == 0, f"{rel}: not a successful `make demo`")
    lines = [x for x in d["output_tail"] if _DEMO_LINE.match(x)]
    expect(any(x.startswith("A: ") for x in lines), f"{rel}: no answer in the recorded output")
    p = d["provenance"]
    return (f"`make demo` on {machine_short(p)}, {p['date'][:10]}, commit {(p.get('commit') or 'unknown')[:12]}"
            f"{' (dirty tree)' if p.get('dirty') else ''}{', from an empty cache' if d.get('fresh_cache') else ''} "
            f"(`{rel}`):\n\n```\n" + "\n".join(lines) + "\n```")
