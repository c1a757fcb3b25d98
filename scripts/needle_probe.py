"""Why does a selection miss a needle? Per needle of one task prompt: how much of the model's true attention to
that needle's sentence each selection keeps, and where the estimate ranks the needle's tokens.

    .venv/bin/python scripts/needle_probe.py --task niah_multikey --length 16384 --sample 1 \
        --out docs/eval/qwen/needle_probe

The prompt is the evaluation's (same task, length, seed, chat template and answer prefix; `a2ats eval --preset
long`), its codebooks the evaluation's (cached). After one dense prefill, every method decodes the same tokens:
full attention's greedy answer, teacher-forced, so each step is probed in the same context. At each step, layer,
KV head and query head: the true attention mass on each needle sentence (the inserted "One of the special magic
numbers for KEY is: VALUE." tokens), whether the selection keeps those tokens, and the best rank the estimate
(the method's scores, before top-K) gives any of them among the candidates, against K. Then each method decodes
greedily on its own: its answer. Methods: full, oracle, the paper's A²ATS, banded WRoPE, and each of them with a
shortlist re-rank (``RerankMethod``: the estimate's top factor x K per query head, re-scored with exact keys).
Weights read as the bf16 values they are, as in the evaluation.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from a2ats.assets.models import load_model
from a2ats.core.config import A2ATSConfig
from a2ats.core.selection import always_kept
from a2ats.eval import tasks as T
from a2ats.eval.harness import PRESETS, EvalConfig, build_methods
from a2ats.eval.prefill import fork, greedy_decode, prefill
from a2ats.eval.text_metrics import attention_scaling
from a2ats.hf import A2ATS
from a2ats.hf.generate import encode_prompt
from a2ats.hf.precision import bf16_weight_reads, parse_dtype
from a2ats.methods import FullMethod, Method, OracleMethod, RerankMethod
from a2ats.provenance import provenance

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen2.5-coder-0.5b")
p.add_argument("--task", default="niah_multikey")
p.add_argument("--length", type=int, default=16384)
p.add_argument("--sample", type=int, default=1)
p.add_argument("--budget", type=float, default=0.03)
p.add_argument("--factors", default="2,4", help="shortlist factors of the re-rank variants")
p.add_argument("--out", default="docs/eval/qwen/needle_probe")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
t_start = time.perf_counter()

cfg = EvalConfig(**PRESETS["long"], model=a.model)
model, tok = load_model(a.model)
sample = T.generate(a.task, tok, a.length, seed=cfg.seed + a.sample)
ids = encode_prompt(tok, sample.prompt)
ids = torch.cat([ids, torch.tensor([tok.encode(sample.answer_prefix, add_special_tokens=False)])], dim=1)

# needle sentences -> token spans, through the tokenizer's character offsets of the same text
text = tok.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False)
text += sample.answer_prefix
enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
if enc["input_ids"] != ids[0].tolist():
    sys.exit("the prompt's tokens differ when tokenized from its text: the needle spans cannot be located")
needles = []
for m in re.finditer(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.", text):
    span = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < m.end() and e > m.start()]
    needles.append({"key": m.group(1), "value": m.group(2), "queried": m.group(2) in sample.answers,
                    "tokens": [span[0], span[-1] + 1], "position": round(span[0] / ids.shape[1], 3)})
spans = [torch.arange(*n["tokens"]) for n in needles]
print(f"{ids.shape[1]} tokens; needles: {[(n['key'], n['value'], n['queried'], n['tokens']) for n in needles]}", flush=True)


class Probe(Method):
    """Wraps a method: at each decode step records per needle the true mass on its sentence, the share of that mass
    the selection keeps, and the estimate's best rank among the needle's tokens (per query head)."""

    def __init__(self, inner: Method, scaling: float):
        self.inner, self.scaling, self.rows = inner, scaling, []
        self.name = inner.name

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        self.inner.on_append(layer, store, k_pre, k_post, kv_heads)

    def select(self, step, config):
        keep = self.inner.select(step, config)  # (1, Hkv, n)
        B, Hq, d = step.query.shape
        Hkv, G, n = step.keys.shape[1], step.group, step.keys.shape[2]
        logits = torch.einsum("bhgd,bhnd->bhgn", step.query.float().view(B, Hkv, G, d), step.keys.float())
        prob = (logits * self.scaling).softmax(-1)[0]  # (Hkv, G, n)
        _, cand, length = always_kept(step.valid, config.sinks, config.window)
        k = int(config.budget.tokens_for(length)[0])
        base = getattr(self.inner, "inner", self.inner)  # a re-rank's estimate is its inner method's
        est = None if isinstance(base, FullMethod) else base.scores(step).float().view(Hkv, G, n)
        if est is not None:
            est = est.masked_fill(~cand[0], float("-inf"))
        for i, s in enumerate(spans):
            mass = prob[:, :, s].sum(-1)  # (Hkv, G)
            kept = (prob[:, :, s] * keep[0][:, None, s]).sum(-1)
            row = {"layer": step.layer, "needle": i, "mass": mass.tolist(), "kept": kept.tolist()}
            if est is not None:
                # candidates estimated strictly higher than the sentence's best token (ties, common where tokens
                # share a code, are not counted against it: within K means it can be chosen)
                best = est[:, :, s].max(-1).values
                row["rank"] = (est > best[..., None]).sum(-1).tolist()
                row["k"] = k
            self.rows.append(row)
        return keep


scaling = attention_scaling(model)
dtype = parse_dtype(cfg.prefill_dtype)
factors = [float(f) for f in a.factors.split(",") if f]
with bf16_weight_reads(model):
    built = build_methods(["a2ats", "a2ats-banded"], model, tok, cfg)
    methods = {"full": FullMethod(), "oracle": OracleMethod(), "a2ats": built["a2ats"], "a2ats-banded": built["a2ats-banded"]}
    for base in ("a2ats", "a2ats-banded"):
        for f in factors:
            methods[f"{base}-rerank{f:g}"] = RerankMethod(built[base], f)
    t0 = time.perf_counter()
    pre = prefill(model, ids, dtype)
    prefill_s = time.perf_counter() - t0
    gen_eos = model.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])} - {None}
    answers, probes, shortlists = {}, {}, {}
    for name, method in methods.items():
        config = A2ATSConfig(budget=1.0 if name == "full" else a.budget, reduction="union")
        with torch.inference_mode(), A2ATS(model, config=config, method=method) as a2:
            toks, _ = greedy_decode(model, a2, pre, sample.max_new_tokens, eos)
            answers[name] = tok.decode(toks, skip_special_tokens=True)
            if name == "full":
                forced = toks[:-1] if toks[-1] in eos else toks  # every method is probed on full attention's answer
        if isinstance(method, RerankMethod):
            shortlists[name] = sum(method.shortlisted) / len(method.shortlisted)
        probe = Probe(method, scaling)
        with torch.inference_mode(), A2ATS(model, config=config, method=probe) as a2:
            cache = fork(pre, a2)
            for t in forced[:-1]:
                model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
        probes[name] = probe.rows
        print(f"{name:24s} answer {answers[name]!r}", flush=True)


def summary(rows):
    """Per needle: share of the true mass on its sentence the selection keeps (pooled over steps, layers, heads);
    for estimates, the share of (step, layer, query head) with >= 1% of their mass on the sentence where the
    estimate ranks one of its tokens within K, within 2K, within 4K."""
    res = []
    for i, n in enumerate(needles):
        rs = [r for r in rows if r["needle"] == i]
        mass = torch.tensor([r["mass"] for r in rs])
        kept = torch.tensor([r["kept"] for r in rs])
        item = {"key": n["key"], "queried": n["queried"], "mass": float(mass.mean()), "kept": float(kept.sum() / mass.sum())}
        if rs and "rank" in rs[0]:
            rank = torch.tensor([r["rank"] for r in rs]).float()
            k = rs[0]["k"]
            hot = mass >= 0.01
            for m in (1, 2, 4):
                item[f"within_{m}k"] = float((rank[hot] < m * k).float().mean()) if hot.any() else None
            item["attending_heads"] = int(hot.sum())
        res.append(item)
    return res


report = {"command": "python " + " ".join(sys.argv), "task": a.task, "length": a.length, "seed": sample.seed,
          "context_tokens": int(ids.shape[1]), "budget": a.budget, "answers_expected": list(sample.answers),
          "needles": needles, "forced": tok.decode(forced), "prefill_seconds": round(prefill_s, 1),
          "methods": {name: {"answer": answers[name], "score": T.score(sample, answers[name]),
                             "shortlist_per_kv_head": shortlists.get(name), "needles": summary(probes[name])}
                      for name in methods},
          "wall_seconds": round(time.perf_counter() - t_start, 1)}
name = f"{a.task}-{a.length}-s{a.sample}"
report["provenance"] = provenance(vars(a))
(out / f"{name}.json").write_text(json.dumps(report, indent=1))
lines = [f"# {a.task}, {a.length} tokens, sample {a.sample}: per-needle probe (rho = {a.budget:g})", "",
         f"`{report['command']}`", "", f"Expected {sample.answers}; teacher-forced answer (full attention's): "
         f"{report['forced']!r}.", "",
         "| method | answer | score | needle (key) | queried | true mass | kept | est. rank < K | < 2K | < 4K |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for mname, m in report["methods"].items():
    for j, nd in enumerate(m["needles"]):
        def f(x):
            return "" if x is None else f"{x:.2f}"
        lead = (f"{mname}" + (f" (shortlist {m['shortlist_per_kv_head']:.0f} rows)" if m["shortlist_per_kv_head"] else ""),
                repr(m["answer"][:40]), f"{m['score']:g}") if j == 0 else ("", "", "")
        lines.append(f"| {' | '.join(lead)} | {nd['key']} | {'yes' if nd['queried'] else ''} | {nd['mass']:.4f} | "
                     f"{nd['kept']:.2f} | {f(nd.get('within_1k'))} | {f(nd.get('within_2k'))} | {f(nd.get('within_4k'))} |")
(out / f"{name}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
