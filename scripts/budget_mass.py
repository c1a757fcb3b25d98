"""Attention mass kept against tokens read, for the GQA reductions and budgets the throughput projection
weighs (`a2ats bench project`: "lower effective budget" = a smaller ρ and K per KV head), on the default
model with its cached codebooks (the paper's settings).

    .venv/bin/python scripts/budget_mass.py --out docs/bench/budget_mass.json [--texts 3 --decode-last 32 --oracle]

Same texts and protocol as scripts/core_figures.py: three held-out State of the Union addresses, the
first 4,096 tokens of each, the last 32 decoded one at a time (teacher forcing); mass per query head,
averaged over layers, heads and steps; tokens attended per KV head (sinks, window and union included).
"""

import argparse
import json
import platform
import sys

import torch

from a2ats.assets.corpus import speeches
from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookSettings
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.eval.attention_metrics import attention_mass
from a2ats.eval.prefill import prefill
from a2ats.hf.calibrate import load_or_calibrate
from a2ats.methods import A2ATSMethod, OracleMethod

p = argparse.ArgumentParser()
p.add_argument("--out", default="docs/bench/budget_mass.json")
p.add_argument("--texts", type=int, default=3)
p.add_argument("--length", type=int, default=4096)
p.add_argument("--decode-last", type=int, default=32)
p.add_argument("--budgets", default="0.0075,0.015,0.03,0.06", help="comma-separated fractions")
p.add_argument("--oracle", action="store_true", help="also the oracle (exact top-K) at every setting")
a = p.parse_args()

model, tok = load_model()
cb = load_or_calibrate(model, tok, settings=CodebookSettings(wrope_band_ratio=None))  # the figures this reproduces were measured with the paper's single WRoPE distance
methods = {"a2ats": A2ATSMethod(cb, WRoPE(find_rotary_embedding(model), 2048)), "oracle": OracleMethod()}
held_out = [s for s in speeches()[110:] if len(s) > 30000][: a.texts]
ids = [torch.tensor(tok.encode(s, add_special_tokens=False)[: a.length]) for s in held_out]
pres = [prefill(model, x[: -a.decode_last]) for x in ids]
rows = []
for name in ("a2ats", "oracle") if a.oracle else ("a2ats",):
    for reduction in ("union", "max"):
        for rho in [float(x) for x in a.budgets.split(",")]:
            cfg = A2ATSConfig(budget=rho, reduction=reduction)
            probes = [attention_mass(model, methods[name], cfg, x, a.decode_last, pre) for x, pre in zip(ids, pres)]
            row = {"method": name, "reduction": reduction, "budget": rho,
                   "mass": sum(pr.mean() for pr in probes) / len(probes),
                   "attended_per_kv_head": sum(pr.mean("attended") for pr in probes) / len(probes)}
            rows.append(row)
            print(json.dumps(row), flush=True)
res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
       "command": "python " + " ".join(sys.argv), "texts": a.texts, "length": a.length, "decode_last": a.decode_last,
       "rows": rows}
with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
