"""The accuracy harness: tasks x lengths x samples, every method and budget on the same prompts.

Each sample is prefilled once, densely; every method and budget decodes from a fork of that
prefill (:mod:`a2ats.eval.prefill`), so a full sweep costs one prefill per sample. Results are
written as JSONL (one row per sample, method and budget) as they come, and a run started again on
the same folder skips every row already there (a sweep of hours survives an interruption).

Methods are named as :mod:`a2ats.methods.registry` names them; a ``+max`` suffix runs a method with the ``max``
GQA reduction (K per KV head) instead of the union.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from a2ats.assets.corpus import prompt_start, speeches
from a2ats.core.codebook import CodebookSettings
from a2ats.core.config import A2ATSConfig
from a2ats.core.support import check_context
from a2ats.eval import tasks as T
from a2ats.eval.cost import step_bytes
from a2ats.eval.prefill import greedy_decode, prefill
from a2ats.eval.text_metrics import continuation_metrics
from a2ats.hf import A2ATS
from a2ats.hf.calibrate import calibrate_missing, load_or_calibrate
from a2ats.hf.generate import encode_prompt
from a2ats.hf.precision import bf16_exact, bf16_weight_reads, parse_dtype
from a2ats.methods import Method, RerankMethod, registry
from a2ats.methods.registry import KNOWN, build_method, codebook_variant, parse_method
from a2ats.provenance import provenance

METHODS = registry.NAMES  # every method a preset runs, by its registry name
PAPER_METHODS = registry.names("reference", "ceiling", "window", "retrieval", "paper", "ablation")  # the paper's set
NEEDLE_TASKS = tuple(t for t in T.TASKS if t.startswith("niah_"))


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    budgets: tuple[float, ...]  # fractions of the context (reported in tokens too)
    samples: int = 1
    seed: int = 0
    centroids: int = 4096
    calibration: dict = field(default_factory=dict)  # overrides of CodebookSettings for every codebook
    attention: bool = False  # attention-level metrics (mass captured, recall of the true top-K) per method
    perplexity: bool = False  # perplexity of a continuation decoded under each method
    decode_last: int = 32  # positions the attention metrics are taken at
    ppl_tokens: int = 128  # continuation length for perplexity
    needle_lengths: tuple[int, ...] = ()  # lengths at which only the needle (niah_*) tasks run
    task_samples: dict = field(default_factory=dict)  # task -> samples, overriding ``samples``
    method_budgets: dict = field(default_factory=dict)  # method -> budgets, overriding ``budgets`` (e.g. equal bytes)
    # method -> budgets on the task samples only, overriding the two above there (``()`` skips the method on tasks);
    # the held-out prose metrics keep every run: they cost one prefill per length, the tasks one per prompt
    task_budgets: dict = field(default_factory=dict)
    text_lengths: tuple[int, ...] | None = None  # lengths of the text metrics (default: ``lengths``)
    prefill_dtype: str | None = None  # e.g. "bfloat16": prefills under autocast (decode stays in the model's dtype)
    early_stop: bool = True  # stop decoding once every expected answer is in the output (the score cannot change)
    bf16_weight_reads: bool = False  # decode steps read bf16 copies of fp32 weights that are bf16 values (same numbers)
    model: str = ""  # informative: the model the run used

    def __post_init__(self) -> None:
        bad = []
        for m in self.methods:
            try:
                parse_method(m)
            except ValueError:
                bad.append(m)
        if bad:
            raise ValueError(f"unknown methods {bad}; known: {KNOWN}")
        unknown = [t for t in (*self.tasks, *self.task_samples) if t not in T.TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(T.TASKS)}")
        extra = [b for d in (self.method_budgets, self.task_budgets) for bs in d.values() for b in bs]
        if any(not 0 < b <= 1 for b in (*self.budgets, *extra)):
            raise ValueError(f"budgets are fractions in (0, 1], got {self.budgets} {self.method_budgets or ''} "
                             f"{self.task_budgets or ''}")
        for name, d in (("method_budgets", self.method_budgets), ("task_budgets", self.task_budgets)):
            if set(d) - set(self.methods):
                raise ValueError(f"{name} names methods not in the run: {sorted(set(d) - set(self.methods))}")
        if self.samples < 1 or not (self.lengths or self.needle_lengths) or any(v < 0 for v in self.task_samples.values()):
            raise ValueError("need at least one sample and one length (task_samples may be 0 to skip a task)")
        parse_dtype(self.prefill_dtype)

    def samples_for(self, task: str) -> int:
        return self.task_samples.get(task, self.samples)

    def jobs(self) -> list[tuple[str, int, int]]:
        """(task, length, sample index), sample index outermost: a run stopped early has every cell alike."""
        cells = [(t, n) for n in self.lengths for t in self.tasks]
        cells += [(t, n) for n in self.needle_lengths for t in self.tasks if t in NEEDLE_TASKS]
        return [(t, n, i) for i in range(max([self.samples, *self.task_samples.values()])) for t, n in cells
                if i < self.samples_for(t)]

    def runs(self, tasks: bool = False) -> list[tuple[str, float]]:
        """(method name, budget) pairs the held-out prose is decoded with, or with ``tasks`` each task sample."""
        def budgets(m):
            if tasks and m in self.task_budgets:
                return ((1.0,) if self.task_budgets[m] else ()) if m == "full" else self.task_budgets[m]
            return (1.0,) if m == "full" else self.method_budgets.get(m, self.budgets)
        return [(m, b) for m in self.methods for b in budgets(m)]


# Fields whose change makes old rows incomparable with new ones (the others only add rows).
_RESULT_FIELDS = ("seed", "centroids", "calibration", "decode_last", "ppl_tokens", "prefill_dtype", "model",
                  "bf16_weight_reads")

PRESETS = {
    # small enough for CI on 2 cores: two short tasks, one length, few methods
    "quick": dict(tasks=("niah_single_number_essay", "niah_multikey"), lengths=(1024,), budgets=(0.05, 0.2),
                  methods=("full", "oracle", "streaming", "quest", "a2ats", "a2ats-banded", "a2ats-banded+max"),
                  samples=1, centroids=256,
                  calibration={"text_tokens": 8192, "uuid_tokens": 2048, "max_iter": 5}, attention=True,
                  perplexity=True, decode_last=8, ppl_tokens=32),
    # the first committed table (SmolLM2-135M): every task and method at 2K, 4K and 8K, budgets of about 1.5%,
    # 3% and 6%; one sample per task and length (27 prompts, ~2 h on 2 CPU cores): raise --samples for finer scores
    "standard": dict(tasks=tuple(T.TASKS), lengths=(2048, 4096, 8000), budgets=(0.015, 0.03, 0.06),
                     methods=PAPER_METHODS, samples=1, attention=True, perplexity=True),
    # long context on a model that uses it (Qwen2.5-Coder-0.5B, 32K): every task at 4K, 8K and 16K, the needle
    # tasks at 32K too; every method, and the max GQA reduction at the paper's budget and at the union's bytes
    # (rho = 3% with GQA 7 reads ~10% of each KV head's rows); prefills in bf16, decode in fp32 (weights read as
    # the bf16 values they are); docs/eval/qwen has the time plan
    "long": dict(tasks=tuple(T.TASKS), lengths=(4096, 8192, 16384), needle_lengths=(32000,),
                 budgets=(0.015, 0.03, 0.06), methods=(*METHODS, "a2ats+max", "a2ats-banded+max"),
                 method_budgets={"a2ats+max": (0.03, 0.1), "a2ats-banded+max": (0.1,)}, samples=4,
                 # the plan's second cut (10 h -> ~6 h): on the task samples, the budget sweep for the candidate
                 # defaults only, the baselines at the paper's budget and the two ablations (settled on the prose)
                 # not at all; every run keeps its budgets on the prose
                 task_budgets={"a2ats-euclid": (), "a2ats-postrope": (), **{m: (0.03,) for m in
                               ("oracle", "streaming", "quest", "pqcache", "a2ats-hybrid")}},
                 task_samples={"variable_tracking": 2, "common_words": 1, "frequent_words": 1},  # failed by full: cut first
                 attention=True, perplexity=True, text_lengths=(4096, 16384, 32768), decode_last=32, ppl_tokens=64,
                 prefill_dtype="bfloat16", bf16_weight_reads=True),
}


def build_methods(names, model, tokenizer, cfg: EvalConfig, log: Callable = print) -> dict[str, Method]:
    """One instance per method (the ``+max`` variants share their base's). Every codebook the run needs is
    calibrated up front, forward passes shared where codebooks can share one, and cached."""
    dtype = parse_dtype(cfg.prefill_dtype)  # calibration forwards run like the prefills
    bases = list(dict.fromkeys(parse_method(n)[0] for n in names))

    def settings(base):
        return CodebookSettings(n_centroids=cfg.centroids, **{**cfg.calibration, **codebook_variant(base)})

    calibrate_missing(model, tokenizer, [settings(b) for b in bases if codebook_variant(b) is not None], dtype, log)
    built: dict[str, Method] = {}
    for base in bases:
        cb = None if codebook_variant(base) is None else load_or_calibrate(
            model, tokenizer, settings=settings(base), log=log, compute_dtype=dtype)
        built[base] = build_method(base, model, cb)
    return {name: built[parse_method(name)[0]] for name in names}


def _head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _bytes(name: str, context: int, attended: float, head_dim: int, method: Method | None = None) -> float:
    """Bytes one decode step reads per sequence and KV head (scoring + attended K/V; a shared codebook apart)."""
    shortlist = _shortlisted(method)
    b = step_bytes(parse_method(name)[0], context, attended, head_dim, shortlist=shortlist)
    return b.scoring + b.attended


def _shortlisted(method) -> float:
    """Mean shortlist rows per KV head a re-rank read its keys for since :func:`_reset`; 0 for other methods."""
    if not isinstance(method, RerankMethod) or not method.shortlisted:
        return 0.0
    return sum(method.shortlisted) / len(method.shortlisted)


def _reset(method) -> Method:
    if isinstance(method, RerankMethod):
        method.shortlisted.clear()
    return method


def _row_key(r: dict) -> tuple:
    return r["task"], r["length"], r.get("seed"), r["method"], r["budget"]


def _load_done(out_dir: Path, cfg: EvalConfig, log: Callable) -> list[dict]:
    """Rows of an earlier run in ``out_dir`` that this config would produce again (resume), or []."""
    results, conf = out_dir / "results.jsonl", out_dir / "config.json"
    if not results.is_file() or not conf.is_file():
        return []
    old = json.loads(conf.read_text())
    diffs = [k for k in _RESULT_FIELDS if old.get(k, asdict(cfg)[k]) != asdict(cfg)[k]]
    if diffs:
        raise ValueError(f"{out_dir} holds a run with other {', '.join(diffs)}: give another --out, or remove it to start over")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    log(f"resuming: {len(rows)} rows already in {results}")
    return rows


def run(model, tokenizer, cfg: EvalConfig, out_dir: Path, progress: bool = True, log: Callable = print,
        only: str | None = None) -> list[dict]:
    """Run the sweep, appending rows to ``out_dir/results.jsonl`` (skipping rows already there); returns all rows.
    ``only``: ``"tasks"`` (the task samples) or ``"text"`` (the held-out prose metrics), a long run done in parts on
    one folder (its rows are keyed alike, so the parts resume each other)."""
    if only not in (None, "tasks", "text"):
        raise ValueError(f"only must be 'tasks' or 'text', got {only!r}")
    if only == "text" and not (cfg.attention or cfg.perplexity):
        raise ValueError("only the held-out prose metrics, but this run measures none (attention/perplexity off)")
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((*cfg.lengths, *cfg.needle_lengths))
    if limit and longest + 256 > limit:  # prompt + chat template + answer prefix + answer must fit
        raise ValueError(f"tasks of {longest} tokens leave no room for the answer in the model's {limit} positions: "
                         f"use lengths of at most {limit - 256}")
    if cfg.bf16_weight_reads and not bf16_exact(model):
        raise ValueError("bf16_weight_reads reads bf16 copies of the weights, but this model's weights are not all bf16 "
                         "values: the copies would change the model; run without it")
    rows = _load_done(out_dir, cfg, log)
    done = {_row_key(r) for r in rows}
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    record_run(out_dir, {**asdict(cfg), "only": only}, first_row=len(rows))
    with bf16_weight_reads(model) if cfg.bf16_weight_reads else contextlib.nullcontext():
        _sweep(model, tokenizer, cfg, out_dir, rows, done, progress, log, only)
    return rows


def record_run(out_dir: Path, settings: dict, first_row: int) -> None:
    """Append this run's provenance to ``out_dir/provenance.json`` (``{"runs": [...]}``): a results file is often
    written in parts, resumed on other days or machines, so each part records what produced it and the first row
    of ``results.jsonl`` it wrote (its rows run to the next part's ``first_row``)."""
    path = out_dir / "provenance.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs.append({"first_row": first_row, **provenance(settings)})
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


def _sweep(model, tokenizer, cfg: EvalConfig, out_dir: Path, rows: list, done: set, progress: bool, log: Callable,
           only: str | None = None):
    """The task samples (one prefill each, every method and budget decoded from it), then the text metrics."""
    # build (and calibrate for) only the methods this part still decodes with
    needed = set()
    if only != "text":
        needed |= {m for m, _ in cfg.runs(tasks=True)}
    if (cfg.attention or cfg.perplexity) and only != "tasks":
        needed |= {m for n in _text_lengths(cfg) for m, _ in _text_todo(cfg, n, done)}
    methods = build_methods([m for m in cfg.methods if m in needed], model, tokenizer, cfg, log)
    dtype = parse_dtype(cfg.prefill_dtype)
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])} - {None}
    with open(out_dir / "results.jsonl", "a") as f:

        def emit(row: dict) -> None:  # written as it comes: a long sweep keeps what it finished
            rows.append(row)
            done.add(_row_key(row))
            f.write(json.dumps(row) + "\n")
            f.flush()

        for task, length, i in tqdm(cfg.jobs() if only != "text" else [], desc="samples", disable=not progress):
            sample = T.generate(task, tokenizer, length, seed=cfg.seed + i)
            todo = [(m, b) for m, b in cfg.runs(tasks=True) if (task, length, sample.seed, m, b) not in done]
            if not todo:
                continue
            ids = encode_prompt(tokenizer, sample.prompt)
            if sample.answer_prefix:  # the model's turn starts with RULER's answer prefix
                prefix = tokenizer.encode(sample.answer_prefix, add_special_tokens=False)
                ids = torch.cat([ids, torch.tensor([prefix])], dim=1)
            check_context(model, ids.shape[1], sample.max_new_tokens)
            t0 = time.perf_counter()
            pre = prefill(model, ids, dtype)
            prefill_s = time.perf_counter() - t0

            def answered(toks: list[int]) -> bool:
                return T.score(sample, tokenizer.decode(toks, skip_special_tokens=True)) == 1.0

            for name, budget in todo:
                base, reduction = parse_method(name)
                config = A2ATSConfig(budget=budget, reduction=reduction)
                t0 = time.perf_counter()
                with A2ATS(model, config=config, method=_reset(methods[name])) as a2:
                    toks, stop = greedy_decode(model, a2, pre, sample.max_new_tokens, eos,
                                               answered if cfg.early_stop else None)
                text = tokenizer.decode(toks, skip_special_tokens=True)
                emit({
                    "task": task, "length": length, "context_tokens": int(ids.shape[1]), "seed": sample.seed,
                    "method": name, "budget": budget,
                    "budget_tokens": int(config.budget.tokens_for(torch.tensor([ids.shape[1]]))[0]),
                    "attended_per_kv_head": a2.stats.mean_attended, "attended_fraction": a2.stats.mean_fraction,
                    "bytes_per_step": _bytes(name, int(ids.shape[1]), a2.stats.mean_attended, _head_dim(model),
                                             methods[name]),
                    "score": T.score(sample, text), "output": text, "answers": list(sample.answers),
                    "new_tokens": len(toks), "stop": stop, "path": a2.path,
                    "decode_seconds": time.perf_counter() - t0, "prefill_seconds": prefill_s,
                })
            del pre
        if (cfg.attention or cfg.perplexity) and only != "tasks":
            for length in _text_lengths(cfg):
                for row in _text_metrics(model, tokenizer, methods, cfg, length, done):
                    emit(row)


def held_out_ids(tokenizer, length: int) -> torch.Tensor:
    """``length`` tokens: the token real prompts start with (the attention sink), then State of the Union addresses
    of 1900-1930 (calibration reads the newest 60)."""
    text = "\n\n".join(speeches()[110:140])
    start = prompt_start(tokenizer)
    return torch.tensor(start + tokenizer.encode(text, add_special_tokens=False)[: length - len(start)])


def _text_lengths(cfg: EvalConfig) -> tuple[int, ...]:
    return cfg.text_lengths or cfg.lengths or cfg.needle_lengths


def _text_todo(cfg: EvalConfig, length: int, done: set) -> list[tuple[str, float]]:
    """The (method, budget) runs of the prose metrics at ``length`` with a row still missing."""
    kinds = [k for k, on in (("attention", cfg.attention), ("perplexity", cfg.perplexity)) if on]
    return [(m, b) for m, b in cfg.runs() if any((k, length, None, m, b) not in done for k in kinds)]


def _text_metrics(model, tokenizer, methods, cfg: EvalConfig, length: int, done: set):
    """On held-out prose: each method teacher-forces one continuation after a shared prefill; its perplexity over
    ``ppl_tokens`` tokens and the attention mass and top-K recall at the first ``decode_last`` of them."""
    todo = _text_todo(cfg, length, done)
    if not todo:
        return
    tail = max(cfg.decode_last if cfg.attention else 0, cfg.ppl_tokens if cfg.perplexity else 0)
    ids = held_out_ids(tokenizer, length)
    pre = prefill(model, ids[:-tail], parse_dtype(cfg.prefill_dtype))
    for name, budget in todo:
        config = A2ATSConfig(budget=budget, reduction=parse_method(name)[1])
        base = {"length": length, "method": name, "budget": budget, "context_tokens": length,
                "budget_tokens": int(config.budget.tokens_for(torch.tensor([length]))[0])}
        t0 = time.perf_counter()
        ppl, probe = continuation_metrics(model, _reset(methods[name]), config, pre, ids[-tail:],
                                          cfg.decode_last if cfg.attention else 0)
        base["seconds"] = time.perf_counter() - t0  # one pass gives both rows: counted on the first
        if cfg.attention:
            per_layer = {layer: sum(v) / len(v) for layer, v in sorted(probe.mass.items())}
            yield {**base, "task": "attention", "mass": probe.mean(), "recall": probe.mean("recall"),
                   "attended_per_kv_head": probe.mean("attended"), "mass_per_layer": per_layer,
                   "bytes_per_step": _bytes(name, length, probe.mean("attended"), _head_dim(model), methods[name])}
        if cfg.perplexity:
            yield {**base, "task": "perplexity", "perplexity": ppl, "tokens": tail,
                   "seconds": 0.0 if cfg.attention else base["seconds"]}
