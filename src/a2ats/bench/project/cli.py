"""`a2ats bench project`: its options and the run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from a2ats.bench.output import with_provenance
from a2ats.bench.project.inputs import (
    DEFAULT_SHAPE,
    HOSTS,
    SHAPES,
    Efficiencies,
    Workload,
    default_efficiencies,
    local_hardware,
)
from a2ats.bench.project.model import load_measured, project
from a2ats.bench.project.report import render_markdown
from a2ats.factory import options

CONTEXTS = "32768,65536,131072"
KERNELS_JSON = "docs/bench/kernels.json"


def add_arguments(b) -> None:
    """The options of `bench project`: the selection modelled (left out: the paper's design), the shape, the
    hardware and what to read and write."""
    options.add_selection_args(b, paper_default=True)
    b.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE, help="model shape preset")
    b.add_argument("--hardware", choices=[*HOSTS, "local"], default="h100-host",
                   help="hardware profile (paper-host: the paper's Xeon 8469C server, assumptions named; "
                        "local: from --kernels-json, no GPU)")
    b.add_argument("--sweep", action="store_true",
                   help="the ratio at the longest context over a grid of host read bandwidth x host RAM")
    b.add_argument("--kernels-json", default=KERNELS_JSON,
                   help="a `bench kernels --json` result (the CPU attention efficiency; local: the machine)")
    b.add_argument("--contexts", default=CONTEXTS, help="comma-separated context lengths")
    b.add_argument("--measured", help="JSON list of measured {context, batch, system, tokens_per_s} rows")
    b.add_argument("--out", help="folder for project.md and project.json")
    b.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def _parse_contexts(text) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--contexts must be comma-separated integers, got {text!r}") from None
    if not out or any(n < 1 for n in out):
        raise ValueError(f"--contexts must be positive integers, got {text!r}")
    return out


def from_args(a) -> dict:
    """The projection for parsed `bench project` arguments."""
    import sys

    shape = SHAPES[getattr(a, "shape", DEFAULT_SHAPE)]
    kpath = Path(getattr(a, "kernels_json", None) or KERNELS_JSON)
    kernels = None
    if kpath.is_file():
        try:
            kernels = json.loads(kpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{kpath} is not JSON: {e}") from None
    hw_name = getattr(a, "hardware", "h100-host")
    if hw_name == "local":
        if kernels is None:
            raise ValueError(f"--hardware local needs a `bench kernels --json` result: no file {kpath} "
                             "(run `a2ats bench kernels --json > FILE` and pass --kernels-json FILE)")
        hw = local_hardware(kernels)
    else:
        hw = HOSTS[hw_name]
    eff = Efficiencies.from_kernels(kernels, source=str(kpath)) if kernels is not None else default_efficiencies()
    if hw.unified:
        # On the CPU the "accelerator" kernels are CPU kernels: measured rates from the decode bench.
        src = dict(eff.sources)
        src["gpu_weights"] = ("measured on the CPU: docs/bench/decode.json, 540 MB of fp32 projections in 29 ms "
                              "(18.6 of 29.7 GB/s)")
        src["gpu_attention"] = ("measured on the CPU: docs/bench/decode.json, dense lean engine at 32K, ~226 ms of "
                                "attention over 1.5 GB of fp32 KV (6.7 of 29.7 GB/s)")
        src["gpu_scoring"] = "assumption: codes and score streams on the CPU at ~50% of read bandwidth"
        rate = kernels.get("score_select_token_heads_per_s")
        if rate:
            src["cpu_score_token_heads_per_s"] = ("measured: kernels JSON score_select_token_heads_per_s (fused "
                                                  "score + top-K + union, codes warm in cache)")
        eff = replace(eff, gpu_weights=0.63, gpu_attention=0.23, gpu_scoring=0.5, pcie_latency_us=0.0,
                      cpu_score_token_heads_per_s=float(rate) if rate else None, sources=src)
    # no --budget / --reduction given: the paper's design (rho=0.03, GQA union), which the scenarios vary
    budget = getattr(a, "budget", None)
    kw = {}
    if budget is not None:
        if getattr(budget, "tokens", None) is not None:
            kw["budget_tokens"] = budget.tokens
        elif getattr(budget, "fraction", None) is not None:
            kw["rho"] = budget.fraction
    if getattr(a, "reduction", None) == "max":
        kw["union_inflation"] = 1.0
    kw.update({k: getattr(a, k) for k in ("sinks", "window") if getattr(a, k, None) is not None})
    wl = Workload(**kw)
    measured = load_measured(a.measured) if getattr(a, "measured", None) else None
    argv0 = sys.argv[0] if sys.argv else ""
    cmd = "a2ats " + " ".join(sys.argv[1:]) if argv0.endswith(("a2ats", "__main__.py")) else None
    grid = ((95, 240, 480, 600, 720, 960), (125, 256, 512, 1024, 2048)) if getattr(a, "sweep", False) else None
    return project(shape, hw, eff, wl, _parse_contexts(getattr(a, "contexts", CONTEXTS)),
                   measured=measured, command=cmd, sweep_grid=grid)


def main(a) -> int:
    """`a2ats bench project`: print (and with --out write) the projection."""
    res = with_provenance(from_args(a))
    md = render_markdown(res)
    if getattr(a, "out", None):
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "project.json").write_text(json.dumps(res, indent=1))
        (out / "project.md").write_text(md)
        import sys

        print(f"[a2ats] wrote {out}/project.md and project.json (projections, not measurements)", file=sys.stderr)
    print(json.dumps(res) if getattr(a, "json", False) else md)
    return 0
