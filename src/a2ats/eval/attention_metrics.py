"""Attention-level metrics: share of the true attention mass a selection captures, and score error of a codebook.

Kept apart from the library: these wrap its pieces (a :class:`Method`, :class:`ModelPatch`) to
measure them, and are used by tests and the evaluation harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from a2ats import kernels
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import WRoPE, undo_rotation
from a2ats.core.selection import DecodeStep, always_kept, select, topk_mask
from a2ats.eval.prefill import Prefill, fork, prefill
from a2ats.hf import A2ATS, ModelPatch
from a2ats.methods import Method


@dataclass
class MassProbe(Method):
    """Wraps a method; at each decode step records, per query head, the true attention mass its selection
    captures and its recall of the true top-K (K the budget, among the same candidates)."""

    inner: Method
    scaling: float
    mass: dict[int, list[float]] = field(default_factory=dict)  # layer -> per (step, row, query head)
    recall: dict[int, list[float]] = field(default_factory=dict)
    # the oracle's mass at the same budget and reduction rule (the true scores through the same top-K and GQA
    # reduction, sinks and window): the ceiling a selection's mass is read against, step by step
    oracle_mass: dict[int, list[float]] = field(default_factory=dict)
    attended: list[float] = field(default_factory=list)  # tokens per KV head, per (step, layer)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def on_append(self, layer, store, k_pre, k_post, kv_heads):
        self.inner.on_append(layer, store, k_pre, k_post, kv_heads)

    def scores(self, step):
        return self.inner.scores(step)

    def select(self, step: DecodeStep, config: A2ATSConfig) -> torch.Tensor:
        keep = self.inner.select(step, config)
        B, Hq, d = step.query.shape
        Hkv, G = step.keys.shape[1], step.group
        logits = torch.einsum("bhgd,bhnd->bhgn", step.query.float().reshape(B, Hkv, G, d), step.keys.float()) * self.scaling
        logits = logits.masked_fill(~step.valid[:, None, None, :], float("-inf"))
        p = logits.softmax(-1)
        captured = (p * keep[:, :, None, :]).sum(-1)  # (B, Hkv, G)
        self.attended.append(float(keep.sum(-1).float().mean()))
        self.mass.setdefault(step.layer, []).extend(captured.flatten().tolist())
        _, candidates, length = always_kept(step.valid, config.sinks, config.window)
        true_top = topk_mask(logits.reshape(B, Hq, -1), candidates, config.budget.tokens_for(length))
        best = select(logits.reshape(B, Hq, -1), step.valid, Hkv, config)  # what the oracle method keeps
        self.oracle_mass.setdefault(step.layer, []).extend((p * best[:, :, None, :]).sum(-1).flatten().tolist())
        hits = (true_top.view(B, Hkv, G, -1) & keep[:, :, None, :]).sum(-1).float()
        wanted = true_top.view(B, Hkv, G, -1).sum(-1).float()
        self.recall.setdefault(step.layer, []).extend((hits / wanted.clamp_min(1)).flatten().tolist())
        return keep

    def mean(self, what: str = "mass") -> float:
        got = getattr(self, what)
        vals = got if isinstance(got, list) else [v for vs in got.values() for v in vs]
        return sum(vals) / max(len(vals), 1)


@torch.inference_mode()
def attention_mass(
    model, method: Method, config: A2ATSConfig, ids: torch.Tensor, decode_last: int = 32, pre: Prefill | None = None
) -> MassProbe:
    """Prefill ``ids[:-decode_last]`` densely (or reuse ``pre``, that prefill), then decode the last tokens one
    at a time (teacher forcing) under ``method``; returns the probe holding every layer's, step's and head's figures."""
    mod = next(m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx"))
    probe = MassProbe(method, float(mod.scaling))
    ids = ids.view(-1)
    pre = pre or prefill(model, ids[:-decode_last])
    with A2ATS(model, config=config, method=probe) as a2:
        cache = fork(pre, a2)
        for tok in ids[-decode_last:].to(pre.ids.device):
            model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True)
    return probe


class _ScoreError(ModelPatch):
    def __init__(self, model, codebooks: dict[str, Codebooks], distance: int, queries: int):
        super().__init__(model)
        self.codebooks = codebooks
        self.wrope = WRoPE(self.rotary, distance)
        self.queries = queries
        self.sq: dict[str, float] = {k: 0.0 for k in codebooks}
        self.count = 0

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        from a2ats.hf.patch import dense

        (cos, sin), _ = self._current
        layer = module.layer_idx
        B, Hq, n, d = query.shape
        Hkv = key.shape[1]
        q = self.wrope.query(undo_rotation(query[:, :, -self.queries :], cos[:, -self.queries :], sin[:, -self.queries :]))
        q = q.reshape(B, Hkv, -1, d)  # the group's heads and queries pooled
        k_pre = undo_rotation(key, cos, sin)
        exact = torch.einsum("bhqd,bhnd->bhqn", q, k_pre)
        for name, cb in self.codebooks.items():
            codes = kernels.encode_nearest(*cb.encode_inputs(layer, k_pre)).long()  # (B, Hkv, n)
            cent = cb.centroids[layer].to(k_pre.device)  # (Hkv, C, d)
            approx_k = torch.stack([cent[h][codes[:, h]] for h in range(Hkv)], dim=1)  # (B, Hkv, n, d)
            est = torch.einsum("bhqd,bhnd->bhqn", q, approx_k)
            self.sq[name] += float(((est - exact) ** 2).sum())
        self.count += exact.numel()
        return dense(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


@torch.inference_mode()
def score_error(model, codebooks: dict[str, Codebooks], ids: torch.Tensor, queries: int = 64) -> dict[str, float]:
    """Mean squared error of the WRoPE score estimated from each codebook's centroids vs exact pre-RoPE keys,
    over the last ``queries`` queries of ``ids`` and all their keys, every layer and head."""
    distance = next(iter(codebooks.values())).settings.wrope_distance
    patch = _ScoreError(model, codebooks, distance, queries)
    base = getattr(model, model.base_model_prefix, model)
    with patch:
        base(input_ids=ids.view(1, -1).to(next(model.parameters()).device), use_cache=False)
    return {k: v / max(patch.count, 1) for k, v in patch.sq.items()}
