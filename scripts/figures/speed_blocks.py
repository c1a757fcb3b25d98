"""The decode-speed blocks (the 2-core Intel Xeon of ``docs/bench/speed``): ms per token against dense attention and
llama.cpp, the step's phases, the weight formats' perplexity, and prefill."""

from __future__ import annotations

from pathlib import Path

from blocks import block, expect
from formatting import k, ms, paragraphs, ratio, table
from sources import load_json, same_machine, source_line
from speed_sources import MODELS, SPEED, SPREAD, decode_source, tie

VARIANTS = {"a2ats-fast": "A²ATS default (banded, max 10%), int8 weights",
            "dense-lean": "dense attention, same engine, int8 weights",
            "a2ats-fast-paper": "A²ATS, the paper's single WRoPE distance, int8 weights",
            "a2ats-fast-int4w": "A²ATS default, int4 weights",
            "a2ats-fast-bf16w": "A²ATS default, bf16 weights",
            "a2ats-fast-fp32w": "A²ATS default, fp32 weights",
            "dense-hf": "dense attention, transformers (SDPA), fp32 weights"}


@block("speed-decode")
def speed_decode(root: Path) -> str:
    parts, provs = [], []
    for model, (_, title, lengths) in MODELS.items():
        d = decode_source(root, model)
        provs.append(d["provenance"])
        for v in VARIANTS:
            for n in lengths:
                expect((v, n) in d["_ms"], f"{d['_rel']}: no {v} row at {n}")
        base = [["**A²ATS over dense, same engine and weights**"]
                + [f"**{tie(d['_ms'][('dense-lean', n)] / d['_ms'][('a2ats-fast', n)])}**" for n in lengths]]
        rows = [[label] + [ms(d["_ms"][(v, n)]) for n in lengths] for v, label in VARIANTS.items()]
        rows.append(["A²ATS over dense transformers (fp32 weights)"]
                    + [ratio(d["_ms"][("dense-hf", n)] / d["_ms"][("a2ats-fast", n)]) for n in lengths])
        parts += [f"**{title}**, ms per token (median of {d['rows'][0]['steps']} steps, batch 1):", "",
                  table(["ms per token"] + [k(n) for n in lengths], base + rows), "",
                  source_line(d["_rel"], d["provenance"]), ""]
    same_machine(*provs)
    return "\n".join(parts).rstrip() + "\n\n" + (
        f"A ratio within ±{100 * SPREAD:.0f}% of 1 is called a tie: the spread stated for this machine between runs "
        "of one command (the files hold one median per cell).")


@block("speed-llamacpp")
def speed_llamacpp(root: Path) -> str:
    out, provs, srcs = [], [], []
    for model, (_, title, _) in MODELS.items():
        ours = decode_source(root, model)
        theirs = decode_source(root, model, f"{model}-llamacpp")
        provs += [ours["provenance"], theirs["provenance"]]
        expect("llama.cpp" in (theirs["provenance"].get("documented") or {}),
               f"{theirs['_rel']}: the record does not say how llama.cpp was built and run")
        for (v, n), t in sorted(theirs["_ms"].items(), key=lambda x: x[0][1]):
            expect(v == "llama.cpp", f"{theirs['_rel']}: a {v} row")
            a = ours["_ms"][("a2ats-fast", n)]
            out.append([title, k(n), ms(a), ms(t), tie(t / a)])
        for n in sorted(n for (v, n) in ours["_ms"] if v == "a2ats-fast" and ("llama.cpp", n) not in theirs["_ms"]):
            out.append([title, k(n), ms(ours["_ms"][("a2ats-fast", n)]), "not run", ""])
        srcs += [source_line(theirs["_rel"], theirs["provenance"])]
    same_machine(*provs)
    how = provs[1]["documented"]["llama.cpp"]
    return "\n".join([
        "llama.cpp's dense decode against the A²ATS default, ms per token; llama.cpp reads 4-bit weights, A²ATS "
        "int8. How llama.cpp was run: " + how + ".", "",
        table(["model", "context", "A²ATS default", "llama.cpp", "A²ATS over llama.cpp"], out), "",
        f"A ratio within ±{100 * SPREAD:.0f}% of 1 is called a tie (as above). The A²ATS column is the `speed-decode` "
        "run; llama.cpp ran in separate invocations on the same machine.", ""] + paragraphs(srcs))


@block("speed-breakdown")
def speed_breakdown(root: Path) -> str:
    out, provs, srcs = [], [], []
    for model, (_, title, lengths) in MODELS.items():
        d = decode_source(root, model)
        provs.append(d["provenance"])
        srcs.append(source_line(d["_rel"], d["provenance"]))
        rows = {(r["variant"], r["context"]): r for r in d["rows"]}
        for n in lengths:
            r = rows[("a2ats-fast", n)]
            b = r["breakdown_ms"]
            out.append([f"{title} {k(n)}", ms(r["ms_per_token"]), ms(b["weights"]), ms(b["scoring"]),
                        ms(b["attention"]), ms(b["rest"]), f"{r['attended']:,.0f}"])
    same_machine(*provs)
    return "\n".join(["The default's step (int8 weights), ms: the engine's phases, and the tokens attended per layer "
                      "and KV head:", "",
                      table(["model, context", "step", "weights", "scoring", "attention", "rest", "tokens attended"],
                            out), ""] + paragraphs(srcs))


@block("speed-weights")
def speed_weights(root: Path) -> str:
    out, provs, srcs, data = [], [], [], {}
    for model, (name, title, _) in MODELS.items():
        rel = f"{SPEED}/{model}/weights.json"
        d = load_json(root, rel)
        expect(d.get("model") == name, f"{rel}: model {d.get('model')!r}")
        data[model] = {r["format"]: r for r in d["rows"]}
        provs.append(d["provenance"])
        srcs.append(source_line(rel, d["provenance"]) + f" Held-out tokens: {d['tokens']:,}.")
    same_machine(*provs)
    names = {"model": "the model's own (fp32)", "bf16": "bf16", "int8": "int8, a scale per output row (default)",
             "int4": "int4, groups of 32", "bf16 forward": "bf16 forward (the bf16 prefill's arithmetic)"}
    for f, label in names.items():
        cells = [label, f"{data['smollm2'][f]['bits']:g}"]
        for m in MODELS:
            r = data[m][f]
            cells.append(f"{r['perplexity']:.3f} ({100 * r['change']:+.2f}%)")
        out.append(cells)
    return "\n".join(["Perplexity of held-out prose (dense attention, teacher forcing) with the decode projections' "
                      "weights replaced by what each format stores:", "",
                      table(["format", "bits per weight", "SmolLM2-135M (change)", "Qwen2.5-Coder-0.5B (change)"], out),
                      ""] + paragraphs(srcs))


@block("speed-prefill")
def speed_prefill(root: Path) -> str:
    out, provs, srcs = [], [], []
    for model, (name, title, _) in MODELS.items():
        rel = f"{SPEED}/{model}/prefill.json"
        d = load_json(root, rel)
        expect(d.get("model") == name, f"{rel}: model {d.get('model')!r}")
        provs.append(d["provenance"])
        srcs.append(source_line(rel, d["provenance"]))
        for r in sorted(d["rows"], key=lambda r: (r["tokens"], r["system"])):
            label = {"a2ats": "bf16 prefill (default)", "a2ats-fp32": "fp32 prefill"}[r["system"]]
            out.append([title, k(r["tokens"]), f"ours, {label}", f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.1f}"])
        theirs = decode_source(root, model, f"{model}-llamacpp")
        provs.append(theirs["provenance"])
        srcs.append(source_line(theirs["_rel"], theirs["provenance"]))
        for n, s in sorted(theirs["prefill"]["llama.cpp_seconds"].items(), key=lambda x: int(x[0])):
            out.append([title, k(int(n)), "llama.cpp (its decode run's own prefill)", f"{int(n) / s:.0f}", f"{s:.1f}"])
    same_machine(*provs)
    return "\n".join(["Prefill, one run each (no repeats: no spread is known), tokens per second and seconds. "
                      "llama.cpp's prefills come from its decode runs, at the lengths those ran; where a length "
                      "appears for one system only, the other was not measured there.", "",
                      table(["model", "tokens", "system", "tokens/s", "seconds"], out), ""] + paragraphs(srcs))


ATTENTION = {"smollm2": "docs/bench/speed/amd-smollm2/attention/prefill.json",
             "qwen": "docs/bench/speed/amd-qwen/attention/prefill.json"}


@block("prefill-attention")
def prefill_attention(root: Path) -> str:
    """The bf16 prefill with the attention kernel against the same prefill with torch's attention, same run."""
    out, provs, srcs = [], [], []
    for model, rel in ATTENTION.items():
        d = load_json(root, rel)
        expect(d.get("model") == MODELS[model][0], f"{rel}: model {d.get('model')!r}")
        provs.append(d["provenance"])
        srcs.append(source_line(rel, d["provenance"]))
        at = {(r["system"], r["tokens"]): r for r in d["rows"]}
        for n in sorted({r["tokens"] for r in d["rows"]}):
            ours, torch_ = at.get(("a2ats", n)), at.get(("a2ats-torch-attention", n))
            expect(ours is not None and torch_ is not None, f"{rel}: both systems at {n} tokens")
            out.append([MODELS[model][1], k(n), f"{torch_['seconds']:.1f}", f"{ours['seconds']:.1f}",
                        f"{torch_['seconds'] / ours['seconds']:.2f}x"])
    same_machine(*provs)
    return "\n".join(["One prompt prefilled by the engine in bf16 (key encoding included), with torch's attention and "
                      "with the attention kernel, one after the other in one run (one run each: no spread is known), "
                      "seconds:", "",
                      table(["model", "tokens", "torch's attention", "the kernel", "speed-up"], out), ""]
                     + paragraphs(srcs))


CHUNKS = "docs/bench/speed/amd-smollm2/chunks/prefill.json"


@block("prefill-chunks")
def prefill_chunks(root: Path) -> str:
    """Prefill rate against the prompt tokens per forward: what a step's prefill beside decode costs per token."""
    from a2ats.runtime.settings import PREFILL_BUDGET

    d = load_json(root, CHUNKS)
    expect(d.get("model") == "smollm2-135m", f"{CHUNKS}: model {d.get('model')!r}")
    rows = sorted((r for r in d["rows"] if r["system"] == "a2ats"), key=lambda r: r["chunk"])
    expect(len({r["tokens"] for r in rows}) == 1 and len(rows) > 2, f"{CHUNKS}: one prompt length, several chunks")
    expect(any(r["chunk"] == PREFILL_BUDGET for r in rows), f"{CHUNKS}: no row at the default budget {PREFILL_BUDGET}")
    best = max(r["tokens_per_s"] for r in rows)
    out = [[str(r["chunk"]) + (" (the default budget)" if r["chunk"] == PREFILL_BUDGET else ""),
            f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / best:.2f}", ms(1e3 * r["chunk"] / r["tokens_per_s"])]
           for r in rows]
    return "\n".join([f"SmolLM2-135M-Instruct, one {k(rows[0]['tokens'])}-token prompt prefilled in chunks of each size "
                      "(one run each), A²ATS key encoding included. While sequences decode, the budget is the size of "
                      "the chunks a prompt goes in (each over as many steps as the prefill stall allows):", "",
                      table(["prompt tokens per forward", "tokens/s", "of the best", "ms per chunk"], out), "",
                      source_line(CHUNKS, d["provenance"])])
