"""The options the commands share, and what they build: the model (``--model``, ``--dtype``, ``--device``), the
selection (:class:`~a2ats.core.config.A2ATSConfig`), the codebooks (:class:`~a2ats.core.codebook.CodebookSettings`)
and what runs them (path, runtime, weights). A command adds only the groups it uses.

A flag left out is None and the dataclass's own default applies (the help reads it from there), so no default is
written twice; every value is checked by the dataclass that holds it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from a2ats import factory
from a2ats.assets import models
from a2ats.core.codebook import Codebooks, CodebookSettings
from a2ats.core.config import DEFAULT_BAND_RATIO, DEFAULT_BUDGETS, A2ATSConfig, Budget
from a2ats.hf import tp
from a2ats.hf.calibrate import check_writable, load_or_calibrate, names_file
from a2ats.hf.precision import parse_dtype
from a2ats.methods.registry import build_method
from a2ats.runtime.model import DECODE_WEIGHTS
from a2ats.runtime.settings import PREFILL_BUDGET, PREFILL_STALL, PREFILL_STEP_SECONDS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNTIME_OPTIONS = ("path", "runtime", "decode_weights", "prefill_dtype")

quiet = False  # a torchrun rank other than 0: rank 0 alone prints (every rank computes the same tokens)


def log(msg: str) -> None:
    if not quiet:
        print(f"[a2ats] {msg}", file=sys.stderr, flush=True)


def csv(kind):
    """An argparse type: comma-separated values of ``kind``."""
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def budget(text: str) -> Budget:
    try:
        return Budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Refused(argparse.Action):
    def __init__(self, option_strings, dest, why: str, **kw):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.why}")


def refuse(p: argparse.ArgumentParser, flag: str, why: str) -> None:
    """``flag`` is a usage error on this command, saying ``why`` and what to do instead: a flag other commands take
    is refused by name rather than accepted and ignored."""
    p.add_argument(flag, action=_Refused, why=why)


# -- the groups ------------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"a named model ({models.DEFAULT_MODEL}, the default; {models.EVAL_MODEL}, 32K "
                                   "context) or a local Hugging Face checkpoint folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32: fastest on CPUs here)")
    p.add_argument("--device", default="cpu")


def add_selection_args(p: argparse.ArgumentParser, paper_default: bool = False) -> None:
    """``--budget --reduction --sinks --window``: the A2ATSConfig fields (``paper_default``: left out, the command
    models the paper's design instead of the library's default)."""
    default = ("the paper's design: 0.03 per query head, union" if paper_default else
               f"{DEFAULT_BUDGETS['max']:g} with max, the paper's {DEFAULT_BUDGETS['union']:g} with union")
    p.add_argument("--budget", type=budget, default=None,
                   help="0.1 = 10%% of the context per KV head (max) or per query head (union); 512 = 512 tokens; "
                        f"1.0 = all (default: {default})")
    p.add_argument("--reduction", choices=["max", "union"], default=None,
                   help="GQA: max, one top-K per KV head by the max of its heads' scores, or union, the union of each "
                        f"query head's top-K (the paper's); default: {'union' if paper_default else A2ATSConfig.reduction}")
    p.add_argument("--sinks", type=int, default=None, help=f"first tokens always attended (default {A2ATSConfig.sinks})")
    p.add_argument("--window", type=int, default=None,
                   help=f"last tokens always attended, the current one included (default {A2ATSConfig.window})")


def add_codebook_args(p: argparse.ArgumentParser, file: bool = True) -> None:
    """The CodebookSettings fields (``file``: and ``--codebooks``, where to find or cache them)."""
    if file:
        p.add_argument("--codebooks", help="codebook file, or folder holding one (default: the user cache; built on first use)")
    s = CodebookSettings
    p.add_argument("--centroids", type=int, default=None, help=f"centroids per layer per KV head (default {s.n_centroids}, the paper's)")
    p.add_argument("--wrope-distance", type=int, default=None, help=f"WRoPE distance b (default {s.wrope_distance}, the paper's)")
    p.add_argument("--wrope-bands", type=float, default=None, metavar="RATIO",
                   help="banded WRoPE: score each geometric band of distances, ratio RATIO, at its own distance "
                        f"(default {DEFAULT_BAND_RATIO:g}, the library's selection); 0: the paper's single distance b")
    p.add_argument("--text-tokens", type=int, default=None, help=f"calibration prose tokens (default {s.text_tokens}; paper: ~64K)")
    p.add_argument("--uuid-tokens", type=int, default=None, help=f"calibration UUID-string tokens (default {s.uuid_tokens}; paper: ~16K)")
    p.add_argument("--max-iter", type=int, default=None, help=f"Lloyd iterations at most (default {s.max_iter}; paper: 300; see README)")
    p.add_argument("--kmeans-neighbours", type=int, default=None, metavar="M",
                   help=f"Lloyd's middle passes search each key's centroid's M nearest centroids (default "
                        f"{s.kmeans_neighbours}); 0: every pass searches all")
    p.add_argument("--euclidean", action="store_true", help="plain k-means on pre-RoPE keys (ablation), not query-aware")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="calibration sequence length in tokens (default: a quarter of the model's context, 2K to 16K; "
                        "capped at the context)")
    p.add_argument("--no-sink-prefix", action="store_true",
                   help="calibration sequences without the token real prompts start with (2K sequences without it: "
                        "--calib-seq-len 2048 --no-sink-prefix)")
    p.add_argument("--forward-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype of the calibration forward (autocast); auto: bfloat16 on CPUs with native bf16 "
                        "(AVX-512 BF16, AMX), else the model's")
    p.add_argument("--seed", type=int, default=None, help=f"calibration seed (default {s.seed})")


def add_runtime_args(p: argparse.ArgumentParser, *which: str) -> None:
    """What runs the model: ``which`` of :data:`RUNTIME_OPTIONS` (a command offers only those it honours)."""
    unknown = set(which) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ValueError(f"unknown runtime option(s) {sorted(unknown)}; choose from {RUNTIME_OPTIONS}")
    if "path" in which:
        p.add_argument("--path", choices=["auto", "fast", "reference"], default="auto",
                       help="fast: selection and attention by the kernels (default on a CPU where they build); "
                            "reference: the torch definition, the selection applied as a mask (for accuracy)")
    if "runtime" in which:
        p.add_argument("--runtime", choices=list(factory.RUNTIMES), default="auto",
                       help="what runs the model: the lean engine (default where it runs the model and method, unless "
                            "--path reference) or transformers' own forward with A²ATS patched in")
    if "decode_weights" in which:
        p.add_argument("--decode-weights", choices=list(DECODE_WEIGHTS), default="auto",
                       help="engine, float32 models: what decode steps read for the projection weights, with fp32 math: "
                            "auto (int8), int8 (a scale per output row), int4 (groups of 32), bf16, or model (its own "
                            "fp32 weights). Perplexity of each: `a2ats bench weights`")
    if "prefill_dtype" in which:
        p.add_argument("--prefill-dtype", choices=["auto", "model", "bf16"], default="auto",
                       help="engine, float32 models: the prompt's projections and attention in bf16 (fp32 out; auto: where "
                            "the CPU multiplies bf16 natively) or in the model's dtype")


def _prefill_budget(text: str) -> int | None:
    """``--prefill-budget``: a token count >= 1, or "whole" (None)."""
    if text == "whole":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--prefill-budget takes a number of tokens >= 1 or 'whole', got {text!r}")
    return int(text)


def _finite_or_none(flag: str, what: str):
    """A parser of ``flag``: a finite number >= 0, or "none" (None)."""
    def parse(text: str) -> float | None:
        if text == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} takes a number >= 0 ({what}) or 'none', got {text!r}")
        return value
    return parse


def add_prefill_args(p: argparse.ArgumentParser) -> None:
    """How prompts share the engine's steps with the running sequences (the engine's settings of the same names)."""
    p.add_argument("--prefill-budget", type=_prefill_budget, default=PREFILL_BUDGET, metavar="N|whole",
                   help=f"prompt tokens a step takes on beside the running sequences' decode (default {PREFILL_BUDGET}); "
                        "whole: prompts go in whole, the running sequences waiting")
    p.add_argument("--prefill-stall", type=_finite_or_none("--prefill-stall", "a multiple of a decode step's time"),
                   default=PREFILL_STALL, metavar="X|none",
                   help=f"while sequences decode, a step's prompt work stops after X times its decode forward "
                        f"(default {PREFILL_STALL:g}) and a chunk part-way goes on, layer by layer, in the next steps: "
                        "a running sequence waits about 1 + X decode steps between two tokens at most; none: each "
                        "step runs its chunks through")
    p.add_argument("--prefill-step-seconds", type=_finite_or_none("--prefill-step-seconds", "seconds"),
                   default=PREFILL_STEP_SECONDS, metavar="S|none",
                   help=f"with nothing decoding, a step's prompt work stops after S seconds (default "
                        f"{PREFILL_STEP_SECONDS:g}), so a request that arrives meanwhile (a question over a cached "
                        "document) is planned at the next step instead of after the whole prompt; none: whole prompts")


def add_hybrid_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hybrid", type=float, default=None, metavar="SHARE",
                   help="hybrid WRoPE (not in the paper; reference path): SHARE of each head's budget by the paper's "
                        "score, the rest by banded WRoPE (ratio 2), over the paper's codebook (see docs/retrieval)")


# -- what they build -------------------------------------------------------------------------------------------


def _given(a, **fields: str) -> dict:
    """{dataclass field: value} of the flags (attribute -> field) given: the others keep the dataclass's default."""
    return {f: getattr(a, attr) for attr, f in fields.items() if getattr(a, attr, None) is not None}


def _bands(a) -> dict:
    ratio = getattr(a, "wrope_bands", None)
    return {} if ratio is None else {"wrope_band_ratio": ratio or None}  # 0: the paper's single distance


def config(a) -> A2ATSConfig:
    return A2ATSConfig(**_given(a, budget="budget", reduction="reduction", sinks="sinks", window="window",
                                wrope_distance="wrope_distance"), **_bands(a))


def settings(a) -> CodebookSettings:
    return CodebookSettings(**_given(a, centroids="n_centroids", wrope_distance="wrope_distance",
                                     text_tokens="text_tokens", uuid_tokens="uuid_tokens", max_iter="max_iter",
                                     kmeans_neighbours="kmeans_neighbours", seed="seed", calib_seq_len="seq_len"),
                            **_bands(a), query_aware=not a.euclidean, **({"sink_prefix": False} if a.no_sink_prefix else {}))


def model_label(a) -> str:
    """The model as results name it."""
    return a.model or models.DEFAULT_MODEL


def load(a):
    """The model and tokenizer asked for (under torchrun, each rank's shards)."""
    t = time.perf_counter()
    if tp.launched():  # each rank loads its shards (transformers' tensor-parallel plan)
        model, tok = tp.load(a.model, DTYPES[a.dtype], a.device, log=log)
    else:
        model, tok = models.load_model(a.model, DTYPES[a.dtype], a.device, log=log)
    log(f"loaded {a.model or f'the default model ({models.DEFAULT_MODEL})'} in {time.perf_counter() - t:.1f} s")
    return model, tok


def forward_dtype(a) -> torch.dtype | None:
    """The calibration forward's autocast dtype; ``auto`` only lowers an fp32 model on the CPU."""
    if a.forward_dtype == "auto" and (a.device != "cpu" or a.dtype != "float32"):
        return None
    return parse_dtype(a.forward_dtype)


def codebooks(a, model, tok) -> Codebooks:
    return load_or_calibrate(model, tok, a.codebooks, settings(a), log=log, compute_dtype=forward_dtype(a))


def decoder(a, model, tok, dense: bool | None = None, **engine):
    """What decodes ``model`` as the arguments ask (:func:`a2ats.factory.decoder`: every runtime option given is
    honoured or refused there); ``dense``: full attention (default: ``--dense``, else A²ATS); ``engine``: the lean
    engine's own settings (slots, placement, ...)."""
    method = None
    if getattr(a, "hybrid", None) is not None:
        if a.path == "fast" or a.wrope_bands not in (None, 0):
            raise ValueError("--hybrid runs on the reference path over the paper's codebook: drop --path fast and --wrope-bands")
        a.wrope_bands = 0  # its codebook is the paper's; it bands half the budget itself
        method = build_method(f"a2ats-hybrid{a.hybrid:g}", model, codebooks(a, model, tok))
    dense = getattr(a, "dense", False) if dense is None else dense
    cb = None if method is not None or dense else codebooks(a, model, tok)
    return factory.decoder(model, cb, config(a), method=method, log=log, **engine,
                           **{k: getattr(a, k) for k in RUNTIME_OPTIONS if hasattr(a, k)})


# -- checks before any work ------------------------------------------------------------------------------------


def cache_file() -> Path:
    """A file in the codebook cache (where codebooks are calibrated into when no --codebooks is given)."""
    return models.cache_dir() / "codebooks" / "model" / "codebook.safetensors"


def need_file(path, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise ValueError(f"no {what} at {path}: give an existing file")


def check(a) -> None:
    """The shared options, files and folders, checked before a model loads or a calibration starts (a command
    checks its own options before it loads its model)."""
    need_file(getattr(a, "prompt_file", None), "prompt file")
    need_file(getattr(a, "prompts", None), "prompts file")
    for name in ("slots", "steps", "max_new_tokens", "context", "samples", "centroids", "ppl_tokens", "clients"):
        value = getattr(a, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("batches", "lengths", "needle_lengths", "text_lengths"):
        bad = [v for v in getattr(a, name, None) or () if v < 1]
        if bad:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {bad}")
    if hasattr(a, "sinks"):
        config(a)  # budget range, sinks, window, WRoPE settings
    if hasattr(a, "wrope_bands") and hasattr(a, "centroids"):
        settings(a)
    if a.cmd in ("eval", "bench") and getattr(a, "out", None):
        check_writable(Path(a.out) / "results")
    if hasattr(a, "codebooks") and not getattr(a, "dense", False):
        if a.codebooks is None:
            check_writable(cache_file())
            return
        path = Path(a.codebooks)
        if not names_file(path):
            check_writable(path / "codebooks.safetensors")  # a folder: the file's name waits for the model's context
        elif path.exists():
            Codebooks.load(path)  # a file that is not a codebook file is named now, not after the model loads
        else:
            check_writable(path)
