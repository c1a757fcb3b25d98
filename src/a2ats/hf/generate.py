"""Prompt building and streaming generation with A²ATS (used by the CLI; plain ``model.generate`` underneath)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from transformers import TextStreamer

from a2ats.hf.a2ats import A2ATS


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stats: object | None = None  # a2ats.core.stats.SelectionStats of the decode steps (lean engine)

    @property
    def decode_tokens_per_second(self) -> float:
        return max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> torch.Tensor:
    """Token ids (1, n) of ``text``, wrapped in the model's chat template when it has one and ``chat_template``."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        return ids
    return tokenizer(text, return_tensors="pt")["input_ids"]


class _TimedStreamer(TextStreamer):
    """Streams text and notes when the first new token arrived (the end of prefill)."""

    def __init__(self, tokenizer, out, **kw):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kw)
        self.out = out
        self.first_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._prompt_seen = True
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@torch.inference_mode()
def generate(model, tokenizer, a2: A2ATS, input_ids: torch.Tensor, max_new_tokens: int, out=sys.stdout) -> GenerationResult:
    """Greedy generation of up to ``max_new_tokens`` under A²ATS, streaming the text to ``out``."""
    a2.check_length(input_ids.shape[-1], max_new_tokens)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    streamer = _TimedStreamer(tokenizer, out) if out is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    seq = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=pad,
    )
    t1 = time.perf_counter()
    new = seq[0, input_ids.shape[-1] :]
    first = streamer.first_token_at if streamer and streamer.first_token_at else t1
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=input_ids.shape[-1],
        new_tokens=int(new.numel()),
        prefill_seconds=first - t0,
        decode_seconds=t1 - first,
    )


@torch.inference_mode()
def generate_lean(engine, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, out=sys.stdout) -> GenerationResult:
    """Greedy generation with the lean engine (:class:`a2ats.runtime.Engine`), streaming the text to ``out``."""
    streamer = _TimedStreamer(tokenizer, out) if out is not None else None
    if streamer is not None:
        streamer.put(input_ids)  # the prompt: skipped, as in model.generate
    eos = tokenizer.eos_token_id
    res = engine.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos or 0,
                          on_token=(lambda t: streamer.put(t.cpu())) if streamer else None)
    if streamer is not None:
        streamer.end()
    new = res.tokens[0, : res.new_tokens[0]]
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=input_ids.shape[-1],
        new_tokens=int(new.numel()),
        prefill_seconds=res.prefill_seconds,
        decode_seconds=res.decode_seconds,
        stats=res.stats,
    )
