"""The transformers integration: A²ATS on a plain Hugging Face model, without forking its code.

``with A2ATS(model, codebooks) as a2:`` registers an attention function ("a2ats") through
transformers' ``AttentionInterface`` and a forward pre-hook on each attention module that hands the
function the model's own cos/sin (any rope type) and the cache. Inside the block ``model.generate``
works as usual (a :class:`~a2ats.cache.A2ATSCache` is supplied when none is given) and
``model(...)`` works with ``past_key_values=a2.new_cache()``.

Per layer and step the data flows one way: attention function -> method (encode new keys; score)
-> selection -> exact attention over the selection.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from . import kernels
from .attention import attend_selected, dense
from .cache import A2ATSCache
from .codebook import Codebooks
from .config import A2ATSConfig
from .methods import A2ATSMethod, Method
from .rope import WRoPE, find_rotary_embedding, undo_rotation
from .selection import DecodeStep, reduce_tables
from .stats import SelectionStats

ATTN_IMPLEMENTATION = "a2ats"


def _attention_entry(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    patch = getattr(module, "_a2ats_patch", None)
    if patch is None:  # a module of a model that is not under A²ATS: behave like SDPA
        return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return patch.attention(module, query, key, value, attention_mask, scaling, dropout, kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_entry)
# Masks as SDPA wants them (boolean, True = attend); padding is read from them at decode.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]
    if not mods:
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")
    return sorted(mods, key=lambda m: m.layer_idx)


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def valid_from_mask(mask: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """(B, n) bool of the tokens the current (last) query may attend to, from a 4D mask or None."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, :n]
    if row.dtype != torch.bool:  # additive float mask: 0 keeps, a large negative masks
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, n)


def check_context(model: nn.Module, length: int, max_new_tokens: int = 0) -> None:
    """A clear error, before any work, for inputs the model cannot position."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and length + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {length} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{limit} positions: shorten the prompt or lower --max-new-tokens"
        )


class ModelPatch:
    """Routes a model's attention through :meth:`attention` while active; base of A²ATS and calibration."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rotary = find_rotary_embedding(model)  # also: a clear error for models without RoPE
        self.modules = attention_modules(model)
        self.num_layers = len(self.modules)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._current: tuple[Any, Any] | None = None
        self._handles: list[Any] = []
        self._prev_impl: str | None = None

    def _pre_hook(self, module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise ValueError(
                f"{type(module).__name__} does not receive position_embeddings (cos, sin) from its decoder layer; "
                "A²ATS supports models whose attention applies the shared rotary embedding (Llama, Mistral, Qwen2/3, ...)"
            )
        self._current = (pe, kwargs.get("past_key_values"))

    def kv_heads(self, n_local: int) -> slice:
        """The global KV heads this process holds: all of them, or this rank's slice under tensor parallelism."""
        if n_local == self.num_kv_heads:
            return slice(0, n_local)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r = torch.distributed.get_rank()
            return slice(r * n_local, (r + 1) * n_local)
        raise ValueError(f"attention sees {n_local} of {self.num_kv_heads} KV heads but no process group says which")

    def enable(self):
        if self._handles:
            return self
        self._prev_impl = getattr(self.model.config, "_attn_implementation", None)
        for m in self.modules:
            m._a2ats_patch = self
            self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        _set_attn_implementation(self.model, ATTN_IMPLEMENTATION)
        return self

    def disable(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.modules:
            if getattr(m, "_a2ats_patch", None) is self:
                del m._a2ats_patch
        if self._prev_impl is not None:
            _set_attn_implementation(self.model, self._prev_impl)

    def __enter__(self):
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        raise NotImplementedError


PATHS = ("auto", "fast", "reference")


class A2ATS(ModelPatch):
    """A²ATS retrieval attention on a Hugging Face causal LM.

    Prefill is dense; each new key is encoded with the codebooks; each decode step attends exactly
    to the tokens the method selects (sinks and window always). K, V and codes stay on the model's
    device. ``path``: ``reference`` applies the selection as a mask over the whole cache (for
    accuracy; saves no time); ``fast`` scores, selects and attends with the CPU kernels
    (:mod:`a2ats.kernels`), reading only the selected rows; ``auto`` (default) is ``fast`` for the
    A²ATS method on a CPU model when the kernels build here. Both select the same tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        codebooks: Codebooks | None = None,
        config: A2ATSConfig | None = None,
        method: Method | None = None,
        path: str = "auto",
    ):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        super().__init__(model)
        self.config = config or A2ATSConfig()
        if method is None:
            if codebooks is None:
                raise ValueError("A2ATS needs codebooks (see a2ats.calibrate / a2ats.load_codebooks) or a method")
            c = self.config
            codebooks.check_compatible(model, c.wrope_distance, band_ratio=c.wrope_band_ratio)
            method = A2ATSMethod(codebooks, WRoPE(self.rotary, c.wrope_distance, c.wrope_band_ratio))
        self.method = method
        self.stats = SelectionStats(self.config)
        fast_ok = type(method) is A2ATSMethod  # wrappers (probes) stay reference
        if path == "fast" and not fast_ok:
            raise ValueError("the fast path serves the A²ATS method itself; use path='reference'")
        if path == "auto":
            on_cpu = next(model.parameters()).device.type == "cpu"
            path = "fast" if fast_ok and on_cpu and kernels.cpu_backend() is not None else "reference"
        self.path = path

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
        return attend_selected(query, key, value, keep, scaling), None

    def _fast_decode(self, step: DecodeStep, query: torch.Tensor, store, scaling: float) -> torch.Tensor:
        """Kernel scoring + selection, then attention over the selected rows only: (B, 1, Hq, d)."""
        c, m = self.config, self.method
        bands, offsets = m.band_offsets(step.valid)
        lut = reduce_tables(m.lut(step.layer, step.q_pre, step.query, bands, step.kv_heads), c.reduction)
        budget = c.budget.tokens_for(step.valid.sum(-1))
        idx, count = kernels.score_select(lut, store.extra("codes"), offsets, step.valid, budget, c.sinks, c.window)
        self.stats.record_counts(count, step.valid)
        k_buf, v_buf = store.buffers()
        return kernels.sparse_attention(step.query, k_buf, v_buf, idx, count, scaling).unsqueeze(1)
