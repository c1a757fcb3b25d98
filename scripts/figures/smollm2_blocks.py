"""The SmolLM2-135M blocks (the 2-core Intel Xeon): retrieval quality against bytes read, the needles and the
short-context suite, from ``docs/retrieval/retrieval_quality.json``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from blocks import block, expect
from formatting import table
from sources import load_json, source_line

RQ = "docs/retrieval/retrieval_quality.json"
RQ_NAMES = {"oracle": "oracle top-K (exact keys)", "a2ats": "the paper's A²ATS", "a2ats-euclid": "Euclidean VQ, WRoPE",
            "quest": "Quest (16-token pages)", "a2ats-banded": "banded WRoPE (its own codebook)",
            "a2ats-hybrid": "hybrid, share 0.5", "full": "full attention", "a2ats-hybrid0.25": "hybrid, share 0.25",
            "a2ats-hybrid0.75": "hybrid, share 0.75", "a2ats-postrope": "post-RoPE VQ", "pqcache": "PQCache",
            "streaming": "StreamingLLM"}


def _rq(root: Path) -> dict:
    d = load_json(root, RQ)
    expect("4096 tokens" in d.get("setup", ""), f"{RQ}: setup {d.get('setup')!r}")
    return d


@block("smollm2-mass")
def smollm2_mass(root: Path) -> str:
    d = _rq(root)
    budgets = (0.015, 0.03, 0.06)
    out = []
    names = {"oracle": "oracle top-K (exact keys)", "a2ats (paper)": "the paper's A²ATS",
             "a2ats-euclid": "Euclidean VQ, WRoPE", "quest": "Quest (16-token pages)",
             "a2ats-banded r=2": "banded WRoPE r = 2 (its own codebook)",
             "a2ats-banded r=2, paper codebook": "banded WRoPE r = 2, the paper's codebook",
             "a2ats-hybrid share=0.5": "hybrid, share 0.5 (the paper's codebook)"}
    for m, label in names.items():
        cells = []
        for b in budgets:
            r, o = d["mass"].get(f"{m}@{b}"), d["mass"].get(f"oracle@{b}")
            expect(r is not None and o is not None, f"{RQ}: no mass of {m}@{b}")
            cells.append(f"{r['mass']:.3f} ({r['mass'] / o['mass']:.2f}, {r['bytes_per_step'] / 1024:,.0f} KiB)")
        out.append([label] + cells)
    sw = d["mass"]["sinks + window"]
    out.append(["sinks + window alone", f"{sw['mass']:.3f}", "", ""])
    return "\n".join([f"SmolLM2-135M-Instruct, GQA union, ρ per query head: share of the true attention mass kept "
                      f"({d['setup']}); in brackets the share of the oracle's and the KiB read per step:", "",
                      table(["selection"] + [f"ρ = {100 * b:g}%" for b in budgets], out), "",
                      source_line(RQ, d["provenance"])])


@block("smollm2-needles")
def smollm2_needles(root: Path) -> str:
    d = _rq(root)
    out = []
    for key, r in d["needles"].items():
        m, b = key.split("@")
        out.append([RQ_NAMES.get(m, m), f"{float(b):g}", f"{100 * r['score']:.1f}", f"{r['bytes_per_step'] / 1024:,.0f}",
                    str(r["prompts"])])
    return "\n".join(["SmolLM2-135M-Instruct, the six needle tasks at 2K and 4K tokens, 4 samples each: average "
                      "score ×100 and KiB read per step:", "",
                      table(["selection", "ρ", "needles ×100", "KiB/step", "prompts"], out), "",
                      source_line(RQ, d["provenance"]) + " Rows from `docs/eval/needles/`, `needles/oracle/`, "
                      "`needles/hybrid/` (each with its `provenance.json`)."])


@block("smollm2-suite")
def smollm2_suite(root: Path) -> str:
    d = _rq(root)
    by = defaultdict(dict)
    for key, r in d["suite"].items():
        m, b = key.split("@")
        by[m][float(b)] = r
    budgets = (0.015, 0.03, 0.06)
    out = [["full attention", f"{100 * by['full'][1.0]['score']:.1f}", "", ""]]
    for m in ("oracle", "a2ats", "a2ats-euclid", "a2ats-postrope", "pqcache", "quest", "a2ats-banded", "a2ats-hybrid"):
        expect(m in by, f"{RQ}: no suite rows of {m}")
        out.append([RQ_NAMES[m]] + [f"{100 * by[m][b]['score']:.1f}" if b in by[m] else "n/a" for b in budgets])
    prompts = by["full"][1.0]["prompts"]
    return "\n".join([f"SmolLM2-135M-Instruct, the nine tasks at 2K, 4K and 8K tokens, one sample each ({prompts} "
                      "prompts): average score ×100 (a task's score moves by a third or more with one answer):", "",
                      table(["selection", "ρ = 1.5%", "ρ = 3%", "ρ = 6%"], out), "",
                      source_line(RQ, d["provenance"]) + " Rows from `docs/eval/standard/`, `banded/`, `hybrid/` "
                      "(each with its `provenance.json`)."])
