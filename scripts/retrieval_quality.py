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

from a2ats.assets import load_model
from a2ats.calibrate import load_or_calibrate
from a2ats.codebook import CodebookSettings
from a2ats.config import A2ATSConfig
from a2ats.corpus import speeches
from a2ats.eval.attention_metrics import attention_mass
from a2ats.eval.cost import step_bytes
from a2ats.eval.prefill import prefill
from a2ats.eval.report import load_rows
from a2ats.methods import A2ATSMethod, OracleMethod, QuestMethod
from a2ats.rope import WRoPE, find_rotary_embedding

p = argparse.ArgumentParser()
p.add_argument("--out", default="docs/retrieval")
p.add_argument("--texts", type=int, default=3)
p.add_argument("--length", type=int, default=4096)
p.add_argument("--decode-last", type=int, default=32)
p.add_argument("--budgets", default="0.015,0.03,0.06")
p.add_argument("--band-ratios", default="2", help="banded WRoPE with codebooks calibrated for these ratios")
p.add_argument("--paper-codebook-ratios", default="2,4", help="banded WRoPE scoring over the paper's codebook")
p.add_argument("--results", nargs="*", default=[], help="a2ats eval results.jsonl files for the suite-score panel")
p.add_argument("--mass-from", help="reuse the mass section of an earlier retrieval_quality.json (redraws the suite panel only)")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
earlier = json.loads(Path(a.mass_from).read_text()) if a.mass_from else None

if earlier is not None:
    res = {k: earlier[k] for k in ("command", "machine", "date", "setup", "mass")}
    cfg = load_model(log=lambda *_: None)[0].config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
else:
    model, tok = load_model()
    rot = find_rotary_embedding(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    paper = load_or_calibrate(model, tok)
    methods = {
        "oracle": OracleMethod(),
        "a2ats (paper)": A2ATSMethod(paper, WRoPE(rot, 2048)),
        "a2ats-euclid": A2ATSMethod(load_or_calibrate(model, tok, settings=CodebookSettings(query_aware=False)), WRoPE(rot, 2048)),
        "quest": QuestMethod(),
    }
    for r in [float(x) for x in a.band_ratios.split(",") if x]:
        banded = load_or_calibrate(model, tok, settings=CodebookSettings(wrope_band_ratio=r))
        methods[f"a2ats-banded r={r:g}"] = A2ATSMethod(banded, WRoPE(rot, 2048, r))
    for r in [float(x) for x in a.paper_codebook_ratios.split(",") if x]:
        # banded scoring over the paper's codebook: separates what the banded calibration adds
        methods[f"a2ats-banded r={r:g}, paper codebook"] = A2ATSMethod(paper, WRoPE(rot, 2048, r))

    held = [s for s in speeches()[110:] if len(s) > 30000][: a.texts]
    texts = [torch.tensor(tok.encode(s, add_special_tokens=False)[: a.length]) for s in held]
    budgets = [float(b) for b in a.budgets.split(",")]
    mass, attended, seconds = defaultdict(list), defaultdict(list), defaultdict(list)
    for x in texts:
        pre = prefill(model, x[: -a.decode_last])
        for rho in [0] + budgets:
            for name, m in methods.items():
                if rho == 0 and name != "oracle":
                    continue  # budget 0: sinks + window alone, the same for every method
                t = time.perf_counter()
                probe = attention_mass(model, m, A2ATSConfig(budget=rho), x, a.decode_last, pre=pre)  # 0: a token count
                key = "sinks + window" if rho == 0 else f"{name}@{rho:g}"
                mass[key].append(probe.mean())
                attended[key].append(probe.mean("attended"))
                seconds[key].append(time.perf_counter() - t)
                print(f"{key}: mass {probe.mean():.4f}, attended {probe.mean('attended'):.0f}", flush=True)

    res = {
        "command": "python scripts/retrieval_quality.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "results"),
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

suite = defaultdict(lambda: defaultdict(list))
byts = defaultdict(list)
for path in a.results:
    for r in load_rows(Path(path)):
        if "score" not in r:
            continue
        b = step_bytes(r["method"], r["context_tokens"], r["attended_per_kv_head"], head_dim)
        suite[(r["method"], r["budget"])][(r["task"], r["length"])].append(r["score"])
        byts[(r["method"], r["budget"])].append(b.scoring + b.attended)
res["suite"] = {f"{m}@{b:g}": {"score": mean(mean(v) for v in per.values()), "bytes_per_step": mean(byts[(m, b)]),
                               "prompts": sum(len(v) for v in per.values())} for (m, b), per in suite.items()}
(out / "retrieval_quality.json").write_text(json.dumps(res, indent=1))

panels = [("mass", "share of true attention mass kept")] + ([("suite", "average suite score")] if res["suite"] else [])
matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
for ax, (what, label) in zip(axes[0], panels):
    lines = defaultdict(list)
    for key, v in res[what].items():
        name, _, rho = key.partition("@")
        if rho:
            lines[name].append((v["bytes_per_step"] / 1024, v["mass" if what == "mass" else "score"], rho))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
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
