"""The decode-speed result files of the 2-core Intel Xeon (``docs/bench/speed``): the models and lengths they cover,
one model's decode file checked to be the default's, and what counts as a tie between two speeds."""

from __future__ import annotations

from pathlib import Path

from blocks import expect
from formatting import ratio
from sources import load_json

SPEED = "docs/bench/speed"
MODELS = {"smollm2": ("smollm2-135m", "SmolLM2-135M-Instruct", (2048, 8192, 16384, 32768)),
          "qwen": ("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", (4096, 8192, 32768))}
# A ratio within this of 1 is a tie: the spread the speed machine showed between runs of one command, as its doc
# states (the result files hold one median per cell, no spread of their own).
SPREAD = 0.15


def decode_source(root: Path, model: str, folder: str | None = None) -> dict:
    rel = f"{SPEED}/{folder or model}/decode.json"
    d = load_json(root, rel)
    name, _, _ = MODELS[model]
    expect(d.get("model") == name, f"{rel}: model {d.get('model')!r}, the block claims {name!r}")
    expect(d.get("budget") == "rho=0.1 per KV head (max)", f"{rel}: budget {d.get('budget')!r}, not the default's")
    expect(d.get("wrope_bands") == 2.0, f"{rel}: wrope_bands {d.get('wrope_bands')!r}, not the default's")
    expect(d.get("dtype") == "float32", f"{rel}: dtype {d.get('dtype')!r}")
    d["_rel"] = rel
    d["_ms"] = {(r["variant"], r["context"]): r["ms_per_token"] for r in d["rows"]}
    return d


def tie(x: float) -> str:
    """A speed ratio (above 1: A²ATS faster) with its reading: a tie inside the spread."""
    if abs(x - 1) <= SPREAD or abs(1 / x - 1) <= SPREAD:
        return f"{ratio(x)} (a tie)"
    return ratio(x) + (" (faster)" if x > 1 else " (slower)")
