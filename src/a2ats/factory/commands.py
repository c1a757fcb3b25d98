"""``a2ats generate``, ``a2ats demo`` and ``a2ats calibrate``: their options and their runs. Each builds what it
runs through :func:`a2ats.factory.decoder` (by way of :func:`.options.decoder`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from a2ats import factory
from a2ats.assets import models
from a2ats.assets.corpus import needle_prompt
from a2ats.core.support import check_context
from a2ats.factory import options
from a2ats.factory.options import log
from a2ats.hf.calibrate import calibrate as fit_codebooks
from a2ats.hf.calibrate import check_writable, default_codebook_path, for_model
from a2ats.hf.generate import GenerationResult, encode_prompt


def _add_decode_args(p, max_new_tokens: int) -> None:
    options.add_model_args(p)
    options.add_selection_args(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    options.add_runtime_args(p, *options.RUNTIME_OPTIONS)
    options.add_codebook_args(p)
    options.add_hybrid_arg(p)


def _run(a, model, tok, ids) -> GenerationResult:
    dec = options.decoder(a, model, tok)
    res = factory.generate_text(dec, tok, ids, a.max_new_tokens)
    if res.stats is not None:
        log(res.stats.summary())
    log(f"prompt {res.prompt_tokens} tokens, prefill {res.prefill_seconds:.1f} s (dense); {res.new_tokens} new "
        f"tokens at {res.decode_tokens_per_second:.1f} tokens/s ({factory.describe(dec)})")
    return res


def add_generate_arguments(p) -> None:
    _add_decode_args(p, max_new_tokens=64)
    p.add_argument("--prompt-file", help="file holding the prompt (default: read stdin)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is, without the chat template")


def generate(a) -> int:
    """Answer a prompt (file or stdin), streaming the tokens."""
    text = open(a.prompt_file, encoding="utf-8").read() if a.prompt_file else sys.stdin.read()
    if not text.strip():
        raise SystemExit("a2ats generate: the prompt is empty (give --prompt-file F or text on stdin)")
    model, tok = options.load(a)
    ids = encode_prompt(tok, text, chat_template=not a.no_chat_template)
    check_context(model, ids.shape[-1], a.max_new_tokens)  # before any work (calibration included)
    _run(a, model, tok, ids)
    return 0


def add_demo_arguments(p) -> None:
    _add_decode_args(p, max_new_tokens=32)
    p.add_argument("--context", type=int, default=4000, help="haystack length in tokens")
    p.add_argument("--depth", type=float, default=0.5, help="where the needle sits (0 = start, 1 = end)")


def demo(a) -> int:
    """A needle-in-a-haystack question over essays (seeded as the calibration is), answered with A²ATS."""
    model, tok = options.load(a)
    prompt, answer = needle_prompt(tok, a.context, depth=a.depth, seed=options.settings(a).seed)
    ids = encode_prompt(tok, prompt)
    check_context(model, ids.shape[-1], a.max_new_tokens)
    log(f"needle-in-a-haystack: a 7-digit number hidden at depth {a.depth:.0%} of ~{a.context} tokens of essays")
    options.codebooks(a, model, tok)  # calibrate (once) before the question is printed
    print(f"Q: {prompt.strip().splitlines()[-1]}\nA: ", end="", flush=True)
    res = _run(a, model, tok, ids)
    log(f"expected {answer}: {'found' if answer in res.text else 'NOT found'} in the answer")
    return 0


def add_calibrate_arguments(p) -> None:
    options.add_model_args(p)
    options.add_codebook_args(p, file=False)
    p.add_argument("--out", help="output file (.safetensors) or folder (default: the user cache, where generate looks)")


def calibrate(a) -> int:
    """Fit query-aware codebooks for a model from the built-in offline corpus, and save them."""
    out = a.out or ""
    check_writable(Path(out) if out.endswith(".safetensors") else Path(out) / "x" if out else options.cache_file())
    settings = options.settings(a)
    model, tok = models.load_model(a.model, options.DTYPES[a.dtype], a.device, log=log)
    settings = for_model(model, settings)
    if not out:
        out = default_codebook_path(model, settings)
    elif not out.endswith(".safetensors"):
        out = f"{out.rstrip('/')}/{settings.tag}.safetensors"
    t = time.perf_counter()
    cb = fit_codebooks(model, tok, settings, compute_dtype=options.forward_dtype(a))
    path = cb.save(out)
    log(f"wrote {path} in {time.perf_counter() - t:.1f} s: {cb.info}")
    return 0
