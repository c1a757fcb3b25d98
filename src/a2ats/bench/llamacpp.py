"""llama.cpp's dense decode of the same model, two ways (neither is a test dependency):

- ``llama-bench``, the standard tool, built natively (``bench decode --llama-bench PATH``): each GGUF at each
  depth, flash attention off and on, no Python in the loop. :func:`q8_0_gguf` converts the library's own bf16
  copy of the model to Q8_0 with the converter beside that build, for a comparison at equal bits with our int8
  weights; the model's shipped GGUF (4-bit) is the other row.
- the ``llama-cpp-python`` binding (the ``llama.cpp`` variant; it builds from source in ~10-15 min on 2 cores):
  a real prefill by llama.cpp of the same token ids our variants use (tiled to the length), then single-token
  decode steps, timed one by one; the median is reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class LlamaBenchRow:
    """One GGUF at one depth, the better of flash attention off and on (both kept in ``ms_by_flash``)."""

    variant: str  # "llama.cpp-" + the GGUF's weight type, e.g. llama.cpp-q8_0
    context: int
    ms_per_token: float  # mean over llama-bench's repetitions, at its best flash-attention setting
    tokens_per_s: float
    steps: int  # tokens generated per repetition
    flash_attn: str
    ms_by_flash: dict[str, float] = field(default_factory=dict)
    spread_ms: float = 0.0  # llama-bench's standard deviation across repetitions, in ms per token
    gguf: str = ""
    model_type: str = ""


def weight_type(model_type: str) -> str:
    """The weight type in llama-bench's ``model_type`` ("<arch> <size> <type>"), as its file names spell it:
    ``llama 135M Q8_0`` -> ``q8_0``, ``qwen2 0.5B Q4_K - Medium`` -> ``q4_k_m``."""
    words = model_type.split(maxsplit=2)
    if len(words) < 3:
        return "gguf"
    base, _, size = words[2].partition(" - ")
    return (base.strip() + (f"_{size.strip()[0]}" if size.strip() else "")).lower()


FLASH_SETTINGS = ("off,on", "off", "on")


def llama_bench(binary: str | Path, ggufs: list[str], length: int, threads: int | None = None, gen: int = 16,
                repeats: int = 2, flash: str = "off,on", log=print) -> list[LlamaBenchRow]:
    """Decode at depth ``length`` for each GGUF with the natively built ``llama-bench`` at ``binary``: ``gen``
    tokens per repetition, ``repeats`` repetitions (each prefills the depth anew), ``threads`` threads (default:
    every core), flash attention ``flash`` ("off,on": both, the better kept)."""
    if flash not in FLASH_SETTINGS:
        raise ValueError(f"flash attention setting {flash!r}: choose one of {', '.join(FLASH_SETTINGS)}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"llama-bench repetitions must be an integer >= 1, got {repeats!r}")
    binary = _executable(binary, "llama-bench", "--llama-bench")
    for g in ggufs:
        if not Path(g).is_file():
            raise ValueError(f"GGUF {g} not found")
    threads = threads or os.cpu_count()
    cmd = [str(binary), "-m", ",".join(ggufs), "-t", str(threads), "-p", "0", "-n", str(gen), "-d", str(length),
           "-fa", flash, "-r", str(repeats), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    results = json.loads(done.stdout)
    rows: dict[str, LlamaBenchRow] = {}
    for r in results:
        kind = weight_type(r.get("model_type", ""))
        flash = "on" if r.get("flash_attn") in (True, 1, "on", "enabled") else "off"
        ms = 1e3 / r["avg_ts"]
        spread = 1e3 * r.get("stddev_ts", 0.0) / r["avg_ts"] ** 2  # d(1/ts) = dts / ts^2
        row = rows.setdefault(r["model_filename"], LlamaBenchRow(f"llama.cpp-{kind}", length, ms, r["avg_ts"],
                                                                   int(r["n_gen"]), flash, gguf=r["model_filename"],
                                                                   model_type=r.get("model_type", "")))
        row.ms_by_flash[flash] = round(ms, 3)
        if ms <= row.ms_per_token:
            row.ms_per_token, row.tokens_per_s, row.flash_attn, row.spread_ms = ms, r["avg_ts"], flash, spread
    out = list(rows.values())
    for row in out:
        log(f"{row.variant:16s} {length:6d} tokens: {row.ms_per_token:7.1f} ms/token (flash attention "
            f"{row.flash_attn}; {', '.join(f'{k} {v:.1f}' for k, v in row.ms_by_flash.items())})")
    return out


def _executable(binary: str | Path, tool: str, flag: str) -> Path:
    binary = Path(binary)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ValueError(f"{flag}: {binary} is not an executable {tool}; build llama.cpp's tools natively (cmake "
                         f"-DGGML_NATIVE=ON, target {tool}) and give the binary's path")
    return binary


def batched_bench(binary: str | Path, gguf: str, length: int, batch: int, gen: int = 16, threads: int | None = None,
                  flash: str = "off", log=print) -> dict:
    """Decode throughput of ``batch`` sequences at ``length`` tokens each with the natively built
    ``llama-batched-bench`` at ``binary`` (the batched decode llama-server runs): one prompt of ``length`` tokens
    prefilled once and copied into every sequence's own cache (``-pps``; each sequence then reads its own rows, as
    ``batch`` different prompts would), then ``gen`` tokens for all of them together. Its tokens/s over the
    ``gen`` steps, and the prompt's prefill seconds."""
    binary = _executable(binary, "llama-batched-bench", "--llama-batched-bench")
    if flash not in ("off", "on"):
        raise ValueError(f"llama-batched-bench flash attention {flash!r}: choose off or on")
    if not Path(gguf).is_file():
        raise ValueError(f"GGUF {gguf} not found")
    threads = threads or os.cpu_count()
    cmd = [str(binary), "-m", gguf, "-t", str(threads), "-tb", str(threads), "-c", str(batch * (length + gen + 1)),
           "-b", "2048", "-ub", "512", "-npp", str(length), "-ntg", str(gen), "-npl", str(batch), "-pps",
           "-fa", flash, "--output-format", "jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    found = [json.loads(line) for line in (done.stdout + "\n" + done.stderr).splitlines()
             if line.startswith("{") and '"speed_tg"' in line]
    if len(found) != 1:
        raise RuntimeError(f"{' '.join(cmd)}: expected one result line, got {len(found)}: {done.stdout[-500:]}")
    r = found[0]
    out = {"tokens_per_s": r["speed_tg"], "ms_per_step": 1e3 * r["t_tg"] / gen, "prefill_s": r["t_pp"],
           "flash_attn": flash, "gen": gen, "gguf": gguf, "command": " ".join(cmd)}
    log(f"llama-batched-bench {length:6d} x {batch:2d}: {out['tokens_per_s']:7.1f} tokens/s ({out['ms_per_step']:.1f} "
        f"ms/step; prompt prefilled in {r['t_pp']:.0f} s; flash attention {flash})")
    return out


def converter_for(binary: str | Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` in the source tree the ``llama-bench`` binary was built in."""
    for folder in Path(binary).resolve().parents:
        script = folder / "convert_hf_to_gguf.py"
        if script.is_file():
            return script
    raise ValueError(f"no convert_hf_to_gguf.py above {binary}: give a llama-bench built inside llama.cpp's source "
                     "tree, or a Q8_0 GGUF of your own with --llama-gguf")


def q8_0_gguf(binary: str | Path, model_dir: Path, out_dir: Path, log=print) -> str:
    """A Q8_0 GGUF of the bf16 model in ``model_dir`` (converted once into ``out_dir``), made by the converter of
    the llama.cpp tree ``binary`` (a tool built there) was built in: llama.cpp's weights at our int8 weights' bits."""
    out = Path(out_dir) / f"{Path(model_dir).name}.q8_0.gguf"
    if out.is_file():
        return str(out)
    script = converter_for(binary)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(script.parent / "gguf-py"),
                                                                    os.environ.get("PYTHONPATH")])))
    log(f"converting {model_dir} to Q8_0 with {script} (once)")
    tmp = out.with_suffix(".part")
    done = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", "q8_0", "--outfile", str(tmp)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        hint = " (pip install sentencepiece)" if "sentencepiece" in done.stderr else ""
        raise RuntimeError(f"Q8_0 conversion failed{hint}: {done.stderr.strip()[-500:]}")
    tmp.replace(out)
    return str(out)
