"""The Qwen2.5-Coder-0.5B evaluation blocks: the task suite, the 32K needles, held-out prose, long generation and the
calibration recipes."""

from __future__ import annotations

from pathlib import Path

from blocks import block, expect
from formatting import k, table
from qwen_eval import (
    BANDED_UNION,
    PAPER,
    QWEN,
    QWEN_METHODS,
    kib_per_step,
    library_default,
    qwen_rows,
    qwen_source,
    share_cell,
    task_cells,
)
from sources import load_eval, load_json, machine_of, same_machine, source_line


@block("qwen-tasks")
def qwen_tasks(root: Path) -> str:
    from a2ats.eval.report import _spread, bootstrap

    default = library_default()
    rows, runs, config, _ = qwen_rows(root)
    lengths = (4096, 8192, 16384)
    expect(tuple(config["lengths"]) == lengths, f"{QWEN}/config.json: lengths {config['lengths']}")
    expect(config["samples"] == 4 and config["task_samples"] == {"variable_tracking": 2, "common_words": 1,
                                                                  "frequent_words": 1},
           f"{QWEN}/config.json: samples {config['samples']}, {config['task_samples']}")
    kept, needles = task_cells(rows, lengths)
    prompts = {n: len({(r["task"], r["seed"]) for r in kept if r["length"] == n and r["method"] == "full"})
               for n in lengths}
    need, suite = bootstrap(kept, needles), bootstrap(kept)
    full = ("full", 1.0)
    head = ["selection"] + [f"needles {k(n)}" for n in lengths] + [f"suite {k(n)}" for n in lengths] + \
           [f"KiB/step {k(n)}" for n in lengths]
    out = [["full attention (average score ×100)"] + [f"{100 * need[full][n][0]:.1f}" for n in lengths]
           + [f"{100 * suite[full][n][0]:.1f}" for n in lengths] + [f"{kib_per_step(kept, full, n):,.0f}" for n in lengths]]
    for key, label in QWEN_METHODS:
        key = key or default
        expect(key in need, f"{QWEN}: no task rows of {key}")
        out.append([label] + [share_cell(need, key, n, _spread(kept, needles, n)) for n in lengths]
                   + [share_cell(suite, key, n, _spread(kept, None, n)) for n in lengths]
                   + [f"{kib_per_step(kept, key, n):,.0f}" for n in lengths])
    used = sorted({r["_run"] for r in kept})
    return "\n".join([
        "Share of full attention's average score on the same prompts, with its 95% bootstrap interval over prompts "
        "(overlapping intervals are ties), and the bytes read per decode step per sequence and KV head (K and V rows "
        "attended plus what the method scores from), mean over the prompts. Prompts per length: "
        + ", ".join(f"{prompts[n]} at {k(n)}" for n in lengths)
        + " (the six needle tasks ×4, variable tracking ×2, the two word tasks ×1: † marks an interval that cannot "
          "resample those). Model: Qwen2.5-Coder-0.5B-Instruct, bf16 prefill, fp32 decode.", "",
        table(head, out), "", qwen_source(root, runs, used)])


@block("qwen-needles-32k")
def qwen_needles_32k(root: Path) -> str:
    from a2ats.eval.report import bootstrap

    default = library_default()
    rows, runs, config, left = qwen_rows(root)
    expect(config.get("needle_lengths") == [32000], f"{QWEN}/config.json: needle_lengths {config.get('needle_lengths')}")
    kept, needles = task_cells(rows, (32000,))
    res = bootstrap(kept, needles)
    full = ("full", 1.0)
    n_prompts = len({(r["task"], r["seed"]) for r in kept if r["method"] == "full"})
    out = [["full attention (average score ×100)", f"{100 * res[full][32000][0]:.1f}", "", f"{kib_per_step(kept, full, 32000):,.0f}"]]
    for key, label in QWEN_METHODS:
        key = key or default
        v = res[key][32000]
        out.append([label, f"{100 * v[0]:.1f}", f"{v[3]:.2f} [{v[4]:.2f}, {v[5]:.2f}]", f"{kib_per_step(kept, key, 32000):,.0f}"])
    all_rows, _, _ = load_eval(root, QWEN)
    other = sorted({(r["task"], r["seed"]) for r in all_rows if r["_run"] in left and r.get("length") == 32000})
    note = ""
    if other:
        note = (f" The file holds {len(other)} more 32K prompts ("
                + ", ".join(f"{t} sample {s}" for t, s in other)
                + ") written on another machine with codebooks calibrated there (its run record: "
                  f"{machine_of(runs[left[-1]])}); they are left out so that the table comes from one machine.")
    used = sorted({r["_run"] for r in kept})
    return "\n".join([
        f"The six needle tasks at 32,000 tokens, {n_prompts} prompts: average score ×100, share of full attention's "
        f"on the same prompts [95% bootstrap interval], bytes per decode step (KiB, per sequence and KV head)." + note,
        "", table(["selection", "needles ×100", "share of full", "KiB/step"], out), "",
        qwen_source(root, runs, used)])


@block("qwen-prose")
def qwen_prose(root: Path) -> str:
    default = library_default()
    rows, runs, config, _ = qwen_rows(root)
    lengths = tuple(config["text_lengths"])
    expect(lengths == (4096, 16384, 32768), f"{QWEN}/config.json: text_lengths {lengths}")
    att = {(r["method"], r["budget"], r["length"]): r for r in rows if r["task"] == "attention"}
    ppl = {(r["method"], r["budget"], r["length"]): r["perplexity"] for r in rows if r["task"] == "perplexity"}
    methods = [(default, "default: banded WRoPE, max reduction, 10% per KV head"),
               (BANDED_UNION, "banded WRoPE, GQA union, ρ = 3%"),
               (PAPER, "the paper's A²ATS (GQA union, ρ = 3%)"),
               (("a2ats+max", 0.1), "the paper's scoring, max reduction, 10% per KV head"),
               (("oracle", 0.03), "oracle (exact top-K, reads every key), ρ = 3%"),
               (("quest", 0.03), "Quest, ρ = 3%"), (("pqcache", 0.03), "PQCache, ρ = 3%"),
               (("streaming", 0.03), "StreamingLLM (sinks + recent), ρ = 3%"), (("full", 1.0), "full attention")]
    out = []
    for (m, b), label in methods:
        cells = []
        for n in lengths:
            a = att.get((m, b, n))
            o = att.get(("oracle", 0.03, n))
            expect(a is not None and o is not None, f"{QWEN}: no attention row of {m}@{b} or the oracle at {n}")
            cells.append(f"{a['mass']:.3f} ({a['mass'] / o['mass']:.2f})")
        cells += [f"{att[(m, b, n)]['bytes_per_step'] / 1024:,.0f}" for n in lengths]
        cells += [f"{ppl[(m, b, n)]:.1f}" for n in lengths]
        out.append([label] + cells)
    head = (["selection"] + [f"mass {k(n)} (of oracle's)" for n in lengths] + [f"KiB/step {k(n)}" for n in lengths]
            + [f"ppl {k(n)}" for n in lengths])
    used = sorted({r["_run"] for r in rows if r["task"] in ("attention", "perplexity")})
    return "\n".join([
        f"Held-out State of the Union prose behind the chat template's first token: the share of each query head's "
        f"true attention mass its KV head's selection keeps (mean over {config['decode_last']} positions, every layer "
        f"and head; in brackets, that share over the oracle's at ρ = 3%), the bytes read per decode step (KiB, per "
        f"sequence and KV head), and the perplexity of a {config['ppl_tokens']}-token continuation decoded under each "
        f"selection (one continuation per length, a different passage at each: compare within a column).", "",
        table(head, out), "", qwen_source(root, runs, used)])


LONG_GEN = "docs/eval/qwen/long_generation"


def _long_gen_rows(d: dict, label: str) -> tuple[list[str], list[list[str]]]:
    blocks = [0, 3, 7, 11, 15]
    expect(len(d["mass_per_block"]) == 16 and d["block"] == 64, "long generation: not 16 blocks of 64 tokens")
    cols = [f"{b * 64 + 1}–{(b + 1) * 64}" for b in blocks]
    return cols, [
        [f"{label}: mass kept"] + [f"{d['mass_per_block'][b]:.3f}" for b in blocks],
        [f"{label}: the oracle's mass, same budget"] + [f"{d['oracle_mass_per_block'][b]:.3f}" for b in blocks],
        [f"{label}: recall of the true top-K"] + [f"{d['recall_per_block'][b]:.3f}" for b in blocks],
    ]


def _long_gen_source(root: Path, rel: str, want: dict) -> tuple[dict, str]:
    d = load_json(root, rel)
    for key, value in want.items():
        expect(d.get(key) == value, f"{rel}: {key} is {d.get(key)!r}, the block claims {value!r}")
    expect(d.get("model", "qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b", f"{rel}: model {d.get('model')}")
    return d, source_line(rel, d["provenance"])


@block("qwen-long-generation")
def qwen_long_generation(root: Path) -> str:
    paper, s1 = _long_gen_source(root, f"{LONG_GEN}/long_generation.json",
                                 {"budget": 0.03, "reduction": "union", "wrope_band_ratio": None, "new_tokens": 1024})
    banded, s2 = _long_gen_source(root, f"{LONG_GEN}/banded/long_generation.json",
                                  {"budget": 0.03, "reduction": "union", "wrope_band_ratio": 2.0, "new_tokens": 1024})
    same_machine(paper["provenance"], banded["provenance"])
    cols, a = _long_gen_rows(paper, "the paper's (ρ = 3%, union)")
    _, b = _long_gen_rows(banded, "banded WRoPE (ρ = 3%, union)")
    return "\n".join([
        f"A {paper['prompt_tokens']:,}-token prompt of Python standard-library code and a request for a unit-test "
        f"suite, {paper['new_tokens']:,} tokens generated greedily; per block of generated tokens, mean over steps, "
        "layers and heads:", "", table(["generated tokens"] + cols, a + b), "", s1, "", s2])


@block("qwen-long-generation-default")
def qwen_long_generation_default(root: Path) -> str:
    library_default()
    d, s = _long_gen_source(root, f"{LONG_GEN}/default/long_generation.json",
                            {"budget": 0.1, "reduction": "max", "wrope_band_ratio": 2.0, "new_tokens": 1024})
    cols, rows = _long_gen_rows(d, "default (banded, max, 10% per KV head)")
    return "\n".join(["The same prompt under the library's default selection (its oracle: the true top-10% per KV "
                      "head):", "", table(["generated tokens"] + cols, rows), "", s])


@block("qwen-calibration")
def qwen_calibration(root: Path) -> str:
    rel = "docs/eval/qwen/calibration/calibration.json"
    d = load_json(root, rel)
    expect(d.get("model") == "qwen2.5-coder-0.5b", f"{rel}: model {d.get('model')}")
    expect(set(d["calibration"]) == {"2k", "2k+sink", "16k+sink"}, f"{rel}: recipes {sorted(d['calibration'])}")
    cells = {(r["recipe"], r["length"], r["budget"]): r["mass"] for r in d["rows"]}
    lengths = sorted({r["length"] for r in d["rows"]})
    budgets = sorted({r["budget"] for r in d["rows"]})
    head = ["recipe"] + [f"{k(n)} ρ = {100 * b:g}%" for n in lengths for b in budgets]
    names = {"oracle": "oracle (exact top-K)", "2k": "2K-token chunks", "2k+sink": "2K-token chunks + sink token",
             "16k+sink": "16K-token sequences + sink token (the default recipe then)"}
    out = [[names[r]] + [f"{cells[(r, n, b)]:.3f}" for n in lengths for b in budgets]
           for r in ("oracle", "2k", "2k+sink", "16k+sink")]
    return "\n".join(["Attention mass kept on held-out prose by the paper's selection (single WRoPE distance, GQA "
                      "union) with each recipe's codebooks:", "", table(head, out), "", source_line(rel, d["provenance"])])


SEQ8K = "docs/eval/qwen/calibration/seq8k"


@block("qwen-calibration-8k-tasks")
def qwen_calibration_8k_tasks(root: Path) -> str:
    """The default selection's task scores at 8K with codebooks from 8K calibration sequences (the default since)
    against the suite's, from 16K sequences, on the same prompts: the needle and suite shares of full attention."""
    from a2ats.eval.report import _spread, bootstrap

    default = library_default()
    rows, runs, config = load_eval(root, SEQ8K)
    expect(config.get("model") == "qwen2.5-coder-0.5b" and tuple(config["lengths"]) == (8192,),
           f"{SEQ8K}/config.json: model {config.get('model')}, lengths {config.get('lengths')}")
    new = [r for r in rows if "score" in r and (r["method"], r["budget"]) == default]
    expect(len(new) == 28, f"{SEQ8K}: {len(new)} task rows of the default, expected 28")
    suite, suite_runs, _, _ = qwen_rows(root)
    prompts = {(r["task"], r["seed"]) for r in new}
    before = [r for r in suite if "score" in r and r["length"] == 8192 and (r["task"], r["seed"]) in prompts
              and ((r["method"], r["budget"]) == default or r["method"] == "full")]
    label = "8K sequences"
    rows = before + [{**r, "method": f"{default[0]} ({label})"} for r in new]
    needles = {r["task"] for r in rows if r["task"].startswith("niah_")}
    need, allt = bootstrap(rows, needles), bootstrap(rows)
    full = ("full", 1.0)
    out = [["full attention (average score ×100)", f"{100 * need[full][8192][0]:.1f}", f"{100 * allt[full][8192][0]:.1f}"]]
    for key, name in [(default, "16K calibration sequences (the suite's codebooks, before)"),
                      ((f"{default[0]} ({label})", default[1]), "8K calibration sequences (the default now)")]:
        out.append([name, share_cell(need, key, 8192, _spread(rows, needles, 8192)),
                    share_cell(allt, key, 8192, _spread(rows, None, 8192))])
    used = sorted({r["_run"] for r in before})
    expect("AMD EPYC" in machine_of(runs[0]), f"{SEQ8K}: run on {machine_of(runs[0])}, the suite's rows on the AMD EPYC")
    return "\n".join([
        "The default selection (banded WRoPE, max reduction, 10% per KV head) on the 8K task prompts, with codebooks "
        "calibrated on 16K and on 8K sequences: share of full attention's average score on the same 28 prompts, with "
        "its 95% bootstrap interval (paired over prompts; † marks an interval that cannot resample the one-sample "
        "tasks):", "", table(["codebooks", "needles 8K", "suite 8K"], out), "",
        f"Sources: `{SEQ8K}/results.jsonl` (run {runs[0]['date'][:10]}, commit {runs[0]['commit'][:12]}; machine: "
        f"{machine_of(runs[0])}; command: `{worktree_command(runs[0]['command'])}`, run from a clean checkout of that "
        "commit) and, for full attention and the 16K codebooks, " + qwen_source(root, suite_runs, used).replace("Source: ", "", 1)])


def worktree_command(command: str) -> str:
    """A recorded command run from a checkout elsewhere, as it reads from the repository root."""
    import re

    command = re.sub(r"^\S*/src/a2ats/__main__\.py ", "a2ats ", command)
    return re.sub(r"(?<=\s)/\S*?/(?=docs/)", "", command)
