"""One request on its way through the engine: where it is (waiting, prefilling, running), its slot, how much of
its prompt the cache holds, and what it has produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from a2ats.runtime.model import Pass
from a2ats.runtime.requests import Completion, Request
from a2ats.runtime.sampling import Sampler, TokenLogprobs


@dataclass
class Partial:
    """Prompt positions [start, end) part-way through the model: a chunk whose layers run over several steps.
    ``rest``: the chunk's later positions, split off at a layer when one of its layers grew too long for a step
    (:meth:`split`); they wait at that layer and go on once [start, end) is through every layer."""

    start: int
    end: int
    pass_: Pass
    layer_seconds: float = 0.0  # its last layer's time: whether the next fits what is left of a step
    rest: Partial | None = None

    @property
    def through(self) -> int:
        """The end of the whole chunk, its rest included."""
        return self.end if self.rest is None else self.rest.through

    def split(self, tokens: int) -> Partial:
        """This piece's first ``tokens`` positions, the others put ahead of its rest; each keeps its share of the
        layer time."""
        if not 0 < tokens < self.end - self.start:
            raise ValueError(f"a split keeps 1 to {self.end - self.start - 1} of the piece's positions, got {tokens}")
        head, tail = self.pass_.split(tokens)
        share = self.layer_seconds / (self.end - self.start)
        at = self.start + tokens
        return Partial(self.start, at, head, share * tokens,
                       Partial(at, self.end, tail, share * (self.end - at), self.rest))


class Status(Enum):
    WAITING = "waiting"  # queued, no slot
    PREFILLING = "prefilling"  # holds a slot; its prompt enters the cache a chunk at a time
    RUNNING = "running"  # prompt done: one token per decode step


@dataclass(eq=False)
class Sequence:
    index: int  # the engine's key of this request (StepResult.tokens, completions)
    request: Request
    status: Status = Status.WAITING
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache (a given cache's count from admission)
    partial: Partial | None = None  # a chunk begun, not through every layer: positions [prefilled, partial.through)
    layer_token_seconds: float = 0.0  # one prompt layer's seconds per token, from its last chunk (0: none yet)
    follows: bool = False  # waits for another prompt prefilling its next positions (Scheduler: shares)
    tokens: list[int] = field(default_factory=list)  # generated
    logits: list[torch.Tensor] = field(default_factory=list)  # per token, when the engine keeps them
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per token, when the request asks for them
    sampler: Sampler | None = None  # None: the pick is the argmax (Sampling.plain)

    def __post_init__(self) -> None:
        if self.request.kv is not None:  # loaded into the slot at admission: not prefilled again
            self.prefilled = self.request.kv.length
        if not self.request.sampling.plain:
            self.sampler = Sampler(self.request.sampling)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def left(self) -> int:
        """Prompt tokens not yet in the cache."""
        return len(self.request.prompt) - self.prefilled

    @property
    def need(self) -> int:
        """Positions the sequence fills at most: its prompt and its new tokens."""
        return len(self.request.prompt) + self.request.max_new_tokens

    def completion(self, reason: str, error: str | None = None, kv=None, logits: bool = False) -> Completion:
        r = self.request
        return Completion(r.id, len(r.prompt), self.tokens, reason, self.logits if logits else None, kv, error,
                          self.logprobs if r.sampling.logprobs is not None else None)
