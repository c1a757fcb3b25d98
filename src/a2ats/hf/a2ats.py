"""A²ATS on a plain Hugging Face model, without forking its code: the *reference* path and transformers' fast path.

``with A2ATS(model, codebooks) as a2:`` routes the model's attention through :mod:`.patch`. Inside the
block ``model.generate`` works as usual (an :class:`~a2ats.hf.cache.A2ATSCache` is supplied when none
is given) and ``model(...)`` works with ``past_key_values=a2.new_cache()``.

Per layer and step the data flows one way: attention function -> method (encode new keys; score)
-> selection -> exact attention over the selection.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from a2ats import kernels
from a2ats.core.attention import attend_selected
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import undo_rotation
from a2ats.core.selection import DecodeStep
from a2ats.core.stats import SelectionStats, SelectionTrace
from a2ats.core.support import check_context, check_supported
from a2ats.hf.cache import A2ATSCache
from a2ats.hf.patch import ModelPatch, check_rotary_layout, dense, valid_from_mask
from a2ats.methods import A2ATSMethod, Method


class A2ATS(ModelPatch):
    """A²ATS retrieval attention on a Hugging Face causal LM.

    Prefill is dense; each new key is encoded with the codebooks; each decode step attends exactly
    to the tokens the method selects (sinks and window always). K, V and codes stay on the model's
    device. ``path``: ``reference`` applies the selection as a mask over the whole cache (for
    accuracy; saves no time); ``fast`` scores, selects and attends with the CPU kernels
    (:mod:`a2ats.kernels`), reading only the selected rows; ``auto`` (default) is ``fast`` for the
    A²ATS method on a CPU model when the kernels build here. Both select the same tokens.
    ``trace=True``: :attr:`trace` records every decode step's selection (:class:`~a2ats.core.stats.SelectionTrace`).
    """

    def __init__(
        self,
        model: nn.Module,
        codebooks: Codebooks | None = None,
        config: A2ATSConfig | None = None,
        method: Method | None = None,
        path: str = "auto",
        trace: bool = False,
    ):
        kernels.resolve_path(path, "cpu")  # a bad name is refused before any work
        check_supported(model)  # before the patch looks for a rotary module: the most basic reason first
        super().__init__(model)
        check_rotary_layout(model)
        self.config = config or A2ATSConfig()
        if method is None:
            if codebooks is None:
                raise ValueError("A2ATS needs codebooks (a2ats.load_or_calibrate(model, tokenizer), or Codebooks.load(path)) or a method")
            method = A2ATSMethod.for_model(model, codebooks, self.config)
        self.method = method
        self.stats = SelectionStats(self.config)
        self.trace = SelectionTrace() if trace else None
        # wrappers (probes) stay reference
        self.path = kernels.resolve_path(path, next(model.parameters()).device, type(method) is A2ATSMethod)

    def new_cache(self) -> A2ATSCache:
        return A2ATSCache(self.num_layers)

    def check_length(self, length: int, max_new_tokens: int = 0) -> None:
        check_context(self.model, length, max_new_tokens)

    def enable(self):
        if self._handles:
            return self
        super().enable()
        original = self.model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self.check_length(ids.shape[-1])
            if kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = self.new_cache()
            self.stats.reset()
            if self.trace is not None:
                self.trace = SelectionTrace()
            return original(*args, **kwargs)

        self.model.generate = generate
        return self

    def disable(self) -> None:
        if "generate" in vars(self.model):
            del self.model.generate
        super().disable()

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        (cos, sin), cache = self._current
        if cache is not None and not isinstance(cache, A2ATSCache):
            raise TypeError(
                f"A²ATS needs its own cache, got {type(cache).__name__}: pass past_key_values=a2.new_cache() "
                "(model.generate inside the A2ATS block does this for you)"
            )
        layer, t = module.layer_idx, query.shape[2]
        heads = self.kv_heads(key.shape[1])
        if cache is not None:
            store = cache.layers[layer]
            k_new = key[:, :, -t:]
            self.method.on_append(layer, store, undo_rotation(k_new, cos, sin), k_new, heads)
        if t > 1 or cache is None:  # prefill (or no cache): dense causal attention
            return dense(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        B, _, n, _ = key.shape
        step = DecodeStep(
            layer=layer,
            query=query[:, :, 0],
            q_pre=undo_rotation(query, cos, sin)[:, :, 0],
            keys=key,
            valid=valid_from_mask(mask, B, n, key.device),
            store=store,
            kv_heads=heads,
        )
        if self.path == "fast":
            return self._fast_decode(step, query, store, scaling), None
        keep = self.method.select(step, self.config)
        self.stats.record(keep, step.valid)
        if self.trace is not None:
            self.trace.add_mask(layer, keep, step.valid)
        return attend_selected(query, key, value, keep, scaling), None

    def _fast_decode(self, step: DecodeStep, query: torch.Tensor, store, scaling: float) -> torch.Tensor:
        """Kernel scoring + selection, then attention over the selected rows only: (B, 1, Hq, d)."""
        c, m = self.config, self.method
        bands, offsets = m.band_offsets(step.valid)
        budget = c.budget.tokens_for(step.valid.sum(-1))
        idx, count = m.select_rows(step.layer, step.q_pre, step.query, store.extra("codes"), step.valid, budget, c,
                                   step.kv_heads, bands, offsets)
        self.stats.record_counts(count, step.valid)
        if self.trace is not None:
            self.trace.add_rows(step.layer, idx, count, step.valid)
        k_buf, v_buf = store.buffers()
        return kernels.sparse_attention(step.query, k_buf, v_buf, idx, count, scaling).unsqueeze(1)
