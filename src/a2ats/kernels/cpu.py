"""Build and load the C++ CPU kernels (every ``cpu_*.cpp`` beside this file, one extension) on first use.

The extension is compiled with torch's JIT builder for one instruction set, chosen at run time, and
the ISA is part of the extension's name: builds for different ISAs never share a cache entry, and a
CPU without AVX-512 never loads an AVX-512 build (which would die on an illegal instruction).
``-march=native`` is never used, so a build directory shared between machines stays safe.

Environment:
- ``A2ATS_KERNELS=0``: never build or load; the public functions use the torch references.
- ``A2ATS_CPU_ISA`` in {avx512vnni, avx512, avx2, default}: force an ISA (never above what the CPU supports).
- ``A2ATS_KERNEL_DIR``: build directory root (default: torch's extensions directory).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = sorted(HERE.glob("cpu_*.cpp"))  # cpu_kernels.cpp defines the module; the others register into it
HEADERS = sorted(HERE.glob("cpu_*.h"))
ISAS = ("default", "avx2", "avx512", "avx512vnni")
_FLAGS = {
    # AVX-512 with VNNI integer and BF16 dot products (Zen 4 and later, Cooper Lake, Sapphire Rapids and later)
    "avx512vnni": ["-O3", "-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-fopenmp"],
    "avx512": ["-O3", "-march=x86-64-v4", "-fopenmp"],
    "avx2": ["-O3", "-march=x86-64-v3", "-fopenmp"],
    "default": ["-O3", "-fopenmp"],  # the compiler's baseline target: runs anywhere torch does
}

_loaded: dict[str, object | None] = {}
_by_settings: dict[tuple, object | None] = {}  # (A2ATS_KERNELS, A2ATS_CPU_ISA) -> what cpu_backend() returns
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("A2ATS_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def detected_isa() -> str:
    """The best ISA this CPU runs, from torch's own dispatch probe (asked once: the CPU does not change, and
    every kernel call passes through here)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"  # arm (SVE/NEON) and others: the portable build
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "avx512vnni" if {"avx512_vnni", "avx512_bf16"} <= cpu_flags() else "avx512"
    if cap == "AVX2":
        return "avx2"
    return "default"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): only then is a bf16 forward faster."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def select_isa() -> str:
    """``A2ATS_CPU_ISA`` if set (capped at what the CPU supports), else the detected ISA."""
    best = detected_isa()
    want = os.environ.get("A2ATS_CPU_ISA", "").strip().lower()
    if not want:
        return best
    if want not in ISAS:
        raise ValueError(f"A2ATS_CPU_ISA must be one of {', '.join(ISAS)}, got {want!r}")
    if ISAS.index(want) > ISAS.index(best):
        warnings.warn(f"a2ats: A2ATS_CPU_ISA={want} is not supported by this CPU; building for {best}", stacklevel=3)
        return best
    return want


@functools.cache
def source_digest() -> str:
    """A short hash of every kernel source and header: part of the build's name, so an edited header (which
    torch's builder does not track) never reuses a stale build."""
    h = hashlib.sha256()
    for p in SOURCES + HEADERS:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:10]


def build(isa: str, verbose: bool = False):
    """Compile (or reuse a cached build of) the extension for ``isa`` and import it. Raises on failure."""
    if isa not in _FLAGS:
        raise ValueError(f"unknown ISA {isa!r}; expected one of {', '.join(ISAS)}")
    from torch.utils.cpp_extension import load

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} found")
    name = f"a2ats_cpu_{isa}_{source_digest()}"
    directory = build_directory(name)
    # torch's builder guards a build with a bare `lock` file that a process killed mid-build leaves behind,
    # and every later build of that name waits on it forever. An advisory lock, which the kernel drops when
    # its holder dies, guards the build instead: whoever holds it is the only builder, so a `lock` file
    # found then is stale and goes.
    with open(os.path.join(directory, "a2ats-build.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        return load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=_FLAGS[isa],
                    extra_ldflags=["-fopenmp"], build_directory=directory, verbose=verbose)


def build_directory(name: str) -> str:
    """Where the extension ``name`` is built: under ``A2ATS_KERNEL_DIR``, else torch's extensions directory."""
    root = os.environ.get("A2ATS_KERNEL_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        tag = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
        root = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), tag)
    directory = os.path.join(root, name)
    os.makedirs(directory, exist_ok=True)
    return directory


# The environment's own mapping (CPython's os.environ keeps it, and updates it on every change): two lookups in it
# cost ~0.1 us where os.environ.get's key encoding costs ~1.5 us, and a decode step asks ~10 times per layer.
_ENVIRON = getattr(os.environ, "_data", None)
_SETTINGS = ("A2ATS_KERNELS", "A2ATS_CPU_ISA")
_SETTING_KEYS = tuple(os.environ.encodekey(k) for k in _SETTINGS) if _ENVIRON is not None else ()


def _settings() -> tuple:
    """The two settings that choose the backend, as they are now (raw, as a cache key)."""
    if _ENVIRON is None:
        return tuple(os.environ.get(k) for k in _SETTINGS)
    return _ENVIRON.get(_SETTING_KEYS[0]), _ENVIRON.get(_SETTING_KEYS[1])


def cpu_backend(isa: str | None = None):
    """The loaded extension module, or None (disabled, or the build failed: warned once per ISA)."""
    if isa is None:
        # Every kernel call asks: answer from the two settings as they are now, without re-deciding.
        key = _settings()
        if key not in _by_settings:
            _by_settings[key] = cpu_backend(select_isa()) if enabled() else None
        return _by_settings[key]
    if not enabled():
        return None
    with _lock:
        if isa not in _loaded:
            try:
                _loaded[isa] = build(isa)
            except Exception as exc:  # compiler missing, build error, ...: the references still work
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                warnings.warn(f"a2ats: CPU kernels unavailable ({reason}); using the torch reference path",
                              RuntimeWarning, stacklevel=2)
                _loaded[isa] = None
        return _loaded[isa]
