"""How a sequence picks each token from its logits: its own penalties and biases, then greedy or a seeded draw,
and, when asked, the log probabilities of the pick and of the most likely tokens.

Order, as OpenAI documents and inference servers apply it: ``logit_bias`` added, presence and frequency
penalties subtracted for the tokens this sequence has generated so far (the prompt's are not counted), then
the pick: the argmax at temperature 0, else a draw from softmax(logits / temperature) cut to the top_p nucleus
with the sequence's own generator. Log probabilities are those of the adjusted logits at temperature 1 (the
model's distribution as the penalties and biases leave it, before temperature and top_p).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

PENALTY_RANGE = 2.0  # OpenAI's: presence and frequency penalties in [-2, 2]
BIAS_RANGE = 100.0  # ... logit biases in [-100, 100]
MAX_TOP_LOGPROBS = 20  # ... at most 20 alternatives per token
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


class SamplingError(ValueError):
    """A sampling setting out of range; ``field`` names it (as the API spells it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings, checked on construction. The defaults pick greedily and report nothing."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the draws' generator (None: nondeterministic); unused when greedy
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # report the pick's log probability and this many alternatives' (None: none)

    def __post_init__(self) -> None:
        def finite(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (finite(self.temperature) and self.temperature >= 0):
            raise SamplingError("temperature", f"temperature must be a finite number >= 0 (0: greedy), got "
                                f"{self.temperature}")
        if not (finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SamplingError("seed", f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (finite(v) and -PENALTY_RANGE <= v <= PENALTY_RANGE):
                raise SamplingError(name, f"{name} must be in [-2, 2], got {v}")
        for token, bias in self.logit_bias:
            if not (isinstance(token, int) and token >= 0):
                raise SamplingError("logit_bias", f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not (finite(bias) and -BIAS_RANGE <= bias <= BIAS_RANGE):
                raise SamplingError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for token "
                                    f"{token}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise SamplingError("logprobs", f"logprobs (alternatives reported per token) must be in "
                                f"[0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def plain(self) -> bool:
        """Whether the pick is the logits' argmax and nothing else is asked: the batch's argmax serves it."""
        return (self.temperature == 0 and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias and self.logprobs is None)

    def check_vocab(self, vocab: int) -> None:
        bad = [t for t, _ in self.logit_bias if t >= vocab]
        if bad:
            raise SamplingError("logit_bias", f"logit_bias names token ids past the vocabulary ({vocab} tokens): "
                                f"{bad[:5]}")


@dataclass(frozen=True)
class TokenLogprobs:
    """The picked token's log probability and the ``len(top)`` most likely tokens' (id, log probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class Sampler:
    """One sequence's picks: its settings, its generator and the counts of the tokens it generated."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()  # nondeterministic, as asked
            else:
                self.generator.manual_seed(sampling.seed)
        self.counts: Counter[int] = Counter()
        self._bias = None

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (vocab,) as float32 on the CPU, with the biases and this sequence's penalties applied."""
        s = self.sampling
        x = logits.detach().float().cpu().clone()
        if s.logit_bias:
            if self._bias is None:
                ids, values = zip(*s.logit_bias)
                self._bias = torch.tensor(ids), torch.tensor(values, dtype=torch.float32)
            x.index_add_(0, *self._bias)
        if self.counts and (s.presence_penalty or s.frequency_penalty):
            ids = torch.tensor(list(self.counts))
            n = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            x.index_add_(0, ids, -(s.frequency_penalty * n + s.presence_penalty))
        return x

    def pick(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """The next token for ``logits`` (vocab,), and its log probabilities when the settings ask for them."""
        s = self.sampling
        x = self.adjusted(logits)
        if s.temperature == 0:
            token = int(x.argmax())
        else:
            p = torch.softmax(x / s.temperature, -1)
            if s.top_p < 1.0:
                sorted_p, order = p.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # the mass before each token: the first always kept
                p = torch.zeros_like(p).index_put_((order[keep],), sorted_p[keep])
            token = int(torch.multinomial(p, 1, generator=self.generator))
        self.counts[token] += 1
        if s.logprobs is None:
            return token, None
        lp = torch.log_softmax(x, -1)
        top = lp.topk(s.logprobs) if s.logprobs else None
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return token, TokenLogprobs(token, float(lp[token]), alternatives)
