"""The one rule for the word *path*: ``fast`` = the kernels, ``reference`` = the torch definition they are
tested against, ``auto`` = fast wherever the attention's memory is a CPU with the C++ kernels built."""

from __future__ import annotations

import torch

from a2ats.kernels.cpu import cpu_backend

PATHS = ("auto", "fast", "reference")


def resolve_path(path: str, device: torch.device | str, kernels_serve: bool = True) -> str:
    """``fast`` or ``reference`` for ``path`` when attention runs over memory on ``device``; ``kernels_serve``:
    whether the kernels run the method at all (probes and wrappers stay reference)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "fast" and not kernels_serve:
        raise ValueError("the fast path (the kernels) serves the A²ATS method itself; use path='reference'")
    if path != "auto":
        return path
    on_cpu = torch.device(device).type == "cpu"
    return "fast" if kernels_serve and on_cpu and cpu_backend() is not None else "reference"
