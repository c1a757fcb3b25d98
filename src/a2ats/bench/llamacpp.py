"""llama.cpp's dense decode of the same model (the embedded GGUF: Q4_1 weights, f16 KV), timed like our
variants, when ``llama-cpp-python`` is installed (optional: it builds from source in ~10-15 min on 2 cores,
``pip install llama-cpp-python``; never a test dependency).

The context is a real prefill by llama.cpp itself of the same token ids our variants use (tiled to the
length), then single-token decode steps, timed one by one; the median is reported.
"""

from __future__ import annotations

import importlib.util
import os
import time

import torch


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def bench_llamacpp(ids: torch.Tensor, lengths, steps: int, warmup: int = 2, threads: int | None = None,
                   gguf: str | None = None, flash_attn: bool = False, log=print,
                   prefills: dict | None = None) -> list[tuple[int, list[float]]]:
    """(length, decode step seconds) per length; ``ids`` (1, n) the base prompt, tiled to each length.
    ``prefills``: filled with each length's prefill seconds."""
    from llama_cpp import Llama

    from a2ats.assets.models import DEFAULT_MODEL, gguf_path, named_model

    path = gguf or str(gguf_path(named_model(DEFAULT_MODEL), log=log))
    threads = threads or os.cpu_count()
    base = ids[0].tolist()
    out = []
    for length in lengths:
        llm = Llama(model_path=path, n_ctx=length + warmup + steps + 8, n_threads=threads, n_threads_batch=threads,
                    n_batch=512, verbose=False, logits_all=False, flash_attn=flash_attn)
        prompt = (base * (-(-length // len(base))))[:length]
        t = time.perf_counter()
        llm.eval(prompt)
        seconds = time.perf_counter() - t
        if prefills is not None:
            prefills[length] = seconds
        log(f"llama.cpp prefill of {length} tokens: {seconds:.1f} s ({length / seconds:.0f} tokens/s)")
        times = []
        for s in range(warmup + steps):
            t = time.perf_counter()
            llm.eval([base[s % len(base)]])  # the step's cost does not depend on which token it is
            if s >= warmup:
                times.append(time.perf_counter() - t)
        out.append((length, times))
        del llm
    return out


def prefill_seconds(prompt: list[int], threads: int | None = None, gguf: str | None = None, log=print) -> float:
    """Seconds llama.cpp takes to prefill ``prompt`` (token ids), batch 512, ``threads`` threads."""
    from llama_cpp import Llama

    from a2ats.assets.models import DEFAULT_MODEL, gguf_path, named_model

    path = gguf or str(gguf_path(named_model(DEFAULT_MODEL), log=log))
    threads = threads or os.cpu_count()
    llm = Llama(model_path=path, n_ctx=len(prompt) + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, logits_all=False)
    t = time.perf_counter()
    llm.eval(prompt)
    seconds = time.perf_counter() - t
    del llm
    return seconds


def gguf_for(model: str | None, log=print) -> str:
    """The GGUF llama.cpp runs for ``model`` (None: the default model): a named model's own, verified."""
    from a2ats.assets.models import DEFAULT_MODEL, MODELS, gguf_path, named_model

    if model is not None and model not in MODELS:
        raise ValueError("the llama.cpp variant runs a named model's GGUF: give --model "
                         f"{' or '.join(MODELS)}, or leave llama.cpp out")
    return str(gguf_path(named_model(model or DEFAULT_MODEL), log=log))
