"""Which calibration recipe serves long contexts, and what it costs: attention mass kept at 4K-32K by codebooks
calibrated on short sequences (2K chunks of prose and UUIDs), on the same chunks each starting with the
token real prompts start with (the attention sink), and on long sequences (4K-16K) with that token; each
recipe's forward and k-means seconds beside it.

    .venv/bin/python scripts/calibration_recipe.py --model qwen2.5-coder-0.5b --out docs/eval/qwen/calibration

A recipe ``NAME/exact`` fits its codebooks with every Lloyd pass searching all centroids (10 passes, the recipe
before neighbour passes); recipes that share a corpus share one forward pass. ``--band-ratio 2`` measures with
the library's banded selection (its codebooks calibrated for it), the default the paper's single distance.

Every recipe keeps the paper's settings otherwise (4096 centroids per layer and KV head, 64K prose + 16K
UUID tokens, WRoPE b = 2048, query-aware); codebooks land in the user cache, where `a2ats eval` finds them.
Mass: held-out State of the Union prose (1900-1930) behind the prompt-start token, prefilled densely, the
last 32 positions decoded one at a time (teacher forcing); share of each query head's true attention mass
that the selection keeps, averaged over layers, heads and positions, at rho = 1.5 / 3 / 6 %.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from a2ats.assets.models import cache_dir, load_model
from a2ats.core.codebook import Codebooks, CodebookSettings
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.eval.attention_metrics import attention_mass
from a2ats.eval.harness import held_out_ids
from a2ats.eval.prefill import prefill
from a2ats.hf.calibrate import fit, record, settings_sequences
from a2ats.hf.precision import parse_dtype
from a2ats.methods import A2ATSMethod, OracleMethod
from a2ats.provenance import provenance

RECIPES = {
    "2k": dict(seq_len=2048, sink_prefix=False),  # short chunks, no sink token
    "2k+sink": dict(seq_len=2048, sink_prefix=True),
    "4k+sink": dict(seq_len=4096, sink_prefix=True),
    "8k+sink": dict(seq_len=8192, sink_prefix=True),
    "16k+sink": dict(seq_len=16384, sink_prefix=True),
}

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen2.5-coder-0.5b")
p.add_argument("--recipes", default="2k,2k+sink,16k+sink")
p.add_argument("--lengths", default="4096,16384,32768")
p.add_argument("--budgets", default="0.015,0.03,0.06")
p.add_argument("--decode-last", type=int, default=32)
p.add_argument("--forward-dtype", default="bfloat16", help="calibration forward and prefill compute dtype (autocast)")
p.add_argument("--band-ratio", type=float, default=None, help="banded WRoPE ratio to calibrate and score with "
               "(default: the paper's single distance)")
p.add_argument("--out", default="docs/eval/qwen/calibration")
a = p.parse_args()

torch.set_num_threads(torch.get_num_threads())
dtype = parse_dtype(a.forward_dtype)
model, tok = load_model(a.model)
rot = find_rotary_embedding(model)
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
rows, calib = [], {}
methods = {"oracle": OracleMethod()}
EXACT = dict(kmeans_neighbours=0, max_iter=10)  # every Lloyd pass over all centroids: the recipe before neighbour passes


def recipe_settings(name: str) -> CodebookSettings:
    corpus, _, kmeans = name.partition("/")
    if corpus not in RECIPES or kmeans not in ("", "exact"):
        raise SystemExit(f"unknown recipe {name!r}: use CORPUS or CORPUS/exact, CORPUS one of {', '.join(RECIPES)}")
    return CodebookSettings(**RECIPES[corpus], **(EXACT if kmeans else {}), wrope_band_ratio=a.band_ratio)


names = a.recipes.split(",")
groups: dict[tuple, list[str]] = {}  # recipes of one corpus share a forward pass
for name in names:
    st = recipe_settings(name)
    groups.setdefault((st.seq_len, st.sink_prefix), []).append(name)
store = cache_dir() / "recipes" / Path(a.model).name  # codebooks of recipes that share a tag must not share a file
for group in groups.values():
    files = {n: store / n.replace("/", "-") / f"{recipe_settings(n).tag}.safetensors" for n in group}
    rec = None
    for name in group:
        s = recipe_settings(name)
        if files[name].exists():
            cb = Codebooks.load(files[name])
        else:
            if rec is None:
                rec = record(model, settings_sequences(model, tok, s), s.wrope_distance, True, False, s.wrope_band_ratio, dtype)
            cb = fit(rec, s)
            cb.save(files[name])
        calib[name] = {"settings_tag": s.tag, **cb.info}
        print(json.dumps({"recipe": name, **calib[name]}), flush=True)
        methods[name] = A2ATSMethod(cb, WRoPE(rot, s.wrope_distance, s.wrope_band_ratio))
budgets = [float(x) for x in a.budgets.split(",")]
for length in [int(x) for x in a.lengths.split(",")]:
    ids = held_out_ids(tok, length)
    t = time.perf_counter()
    pre = prefill(model, ids[: -a.decode_last], dtype)
    print(f"prefill {length}: {time.perf_counter() - t:.1f} s", flush=True)
    for name, method in methods.items():
        for rho in budgets:
            probe = attention_mass(model, method, A2ATSConfig(budget=rho, reduction="union"), ids, a.decode_last, pre)
            row = {"length": length, "recipe": name, "budget": rho, "mass": probe.mean(), "recall": probe.mean("recall"),
                   "attended_per_kv_head": probe.mean("attended")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    del pre

table = ["| recipe | " + " | ".join(f"{n // 1024}K ρ={b:g}" for n in sorted({r['length'] for r in rows}) for b in budgets) + " |",
         "|---" * (1 + len(budgets) * len({r['length'] for r in rows})) + "|"]
for name in methods:
    cells = [f"{r['mass']:.3f}" for r in sorted((r for r in rows if r["recipe"] == name), key=lambda r: (r["length"], r["budget"]))]
    table.append(f"| {name} | " + " | ".join(cells) + " |")
res = {"command": "python " + " ".join(sys.argv), "model": a.model, "forward_dtype": a.forward_dtype,
       "band_ratio": a.band_ratio,
       "threads": torch.get_num_threads(), "calibration": calib, "rows": rows}
res["provenance"] = provenance(vars(a))
(out / "calibration.json").write_text(json.dumps(res, indent=1))
(out / "calibration.md").write_text("attention mass kept (share of the true mass)\n\n" + "\n".join(table) + "\n")
print("\n".join(table))
