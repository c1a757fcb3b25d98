"""Throughput beyond one decode stream: serving concurrent clients (AMD EPYC) and the projection of the paper's
design (a performance model, not a measurement)."""

from __future__ import annotations

from pathlib import Path

from blocks import block, expect
from formatting import k, paragraphs, ratio, table
from sources import load_json, same_machine, source_line


@block("serve")
def serve(root: Path) -> str:
    rel = "docs/bench/serve/serve.json"
    d = load_json(root, rel)
    expect(d.get("model") == "smollm2-135m", f"{rel}: model {d.get('model')!r}")
    expect(d.get("budget") == "rho=0.1 per KV head (max)", f"{rel}: budget {d.get('budget')!r}")
    out = []
    for r in d["rows"]:
        soak = r["clients"] != d["rows"][0]["clients"] or r["requests"] > 100
        out.append([r["system"] + (" (soak)" if soak else ""), str(r["clients"]), f"{r['requests']} ({r['ok']})",
                    "–".join(map(str, r["prompt_tokens"])), str(r["max_tokens"]), f"{r['wall_s']:.1f}",
                    f"{r['engine_prefill_seconds']:.1f}", f"{r['engine_decode_seconds']:.1f}",
                    f"{r['engine_decode_tokens_per_s']:.1f}", f"{r['engine_prefill_tokens_per_s']:.0f}",
                    f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}", f"{r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f}"])
    head = ["system", "clients", "requests (ok)", "prompt tokens", "max new", "wall s", "prefill s", "decode s",
            "decode tokens/s", "prefill tokens/s", "TTFT p50 / p99 s", "per-token p50 / p99 ms"]
    return "\n".join([f"{d['slots']} slots; one run of each system (no repeats: no spread is known).", "",
                      table(head, out), "", source_line(rel, d["provenance"])])


@block("projection")
def projection(root: Path) -> str:
    out, srcs = [], []
    for rel in ("docs/bench/project.json", "docs/bench/paper-host/project.json"):
        d = load_json(root, rel)
        expect(d.get("label", "").startswith("PROJECTION"), f"{rel}: not labelled a projection")
        w = d["workload"]
        expect(w["rho"] == 0.03 and w["kv_bytes"] == 2.0 and w["union_inflation"] is None and w["budget_tokens"] is None,
               f"{rel}: workload {w} is not the paper's design the block claims")
        srcs.append(source_line(rel, d["provenance"]))
        t = d["target"]
        out.append([f"`{d['hardware']['name']}`", f"{d['hardware']['host_read_gbps']:g}",
                    f"{d['shape']['name']}", k(t["context"]), ratio(t["ratio"]), ratio(t["ratio_serial"]),
                    t["bottleneck"], f"`{d['provenance'].get('command')}`"])
    return "\n".join(["Projected decode throughput of A²ATS with K/V in host memory over full attention on the GPU "
                      "(the paper's design: ρ = 3%, GQA union, bf16 host K/V), from the performance model "
                      "(`a2ats bench project`); computed, not measured:", "",
                      table(["hardware profile", "host read GB/s (input)", "shape", "context", "projected ratio",
                             "without overlap", "bound by", "command"], out), ""] + paragraphs(srcs))


DOCQA = {"smollm2-135m": ("docs/bench/serve/docqa-smollm2/serve.json", "docs/bench/serve/docqa-smollm2-llamacpp/serve.json"),
         "qwen2.5-coder-0.5b": ("docs/bench/serve/docqa-qwen/serve.json",
                                "docs/bench/serve/docqa-qwen-llamacpp/serve.json")}


@block("serve-docqa")
def serve_docqa(root: Path) -> str:
    return _docqa(root, "smollm2-135m")


@block("serve-docqa-qwen")
def serve_docqa_qwen(root: Path) -> str:
    return _docqa(root, "qwen2.5-coder-0.5b")


def _docqa(root: Path, model: str) -> str:
    """The docqa workload through the openai client: ours (A²ATS and full attention) and llama.cpp's llama-server."""
    rows, srcs = _workload_rows(root, DOCQA[model], "docqa", model)
    out = [[name, f"{r['requests']} ({r['ok']})", "–".join(map(str, r["prompt_tokens"])), f"{r['wall_s']:.0f}",
            f"{r['requests_per_s']:.3f}", f"{r['output_tokens_per_s']:.2f}",
            f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f}", f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}", hit]
           for name, hit, r in rows]
    head = ["system", "requests (ok)", "prompt tokens", "wall s", "requests/s", "output tokens/s", "TTFT p50 / p99 s",
            "inter-token p50 / p99 ms", "prefix hit rate"]
    return "\n".join(["One run of each system (no repeats: no spread is known); llama-server right after ours, "
                      "the same documents, questions and arrival times.", "", table(head, out), ""] + paragraphs(srcs))


def _workload_rows(root: Path, rels, workload: str, model: str) -> tuple[list, list[str]]:
    """Every row of ``rels`` (one machine), as (system name, prefix hit rate, row), and their source lines."""
    rows, srcs, provs = [], [], []
    for rel in rels:
        d = load_json(root, rel)
        expect(d.get("workload") == workload and d.get("model") == model, f"{rel}: not {model}'s {workload}")
        provs.append(d["provenance"])
        srcs.append(source_line(rel, d["provenance"]))
        for r in d["rows"]:
            hit = r.get("prefix_hit_rate")
            name = "llama.cpp llama-server, Q8_0" if r["system"].startswith("external") else r["system"]
            rows.append((name, "—" if hit is None else f"{hit:.2f}", r))
    same_machine(*provs)
    return rows, srcs


SLICED = ("docs/bench/serve/docqa-smollm2-stall1/serve.json", "docs/bench/serve/docqa-smollm2-stall2/serve.json",
          "docs/bench/serve/docqa-smollm2-stall-none/serve.json")


@block("serve-docqa-sliced")
def serve_docqa_sliced(root: Path) -> str:
    """The SmolLM2 docqa run again: prompts sliced by layers between decode steps (the default stall, and 2) and not."""
    from a2ats.runtime.settings import PREFILL_STALL

    out, srcs, provs = [], [], []
    for rel in SLICED:
        d = load_json(root, rel)
        expect(d.get("workload") == "docqa" and d.get("model") == "smollm2-135m", f"{rel}: not SmolLM2's docqa")
        expect("prefill_stall" in d and d.get("prefill_budget") == 256, f"{rel}: no prefill settings recorded")
        cmd = d["provenance"].get("command", "")
        expect(all(f in cmd for f in ("--documents 2 ", "--doc-tokens 6000 ", "--questions 3 ", "--rate 0.05 ",
                                      "--slots 4 ")), f"{rel}: not the workload the caption names: {cmd}")
        provs.append(d["provenance"])
        srcs.append(source_line(rel, d["provenance"]))
        stall = "none" if d["prefill_stall"] is None else f"{d['prefill_stall']:g}"
        if d["prefill_stall"] == PREFILL_STALL:
            stall += " (the default)"
        for r in d["rows"]:
            out.append([r["system"], stall, f"{r['requests']} ({r['ok']})", f"{r['output_tokens_per_s']:.2f}",
                        f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f}",
                        f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}", f"{r['itl_p99_ms'] / r['itl_p50_ms']:.1f}",
                        f"{r['prefix_hit_rate']:.2f}"])
    same_machine(*provs)
    head = ["system", "prefill stall", "requests (ok)", "output tokens/s", "TTFT p50 / p99 s",
            "inter-token p50 / p99 ms", "p99 / p50", "prefix hit rate"]
    return "\n".join(["The same docqa workload (two documents of 6,000 tokens, three questions each, `--rate 0.05`, "
                      "4 slots, prefill budget 256), one run each, one after the other:", "", table(head, out), ""]
                     + paragraphs(srcs))


QWEN_SLICED = "docs/bench/serve/docqa-qwen-sliced/serve.json"  # the Qwen docqa again, at later code


@block("serve-docqa-qwen-sliced")
def serve_docqa_qwen_sliced(root: Path) -> str:
    """The Qwen docqa workload again with prompts sliced by layers and the attention kernel (ours only), beside the
    earlier run's llama-server row."""
    d = load_json(root, QWEN_SLICED)
    expect(d.get("workload") == "docqa" and d.get("model") == "qwen2.5-coder-0.5b", f"{QWEN_SLICED}: not Qwen's docqa")
    cmd = d["provenance"].get("command", "")
    expect(all(f in cmd for f in ("--documents 2 ", "--doc-tokens 16000 ", "--questions 2 ", "--rate 0.02 ",
                                  "--slots 2 ", "--max-new-tokens 64 ")), f"{QWEN_SLICED}: not the workload above: {cmd}")
    rel_llama = DOCQA["qwen2.5-coder-0.5b"][1]
    earlier = load_json(root, rel_llama)
    same_machine(d["provenance"], earlier["provenance"])
    (llama,) = [r for r in earlier["rows"] if r["system"].startswith("external")]
    out = []
    for name, r in [(r["system"], r) for r in d["rows"]] + [("llama.cpp llama-server, Q8_0 (the run above)", llama)]:
        out.append([name, f"{r['requests']} ({r['ok']})", f"{r['wall_s']:.0f}", f"{r['output_tokens_per_s']:.2f}",
                    f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f}", f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}",
                    f"{r['itl_p99_ms'] / r['itl_p50_ms']:.1f}"])
    head = ["system", "requests (ok)", "wall s", "output tokens/s", "TTFT p50 / p99 s", "inter-token p50 / p99 ms",
            "p99 / p50"]
    return "\n".join(["The same workload, ours again at later code (one run; llama-server's row is the run above's, "
                      "not repeated):", "", table(head, out), "", source_line(QWEN_SLICED, d["provenance"])])


QWEN_PIECES = "docs/bench/serve/docqa-qwen-pieces/serve.json"  # again, chunks under way split to fit a decode step
QWEN_SHARED = "docs/bench/serve/docqa-qwen-shared/serve.json"  # again, a document prefilled once for its questions
SMOL_STALL1 = "docs/bench/serve/docqa-smollm2-stall1/serve.json"
SMOL_SHARED = "docs/bench/serve/docqa-smollm2-shared/serve.json"


def _docqa_against(root: Path, rel: str, rel_before: str, model: str, now: str, before_label: str):
    """A docqa run (``rel``) against the run before it (the same workload and machine) and llama-server's first
    run: (run, the run before, the table of the three)."""
    d, before = load_json(root, rel), load_json(root, rel_before)

    def workload(x):
        return x["provenance"].get("command", "").split("bench serve")[-1].split("--out")[0]

    expect(workload(d) == workload(before), f"{rel}: not the workload of {rel_before}")
    same_machine(d["provenance"], before["provenance"])
    (llama,) = [r for r in load_json(root, DOCQA[model][1])["rows"] if r["system"].startswith("external")]
    runs = ([(f"{r['system']}, {now}", r) for r in d["rows"]] + [(f"{r['system']}, {before_label}", r)
                                                                  for r in before["rows"]]
            + [("llama.cpp llama-server, Q8_0 (the first run)", llama)])
    out = [[name, f"{r['requests']} ({r['ok']})", f"{r['wall_s']:.0f}", f"{r['output_tokens_per_s']:.2f}",
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.1f}", f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}",
            f"{r['itl_p99_ms'] / r['itl_p50_ms']:.1f}", f"{r['output_tokens_per_s'] / llama['output_tokens_per_s']:.1f}x"]
           for name, r in runs]
    head = ["system", "requests (ok)", "wall s", "output tokens/s", "TTFT p50 / p99 s", "inter-token p50 / p99 ms",
            "p99 / p50", "output rate over llama-server's"]
    return d, before, "\n".join(["One run of each (no repeats: no spread is known); llama-server's row is the first "
                                 "run's, not repeated:", "", table(head, out)])


@block("serve-docqa-qwen-pieces")
def serve_docqa_qwen_pieces(root: Path) -> str:
    """The Qwen docqa workload once more, a chunk under way split at its layer where that layer would hold a decoding
    sequence past the stall, beside the run before it (same machine) and llama-server's row."""
    d, before, text = _docqa_against(root, QWEN_PIECES, QWEN_SLICED, "qwen2.5-coder-0.5b", "chunks split to fit",
                                     "the run before")
    spans = "; ".join(f"{r['system']}: {slow} of {n} over three times the p50, the longest {hi:.2f} s"
                      for r, (n, slow, hi) in ((r, _first_gaps(r)) for r in before["rows"] + d["rows"]))
    return "\n".join([text, "", f"The first request's gaps between two tokens, the run before then this one: {spans}.",
                      "", source_line(QWEN_PIECES, d["provenance"])])


@block("serve-docqa-qwen-shared")
def serve_docqa_qwen_shared(root: Path) -> str:
    """The Qwen docqa workload once more, a question waiting for another question's prefill of the same document
    instead of prefilling it beside it, against the run before it (same machine) and llama-server's row."""
    d, _, text = _docqa_against(root, QWEN_SHARED, QWEN_PIECES, "qwen2.5-coder-0.5b", "a document prefilled once",
                                "the run before")
    ttfts = "; ".join(f"{r['system']}: " + ", ".join(f"{e['ttft']:.0f}" for e in sorted(r["exchanges"],
                                                                                        key=lambda e: e["sent"]))
                      for r in d["rows"])
    return "\n".join([text, "", f"Each request's TTFT in s, in order of arrival (documents 1, 2, 1, 2): {ttfts}.", "",
                      source_line(QWEN_SHARED, d["provenance"])])


@block("serve-docqa-smollm2-shared")
def serve_docqa_smollm2_shared(root: Path) -> str:
    """The default model's docqa workload again at the code of the Qwen runs above (chunks under way split to fit,
    a document prefilled once for its questions), against its run with the stall's default and llama-server's."""
    d, _, text = _docqa_against(root, SMOL_SHARED, SMOL_STALL1, "smollm2-135m", "now",
                                "prompts sliced by layers (above)")
    return "\n".join([text, "", source_line(SMOL_SHARED, d["provenance"])])


def _first_gaps(row) -> tuple[int, int, float]:
    """(count, how many over three times the run's inter-token p50, longest) of the gaps between the tokens of a
    run's first request."""
    gaps = min(row["exchanges"], key=lambda e: e["sent"])["gaps"]
    return len(gaps), sum(g > 3e-3 * row["itl_p50_ms"] for g in gaps), max(gaps)


QWEN_BATCH = "docs/bench/serve/qwen-8x32k/throughput.json"  # ours and llama.cpp's, one command
QWEN_OURS = "docs/bench/serve/qwen-8x32k-ours/throughput.json"  # ours again, the codebooks counted once per step


@block("serve-qwen-8x32k")
def serve_qwen_8x32k(root: Path) -> str:
    """Steady decode of 8 sequences of 32K tokens on Qwen2.5-Coder-0.5B: ours (A²ATS, full attention) and llama.cpp's
    batched decode, each step's bytes against the read bandwidth measured in the run."""
    first, ours = load_json(root, QWEN_BATCH), load_json(root, QWEN_OURS)
    for rel, d in ((QWEN_BATCH, first), (QWEN_OURS, ours)):
        expect(d.get("model") == "qwen2.5-coder-0.5b", f"{rel}: model {d.get('model')!r}")
    same_machine(first["provenance"], ours["provenance"])
    llama = [r for r in first["rows"] if r["system"].startswith("llama.cpp")]
    rows = ours["rows"] + llama
    expect(len(llama) == 1 and all(r["context"] == llama[0]["context"] and r["batch"] == llama[0]["batch"]
                                   for r in rows), f"{QWEN_BATCH}: one context and batch, llama.cpp's among them")
    base = llama[0]["tokens_per_s"]
    names = {"a2ats-offload": "A²ATS (int8 weights, bf16 K/V)", "full-local": "full attention, same engine",
             "a2ats-offload-int8rows": "A²ATS, int8 weights by rows (not in tiles)",
             "full-local-int8rows": "full attention, int8 weights by rows (not in tiles)"}
    out = []
    for r in rows:
        f = r.get("floor") or {}
        b = f.get("bytes") or {}
        name = names.get(r["system"]) or f"llama.cpp Q8_0, llama-batched-bench (flash attention {r['llama']['flash_attn']})"
        out.append([name, f"{r['tokens_per_s']:.1f}", f"{r['ms_per_step']:.0f}",
                    " / ".join(f"{b[p] / 1e6:.0f}" for p in ("weights", "scoring", "attention")) if b else "—",
                    " / ".join(f"{f['gbps'].get(p, 0):.0f}" for p in ("weights", "scoring", "attention")) if b else "—",
                    f"{f['share_of_floor']:.2f}" if f else "—", ratio(r["tokens_per_s"] / base)])
    short = {"a2ats-offload": "A²ATS", "full-local": "full attention"}
    earlier = " and ".join(f"{r['tokens_per_s']:.1f} ({short[r['system']]})" for r in first["rows"] if r["system"] in names)
    gbps = next(r["floor"]["host_gbps"] for r in ours["rows"] if r.get("floor"))
    steps = min(r["steps"] for r in ours["rows"])
    return "\n".join([f"{llama[0]['batch']} sequences of {k(llama[0]['context'])} tokens decoding together (ours: the "
                      f"median of {steps} timed steps; llama.cpp: the mean over its {llama[0]['llama']['gen']}); MB a "
                      "step must read (the weights and codebooks once, every sequence's codes and the K/V rows it "
                      "attends), each part's GB/s, and the share of the floor (those bytes at the "
                      f"{gbps:g} GB/s read bandwidth measured in the run, over the step's time):", "",
                      table(["system", "tokens/s", "ms per step", "MB read: weights / scoring / attention",
                             "GB/s: weights / scoring / attention", "of the floor", "over llama.cpp"], out), "",
                      f"llama.cpp's row is from the first command, whose own rows for ours were {earlier} tokens/s "
                      f"against a read bandwidth it measured at {first['rows'][0]['floor']['host_gbps']:g} GB/s (its "
                      "floor counted the codebooks once per sequence; the second command counts them once per step)."
                      + _tiles_line(ours["rows"]), "", source_line(QWEN_BATCH, first["provenance"]), "",
                      source_line(QWEN_OURS, ours["provenance"])])


def _tiles_line(rows) -> str:
    """The weights' part of a step with int8 weights in tiles against by rows, per system run both ways."""
    ms = {r["system"]: r["breakdown_ms"]["weights"] for r in rows}
    pairs = [(s, ms[s], ms[s + "-int8rows"]) for s in ("a2ats-offload", "full-local") if s in ms and s + "-int8rows" in ms]
    if not pairs:
        return ""
    short = {"a2ats-offload": "A²ATS", "full-local": "full attention"}
    return (" The weights' part of a step (ms, the mean of the timed steps), int8 weights in tiles against by rows: "
            + "; ".join(f"{short[s]} {a:.1f} against {b:.1f}" for s, a, b in pairs) + ".")


SOAK = "docs/bench/serve/soak-1000/serve.json"


@block("serve-soak")
def serve_soak(root: Path) -> str:
    """A soak run with disconnects on the default model: every request answered or cancelled once, nothing held."""
    d = load_json(root, SOAK)
    (r,) = [r for r in d["rows"] if r.get("soak")]
    expect(r["requests"] >= 1000 and r["left"] > 0, f"{SOAK}: not a soak of 1,000 requests with disconnects")
    verdict = "every request answered exactly once" if r["exactly_once"] else "NOT every request answered exactly once"
    return "\n".join([
        f"{r['requests']:,} requests of {r['prompt_tokens'][0]}–{r['prompt_tokens'][1]} prompt tokens and up to "
        f"{r['max_tokens']} new ones through {r['clients']} concurrent clients ({d['slots']} slots, {r['system']}); "
        f"half streamed, of which the client dropped {r['left']} after their first text. {r['ok']} answered 200 with "
        f"{r['unique_ids']} distinct completion ids; the server counted {r['server_answered']} answers (cancellations "
        f"included); {r['leaked']} slots or queue places were still held afterwards: {verdict}. Wall time "
        f"{r['wall_s']:.0f} s, TTFT p50 / p99 {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} s.", "",
        source_line(SOAK, d["provenance"])])


CACHED = "docs/bench/serve/docqa-qwen-32k-cached/serve.json"


@block("serve-docqa-cached")
def serve_docqa_cached(root: Path) -> str:
    """Questions over a document already in the prefix cache (`--warm`): their TTFT, and the document's own."""
    d = load_json(root, CACHED)
    expect(d.get("workload") == "docqa" and d.get("model") == "qwen2.5-coder-0.5b", f"{CACHED}: not Qwen's docqa")
    out = []
    for r in d["rows"]:
        expect(bool(r.get("warm")), f"{CACHED}: {r['system']} was not warmed (--warm)")
        cold = ", ".join(f"{w['ttft_s']:.0f}" for w in r["warm"])
        out.append([r["system"], "–".join(map(str, r["prompt_tokens"])), cold, f"{r['requests']} ({r['ok']})",
                    f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}", f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}",
                    f"{r['prefix_hit_rate']:.2f}"])
    return "\n".join(["Each document asked once first (its prefill alone: the cold TTFT), then the timed questions, "
                      "each finding its document in the prefix cache. One run:", "",
                      table(["system", "prompt tokens", "document's cold TTFT s", "questions (ok)",
                             "question TTFT p50 / p99 s", "inter-token p50 / p99 ms", "prefix hit rate"], out), "",
                      source_line(CACHED, d["provenance"])])


CHAT = ("docs/bench/serve/chat-smollm2/serve.json", "docs/bench/serve/chat-smollm2-llamacpp/serve.json")


@block("serve-chat")
def serve_chat(root: Path) -> str:
    """The chat workload through the openai client: ours (A²ATS and full attention) and llama.cpp's llama-server."""
    rows, srcs = _workload_rows(root, CHAT, "chat", "smollm2-135m")
    out = [[name, f"{r['requests']} ({r['ok']})", "–".join(map(str, r["prompt_tokens"])), f"{r['wall_s']:.0f}",
            f"{r['output_tokens_per_s']:.2f}", f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}",
            f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}", hit] for name, hit, r in rows]
    head = ["system", "turns (ok)", "prompt tokens", "wall s", "output tokens/s", "TTFT p50 / p99 s",
            "inter-token p50 / p99 ms", "prefix hit rate"]
    return "\n".join(["One run of each system (no repeats: no spread is known); llama-server right after ours, the "
                      "same conversations and start times.", "", table(head, out), ""] + paragraphs(srcs))
