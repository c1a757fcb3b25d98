"""What goes into the runtime and what comes out: requests, completions, one step's result, a run's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from a2ats.core.config import Budget
from a2ats.core.stats import SelectionStats, SelectionTrace
from a2ats.runtime.sampling import Sampling, TokenLogprobs
from a2ats.runtime.slots import KVState


@dataclass
class Request:
    prompt: list[int] | torch.Tensor  # token ids (no padding)
    max_new_tokens: int = 32
    id: Any = None  # echoed in the completion (default: the request's index)
    kv: KVState | None = None  # the cache of the prompt's first kv.length tokens, already computed: not prefilled again
    keep_kv: bool = False  # the completion carries the sequence's cache (Completion.kv)
    sampling: Sampling = field(default_factory=Sampling)  # greedy unless set (:mod:`.sampling`)
    budget: Budget | float | int | str | None = None  # this sequence's retrieval budget (a Budget once constructed)

    def __post_init__(self) -> None:
        ids = self.prompt.flatten().tolist() if isinstance(self.prompt, torch.Tensor) else list(self.prompt)
        if not ids:
            raise ValueError("a request needs a non-empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.sampling, Sampling):
            raise ValueError(f"sampling must be a2ats.runtime.Sampling, got {type(self.sampling).__name__}")
        if self.budget is not None:
            self.budget = Budget.parse(self.budget)
        if self.kv is not None and self.kv.length >= len(ids):
            raise ValueError(f"the request's cache holds {self.kv.length} tokens of a {len(ids)}-token prompt: it may "
                             "cover all but the prompt's last token, whose logits start the generation")
        self.prompt = ids


@dataclass
class Completion:
    id: Any
    prompt_tokens: int
    tokens: list[int]  # generated ids, up to and including the end-of-sequence token
    finish_reason: str  # "eos", "length", "cancelled" (Engine.cancel) or "error" (this sequence failed; see error)
    logits: list[torch.Tensor] | None = None  # (vocab,) per token, when asked for (tests)
    kv: KVState | None = None  # the sequence's cache (prompt and all generated tokens but the last), when asked for
    error: str | None = None  # why the sequence failed (finish_reason "error"); the others went on
    logprobs: list[TokenLogprobs] | None = None  # per token, when the request's sampling asks for them


@dataclass
class StepResult:
    """What one :meth:`Engine.step` did: a decode token for every running sequence and prompt chunks beside them
    (a prompt's last chunk yields its sequence's first token)."""

    tokens: dict[int, int]  # request index -> the token it produced (decoded, or the first after its prompt)
    finished: list[tuple[int, Completion]]  # (request index, completion) of the sequences that ended
    seconds: float
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per part of the decode, when profiling
    attended: int = 0  # decode with a method: tokens attended, summed over layers, rows and KV heads
    heads: int = 0  # ... over this many (layer, row, KV head) terms
    context: int = 0  # ... whose rows held this many tokens in all
    crossed: int = 0  # bytes between accelerator and host (decode)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # request index -> its token's, when asked for
    decode_rows: int = 0  # sequences decoded (one forward)
    prefill_tokens: int = 0  # prompt tokens prefilled
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def decoded(self) -> bool:
        return self.decode_rows > 0

    @property
    def prefill(self) -> bool:
        """A step that only prefilled."""
        return self.prefill_tokens > 0 and not self.decoded


@dataclass
class ServeResult:
    completions: list[Completion]  # in request order
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    decode_tokens: int  # tokens produced by decode steps (each prefill also yields one)
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per part of decode steps, when profiled
    stats: SelectionStats | None = None
    crossed_bytes: int = 0  # moved between accelerator and host during decode
    trace: SelectionTrace | None = None  # every decode step's selection per request, when asked for (tests)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each decode step

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


@dataclass
class EngineOutput:
    """A batch's generation (:meth:`Engine.generate`), row by row as the batch came in."""

    tokens: torch.Tensor  # (B, new) generated ids; rows that stopped early are padded with pad_token_id
    new_tokens: list[int]  # per row, up to and including its end-of-sequence token
    prompt_tokens: int
    prefill_seconds: float
    step_seconds: list[float]  # wall time of each decode step (the first token comes from prefill)
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds over decode steps, when profiled
    stats: SelectionStats | None = None  # what decode steps attended to (A²ATS only)
    logits: list[torch.Tensor] | None = None  # (B, vocab) per new token, when asked for (NaN: the row had ended)
    trace: SelectionTrace | None = None  # every decode step's selection, rows = batch rows, when asked for

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
