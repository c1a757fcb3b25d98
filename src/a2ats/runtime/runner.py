"""Per-layer attention of the engine: dense at prefill, A²ATS selection + sparse attention at decode.

The fast path (CPU kernels) and the reference path (torch gather + :mod:`a2ats.core.selection` +
:func:`a2ats.core.attention.attend_selected`) make the same selection; tests hold them equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from a2ats import kernels
from a2ats.core.attention import attend_selected
from a2ats.core.config import A2ATSConfig
from a2ats.core.selection import select
from a2ats.core.stats import SelectionTrace
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.runtime.batch_cache import BatchKV
from a2ats.runtime.model import LeanModel
from a2ats.runtime.step import StepContext, Timer


class Runner:
    def __init__(self, lean: LeanModel, method: A2ATSMethod | None, config: A2ATSConfig, fast: bool):
        self.lean, self.method, self.config, self.fast = lean, method, config, fast
        self.cache: BatchKV | None = None
        self.ctx: StepContext | None = None
        self.timer: Timer | None = None
        self.trace: SelectionTrace | None = None  # every decode step's selection, when asked for (tests)
        self.kv_heads = slice(0, lean.kv_heads)
        # Summed over decode layer-steps, rows and KV heads, kept as tensors so counting costs no device sync.
        self.attended = torch.zeros((), dtype=torch.long, device=lean.device)  # tokens attended
        self.context = torch.zeros((), dtype=torch.long, device=lean.device)  # row lengths
        self.heads = 0  # (layer-step, row, KV head) terms

    def reset_counts(self) -> None:
        self.attended.zero_()
        self.context.zero_()
        self.heads = 0

    def new_cache(self, batch: int, capacity: int) -> BatchKV:
        lean = self.lean
        self.cache = BatchKV(lean.num_layers, batch, lean.kv_heads, lean.head_dim, capacity, lean.dtype,
                                 lean.device, codes=self.method is not None)
        # Decode keys inside the window are always attended, so their codes are not needed until they
        # leave it: they wait here (pre-RoPE) and are encoded together once per `window + 1` steps,
        # which reads the codebook once per batch instead of once per token and layer.
        self.pending = torch.empty(lean.num_layers, batch, lean.kv_heads, self.config.window + 1, lean.head_dim,
                                   dtype=lean.dtype, device=lean.device) if self.method is not None else None
        return self.cache

    def begin_step(self, mask: torch.Tensor, decode: bool) -> StepContext:
        """Open cache slots for this step's tokens (mask (B, t)) and compute what every layer shares;
        ``decode``: one generated token per row, attended sparsely (dense when there is no method)."""
        start, end = self.cache.advance(mask)
        valid = self.cache.valid_now
        decode = decode and self.method is not None
        ctx = StepContext(start=start, end=end, valid=valid, decode=decode)
        if decode:
            length = valid.sum(-1)
            ctx.budget = self.config.budget.tokens_for(length)
            lean = self.lean
            self.context += length.sum() * (lean.kv_heads * lean.num_layers)
            self.heads += valid.shape[0] * lean.kv_heads * lean.num_layers
            ctx.bands, ctx.offsets = self.method.band_offsets(valid)
            # Every row's newest `window` slots are real (decode appends one real token per row), so
            # codes are needed exactly for the slots before end - window.
            cache = self.cache
            ctx.slot = start - cache.encoded
            if end - self.config.window > cache.encoded:
                ctx.encode_from, cache.encoded = cache.encoded, end
        elif self.method is not None:
            self.cache.encoded = end  # prefill encodes its chunk at once
        self.ctx = ctx
        return ctx

    def attend(self, layer: int, q_pre, q, k_pre, k, v) -> torch.Tensor:
        ctx, cache, timer = self.ctx, self.cache, self.timer
        codes = None
        if self.method is not None and not ctx.decode:
            codes = self.method.encode(layer, k_pre, k, self.kv_heads)
        cache.write(layer, ctx.start, k, v, codes)
        if ctx.decode:
            pending = self.pending[layer]
            pending[:, :, ctx.slot] = k_pre[:, :, 0]
            if ctx.encode_from >= 0:
                codes = self.method.encode(layer, pending[:, :, : ctx.slot + 1], None, self.kv_heads)
                cache.write_codes(layer, ctx.encode_from, codes)
        B, Hq, t, d = q.shape
        if timer is not None:
            timer.lap("scoring" if ctx.decode else "rest")
        if not ctx.decode:
            out = self._dense(layer, q)
            if timer is not None:
                timer.lap("attention")
            return out
        q1, q1_pre = q[:, :, 0], q_pre[:, :, 0].float()
        c, m = self.config, self.method
        if self.fast:
            idx, count = m.select_rows(layer, q1_pre, q1, cache.layer_codes(layer), ctx.valid, ctx.budget, c,
                                       self.kv_heads, ctx.bands, ctx.offsets)
            if timer is not None:
                timer.lap("scoring")
            out = kernels.sparse_attention(q1, cache.k[layer], cache.v[layer], idx, count, self.lean.scaling)
            self.attended += count.sum()
            if self.trace is not None:
                self.trace.add_rows(layer, idx, count, ctx.valid)
        else:
            scores = m.score_tokens(layer, q1_pre, q1, cache.layer_codes(layer), ctx.bands, ctx.offsets, self.kv_heads)
            keep = select(scores, ctx.valid, cache.kv_heads, c)
            if timer is not None:
                timer.lap("scoring")
            out = attend_selected(q, cache.keys(layer), cache.values(layer), keep, self.lean.scaling)
            self.attended += keep.sum()
            if self.trace is not None:
                self.trace.add_mask(layer, keep, ctx.valid)
        out = out.reshape(B, 1, Hq * d)
        if timer is not None:
            timer.lap("attention")
        return out

    def _dense(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Causal attention of this step's queries over the cache so far, padding masked (SDPA)."""
        ctx, cache = self.ctx, self.cache
        B, Hq, t, d = q.shape
        n = ctx.end
        causal = torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t)
        mask = (causal.unsqueeze(0) & ctx.valid.unsqueeze(1)).unsqueeze(1)  # (B, 1, t, n)
        # A padding query row (left padding) would see nothing and turn to NaN, which its V row would then
        # spread through 0·NaN in later layers: let every row see its own slot.
        mask = mask.clone()
        rows = torch.arange(t, device=q.device)
        mask[:, :, rows, n - t + rows] = True
        out = F.scaled_dot_product_attention(q, cache.keys(layer), cache.values(layer), attn_mask=mask,
                                             scale=self.lean.scaling, enable_gqa=Hq != cache.kv_heads)
        return out.transpose(1, 2).reshape(B, t, Hq * d)
