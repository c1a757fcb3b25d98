"""Does the default selection hold up over a long generation? Recall and mass of A²ATS's selection at every
step of 1,024 tokens generated after a 16K prompt, against its first steps; and how well the precomputed
codebook fits the keys the model generates late, against the prompt's keys.

    .venv/bin/python scripts/long_generation.py --model qwen2.5-coder-0.5b --out docs/eval/qwen/long_generation/default

The prompt (chat template), by default (``--prompt code``): Python standard-library modules (textwrap, bisect,
shlex, fractions, string, heapq; read from this interpreter's own library, cut to the prompt length) and a
request to write a unit-test suite for them, a long generation this coder model carries out. (Asked for a
commentary on held-out State of the Union prose, ``--prompt prose``, it refuses and repeats its refusal: a
degenerate generation.) Decoding is greedy under A²ATS (by default the library's default selection: banded, max
reduction at 10% per KV head; ``--reduction union --budget 0.03``: the paper's GQA union at 3%), on the reference
path, which computes what the fast path computes; weights read as the bf16 values they are;
the end-of-turn tokens are suppressed so the generation runs its full length. At every step and layer the
probe compares the selection with the true attention: mass kept, the oracle's mass at the same budget (the
ceiling: the true top-K under the same reduction) and recall of the true top-K (means over layers and
query heads).
Codebook fit: mean squared distance of each key to its centroid in the query-aware space (the score error the
codebook was fit to minimize), for the prompt's keys and for each block of generated keys.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import matplotlib
import torch

from a2ats import kernels
from a2ats.assets.corpus import speeches
from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookSettings
from a2ats.core.config import DEFAULT_BAND_RATIO, A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding, undo_rotation
from a2ats.eval.attention_metrics import MassProbe
from a2ats.eval.prefill import fork, prefill
from a2ats.eval.text_metrics import attention_scaling
from a2ats.hf import A2ATS
from a2ats.hf.cache import A2ATSCache
from a2ats.hf.calibrate import load_or_calibrate
from a2ats.hf.generate import encode_prompt
from a2ats.hf.precision import bf16_exact, bf16_weight_reads, parse_dtype
from a2ats.methods import A2ATSMethod
from a2ats.provenance import provenance

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen2.5-coder-0.5b")
p.add_argument("--prompt-tokens", type=int, default=16384)
p.add_argument("--new-tokens", type=int, default=1024)
p.add_argument("--budget", type=float, default=None, help="default: the reduction's (10%% max, 3%% union)")
p.add_argument("--reduction", choices=["max", "union"], default="max")
p.add_argument("--block", type=int, default=64, help="steps per point of the plot")
p.add_argument("--prefill-dtype", default="bfloat16")
p.add_argument("--prompt", choices=["code", "prose"], default="code")
p.add_argument("--wrope-bands", type=float, default=DEFAULT_BAND_RATIO,
               help=f"banded WRoPE ratio (default {DEFAULT_BAND_RATIO:g}, the library's selection); 0: the paper's single distance")
p.add_argument("--out", default="docs/eval/qwen/long_generation")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
t_start = time.perf_counter()

model, tok = load_model(a.model)
cfg = A2ATSConfig(budget=a.budget, wrope_band_ratio=a.wrope_bands or None, reduction=a.reduction)
settings = CodebookSettings(wrope_distance=cfg.wrope_distance, wrope_band_ratio=cfg.wrope_band_ratio)
cb = load_or_calibrate(model, tok, settings=settings, compute_dtype=parse_dtype(a.prefill_dtype))
method = A2ATSMethod(cb, WRoPE(find_rotary_embedding(model), cfg.wrope_distance, cfg.wrope_band_ratio))
if a.prompt == "code":
    lib = Path(json.__file__).parent.parent  # this interpreter's standard library: offline, the same everywhere
    modules = ["textwrap", "bisect", "shlex", "fractions", "string", "heapq"]  # ~23K tokens: cut to the prompt length
    text = "\n\n".join(f"# ===== {m}.py =====\n" + (lib / f"{m}.py").read_text() for m in modules)
    request = ("\n\nWrite a thorough unittest test suite for the modules above: one TestCase class per public class "
               "or function, many test methods each, with a comment on what each test checks.")
else:
    text = "\n\n".join(speeches()[110:140])
    request = ("\n\nWrite a long and detailed commentary on the addresses above: go through them one by one, quote "
               "their most important passages and explain what each says about its time.")
body = tok.encode(text, add_special_tokens=False)
overhead = encode_prompt(tok, request).shape[1]
ids = encode_prompt(tok, tok.decode(body[: a.prompt_tokens - overhead - 8]) + request)[0]
pre = prefill(model, ids, parse_dtype(a.prefill_dtype))
print(f"prompt {len(ids)} tokens, prefill {time.perf_counter() - t_start:.0f} s", flush=True)

gen_eos = model.generation_config.eos_token_id
banned = sorted({tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
probe = MassProbe(method, attention_scaling(model))
Hq = model.config.num_attention_heads
tokens = []
t0 = time.perf_counter()
reads = bf16_weight_reads(model) if bf16_exact(model) else contextlib.nullcontext()  # same numbers, half the bytes
with torch.inference_mode(), reads, A2ATS(model, config=cfg, method=probe) as a2:
    cache: A2ATSCache = fork(pre, a2)
    logits = pre.last_logits.clone()
    for step in range(a.new_tokens):
        logits[:, banned] = float("-inf")  # the generation runs its full length
        tok_id = logits.argmax(-1, keepdim=True)
        tokens.append(int(tok_id))
        logits = model(input_ids=tok_id, past_key_values=cache, use_cache=True).logits[:, -1]
        if (step + 1) % 128 == 0:
            print(f"{step + 1} steps, {time.perf_counter() - t0:.0f} s", flush=True)
decode_s = time.perf_counter() - t0

# per step: mean over layers and query heads (each layer's list grows by Hq values per step)
layers = sorted(probe.mass)
steps = len(probe.mass[layers[0]]) // Hq


def per_step(what):
    vals = getattr(probe, what)
    return [sum(sum(vals[layer][s * Hq:(s + 1) * Hq]) for layer in layers) / (Hq * len(layers)) for s in range(steps)]


mass, recall, oracle = per_step("mass"), per_step("recall"), per_step("oracle_mass")

# codebook fit: squared distance to the nearest centroid in the query-aware space, prompt keys vs generated keys
n_prompt = len(ids)
cos, sin = find_rotary_embedding(model)(cache.layers[0].keys.float(), position_ids=torch.arange(cache.layers[0].length).unsqueeze(0))
fit_prompt, fit_blocks = [], [[] for _ in range(-(-steps // a.block))]
with torch.inference_mode():
    for layer, store in enumerate(cache.layers):
        k_pre = undo_rotation(store.keys.float(), cos, sin)  # (1, Hkv, n, d)
        _, t, chol, _ = cb.tensors_for(layer, slice(0, cb.num_kv_heads), k_pre.device)
        z = torch.matmul(k_pre, chol.unsqueeze(0))[0]  # (Hkv, n, d)
        codes = kernels.encode_nearest(*cb.encode_inputs(layer, k_pre))[0].long()  # (Hkv, n)
        err = ((z - torch.gather(t, 1, codes.unsqueeze(-1).expand(-1, -1, z.shape[-1]))) ** 2).sum(-1).mean(0)  # (n,)
        fit_prompt.append(float(err[:n_prompt].mean()))
        gen = err[n_prompt:]
        for b in range(len(fit_blocks)):
            fit_blocks[b].append(float(gen[b * a.block:(b + 1) * a.block].mean()))
fit_prompt_mean = sum(fit_prompt) / len(fit_prompt)
fit_gen = [sum(v) / len(v) for v in fit_blocks]


def blocks(xs):
    return [sum(xs[i:i + a.block]) / len(xs[i:i + a.block]) for i in range(0, len(xs), a.block)]


res = {
    "command": "python " + " ".join(sys.argv), "model": a.model, "prompt_tokens": len(ids), "new_tokens": steps,
    "budget": cfg.budget.fraction, "reduction": cfg.reduction, "wrope_band_ratio": cfg.wrope_band_ratio, "codebooks": cb.settings.tag, "prefill_dtype": a.prefill_dtype,
    "decode_seconds": round(decode_s, 1), "wall_seconds": round(time.perf_counter() - t_start, 1),
    "prompt": a.prompt, "block": a.block, "mass_per_block": blocks(mass), "oracle_mass_per_block": blocks(oracle),
    "recall_per_block": blocks(recall),
    "first_block": {"mass": blocks(mass)[0], "oracle_mass": blocks(oracle)[0], "recall": blocks(recall)[0]},
    "last_block": {"mass": blocks(mass)[-1], "oracle_mass": blocks(oracle)[-1], "recall": blocks(recall)[-1]},
    "codebook_fit": {"prompt_keys": fit_prompt_mean, "generated_keys_per_block": fit_gen},
    "mass_per_step": mass, "oracle_mass_per_step": oracle, "recall_per_step": recall, "text": tok.decode(tokens),
}
res["provenance"] = provenance(vars(a))
(out / "long_generation.json").write_text(json.dumps(res, indent=1))

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
x = [a.block * (i + 0.5) for i in range(len(res["mass_per_block"]))]
ax1.plot(range(1, steps + 1), mass, color="C0", alpha=0.25, lw=0.6)
ax1.plot(x, res["mass_per_block"], "o-", color="C0", label="attention mass kept")
ax1.plot(x, res["oracle_mass_per_block"], "s--", color="C3", label="oracle's mass (same budget)")
ax1.plot(range(1, steps + 1), recall, color="C1", alpha=0.25, lw=0.6)
ax1.plot(x, res["recall_per_block"], "o-", color="C1", label="recall of the true top-K")
ax1.set_xlabel("generated token")
ax1.set_ylim(0, 1)
ax1.set_title(f"A²ATS {cfg.budget_label} ({cb.settings.tag}) after a {len(ids)}-token prompt", fontsize=9)
ax1.legend(fontsize=8)
ax2.axhline(fit_prompt_mean, color="k", ls="--", lw=1, label="prompt keys")
ax2.plot(x, fit_gen, "o-", color="C2", label="generated keys")
ax2.set_xlabel("generated token")
ax2.set_ylabel("squared distance to centroid (query-aware space)")
ax2.set_title("codebook fit (mean over layers and KV heads)", fontsize=9)
ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "long_generation.png", dpi=110)
print(json.dumps({k: v for k, v in res.items() if not k.endswith("_per_step") and k != "text"}, indent=1))
