"""`a2ats bench weights`: the quality cost of each decode weight format (the quality beside `bench decode`'s
speed), measured as llama.cpp measures its quantizations: perplexity of held-out prose with the model's projection
and LM-head weights replaced by what the format stores, against the model's own weights. The linears compute what
the decode kernels do (``weights.reference``): int8 and int4 also quantize their inputs in blocks of 32.

The text: State of the Union addresses that calibration never reads (it takes the essays and the latest
60 addresses), in windows of ``window`` tokens, each scored in full (teacher forcing, dense attention).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from a2ats.assets.corpus import speeches
from a2ats.bench.output import emit, machine
from a2ats.factory import options
from a2ats.kernels import weights as packed_weights

TOKENS = 16384  # held-out tokens scored per format


@dataclass
class FormatRow:
    format: str
    bits: float  # per weight, scales included
    decode_mb: float  # bytes a decode step reads for the projections and LM head, in MB
    perplexity: float
    change: float  # relative to the model's own weights
    seconds: float


def held_out_windows(tokenizer, tokens: int, window: int) -> list[torch.Tensor]:
    """``tokens`` tokens of addresses calibration never reads, as windows of ``window`` tokens."""
    ids: list[int] = []
    for doc in speeches()[:-60]:
        ids += tokenizer.encode(doc + "\n\n", add_special_tokens=False)
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise ValueError(f"only {len(ids)} held-out tokens; ask for fewer")
    return [torch.tensor(ids[s : s + window]) for s in range(0, tokens - window + 1, window)]


def _decode_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears a decode step reads through the weight copies: every decoder layer's, and the LM head."""
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    return linears + [model.get_output_embeddings()]


@contextmanager
def weights_as(model: nn.Module, fmt: str):
    """Inside the block the decode linears compute as the decode kernels for ``fmt`` do (:func:`weights.reference
    <a2ats.kernels.weights.reference>`): they hold ``unpack(pack(w, fmt))`` (new parameters, so a tied LM head
    stops sharing with the embedding, as in the engine, whose embedding reads the model's own table), and for
    int8 and int4 their inputs are quantized in blocks of 32 (a forward pre-hook, in torch: a prefill-shaped
    forward runs at matmul speed)."""
    saved, hooks = [], []
    try:
        for m in _decode_linears(model):
            saved.append((m, m.weight))
            if fmt == "model":
                continue
            m.weight = nn.Parameter(packed_weights.unpack(packed_weights.pack(m.weight, fmt)).to(m.weight.dtype),
                                    requires_grad=False)
            if fmt != "bf16":
                hooks.append(m.register_forward_pre_hook(_quantized_input(fmt)))
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, w in saved:
            m.weight = w


def _quantized_input(fmt: str):
    def hook(module, args):
        x = args[0]
        return (packed_weights.activations(x, fmt).to(x.dtype), *args[1:])

    return hook


@torch.inference_mode()
def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids[None].to(model.device)).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, ids[1:].to(logits.device), reduction="sum"))
        count += len(ids) - 1
    return math.exp(nll / count)


def decode_bytes(model: nn.Module, fmt: str) -> int:
    """Bytes of the decode linears' weights in ``fmt`` ("model": as the model holds them)."""
    total = 0
    for m in _decode_linears(model):
        O, I = m.weight.shape
        bits = m.weight.element_size() * 8 if fmt == "model" else packed_weights.BITS[fmt]
        total += int(O * I * bits / 8)
    return total


def compare_formats(model: nn.Module, tokenizer, formats=("model", *packed_weights.FORMATS), tokens: int = TOKENS,
                    window: int = 2048, bf16_forward: bool = True, log=print) -> list[FormatRow]:
    """Perplexity and decode bytes per weight format, the model's own weights first. ``bf16_forward``: one more row,
    "bf16 forward", the model's own weights with every projection and attention product in bf16 (autocast), as
    the engine's bf16 prefill computes the prompt's keys and values."""
    formats = ("model", *(f for f in formats if f != "model"))  # the baseline first
    windows = held_out_windows(tokenizer, tokens, window)
    rows: list[FormatRow] = []
    base = None
    for fmt in formats:
        t = time.perf_counter()
        with weights_as(model, fmt):
            ppl = perplexity(model, windows)
        base = ppl if base is None else base
        bits = model.dtype.itemsize * 8 if fmt == "model" else packed_weights.BITS[fmt]
        rows.append(FormatRow(fmt, bits, decode_bytes(model, fmt) / 1e6, ppl, ppl / base - 1, time.perf_counter() - t))
        log(f"{fmt:6s} {bits:4.1f} bits  {rows[-1].decode_mb:7.1f} MB per step  perplexity {ppl:.3f} "
            f"({rows[-1].change:+.2%})  [{rows[-1].seconds:.0f} s]")
    if bf16_forward and model.dtype == torch.float32 and model.device.type == "cpu":
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ppl = perplexity(model, windows)
        rows.append(FormatRow("bf16 forward", 32.0, decode_bytes(model, "model") / 1e6, ppl, ppl / base - 1,
                              time.perf_counter() - t))
        log(f"bf16 forward (the prefill's arithmetic): perplexity {ppl:.3f} ({rows[-1].change:+.2%})")
    return rows


def rows_to_json(rows: list[FormatRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def add_arguments(p) -> None:
    options.add_model_args(p)
    p.add_argument("--ppl-tokens", type=int, default=TOKENS,
                   help="held-out tokens scored per weight format (2,048-token windows)")
    p.add_argument("--out", help="folder for weights.json and weights.md")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def main(a) -> int:
    """Perplexity of held-out prose per decode weight format: a table (or JSON), and with --out the files."""
    model, tok = options.load(a)
    rows = rows_to_json(compare_formats(model, tok, tokens=a.ppl_tokens, log=options.log))
    res = {"machine": machine(), "model": options.model_label(a), "dtype": a.dtype, "tokens": a.ppl_tokens,
           "command": "a2ats " + " ".join(sys.argv[1:]), "rows": rows}
    lines = [f"perplexity of {a.ppl_tokens} held-out tokens (2,048-token windows) per decode weight format", "",
             "| format | bits per weight | MB read per step | perplexity | change |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['bits']:.1f} | {r['decode_mb']:.0f} | {r['perplexity']:.3f} | {r['change']:+.2%} |"
              for r in rows]
    emit(res, "\n".join(lines) + "\n", "weights", a.out, None, a.json, options.log)
    return 0
