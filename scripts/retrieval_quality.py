"""Retrieval quality against bytes read per step (the retrieval-quality issue's report), on the default model.

    .venv/bin/python scripts/retrieval_quality.py --out docs/retrieval [--results eval/*/results.jsonl ...]

Attention mass: three held-out State of the Union texts of 4K tokens, the last 32 positions of each decoded
one at a time after a shared dense prefill, every layer and query head; the share of the true attention mass
each selection keeps. Suite score: read from `a2ats eval` results files (same prompts for every method).
Bytes per step: :mod:`a2ats.eval.cost` (per sequence and KV head; the A²ATS codebook, shared by the batch,
is listed apart). Codebooks come from the cache (calibrated on first use).
"""

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib
import torch

from a2ats.assets.corpus import speeches
from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookSettings
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.eval.attention_metrics import attention_mass
from a2ats.eval.cost import step_bytes
from a2ats.eval.prefill import prefill
from a2ats.eval.report import load_rows
from a2ats.hf.calibrate import load_or_calibrate
from a2ats.methods import A2ATSMethod, HybridMethod, OracleMethod, QuestMethod
from a2ats.provenance import provenance

p = argparse.ArgumentParser()
p.add_argument("--out", default="docs/retrieval")
p.add_argument("--texts", type=int, default=3)
p.add_argument("--length", type=int, default=4096)
p.add_argument("--decode-last", type=int, default=32)
p.add_argument("--budgets", default="0.015,0.03,0.06")
p.add_argument("--band-ratios", default="2", help="banded WRoPE with codebooks calibrated for these ratios")
p.add_argument("--paper-codebook-ratios", default="2,4", help="banded WRoPE scoring over the paper's codebook")
p.add_argument("--hybrid-shares", default="0.5", help="hybrid WRoPE (paper's codebook) with these shares of the budget by the paper's score")
p.add_argument("--results", nargs="*", default=[], help="a2ats eval results.jsonl files for the suite-score panel")
p.add_argument("--needle-results", nargs="*", default=[], help="results.jsonl of the needle runs with more samples (a panel of their own)")
p.add_argument("--mass-from", help="reuse the mass section of an earlier retrieval_quality.json: only methods it lacks are measured")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
earlier = json.loads(Path(a.mass_from).read_text()) if a.mass_from else None


def _command() -> str:
    args = {k.replace("_", "-"): " ".join(v) if isinstance(v, list) else v for k, v in vars(a).items()}
    return "python scripts/retrieval_quality.py " + " ".join(f"--{k} {v}" for k, v in args.items() if v not in (None, ""))


model, tok = load_model()
rot = find_rotary_embedding(model)
head_dim = model.config.hidden_size // model.config.num_attention_heads
paper = load_or_calibrate(model, tok, settings=CodebookSettings(wrope_band_ratio=None))
makers = {
    "oracle": OracleMethod,
    "a2ats (paper)": lambda: A2ATSMethod(paper, WRoPE(rot, 2048)),
    "a2ats-euclid": lambda: A2ATSMethod(load_or_calibrate(model, tok, settings=CodebookSettings(query_aware=False, wrope_band_ratio=None)), WRoPE(rot, 2048)),
    "quest": QuestMethod,
}
for r in [float(x) for x in a.band_ratios.split(",") if x]:
    makers[f"a2ats-banded r={r:g}"] = lambda r=r: A2ATSMethod(
        load_or_calibrate(model, tok, settings=CodebookSettings(wrope_band_ratio=r)), WRoPE(rot, 2048, r))
for r in [float(x) for x in a.paper_codebook_ratios.split(",") if x]:
    # banded scoring over the paper's codebook: separates what the banded calibration adds
    makers[f"a2ats-banded r={r:g}, paper codebook"] = lambda r=r: A2ATSMethod(paper, WRoPE(rot, 2048, r))
for sh in [float(x) for x in a.hybrid_shares.split(",") if x]:
    makers[f"a2ats-hybrid share={sh:g}"] = lambda sh=sh: HybridMethod(paper, rot, 2048, 2.0, sh)
budgets = [float(b) for b in a.budgets.split(",")]
done = set(earlier["mass"]) if earlier else set()
methods = {name: make() for name, make in makers.items() if any(f"{name}@{b:g}" not in done for b in budgets)}

held = [s for s in speeches()[110:] if len(s) > 30000][: a.texts]
texts = [torch.tensor(tok.encode(s, add_special_tokens=False)[: a.length]) for s in held]
mass, attended, seconds = defaultdict(list), defaultdict(list), defaultdict(list)
for x in texts if methods else ():
    pre = prefill(model, x[: -a.decode_last])
    for rho in [0] + budgets:
        for name, m in methods.items():
            key = "sinks + window" if rho == 0 else f"{name}@{rho:g}"
            if (rho == 0 and name != "oracle") or key in done:
                continue  # budget 0: sinks + window alone, the same for every method
            t = time.perf_counter()
            probe = attention_mass(model, m, A2ATSConfig(budget=rho, reduction="union"), x, a.decode_last, pre=pre)  # 0: a token count
            mass[key].append(probe.mean())
            attended[key].append(probe.mean("attended"))
            seconds[key].append(time.perf_counter() - t)
            print(f"{key}: mass {probe.mean():.4f}, attended {probe.mean('attended'):.0f}", flush=True)

if earlier is not None:
    res = {k: earlier[k] for k in ("command", "machine", "date", "setup", "mass", "added", "provenance") if k in earlier}
    if mass:
        res.setdefault("added", []).append({"command": _command(), "date": time.strftime("%Y-%m-%d"), "methods": sorted(mass),
                                            "provenance": provenance(vars(a))})
else:
    res = {
        "command": _command(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "setup": f"{len(texts)} held-out State of the Union texts of {a.length} tokens, last {a.decode_last} positions, all layers and query heads",
        "mass": {},
    }
for key in mass:
    name = key.split("@")[0]
    kind = "streaming" if key == "sinks + window" else name.split(" ")[0]
    b = step_bytes(kind, a.length, mean(attended[key]), head_dim)
    res["mass"][key] = {"mass": mean(mass[key]), "attended_per_kv_head": mean(attended[key]),
                        "bytes_per_step": b.scoring + b.attended, "shared_bytes_per_step": b.shared,
                        "seconds": mean(seconds[key])}



def suite_scores(paths) -> dict:
    """Average score and bytes per step per method and budget over the rows of ``paths``."""
    suite, byts = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for path in paths:
        for r in load_rows(Path(path)):
            if "score" not in r:
                continue
            b = step_bytes(r["method"], r["context_tokens"], r["attended_per_kv_head"], head_dim)
            suite[(r["method"], r["budget"])][(r["task"], r["length"])].append(r["score"])
            byts[(r["method"], r["budget"])].append(b.scoring + b.attended)
    return {f"{m}@{b:g}": {"score": mean(mean(v) for v in per.values()), "bytes_per_step": mean(byts[(m, b)]),
                           "prompts": sum(len(v) for v in per.values())} for (m, b), per in suite.items()}


res["suite"] = suite_scores(a.results)
res["needles"] = suite_scores(a.needle_results)
res.setdefault("provenance", provenance(vars(a)))  # the first run's; each `added` entry holds its own
(out / "retrieval_quality.json").write_text(json.dumps(res, indent=1))

panels = [("mass", "share of true attention mass kept"), ("suite", "average suite score (9 tasks, 1 sample)"),
          ("needles", "average needle-task score (6 tasks, 4 samples)")]
panels = [p for p in panels if res[p[0]]]
matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)


def display(name: str) -> str:
    """One name per method in every panel (the eval harness and the mass section name some differently)."""
    if name == "a2ats":
        return "a2ats (paper)"
    if name == "a2ats-banded":
        return "a2ats-banded r=2"
    if name.startswith("a2ats-hybrid") and "share" not in name:
        return f"a2ats-hybrid share={name[len('a2ats-hybrid'):] or '0.5'}"
    return name


names = sorted({display(k.partition("@")[0]) for what, _ in panels for k in res[what] if "@" in k})
colors = dict(zip(names, plt.get_cmap("tab20").colors))  # the same colour for a method in every panel
fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
for ax, (what, label) in zip(axes[0], panels):
    lines = defaultdict(list)
    for key, v in res[what].items():
        name, _, rho = key.partition("@")
        if rho:
            lines[display(name)].append((v["bytes_per_step"] / 1024, v["mass" if what == "mass" else "score"], rho))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=colors[name])
        for x_, y_, rho in pts:
            ax.annotate(rho, (x_, y_), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if what == "mass" and "sinks + window" in res["mass"]:
        ax.axhline(res["mass"]["sinks + window"]["mass"], color="gray", ls=":", label="sinks + window")
    ax.set_xlabel("KiB read per step, per sequence and KV head")
    ax.set_ylabel(label)
    ax.set_xscale("log")
    ax.legend(fontsize=7)
fig.suptitle(f"default model (SmolLM2-135M-Instruct); point labels: budget rho; the A²ATS codebook (shared by the batch) is not counted; {res['machine']}", fontsize=8)
fig.tight_layout()
fig.savefig(out / "retrieval_quality.png", dpi=110)
print(json.dumps(res["mass"], indent=1))
