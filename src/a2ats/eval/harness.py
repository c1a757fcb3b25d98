"""The accuracy harness: tasks x lengths x samples, every method and budget on the same prompts.

Each sample is prefilled once, densely; every method and budget decodes from a fork of that
prefill (:mod:`a2ats.eval.prefill`), so a full sweep costs one prefill per sample. Results are
written as JSONL (one row per sample, method and budget) as they come.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..calibrate import load_or_calibrate
from ..codebook import CodebookSettings
from ..config import A2ATSConfig
from ..generate import encode_prompt
from ..hf import A2ATS
from ..methods import A2ATSMethod, FullMethod, HybridMethod, Method, OracleMethod, PQCacheMethod, QuestMethod, StreamingMethod
from ..corpus import speeches
from ..rope import WRoPE, find_rotary_embedding
from . import tasks as T
from .attention_metrics import attention_mass
from .perplexity import continuation_perplexity
from .prefill import greedy_decode, prefill

METHODS = ("full", "oracle", "streaming", "quest", "pqcache", "a2ats", "a2ats-euclid", "a2ats-postrope", "a2ats-banded",
           "a2ats-hybrid")
PAPER_METHODS = METHODS[:-2]  # the evaluation issue's set: the paper's method, its ablations and the baselines
BAND_RATIO = 2.0  # a2ats-banded's ratio of band edges (distances 64-128, 128-256, ...)
HYBRID_SHARE = 0.5  # a2ats-hybrid: share of the budget chosen by the paper's score; "a2ats-hybrid0.75" sets another


def _hybrid_share(name: str) -> float | None:
    """The share in an ``a2ats-hybrid[SHARE]`` name, or None for any other name."""
    m = re.fullmatch(r"a2ats-hybrid(0?\.\d+|[01])?", name)
    return None if m is None else float(m.group(1) or HYBRID_SHARE)


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

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS and _hybrid_share(m) is None]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)} (a2ats-hybrid0.75: another share)")
        unknown = [t for t in self.tasks if t not in T.TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(T.TASKS)}")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets are fractions in (0, 1], got {self.budgets}")
        if self.samples < 1 or not self.lengths:
            raise ValueError("need at least one sample and one length")


PRESETS = {
    # small enough for CI on 2 cores: two short tasks, one length, few methods
    "quick": dict(tasks=("niah_single_number_essay", "niah_multikey"), lengths=(1024,), budgets=(0.05, 0.2),
                  methods=("full", "oracle", "streaming", "quest", "a2ats"), samples=1, centroids=256,
                  calibration={"text_tokens": 8192, "uuid_tokens": 2048, "max_iter": 5}, attention=True,
                  perplexity=True, decode_last=8, ppl_tokens=32),
    # the committed table: every task and method at 2K, 4K and 8K, budgets of about 1.5%, 3% and 6%;
    # one sample per task and length (27 prompts, ~2 h on 2 CPU cores): raise --samples for finer scores
    "standard": dict(tasks=tuple(T.TASKS), lengths=(2048, 4096, 8000), budgets=(0.015, 0.03, 0.06),
                     methods=PAPER_METHODS, samples=1, attention=True, perplexity=True),
}


def build_methods(names, model, tokenizer, cfg: EvalConfig, log: Callable = print) -> dict[str, Method]:
    """One instance per method name; codebooks are loaded from the cache or calibrated once."""
    rot = find_rotary_embedding(model)

    def codebook_method(**kw):
        settings = CodebookSettings(n_centroids=cfg.centroids, **{**cfg.calibration, **kw})
        cb = load_or_calibrate(model, tokenizer, settings=settings, log=log)
        return A2ATSMethod(cb, WRoPE(rot, settings.wrope_distance, settings.wrope_band_ratio))

    makers = {
        "full": FullMethod,
        "oracle": OracleMethod,
        "streaming": StreamingMethod,
        "quest": QuestMethod,
        "pqcache": PQCacheMethod,
        # the paper's method and its ablations: one fixed WRoPE distance, whatever the library's default
        "a2ats": lambda: codebook_method(wrope_band_ratio=None),
        "a2ats-euclid": lambda: codebook_method(query_aware=False, wrope_band_ratio=None),
        "a2ats-postrope": lambda: codebook_method(post_rope=True, wrope_band_ratio=None),
        "a2ats-banded": lambda: codebook_method(wrope_band_ratio=BAND_RATIO),
    }

    def hybrid(share):  # over the paper's codebook: one code per token serves both scorings
        settings = CodebookSettings(n_centroids=cfg.centroids, **{**cfg.calibration, "wrope_band_ratio": None})
        cb = load_or_calibrate(model, tokenizer, settings=settings, log=log)
        return HybridMethod(cb, rot, settings.wrope_distance, BAND_RATIO, share)

    def make(name):
        share = _hybrid_share(name)
        return makers[name]() if share is None else hybrid(share)

    return {n: make(n) for n in names}


def run(model, tokenizer, cfg: EvalConfig, out_dir: Path, progress: bool = True, log: Callable = print) -> list[dict]:
    """Run the sweep, appending rows to ``out_dir/results.jsonl``; returns all rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    methods = build_methods(cfg.methods, model, tokenizer, cfg, log)
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])} - {None}
    rows = []
    jobs = [(t, n, i) for n in cfg.lengths for t in cfg.tasks for i in range(cfg.samples)]
    with open(out_dir / "results.jsonl", "w") as f:

        def emit(row: dict) -> None:  # written as it comes: a long sweep keeps what it finished
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()

        for task, length, i in tqdm(jobs, desc="samples", disable=not progress):
            sample = T.generate(task, tokenizer, length, seed=cfg.seed + i)
            ids = encode_prompt(tokenizer, sample.prompt)
            if sample.answer_prefix:  # the model's turn starts with RULER's answer prefix
                prefix = tokenizer.encode(sample.answer_prefix, add_special_tokens=False)
                ids = torch.cat([ids, torch.tensor([prefix])], dim=1)
            t0 = time.perf_counter()
            pre = prefill(model, ids)
            prefill_s = time.perf_counter() - t0
            for name, method in methods.items():
                for budget in (1.0,) if name == "full" else cfg.budgets:
                    config = A2ATSConfig(budget=budget)
                    t0 = time.perf_counter()
                    with A2ATS(model, config=config, method=method) as a2:
                        toks = greedy_decode(model, a2, pre, sample.max_new_tokens, eos)
                    text = tokenizer.decode(toks, skip_special_tokens=True)
                    row = {
                        "task": task, "length": length, "context_tokens": int(ids.shape[1]), "seed": sample.seed,
                        "method": name, "budget": budget,
                        "budget_tokens": int(config.budget.tokens_for(torch.tensor([ids.shape[1]]))[0]),
                        "attended_per_kv_head": a2.stats.mean_attended, "attended_fraction": a2.stats.mean_fraction,
                        "score": T.score(sample, text), "output": text, "answers": list(sample.answers),
                        "decode_seconds": time.perf_counter() - t0, "prefill_seconds": prefill_s,
                    }
                    emit(row)
        for length in cfg.lengths if cfg.attention or cfg.perplexity else ():
            for row in _text_metrics(model, tokenizer, methods, cfg, length):
                emit(row)
    return rows


def held_out_ids(tokenizer, length: int) -> torch.Tensor:
    """``length`` tokens of State of the Union addresses of 1900-1930 (calibration reads the newest 60)."""
    text = "\n\n".join(speeches()[110:140])
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False)[:length])


def _text_metrics(model, tokenizer, methods, cfg: EvalConfig, length: int):
    """Attention mass and recall at the last positions, and continuation perplexity, on held-out prose."""
    ids = held_out_ids(tokenizer, length)
    pre_att = prefill(model, ids[: -cfg.decode_last]) if cfg.attention else None
    pre_ppl = prefill(model, ids[: -cfg.ppl_tokens]) if cfg.perplexity else None
    for name, method in methods.items():
        for budget in (1.0,) if name == "full" else cfg.budgets:
            config = A2ATSConfig(budget=budget)
            base = {"length": length, "method": name, "budget": budget, "context_tokens": length,
                    "budget_tokens": int(config.budget.tokens_for(torch.tensor([length]))[0])}
            if pre_att is not None:
                probe = attention_mass(model, method, config, ids, cfg.decode_last, pre=pre_att)
                per_layer = {layer: sum(v) / len(v) for layer, v in sorted(probe.mass.items())}
                yield {**base, "task": "attention", "mass": probe.mean(), "recall": probe.mean("recall"),
                       "mass_per_layer": per_layer}
            if pre_ppl is not None:
                with A2ATS(model, config=config, method=method) as a2:
                    ppl = continuation_perplexity(model, a2, pre_ppl, ids[-cfg.ppl_tokens :])
                yield {**base, "task": "perplexity", "perplexity": ppl}
