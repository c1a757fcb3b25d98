"""Benchmarks (`a2ats bench kernels | decode`): speed and memory figures live here, never in timed tests."""

# Decode variants (names only, so the command line can list them without importing the engines).
# a2ats-fast / dense-lean: the lean engine with its default decode weights (int8 copies of an fp32 model);
# *-fp32w, *-bf16w, *-int8w, *-int4w: the same engine reading that weight format at decode (fp32 models).
# a2ats-fast-paper: the fast path scoring with the paper's single WRoPE distance over the same codes: what the
# default's banded lookup tables (one per band of distances) cost per step (the codebook's values do not change
# the work).
# llama.cpp: its dense decode of the same GGUF, when llama-cpp-python is installed (see bench/llamacpp.py).
WEIGHT_SUFFIXES = {"-fp32w": "model", "-bf16w": "bf16", "-int8w": "int8", "-int4w": "int4"}
ENGINE_VARIANTS = ("a2ats-fast", "dense-lean")
VARIANTS = ("a2ats-fast", "a2ats-reference", "dense-hf", "dense-lean",
            *(f"{base}{suffix}" for base in ENGINE_VARIANTS for suffix in WEIGHT_SUFFIXES), "a2ats-fast-paper", "llama.cpp")
DEFAULT_VARIANTS = ("a2ats-fast", "a2ats-fast-fp32w", "a2ats-reference", "dense-hf", "dense-lean")


def engine_variant(name: str) -> tuple[str, str] | None:
    """(engine variant, decode weight format) for a lean-engine variant name, else None."""
    for suffix, fmt in WEIGHT_SUFFIXES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in ENGINE_VARIANTS:
            return name[: -len(suffix)], fmt
    return (name, "auto") if name in ENGINE_VARIANTS else None
