"""Greedy generation with the lean engine: dense chunked prefill, then one sparse decode step per token."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from a2ats import kernels
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.stats import SelectionStats, SelectionTrace
from a2ats.core.support import check_context
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.runtime.model import POST_ROPE_REFUSAL, LeanModel
from a2ats.runtime.runner import Runner
from a2ats.runtime.step import Timer

PATHS = ("auto", "fast", "reference")


@dataclass
class EngineOutput:
    tokens: torch.Tensor  # (B, new) generated ids; rows that stopped early are padded with pad_token_id
    new_tokens: list[int]  # per row, up to and including its end-of-sequence token
    prompt_tokens: int
    prefill_seconds: float
    step_seconds: list[float]  # wall time of each decode step (the first token comes from prefill)
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds over decode steps, when profiled
    stats: SelectionStats | None = None  # what decode steps attended to (A²ATS only)
    logits: list[torch.Tensor] | None = None  # (B, vocab) per new token, when asked for (tests)
    trace: SelectionTrace | None = None  # every decode step's selection, when asked for (tests)

    @property
    def attended(self) -> float:
        """Mean tokens attended per decode layer-step, row and KV head (0 for dense)."""
        return self.stats.mean_attended if self.stats is not None else 0.0

    @property
    def decode_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_seconds / max(len(self.step_seconds), 1)


class Engine:
    """Lean greedy decoding of a Llama-family HF model, with A²ATS (``codebooks`` given) or dense attention.

    ``path``: ``fast`` uses the CPU kernels (:mod:`a2ats.kernels`), ``reference`` the torch selection and
    masked attention; ``auto`` is fast when the kernels are built for this machine. Both select the same
    tokens. ``decode_weights="bf16"``: decode steps of a float32 model read bf16 copies of the projection
    weights, fp32 math (see :class:`LeanModel`). Build the engine after moving the model to its device
    and dtype.
    """

    def __init__(self, model: nn.Module, codebooks: Codebooks | None = None, config: A2ATSConfig | None = None,
                 path: str = "auto", prefill_chunk: int = 4096, decode_weights: str = "model"):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.model = model
        self.config = config or A2ATSConfig()
        self.lean = LeanModel(model, decode_weights)
        method = None
        if codebooks is not None:
            method = A2ATSMethod.for_model(model, codebooks, self.config)
            if method.post_rope:
                raise ValueError(POST_ROPE_REFUSAL)
        cpu = self.lean.device.type == "cpu"
        if path == "auto":
            path = "fast" if cpu and kernels.cpu_backend() is not None else "reference"
        self.path = path
        self.runner = Runner(self.lean, method, self.config, fast=path == "fast")
        self.prefill_chunk = prefill_chunk

    @property
    def method_name(self) -> str:
        m = self.runner.method
        return "dense" if m is None else m.name

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 on_token: Callable[[torch.Tensor], None] | None = None, profile: bool = False,
                 keep_logits: bool = False, trace: bool = False) -> EngineOutput:
        """Greedy continuation of left-padded ``input_ids`` (B, n); ``on_token`` receives each new (B,) column."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        device = self.lean.device
        ids = input_ids.to(device)
        B, n = ids.shape
        check_context(self.model, n, max_new_tokens)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        if not mask[:, -1].all():
            raise ValueError("the engine needs left padding: every row's last prompt token must be real")
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=device)
        runner = self.runner
        runner.new_cache(B, n + max_new_tokens)
        runner.timer = None
        runner.reset_counts()
        runner.trace = SelectionTrace() if trace and runner.method is not None else None
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)

        t0 = time.perf_counter()
        for s in range(0, n, self.prefill_chunk):
            e = min(s + self.prefill_chunk, n)
            runner.begin_step(mask[:, s:e], decode=False)
            logits = self.lean.forward(ids[:, s:e], positions[:, s:e], runner.attend)
        token = logits[:, -1].argmax(-1)
        kept = [logits[:, -1].float()] if keep_logits else None
        prefill_seconds = time.perf_counter() - t0

        out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = [max_new_tokens] * B
        pos = positions[:, -1:] + 1
        one = torch.ones(B, 1, dtype=torch.bool, device=device)
        timer = Timer() if profile else None
        steps: list[float] = []
        for i in range(max_new_tokens):
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out[:, i] = token
            if on_token is not None:
                on_token(token)
            finished = ~done & torch.isin(token, eos)
            for b in finished.nonzero().flatten().tolist():
                lengths[b] = i + 1
            done |= finished
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            t = time.perf_counter()
            runner.timer = timer
            if timer is not None:
                timer.start()
            runner.begin_step(one, decode=True)
            if timer is not None:
                timer.lap("rest")
            logits = self.lean.forward(token[:, None], pos, runner.attend, timer=timer)
            token = logits[:, -1].argmax(-1)
            if kept is not None:
                kept.append(logits[:, -1].float())
            pos = pos + 1
            steps.append(time.perf_counter() - t)
            if timer is not None:
                timer.lap("rest")
        runner.timer = None
        breakdown = dict(timer.totals) if timer is not None else {}
        stats = None
        if runner.method is not None and steps:
            stats = SelectionStats(self.config, steps=len(steps) * self.lean.num_layers,
                                   attended=float(runner.attended), heads=runner.heads,
                                   context=float(runner.context), last_length=int(runner.ctx.valid.sum(-1).max()))
        return EngineOutput(out[:, : i + 1], lengths, n, prefill_seconds, steps, breakdown, stats, kept, runner.trace)
