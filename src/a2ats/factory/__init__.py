"""The one place that turns what a caller asks for into what decodes: the lean engine, or A²ATS inside
transformers. Methods come from :mod:`a2ats.methods.registry` (by name) or from codebooks.

Two words, one meaning each:

- *path*: how selection and attention run: ``fast`` = the kernels, ``reference`` = the torch definition
  (the selection applied as a mask), ``auto`` = fast where the kernels build (:func:`a2ats.kernels.resolve_path`).
- *runtime*: what runs the model: ``engine`` = :class:`a2ats.runtime.Engine` (the lean runtime),
  ``transformers`` = the model's own forward with :class:`a2ats.hf.A2ATS`; ``auto`` = the engine when it runs
  this model and method and the reference path was not asked for (the reference path is transformers').

For the command line: :mod:`.options` (the options the commands share, and what they build here) and
:mod:`.commands` (``generate``, ``demo``, ``calibrate``).
"""

from __future__ import annotations

import sys

from torch import nn

from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.hf import A2ATS
from a2ats.hf.generate import GenerationResult, generate, generate_lean
from a2ats.methods import A2ATSMethod, Method
from a2ats.runtime import Engine
from a2ats.runtime.model import POST_ROPE_REFUSAL, SUPPORTED

RUNTIMES = ("auto", "engine", "transformers")


def engine_refusal(model: nn.Module, method: Method | None) -> str | None:
    """Why the lean engine cannot decode ``model`` with ``method`` (None: it can)."""
    arch = type(model).__name__
    if arch not in SUPPORTED:
        return f"the lean engine runs {', '.join(SUPPORTED)}, not {arch}"
    if method is not None and type(method) is not A2ATSMethod:
        return f"the lean engine decodes with the A²ATS method itself; {method.name} runs in transformers"
    if method is not None and method.post_rope:
        return POST_ROPE_REFUSAL
    return None


def decoder(model: nn.Module, codebooks: Codebooks | None = None, config: A2ATSConfig | None = None, *,
            method: Method | None = None, path: str = "auto", runtime: str = "auto", decode_weights: str = "auto",
            prefill_dtype: str = "auto", log=None, **engine) -> Engine | A2ATS:
    """What decodes ``model`` with A²ATS over ``codebooks`` (or ``method``; neither: dense, engine only).

    ``engine``: the lean engine's own settings (``slots``, ``max_context``, ``placement``, ``kv_dtype``, ...; see
    :class:`~a2ats.runtime.Engine`). Only the engine serves a queue over slots, so with any of them ``auto`` is
    the engine (on either path) and ``transformers`` is refused."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    config = config or A2ATSConfig()
    if method is None and codebooks is not None:
        method = A2ATSMethod.for_model(model, codebooks, config)
    why = engine_refusal(model, method)
    if engine and runtime == "transformers":
        raise ValueError(f"{', '.join(sorted(engine))} are the lean engine's (runtime 'engine'): transformers' generate "
                         "decodes one batch without slots; run in the engine, or drop them")
    if runtime == "auto":
        runtime = "engine" if why is None and (path != "reference" or engine) else "transformers"
        if why is not None and log is not None and not engine:
            log(f"{why}: running in transformers")
    if runtime == "engine" or engine:
        if why is not None:
            raise ValueError(why)
        return Engine(model, config=config, method=method, path=path, decode_weights=decode_weights,
                      prefill_dtype=prefill_dtype, **engine)
    if decode_weights not in ("auto", "model"):
        raise ValueError(f"decode weights {decode_weights!r} are the lean engine's (runtime 'engine'); transformers "
                         "reads the model's own: drop the weight format or run in the engine")
    if method is None:
        raise ValueError("A²ATS in transformers needs codebooks (a2ats.load_or_calibrate) or a method")
    return A2ATS(model, config=config, method=method, path=path)


def describe(dec: Engine | A2ATS) -> str:
    """Which runtime and path ``dec`` is, for logs: a speed figure names where it came from."""
    if isinstance(dec, Engine):
        lean = dec.lean
        own = str(lean.dtype).removeprefix("torch.")
        arithmetic = (f"{own if lean.decode_weights == 'model' else lean.decode_weights} decode weights, "
                      f"{'bf16' if lean.prefill_dtype == 'bf16' else own} prefill")
        return ("fast path: lean engine + kernels" if dec.path == "fast" else "lean engine, reference path") + \
            f"; {arithmetic}"
    if dec.path == "fast":
        return "fast path: transformers' generate + kernels"
    return "reference path: selection applied as a mask on one device, for accuracy, not speed"


def generate_text(dec: Engine | A2ATS, tokenizer, input_ids, max_new_tokens: int, out=sys.stdout) -> GenerationResult:
    """Greedy generation of ``input_ids`` (1, n) with ``dec``, streaming the text to ``out``."""
    if isinstance(dec, Engine):
        return generate_lean(dec, tokenizer, input_ids, max_new_tokens, out)
    with dec:
        res = generate(dec.model, tokenizer, dec, input_ids, max_new_tokens, out)
    res.stats = dec.stats
    return res
