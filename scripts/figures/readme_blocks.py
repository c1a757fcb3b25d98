"""The README's headline results, from the sources the results pages read: accuracy and retrieval quality (the Qwen
suite) and decode speed (the speed machine)."""

from __future__ import annotations

from pathlib import Path

from blocks import block
from floor_blocks import QWEN_RUNS, RUNS
from formatting import k
from qwen_eval import (
    PAPER,
    QWEN,
    kib_per_step,
    library_default,
    qwen_rows,
    share_cell,
    task_cells,
)
from sources import load_json, machine_short, same_machine
from speed_sources import SPREAD, tie


@block("readme-results")
def readme_results(root: Path) -> str:
    from a2ats.eval.report import bootstrap

    default = library_default()
    rows, runs, config, left = qwen_rows(root)
    lengths = (4096, 8192, 16384)
    kept, needles = task_cells(rows, lengths)
    need = bootstrap(kept, needles)
    full = ("full", 1.0)
    k32, n32 = task_cells(rows, (32000,))
    r32 = bootstrap(k32, n32)
    n32p = len({(r["task"], r["seed"]) for r in k32 if r["method"] == "full"})
    att = {(r["method"], r["budget"], r["length"]): r for r in rows if r["task"] == "attention"}
    tl = tuple(config["text_lengths"])

    def mass(key):
        return " / ".join(f"{att[(*key, n)]['mass']:.3f}" for n in tl)

    def of_oracle(key):
        return " / ".join(f"{att[(*key, n)]['mass'] / att[('oracle', 0.03, n)]['mass']:.2f}" for n in tl)

    kib = " / ".join(f"{kib_per_step(kept, default, n):,.0f}" for n in lengths)
    kib_p = " / ".join(f"{kib_per_step(kept, PAPER, n):,.0f}" for n in lengths)
    more = " / ".join(f"{100 * (kib_per_step(kept, default, n) / kib_per_step(kept, PAPER, n) - 1):+.0f}%" for n in lengths)
    d = r32[default][32000]
    f32 = r32[full][32000]
    acc = (
        f"- **Accuracy** (Qwen2.5-Coder-0.5B-Instruct, {machine_short(runs[0])}; `{QWEN}`): on the six needle tasks the default selection scores "
        + " / ".join(f"{share_cell(need, default, n, '')}" for n in lengths)
        + f" of full attention's average at {' / '.join(k(n) for n in lengths)} (full attention's average ×100: "
        + " / ".join(f"{100 * need[full][n][0]:.1f}" for n in lengths)
        + f"; 95% bootstrap intervals); at 32K ({n32p} prompts on that machine) {100 * d[0]:.1f} against full "
        f"attention's {100 * f32[0]:.1f}, a share of {d[3]:.2f} [{d[4]:.2f}, {d[5]:.2f}]"
        + (", a tie" if d[4] <= 1 <= d[5] else "") + ". It reads "
        f"{kib} KiB per decode step on the {k(4096)} / {k(8192)} / {k(16384)} task prompts, against {kib_p} for "
        f"the paper's selection at ρ = 3% ({more}). [`docs/results.md`](docs/results.md#accuracy)")
    ret = (f"- **Retrieval quality** (same source): the default keeps {mass(default)} of the true attention mass on "
           f"held-out prose at {' / '.join(k(n) for n in tl)} ({of_oracle(default)} of the exact top-K's at ρ = 3%); "
           f"the paper's selection {mass(PAPER)} ({of_oracle(PAPER)}).")
    sp, provs = [], []
    for title, rel in (("SmolLM2-135M-Instruct", RUNS[0]), ("Qwen2.5-Coder-0.5B-Instruct", QWEN_RUNS[0])):
        d = load_json(root, rel)
        provs.append(d["provenance"])
        at = {(r["variant"], r["context"]): r["ms_per_token"] for r in d["rows"]}
        lengths_ = sorted(n for v, n in at if v == "a2ats-fast")
        llama = [n for n in lengths_ if ("llama.cpp-q8_0", n) in at]
        sp.append(f"{title}: " + ", ".join(f"{tie(at['llama.cpp-q8_0', n] / at['a2ats-fast', n])} at {k(n)}"
                                             for n in llama)
                  + " against llama.cpp; " + ", ".join(
                      f"{tie(at['dense-lean', n] / at['a2ats-fast', n])} at {k(n)}" for n in lengths_)
                  + " against dense")
    same_machine(*provs)
    speed = (f"- **Decode speed** (batch 1, {machine_short(provs[0])}, run {provs[0]['date'][:10]}; `{RUNS[0]}`, "
             f"`{QWEN_RUNS[0]}`): the default's speed over llama.cpp's (llama-bench built natively, Q8_0 from the "
             "same weights against our int8, in the same run) and over dense attention in the same engine: "
             + "; ".join(sp) + f". Within ±{100 * SPREAD:.0f}% (these machines' run-to-run spread) is a tie. "
             "[`docs/bench/speed`](docs/bench/speed/README.md#the-step-against-what-it-must-read-same-runs-measured-spread)")
    return "\n".join([acc, ret, speed, _serving(root)])


def _serving(root: Path) -> str:
    """The serving headline: 8 long sequences decoding together, against llama.cpp's batched decode."""
    from throughput_blocks import QWEN_BATCH, QWEN_OURS

    first, ours = load_json(root, QWEN_BATCH), load_json(root, QWEN_OURS)
    (llama,) = [r for r in first["rows"] if r["system"].startswith("llama.cpp")]
    at = {r["system"]: r for r in ours["rows"]}
    a2, full = at["a2ats-offload"], at["full-local"]
    return (f"- **Serving throughput** (Qwen2.5-Coder-0.5B-Instruct, {llama['batch']} sequences of {k(llama['context'])} "
            f"tokens decoding together, {machine_short(ours['provenance'])}; `{QWEN_OURS}`, `{QWEN_BATCH}`): the "
            f"default {a2['tokens_per_s']:.1f} tokens/s, {a2['tokens_per_s'] / llama['tokens_per_s']:.2f}x llama.cpp's "
            f"batched decode (llama-batched-bench built natively, Q8_0 from the same weights: "
            f"{llama['tokens_per_s']:.1f}) and {a2['tokens_per_s'] / full['tokens_per_s']:.2f}x full attention in the "
            f"same engine ({full['tokens_per_s']:.1f}); one run each. "
            "[`docs/bench/serve`](docs/bench/serve/README.md#decode-throughput-with-8-sequences-of-32k-tokens-qwen25-coder-05b)")
