"""What each engine step does: every running sequence decodes one token, and prompt chunks fill the step beside
them up to a token budget, so a running sequence never waits behind a whole prompt.

Waiting requests take free slots in order of arrival (the first that does not fit the cache holds the others back:
none overtakes it). Among the prompts in slots, the one with the fewest tokens left goes first: a question over a
cached document, whose prompt is mostly in the prefix cache, is answered before a long prompt that arrived earlier
is through (in-flight chunks, begun in an earlier step, are carried on whatever the budget). With nothing decoding
the budget does not apply: prompts go in whole, in chunks of ``chunk`` tokens.

With a prefix cache (``shares``), a prompt whose next position another prompt in a slot is prefilling too (the same
tokens up to it, that one further on or at the same place and earlier in arrival) waits for it instead of
prefilling the same tokens beside it, each at half the rate: the engine copies in what the other stored meanwhile
(two questions over one document, the second arriving while the first's document is still prefilling).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from a2ats.runtime.sequence import Sequence, Status

# A prompt waits for another prefilling the same tokens only when the two begin with at least this many (a prefix
# cache block's worth): a system prompt of a few tokens is not worth a wait.
SHARED_SPAN = 256


@dataclass(frozen=True)
class Chunk:
    """Prompt positions [start, end) of ``seq`` to prefill."""

    seq: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        """The prompt's last chunk: its logits give the sequence's first token."""
        return self.end == len(self.seq.prompt)


@dataclass
class Plan:
    decode: list[Sequence] = field(default_factory=list)  # one token each, in one forward
    prefill: list[Chunk] = field(default_factory=list)  # in order


class Scheduler:
    def __init__(self, chunk: int, budget: int | None, shares: bool = False):
        """``chunk``: prompt tokens per prefill forward at most; ``budget``: prompt tokens per step while sequences
        decode (None: whole prompts, the running sequences wait for them). Both checked by the engine's settings.
        ``shares``: prompts' prefills are shared through a prefix cache (a prompt waits for another one prefilling
        the same tokens ahead of it)."""
        self.chunk, self.budget, self.shares = chunk, budget, shares
        self.waiting: deque[Sequence] = deque()
        self.slots: list[Sequence | None] = []

    def resize(self, slots: int) -> None:
        if any(s is not None for s in self.slots):
            raise RuntimeError("the slots hold sequences: resize only an idle scheduler")
        self.slots = [None] * slots

    @property
    def busy(self) -> bool:
        return any(s is not None for s in self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.busy

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """``seq`` out of the queue or its slot."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self.slots[seq.slot] = None

    def clear(self) -> None:
        self.waiting.clear()
        self.slots = [None] * len(self.slots)

    def schedule(self, fits: Callable[[Sequence], bool], admit: Callable[[Sequence], bool]) -> Plan:
        """This step's work; ``fits(seq)``: whether a waiting sequence fits a slot of the cache as allocated;
        ``admit(seq)``: a sequence takes its slot (the engine fills what it can without prefilling, which moves
        ``seq.prefilled``; False: it failed and has no chunks). Prefilled counts move as the engine runs the
        chunks."""
        plan = Plan(decode=[s for s in self.slots if s is not None and s.status is Status.RUNNING])
        room = self.budget if plan.decode and self.budget is not None else None
        failed = []  # admitted and failed at once: the engine ends them (and frees their slots) after this plan
        while self.waiting and None in self.slots and fits(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.slots.index(None), Status.PREFILLING
            self.slots[seq.slot] = seq
            if not admit(seq):
                failed.append(seq)
        prefilling = [s for s in self.slots if s is not None and s.status is Status.PREFILLING and s not in failed]
        for seq in sorted(prefilling, key=lambda s: (s.left, s.index)):
            seq.follows = self.shares and self._follows(seq, prefilling)
            if seq.follows:
                continue
            start, end = seq.prefilled, len(seq.prompt)
            if seq.partial is not None:  # begun: carried on whole
                plan.prefill.append(Chunk(seq, seq.partial.start, seq.partial.through))
                start = seq.partial.through
                if room is not None:
                    room -= start - seq.partial.start
            while start < end and (room is None or room > 0):
                stop = min(end, start + self.chunk, start + room if room is not None else end)
                plan.prefill.append(Chunk(seq, start, stop))
                if room is not None:
                    room -= stop - start
                start = stop
        return plan

    @staticmethod
    def _follows(seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether another prompt in a slot will prefill ``seq``'s next position before ``seq`` could: the same
        tokens up to it and over SHARED_SPAN at least (a shared system prompt of a few tokens is not worth a wait),
        and further on, or at the same place and earlier in arrival. Never for a chunk begun, a given cache, or the
        prompt's last token (its logits give the first new token: always prefilled)."""
        at = seq.prefilled
        if seq.partial is not None or seq.request.kv is not None or at >= len(seq.prompt) - 1:
            return False
        span = max(at + 1, SHARED_SPAN)
        for o in prefilling:
            ahead = o.partial.through if o.partial is not None else o.prefilled
            if (o is seq or o.request.kv is not None or min(len(o.prompt), len(seq.prompt)) < span or ahead < at
                    or (ahead == at and o.index > seq.index)):
                continue
            if o.prompt[:span] == seq.prompt[:span]:
                return True
        return False
