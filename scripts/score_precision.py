"""What scoring from bf16-rounded centroids (A2ATSConfig.score_precision, the fast paths' default) costs in
quality: the share of the true attention mass A²ATS selection keeps when it scores from the codebooks' centroids as
calibrated (fp32) and rounded to bf16, everything else equal (the same codes, prefill and decode).

    .venv/bin/python scripts/score_precision.py --model qwen2.5-coder-0.5b --length 8192 --out docs/bench/quality

Held-out text (the last State of the Union speeches, which calibration never reads), prefilled densely, its last
``--decode-last`` tokens decoded one at a time (teacher forcing), every layer and query head. Codebooks come from
the cache (calibrated on first use).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from a2ats.assets.corpus import speeches
from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookSettings
from a2ats.core.config import A2ATSConfig
from a2ats.eval.attention_metrics import attention_mass
from a2ats.eval.prefill import prefill
from a2ats.hf.calibrate import load_or_calibrate
from a2ats.methods import A2ATSMethod
from a2ats.provenance import provenance

p = argparse.ArgumentParser()
p.add_argument("--model", default=None)
p.add_argument("--length", type=int, default=8192)
p.add_argument("--decode-last", type=int, default=32)
p.add_argument("--out", default="docs/bench/quality")
a = p.parse_args()

model, tok = load_model(a.model)
codebooks = load_or_calibrate(model, tok, None, CodebookSettings())
text = "\n\n".join(speeches()[-40:])
ids = torch.tensor([tok.encode(text, add_special_tokens=False)[: a.length]])
if ids.shape[1] < a.length:
    raise SystemExit(f"the held-out text has {ids.shape[1]} tokens, fewer than --length {a.length}")
t = time.perf_counter()
pre = prefill(model, ids[0, : -a.decode_last])
rows = {}
for label in ("fp32", "bf16"):
    config = A2ATSConfig(score_precision=label)
    probe = attention_mass(model, A2ATSMethod.for_model(model, codebooks, config), config, ids, a.decode_last, pre=pre)
    flat = {k: torch.tensor([x for v in getattr(probe, k).values() for x in v]) for k in ("mass", "recall", "oracle_mass")}
    rows[label] = {k: round(float(v.mean()), 5) for k, v in flat.items()} | {"samples": int(flat["mass"].numel())}
    print(f"{label}: {rows[label]}", flush=True)
res = {"model": a.model or "smollm2-135m", "length": a.length, "decode_last": a.decode_last,
       "budget": config.budget_label, "seconds": round(time.perf_counter() - t, 1), "rows": rows,
       "provenance": provenance({"model": a.model, "length": a.length, "decode_last": a.decode_last})}
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
name = f"score-precision-{(a.model or 'smollm2-135m').split('/')[-1]}-{a.length}.json"
(out / name).write_text(json.dumps(res, indent=1) + "\n")
print(f"wrote {out / name}")
