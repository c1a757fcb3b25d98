"""Method-agnostic selection (docs/design.md §1.3 steps 3-4): per-head top-K with sinks and window
excluded from the competition, the GQA reduction, and sinks and window added back.

Every method (A²ATS, oracle, Quest, ...) produces estimated scores per query head; this module
turns them into the set of tokens each KV head attends to, identically for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2ats.core.config import A2ATSConfig


@dataclass
class DecodeStep:
    """Everything a method may need to choose tokens for one layer at one decode step."""

    layer: int
    query: torch.Tensor  # (B, Hq, d) post-RoPE, model dtype
    q_pre: torch.Tensor  # (B, Hq, d) pre-RoPE, fp32
    keys: torch.Tensor  # (B, Hkv, n, d) post-RoPE (the cache's view)
    valid: torch.Tensor  # (B, n) bool: False for padding
    store: object  # the cache layer (per-token extras such as codes)
    kv_heads: slice  # global KV heads held here (tensor parallel ranks hold a slice)

    @property
    def group(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]


def table_scores(lut: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """Estimated scores (B, Hkv·G, n) fp32 read from lookup tables: ``lut[b, h, g, codes[b, h, j] + offsets[b, j]]``.

    ``lut`` (B, Hkv, G, T): one row per query head of each KV head's group (G = 1 for a reduced table);
    ``codes`` (B, Hkv, n); ``offsets`` (B, n) or None: where token j's band starts in the table (banded WRoPE)."""
    B, H, G, _ = lut.shape
    n = codes.shape[-1]
    entry = codes.long()
    if offsets is not None:
        entry = entry + offsets.long().unsqueeze(1)
    return torch.gather(lut.float(), -1, entry.unsqueeze(2).expand(B, H, G, n)).reshape(B, H * G, n)


def always_kept(valid: torch.Tensor, sinks: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(always, candidates, length) for valid (B, n): the first ``sinks`` and last ``window`` valid
    tokens are always attended; the other valid tokens compete for the budget."""
    rank = valid.cumsum(-1) - 1  # position among the row's real tokens (left padding skipped)
    length = valid.sum(-1)
    always = valid & ((rank < sinks) | (rank >= (length - window).unsqueeze(-1)))
    return always, valid & ~always, length


def float_order(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the float32 order of ``scores`` (the selection kernels compare these)."""
    bits = scores.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _sort_key(scores: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score, rank): ties (common: tokens sharing a VQ code share a score)
    go to the more recent token, so a row selects the same set whatever padding precedes it."""
    return (float_order(scores).to(torch.int64) << 32) | rank.unsqueeze(1)


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, H, n): for each row b and head, the ``k[b]`` highest-scoring candidates.

    Rows may have different k; fewer candidates than k selects them all; non-candidates never.
    Equal scores are broken toward the later token.
    """
    B, H, n = scores.shape
    kmax = int(min(int(k.max()) if k.numel() else 0, n))
    out = torch.zeros(B, H, n, dtype=torch.bool, device=scores.device)
    if kmax <= 0:
        return out
    rank = candidates.long().cumsum(-1)  # among candidates: shift-invariant under left padding
    low = torch.iinfo(torch.int64).min
    key = _sort_key(scores, rank).masked_fill(~candidates.unsqueeze(1), low)
    vals, idx = key.topk(kmax, dim=-1, sorted=True)
    take = (torch.arange(kmax, device=scores.device) < k.view(B, 1, 1)) & (vals > low)
    out.scatter_(-1, idx, take)
    return out


def reduce_tables(lut: torch.Tensor, reduction: str) -> torch.Tensor:
    """Lookup tables (B, Hkv, G, T) as the fused selection kernels take them for ``reduction``.

    A token's code is shared by every query head of its KV head, so "max" (max over the group's
    estimated scores, then top-K per KV head) is the union kernel run on one table per KV head: the
    entry-wise max over the group. Same scores, same ties, same set as :func:`select`."""
    return lut.amax(2, keepdim=True) if reduction == "max" else lut


def select(scores: torch.Tensor, valid: torch.Tensor, num_kv_heads: int, config: A2ATSConfig,
           budget: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens each KV head attends to, (B, Hkv, n) bool, from per-query-head scores (B, Hq, n); ``budget`` (B,):
    each row's top-K (default: the config's budget of its length).

    ``union``: top-K per query head, OR over the GQA group (the paper).
    ``max``: each token scored by the max over the group's heads, top-K per KV head.
    """
    B, Hq, n = scores.shape
    G = Hq // num_kv_heads
    always, candidates, length = always_kept(valid, config.sinks, config.window)
    k = config.budget.tokens_for(length) if budget is None else budget
    if config.reduction == "max":
        per_kv = scores.float().view(B, num_kv_heads, G, n).amax(2)
        chosen = topk_mask(per_kv, candidates, k)
    else:
        chosen = topk_mask(scores, candidates, k).view(B, num_kv_heads, G, n).any(2)
    return chosen | always.unsqueeze(1)
