"""Serving a queue of prompts with continuous batching: a fixed number of slots decode together, and a
new sequence is admitted (prefilled into a free slot) as soon as one finishes.

Placements: ``offload`` keeps K/V in host memory and selects on the accelerator (the paper's system,
:mod:`.offload`); ``local`` keeps K/V on the accelerator too (on a CPU-only machine both are the same
memory, and the offload code path still runs). Without codebooks the server decodes with full
attention: the baseline. Greedy decoding; every sequence's tokens are its own (slots never mix).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.stats import SelectionStats, SelectionTrace
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.runtime.model import POST_ROPE_REFUSAL, LeanModel
from a2ats.runtime.offload import OffloadRunner
from a2ats.runtime.preflight import MemoryPlan, plan
from a2ats.runtime.slots import SlotCache
from a2ats.runtime.step import Timer

PLACEMENTS = ("offload", "local")


@dataclass
class Request:
    prompt: list[int] | torch.Tensor  # token ids (no padding)
    max_new_tokens: int = 32
    id: Any = None  # echoed in the completion (default: the request's index)

    def __post_init__(self) -> None:
        ids = self.prompt.flatten().tolist() if isinstance(self.prompt, torch.Tensor) else list(self.prompt)
        if not ids:
            raise ValueError("a request needs a non-empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.prompt = ids


@dataclass
class Completion:
    id: Any
    prompt_tokens: int
    tokens: list[int]  # generated ids, up to and including the end-of-sequence token
    finish_reason: str  # "eos" or "length"
    logits: list[torch.Tensor] | None = None  # (vocab,) per token, when asked for (tests)


@dataclass
class ServeResult:
    completions: list[Completion]  # in request order
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    decode_tokens: int  # tokens produced by decode steps (each prefill also yields one)
    slot_steps: int = 0  # sum over decode steps of the active slots
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per part of decode steps, when profiled
    stats: SelectionStats | None = None
    crossed_bytes: int = 0  # moved between accelerator and host during decode
    trace: SelectionTrace | None = None  # every decode step's selection per request, when asked for (tests)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens from decode steps over their wall time."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def served_tokens_per_s(self) -> float:
        """All generated tokens over all wall time, prefills included: the served workload's rate."""
        total = sum(len(c.tokens) for c in self.completions if c is not None)
        wall = self.prefill_seconds + self.decode_seconds
        return total / wall if wall else 0.0


class ServeError(RuntimeError):
    """A failure mid-run; ``completions`` keeps every sequence finished before it (None for the others)."""

    def __init__(self, message: str, completions: list[Completion | None]):
        super().__init__(message)
        self.completions = completions


class Server:
    """Continuous-batching greedy decoding over ``slots`` sequences of up to ``max_context`` tokens each.

    Allocates K/V for ``slots x max_context`` at construction, after a memory preflight that refuses
    (naming the largest batch that fits) rather than failing mid-run. ``overlap``: micro-batches per
    decode step, so the host attends one while the accelerator selects the next (see :mod:`.offload`).
    ``kv_dtype``: how K/V are stored (default: the model's dtype); ``torch.bfloat16`` under an fp32
    model halves the bytes the host holds and reads per selected row, ``torch.int8`` (a float32 scale
    per row) quarters them (attention math stays fp32).
    ``host_free``/``accelerator_free`` override the measured free memory (tests, planning).
    ``beyond_model_context``: allow ``max_context`` past the model's trained positions (benchmarks
    of speed only: outputs there are not meaningful).
    """

    def __init__(self, model: nn.Module, codebooks: Codebooks | None = None, config: A2ATSConfig | None = None,
                 slots: int = 4, max_context: int | None = None, placement: str = "offload",
                 prefill_chunk: int = 4096, decode_weights: str = "model", overlap: int = 1,
                 kv_dtype: torch.dtype | None = None, host_free: int | None = None,
                 accelerator_free: int | None = None, beyond_model_context: bool = False):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.config = model, config or A2ATSConfig()
        self.lean = lean = LeanModel(model, decode_weights)
        limit = getattr(model.config, "max_position_embeddings", None)
        max_context = max_context or limit or 4096
        if limit and max_context > limit and not beyond_model_context:
            raise ValueError(f"max_context {max_context} exceeds the model's context of {limit} positions")
        method = None
        if codebooks is not None:
            method = A2ATSMethod.for_model(model, codebooks, self.config)
            if method.post_rope:
                raise ValueError(POST_ROPE_REFUSAL)
        kv_dtype = kv_dtype or lean.dtype
        if kv_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            raise ValueError(f"kv_dtype must be float32, bfloat16, float16 or int8, got {kv_dtype}")
        self.placement, self.max_context, self.prefill_chunk = placement, max_context, prefill_chunk
        accelerator = lean.device
        host = torch.device("cpu") if placement == "offload" else accelerator
        self.plan: MemoryPlan = plan(lean.num_layers, slots, lean.kv_heads, lean.heads, lean.head_dim, max_context,
                                     kv_dtype, accelerator, host, prefill_chunk, codes=method is not None, host_free=host_free,
                                     accelerator_free=accelerator_free)
        self.plan.check()
        self.cache = SlotCache(lean.num_layers, slots, lean.kv_heads, lean.head_dim, max_context, kv_dtype,
                               accelerator, host, codes=method is not None)
        self.runner = OffloadRunner(lean, method, self.config, self.cache, overlap)

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def method_name(self) -> str:
        m = self.runner.method
        return "dense" if m is None else m.name

    def _check(self, r: Request) -> None:
        need = len(r.prompt) + r.max_new_tokens
        if need > self.max_context:
            raise ValueError(f"request {r.id!r}: prompt of {len(r.prompt)} tokens + {r.max_new_tokens} new tokens "
                             f"exceeds the server's max_context of {self.max_context}: build the server with a larger "
                             "max_context, or shorten the prompt")

    @torch.inference_mode()
    def _prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Dense prefill of one sequence into ``slot``; the logits of its last token (vocab,)."""
        lean, runner, device = self.lean, self.runner, self.lean.device
        tokens = torch.tensor([ids], device=device)
        for s in range(0, len(ids), self.prefill_chunk):
            e = min(s + self.prefill_chunk, len(ids))
            runner.begin_prefill(slot, s, e)
            logits = lean.forward(tokens[:, s:e], torch.arange(s, e, device=device)[None], runner.attend)
        runner.host_ready()
        self.cache.filled(slot, len(ids))
        return logits[0, -1]

    @torch.inference_mode()
    def serve(self, requests: Iterable[Request], eos_token_id: int | list[int] | None = None,
              on_finish: Callable[[int, Completion], None] | None = None, profile: bool = False,
              keep_logits: bool = False, trace: bool = False) -> ServeResult:
        """Serve ``requests`` in order of arrival; ``on_finish(index, completion)`` as each one ends.
        ``trace``: record every decode step's selection (:class:`~a2ats.core.stats.SelectionTrace`; its rows are
        the requests' indices).

        A failure mid-run raises :class:`ServeError` holding every completion finished before it."""
        reqs = list(requests)
        for i, r in enumerate(reqs):
            if r.id is None:
                r.id = i
            self._check(r)
        eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        S, device, cache, runner, lean = self.slots, self.lean.device, self.cache, self.runner, self.lean
        done: list[Completion | None] = [None] * len(reqs)
        queue = deque(range(len(reqs)))
        owner: list[int | None] = [None] * S  # request index in each slot
        produced: list[list[int]] = [[] for _ in range(S)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(S)]
        last = torch.zeros(S, dtype=torch.long, device=device)
        runner.attended.zero_()
        runner.context.zero_()
        runner.heads, runner.crossed = 0, 0
        runner.trace = SelectionTrace() if trace and runner.method is not None else None
        runner.trace_ids = owner  # the same list, updated as requests take and leave slots
        timer = Timer() if profile else None
        prefill_s = decode_s = 0.0
        steps = decode_tokens = slot_steps = 0

        def finish(slot: int, reason: str) -> None:
            i = owner[slot]
            c = Completion(reqs[i].id, len(reqs[i].prompt), produced[slot], reason, kept[slot] if keep_logits else None)
            done[i] = c
            owner[slot], produced[slot], kept[slot] = None, [], []
            cache.free(slot)
            if on_finish is not None:
                on_finish(i, c)

        def take(slot: int, token: int, logits: torch.Tensor | None) -> None:
            produced[slot].append(token)
            if keep_logits:
                kept[slot].append(logits.float().cpu())
            if token in eos:
                finish(slot, "eos")
            elif len(produced[slot]) >= reqs[owner[slot]].max_new_tokens:
                finish(slot, "length")

        try:
            while queue or any(o is not None for o in owner):
                for slot in range(S):  # admit: fill every free slot from the queue
                    while owner[slot] is None and queue:
                        i = queue.popleft()
                        owner[slot] = i
                        t = time.perf_counter()
                        logits = self._prefill(slot, reqs[i].prompt)
                        token = int(logits.argmax())
                        prefill_s += time.perf_counter() - t
                        last[slot] = token
                        take(slot, token, logits)
                active_list = [o is not None for o in owner]
                if not any(active_list):
                    continue
                active = torch.tensor(active_list, device=device)
                t = time.perf_counter()
                runner.timer = timer
                if timer is not None:
                    timer.start()
                step = runner.begin_decode(active, active_list)
                if timer is not None:
                    timer.lap("rest")
                logits = lean.forward(last[:, None], step.pos[:, None], runner.attend, timer=timer)[:, -1]
                tokens = logits.argmax(-1)
                last = tokens
                host_tokens = tokens.tolist()
                decode_s += time.perf_counter() - t
                if timer is not None:
                    timer.lap("rest")
                runner.timer = None
                steps += 1
                slot_steps += sum(active_list)
                for slot, on in enumerate(active_list):
                    if on:
                        decode_tokens += 1
                        take(slot, host_tokens[slot], logits[slot] if keep_logits else None)
        except Exception as e:
            for slot in range(S):
                if owner[slot] is not None:
                    owner[slot] = None
                    cache.free(slot)
            finished = sum(c is not None for c in done)
            raise ServeError(f"serving failed after {finished} of {len(reqs)} sequences finished: {e}", done) from e
        stats = None
        if runner.method is not None and runner.heads:
            stats = SelectionStats(self.config, steps=steps * lean.num_layers, attended=float(runner.attended),
                                   heads=runner.heads, context=float(runner.context),
                                   last_length=max(len(r.prompt) for r in reqs))
        return ServeResult(done, prefill_s, decode_s, steps, decode_tokens, slot_steps,
                           dict(timer.totals) if timer is not None else {}, stats, runner.crossed, runner.trace)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, keep_logits: bool = False, trace: bool = False) -> ServeResult:
        """A left-padded batch (as tokenizers pad for ``model.generate``) served as one request per row."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        reqs = [Request(row[m].tolist(), max_new_tokens) for row, m in zip(input_ids.cpu(), mask.cpu())]
        return self.serve(reqs, eos_token_id=eos_token_id, keep_logits=keep_logits, trace=trace)
