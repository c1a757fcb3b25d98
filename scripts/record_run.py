"""Run a command, time it, and record what it printed with its provenance: the figures the README quotes for
`make demo` (its output, a first run's time) and `make test` (the suite's time) come from these files.

    python scripts/record_run.py --out docs/bench/commands/demo.json --fresh-clone -- make demo
    python scripts/record_run.py --out docs/bench/commands/test.json --fresh-cache -- make test

``--fresh-cache`` points ``A2ATS_CACHE`` at a new empty folder, as on a newcomer's machine (converted models
and codebooks are then made inside the run). ``--fresh-clone`` also runs the command in a new clone of this
repository's HEAD with the C++ kernels built in a new folder, as a newcomer's first command: its time includes
the set-up (virtual environment and installs), the kernel build and the calibration. Each output line's time
is kept, so the record splits the run into phases. The command's own exit status is recorded and returned.
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
    p.add_argument("--fresh-clone", action="store_true",
                   help="run in a new clone of HEAD, with a new cache and kernel build folder (implies --fresh-cache)")
    p.add_argument("--keep-lines", type=int, default=40, help="the last N lines of output kept in the file")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run after --")
    env = dict(os.environ)
    fresh_cache = a.fresh_cache or a.fresh_clone
    with tempfile.TemporaryDirectory(prefix="a2ats-run-") as tmp:
        cwd = None
        if fresh_cache:
            env["A2ATS_CACHE"] = os.path.join(tmp, "cache")
        if a.fresh_clone:
            cwd = os.path.join(tmp, "a2ats")
            subprocess.run(["git", "clone", "-q", str(Path(__file__).resolve().parents[1]), cwd], check=True)
            env["A2ATS_KERNEL_DIR"] = os.path.join(tmp, "kernels")
            for var in ("VIRTUAL_ENV", "PYTHONPATH"):  # the clone's own environment, not this checkout's
                env.pop(var, None)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timed = [(time.perf_counter() - t, line.rstrip("\n")) for line in proc.stdout]
        returncode = proc.wait()
        seconds = time.perf_counter() - t
    lines = [(at, _BAR.sub("", line)) for at, line in timed]
    lines = [(round(at, 1), x) for at, x in lines if x.strip()]
    record = {"command": " ".join(cmd), "seconds": round(seconds, 1), "returncode": returncode,
              "fresh_cache": fresh_cache, "fresh_clone": a.fresh_clone,
              "output_tail": [x for _, x in lines][-a.keep_lines:], "phases": phases(lines, seconds),
              "provenance": provenance({"command": cmd, "fresh_cache": fresh_cache, "fresh_clone": a.fresh_clone})}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{' '.join(cmd)}: exit {returncode} after {seconds:.0f} s; wrote {a.out}", file=sys.stderr)
    return returncode


_SAVED = re.compile(r"\(forward ([0-9.]+) s, k-means ([0-9.]+) s\)")


def phases(lines: list[tuple[float, str]], seconds: float) -> dict:
    """Where a run's time went: the set-up before the library's first line (virtual environment, installs), the
    calibration's forward and k-means as it reported them, and the rest (model conversion and loading, kernel
    build, the answer)."""
    first = next((at for at, x in lines if x.startswith("[a2ats]")), None)
    saved = next((m for _, x in lines if (m := _SAVED.search(x))), None)
    if first is None:
        return {}
    out = {"setup_s": first}
    if saved:
        out["calibration_forward_s"], out["calibration_kmeans_s"] = float(saved[1]), float(saved[2])
    out["rest_s"] = round(seconds - sum(out.values()), 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
