"""Where a benchmark's figures go: the machine they came from, a table on stdout (or one JSON object), and
optionally ``NAME.json``, ``NAME.md`` and ``NAME.png`` in a folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from a2ats.provenance import cpu_model_and_flags, provenance


def machine() -> str:
    """The CPU (and GPU), cores, torch and its threads: every figure names the machine it came from."""
    cpu, _ = cpu_model_and_flags()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def served_table(served: list[dict]) -> str:
    if not served:
        return ""
    return ("\nserved workload (real prompts through a queue, prefills included)\n\n"
            "| system | slots | requests | decode tokens/s | tokens/s with prefills |\n|---|---|---|---|---|\n"
            + "".join(f"| {s['system']} | {s['slots']} | {s['requests']} x {s['prompt_tokens']} + {s['new_tokens']} | "
                      f"{s['decode_tokens_per_s']:.1f} | {s['served_tokens_per_s']:.1f} |\n" for s in served))


def with_provenance(res: dict) -> dict:
    """``res`` with a ``provenance`` record (a2ats.provenance) unless it has one; the run's settings in it are the
    result's own top-level fields (model, dtype, budget, lengths, ...), its rows left out."""
    if "provenance" in res:
        return res
    settings = {k: v for k, v in res.items() if not isinstance(v, (list, dict)) or k in ("lengths", "variants")}
    return {**res, "provenance": provenance(settings)}


def emit(res: dict, table: str, name: str, out: str | None, plot: Callable[[Path], None] | None, as_json: bool,
         log: Callable[[str], None]) -> None:
    """Print ``table`` (or ``res`` as JSON); with ``out``, also write NAME.json, NAME.md and NAME.png there. Both
    JSON forms carry ``provenance``: what produced the figures (commit, machine, versions, command, defaults)."""
    res = with_provenance(res)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
        (folder / f"{name}.md").write_text(table)
        if plot is not None:
            plot(folder / f"{name}.png")
        log(f"wrote {folder}/{name}.json, {name}.md" + (f", {name}.png" if plot is not None else ""))
    print(json.dumps(res) if as_json else table)
