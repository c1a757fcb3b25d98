"""Running statistics of what decode steps attended to, for the one-line report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from a2ats.core.config import A2ATSConfig


@dataclass
class SelectionStats:
    config: A2ATSConfig
    steps: int = 0  # layer-steps recorded
    attended: float = 0.0  # sum over (layer-step, row, KV head) of tokens attended
    heads: int = 0  # number of (layer-step, row, KV head) terms
    context: float = 0.0  # sum over the same terms of the row's length
    last_length: int = 0
    decode_steps: int = 0  # decode steps (of every layer), where counted
    # decode steps that attended to every token instead of selecting (the runtime's dense fallback), by why;
    # their tokens count as attended above
    dense: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.steps, self.attended, self.heads, self.context, self.last_length = 0, 0.0, 0, 0.0, 0
        self.decode_steps, self.dense = 0, {}

    def record(self, keep: torch.Tensor, valid: torch.Tensor) -> None:
        self.record_counts(keep.sum(-1), valid)

    def record_counts(self, counts: torch.Tensor, valid: torch.Tensor) -> None:
        """``counts`` (B, Hkv): tokens attended by each row's KV heads at one layer-step."""
        lengths = valid.sum(-1, keepdim=True).expand_as(counts)
        self.steps += 1
        self.attended += float(counts.sum())
        self.context += float(lengths.sum())
        self.heads += counts.numel()
        self.last_length = int(valid.sum(-1).max())

    @property
    def mean_attended(self) -> float:
        return self.attended / max(self.heads, 1)

    @property
    def mean_fraction(self) -> float:
        return self.attended / max(self.context, 1.0)

    def summary(self) -> str:
        cfg = self.config
        if not self.heads:
            return "no decode steps recorded"
        k = int(cfg.budget.tokens_for(torch.tensor([self.last_length]))[0])
        k = min(k, max(self.last_length - cfg.sinks - cfg.window, 0))  # cannot retrieve more than compete
        per = "query head, GQA union" if cfg.reduction == "union" else "KV head (max over the group)"
        line = (
            f"context {self.last_length} tokens | attended per step: {self.mean_attended:.0f} tokens per KV head "
            f"({self.mean_fraction:.1%} of the context, mean over layers and steps) | budget {cfg.budget}: "
            f"{k} retrieved per {per} + {cfg.sinks} sinks + {cfg.window} window"
        )
        if self.dense:
            why = "; ".join(f"{n} {reason}" if len(self.dense) > 1 else reason for reason, n in self.dense.items())
            line += f" | dense: {sum(self.dense.values())} of {self.decode_steps} steps ({why})"
        return line

    @property
    def dense_steps(self) -> int:
        return sum(self.dense.values())


class SelectionTrace:
    """Which tokens every decode step attended, per layer, row and KV head, as positions among the row's real
    tokens: two paths with different paddings or cache layouts compare set for set. ``sets[(layer, row)]`` lists
    one tuple of per-KV-head frozensets per decode step. For tests and debugging (it reads the selection back)."""

    def __init__(self):
        self.sets: dict[tuple[int, int], list[tuple[frozenset[int], ...]]] = {}

    def _add(self, layer: int, valid: torch.Tensor, slots, rows) -> None:
        """``slots[b][h]``: the cache slots row b's KV head h attended, turned into positions among real tokens."""
        rank = (valid.long().cumsum(-1) - 1).cpu()
        for row, heads, r in zip(rows if rows is not None else range(len(slots)), slots, rank):
            self.sets.setdefault((layer, row), []).append(tuple(frozenset(r[s.long().cpu()].tolist()) for s in heads))

    def add_mask(self, layer: int, keep: torch.Tensor, valid: torch.Tensor, rows=None) -> None:
        """``keep`` (B, Hkv, n) bool over cache slots, ``valid`` (B, n)."""
        keep = keep & valid.unsqueeze(1)
        self._add(layer, valid, [[k.nonzero().flatten() for k in heads] for heads in keep], rows)

    def add_rows(self, layer: int, idx: torch.Tensor, count: torch.Tensor, valid: torch.Tensor, rows=None) -> None:
        """``idx`` (B, Hkv, m) cache slots, the first ``count`` (B, Hkv) of each row and head selected."""
        self._add(layer, valid, [[i[: int(c)] for i, c in zip(heads, counts)] for heads, counts in zip(idx, count)], rows)

    def steps(self) -> int:
        return max((len(v) for v in self.sets.values()), default=0)
