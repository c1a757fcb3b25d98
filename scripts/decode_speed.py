"""Decode speed of the reference path against dense attention, on the default model (README figures).

    .venv/bin/python scripts/decode_speed.py --out docs/decode_speed.json

Prefill once per context length, then time greedy decode steps in a manual loop (same tokens fed
to both), for dense SDPA (DynamicCache) and the A²ATS reference path at rho = 0.03. The reference
path applies the selection as a mask over the whole cache: it is expected to be *slower*.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from a2ats import A2ATS, A2ATSConfig
from a2ats.assets.corpus import speeches
from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookSettings
from a2ats.hf.calibrate import load_or_calibrate

p = argparse.ArgumentParser()
p.add_argument("--out", default="docs/decode_speed.json")
p.add_argument("--lengths", default="2048,4096,8000")
p.add_argument("--steps", type=int, default=32)
p.add_argument("--repeats", type=int, default=3)
a = p.parse_args()

model, tok = load_model()
cb = load_or_calibrate(model, tok, settings=CodebookSettings(wrope_band_ratio=None))  # the figures this reproduces were measured with the paper's single WRoPE distance
text = "\n\n".join(speeches()[-40:])
all_ids = tok.encode(text, add_special_tokens=False)


@torch.inference_mode()
def run(ids, cache, steps):
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tok_ = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        tok_ = model(input_ids=tok_, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) / steps * 1e3


res = {"torch_threads": torch.get_num_threads(), "dtype": "float32", "rows": []}
for n in map(int, a.lengths.split(",")):
    ids = torch.tensor([all_ids[:n]])
    dense, ref = [], []
    for _ in range(a.repeats):  # interleaved, so both see the same machine noise
        dense.append(run(ids, DynamicCache(), a.steps))
        with A2ATS(model, cb, A2ATSConfig(budget=0.03, wrope_band_ratio=None, reduction="union")) as a2:
            ref.append(run(ids, a2.new_cache(), a.steps))
    row = {"context": n, "dense_ms_per_token": statistics.median(dense), "reference_ms_per_token": statistics.median(ref),
           "attended_fraction": a2.stats.mean_fraction}
    res["rows"].append(row)
    print(row, flush=True)
with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
