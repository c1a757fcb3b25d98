"""Benchmarks (`a2ats bench kernels | decode`): speed and memory figures live here, never in timed tests."""

# Decode variants (names only, so the command line can list them without importing the engines).
# *-bf16w: the lean engine reading bf16 copies of the projection weights at decode (fp32 models).
# a2ats-fast-paper: the fast path scoring with the paper's single WRoPE distance over the same codes: what the
# default's banded lookup tables (one per band of distances) cost per step (the codebook's values do not change
# the work).
# llama.cpp: its dense decode of the same GGUF, when llama-cpp-python is installed (see bench/llamacpp.py).
VARIANTS = ("a2ats-fast", "a2ats-reference", "dense-hf", "dense-lean", "a2ats-fast-bf16w", "dense-lean-bf16w", "a2ats-fast-paper",
            "llama.cpp")
DEFAULT_VARIANTS = ("a2ats-fast", "a2ats-fast-bf16w", "a2ats-reference", "dense-hf", "dense-lean")
