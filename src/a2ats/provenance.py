"""Where a result came from: the code (commit, dirty tree), the machine (CPU model and flags, cores, threads), the
software (Python, torch, transformers), when, the full command, and the settings in force (the library's defaults
and the run's own). Every result file ``a2ats bench`` and ``a2ats eval`` write records one, so a figure quoted in
the docs can be traced to what produced it (``scripts/figures`` checks the settings a doc claims against it)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# The CPU features a figure's speed depends on: the kernels' ISA builds (AVX2, AVX-512), native bf16 (the bf16
# prefill's `auto`), integer dot products (VNNI) and AMX tiles, which torch's bf16 matmuls use where present.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni")
CPU_FLAG_PREFIXES = ("amx_",)
_MAX_DIRTY_PATHS = 20  # enough to see what changed; a tree with more changes is dirty all the same


def provenance(settings: dict | None = None) -> dict:
    """A JSON-ready record of what produced a result; ``settings``: the run's own (model, lengths, variants, ...)."""
    commit, dirty, dirty_paths = _source_state()
    cpu, flags = cpu_model_and_flags()
    torch_version, threads, gpu = _torch()
    return {
        "commit": commit,
        "dirty": dirty,
        "dirty_paths": dirty_paths,
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": gpu,
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch_version,
        "transformers": _version("transformers"),
        "a2ats": _version("a2ats"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "defaults": _defaults(),
        "settings": _jsonable(settings or {}),
    }


def _source_state() -> tuple[str | None, bool | None, list[str]]:
    """(commit, dirty, changed paths) of the checkout this package was imported from; the installed version (and
    dirty None: unknown) when it is not a git checkout, e.g. a wheel in site-packages."""
    package = Path(__file__).resolve().parent
    top = _git(package, "rev-parse", "--show-toplevel")
    # only a checkout of this project counts: an installed copy may sit inside some other repository
    if top is None or package != Path(top).resolve() / "src" / "a2ats":
        version = _version("a2ats")
        return (f"a2ats=={version}" if version else None), None, []
    return git_state(package)


def git_state(path: Path) -> tuple[str | None, bool | None, list[str]]:
    """(HEAD, dirty, changed paths) of the git checkout holding ``path``; dirty is None when git cannot tell."""
    commit = _git(path, "rev-parse", "HEAD")
    # tracked files only: results a run writes into the tree (untracked until committed) must not make it dirty
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return commit, None, []
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return commit, bool(paths), paths[:_MAX_DIRTY_PATHS]


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    # only trailing newlines go: `status --porcelain` lines start with a significant space (" M path")
    return out.stdout.rstrip("\n") if out.returncode == 0 else None


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and the flags of ``CPU_FLAGS`` it has (Linux: /proc/cpuinfo; elsewhere the platform's
    processor string and no flags)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    keep = sorted(f for f in flags if f in CPU_FLAGS or f.startswith(CPU_FLAG_PREFIXES))
    return model or platform.processor() or platform.machine(), keep


def _torch() -> tuple[str | None, int | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None, None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return torch.__version__, torch.get_num_threads(), gpu


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _defaults() -> dict:
    """The library's defaults in force: decode (A2ATSConfig) and calibration (CodebookSettings). Imported by name at
    call time: this module sits in the bottom layer beside a2ats.core (independent siblings), and reads core's
    defaults as data only."""
    out = {}
    for key, module, cls in (("A2ATSConfig", "a2ats.core.config", "A2ATSConfig"),
                             ("CodebookSettings", "a2ats.core.codebook", "CodebookSettings")):
        try:
            out[key] = _jsonable(dataclasses.asdict(getattr(importlib.import_module(module), cls)()))
        except Exception as e:  # a record must still be written; say why this part is missing
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _jsonable(value):
    """Settings as JSON can hold them: containers kept, dataclasses as dicts, anything else as its string."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
