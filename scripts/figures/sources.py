"""Reading the committed result files: a file and its provenance record, an ``a2ats eval`` folder's rows and runs,
the machine a record names, and the source line a block ends with."""

from __future__ import annotations

import json
import re
from pathlib import Path

from blocks import expect


def load_json(root: Path, rel: str) -> dict:
    path = root / rel
    expect(path.is_file(), f"{rel}: no such result file")
    data = json.loads(path.read_text())
    expect(isinstance(data.get("provenance"), dict), f"{rel}: no provenance record")
    return data


def load_eval(root: Path, folder: str) -> tuple[list[dict], list[dict], dict]:
    """(rows, the provenance record of each run that wrote them, the config) of an ``a2ats eval`` folder; each row
    gets ``_run``, the index of the run (part) that wrote it."""
    rows_path, prov_path = root / folder / "results.jsonl", root / folder / "provenance.json"
    expect(rows_path.is_file(), f"{folder}/results.jsonl: no such result file")
    expect(prov_path.is_file(), f"{folder}/provenance.json: no provenance record beside results.jsonl")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    runs = json.loads(prov_path.read_text())["runs"]
    starts = [r["first_row"] for r in runs]
    expect(starts == sorted(starts) and starts[:1] == [0], f"{folder}/provenance.json: runs out of order")
    for i, row in enumerate(rows):
        row["_run"] = max(j for j, s in enumerate(starts) if s <= i)
    config = json.loads((root / folder / "config.json").read_text())
    return rows, runs, config


def machine_of(prov: dict) -> str:
    """The machine as the record has it; a backfilled record's CPU may be unrecorded, then what the doc of the
    time stated, quoted as such."""
    cpu = prov.get("cpu")
    parts = [cpu or "CPU not recorded"]
    if prov.get("cpu_flags"):
        parts[0] += " (" + " ".join(prov["cpu_flags"]) + ")"
    if prov.get("cores"):
        parts.append(f"{prov['cores']} cores")
    if prov.get("torch"):
        parts.append(f"torch {prov['torch']}" + (f", {prov['torch_threads']} threads" if prov.get("torch_threads")
                                                 else ""))
    text = ", ".join(parts)
    doc = prov.get("documented") or {}
    if doc.get("states"):
        text += f"; {doc['source']} states: {doc['states']}"
    return text


def machine_short(prov: dict) -> str:
    """The CPU in a few words: the recorded model, else the one the doc of the time named."""
    if prov.get("cpu"):
        return f"{prov['cpu']}, {prov['cores']} cores" if prov.get("cores") else prov["cpu"]
    m = re.search(r"\d+-core [^,;(]+", (prov.get("documented") or {}).get("states", ""))
    expect(m is not None, "the record names no CPU")
    return m.group().strip() + " (as documented)"


def source_line(rel: str, prov: dict) -> str:
    commit = (prov.get("commit") or "unknown")[:12]
    if prov.get("dirty"):
        commit += ", dirty tree"
    if prov.get("backfilled"):
        when = f"committed {prov['date'][:10]}, commit {commit} (a backfilled record: the commit that last changed the file)"
    else:
        when = f"run {prov['date'][:10]}, commit {commit}"
    cmd = prov.get("command") or "not recorded"
    return f"Source: `{rel}` ({when}). Machine: {machine_of(prov)}. Command: `{cmd}`."


def same_machine(*provs: dict) -> None:
    """One machine per table: every source a table reads names the same CPU (or, where unrecorded, the doc of the
    time states the same one)."""
    seen = {(p.get("cpu") or (p.get("documented") or {}).get("states", "")).split(";")[0] for p in provs}
    expect(len(seen) == 1, f"the sources come from different machines: {sorted(seen)}")
