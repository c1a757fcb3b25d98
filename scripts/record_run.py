"""Run a command, time it, and record what it printed with its provenance: the figures the README quotes for
`make demo` (its output, a first run's time) and `make test` (the suite's time) come from these files.

    python scripts/record_run.py --out docs/bench/commands/demo.json --fresh-cache -- make demo
    python scripts/record_run.py --out docs/bench/commands/test.json --fresh-cache -- make test

``--fresh-cache`` points ``A2ATS_CACHE`` at a new empty folder, as on a newcomer's machine (converted models
and codebooks are then made inside the run). The command's own exit status is recorded and returned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from a2ats.provenance import provenance

# progress bars redraw with carriage returns; keep each line's last state
_BAR = re.compile(r"^.*\r")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--fresh-cache", action="store_true", help="A2ATS_CACHE in a new empty folder")
    p.add_argument("--keep-lines", type=int, default=40, help="the last N lines of output kept in the file")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run after --")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="a2ats-cache-") as cache:
        if a.fresh_cache:
            env["A2ATS_CACHE"] = cache
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t
    lines = [_BAR.sub("", line) for line in proc.stdout.splitlines()]
    record = {"command": " ".join(cmd), "seconds": round(seconds, 1), "returncode": proc.returncode,
              "fresh_cache": a.fresh_cache, "output_tail": [x for x in lines if x.strip()][-a.keep_lines:],
              "provenance": provenance({"command": cmd, "fresh_cache": a.fresh_cache})}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{' '.join(cmd)}: exit {proc.returncode} after {seconds:.0f} s; wrote {a.out}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
