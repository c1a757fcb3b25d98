"""How a plain Hugging Face model's attention is routed through a2ats while a patch is active.

Registers an attention function ("a2ats") with transformers' ``AttentionInterface``; a forward
pre-hook on each attention module hands it the model's own cos/sin (any rope type) and the cache.
Modules of models not under a patch behave like SDPA. :class:`ModelPatch` is the base of A²ATS
decoding (:mod:`.a2ats`) and of calibration's recording (:mod:`.calibrate`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)

from a2ats import kernels
from a2ats.core.distributed import kv_heads_held
from a2ats.core.rope import WRoPE, find_rotary_embedding, undo_rotation
from a2ats.core.support import UnsupportedModelError, check_supported, model_type


def dense(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Ordinary causal attention, as transformers' SDPA integration computes it; a whole causal sequence in bf16 on
    the CPU (a bf16 prefill or calibration forward) goes to the C++ kernel (:func:`a2ats.kernels.causal_attention`:
    the same arithmetic as torch's bf16 attention, ~2.5x faster on 2 cores)."""
    if _bf16_causal(module, query, key, attention_mask, dropout, kwargs):
        out = kernels.causal_attention(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling)
        return out.to(torch.bfloat16).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _bf16_causal(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """Whether SDPA would run plain causal attention over the whole sequence, in bf16 (bf16 operands, or autocast
    to bf16), on CPU tensors: the case :func:`a2ats.kernels.causal_attention` computes."""
    if attention_mask is not None or query.shape[2] < 2 or query.shape[2] != key.shape[2] or not query.is_cpu:
        return False
    if dropout or kwargs.get("cache") is not None or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return False
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return (autocast_bf16 or query.dtype == torch.bfloat16) and kernels.bf16_attention_kernel(query.shape[-1])


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


def valid_from_mask(mask: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """(B, n) bool of the tokens the current (last) query may attend to, from a 4D mask or None."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, :n]
    if row.dtype != torch.bool:  # additive float mask: 0 keeps, a large negative masks
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, n)


class ModelPatch:
    """Routes a model's attention through :meth:`attention` while active; base of A²ATS and calibration."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rotary = find_rotary_embedding(model)  # also: a clear error for models without RoPE
        self.modules = attention_modules(model)
        self.num_layers = len(self.modules)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.held = kv_heads_held(model)  # every head, or this tensor-parallel rank's block (a bad rank count: refused)
        self._current: tuple[Any, Any] | None = None
        self._handles: list[Any] = []
        self._prev_impl: str | None = None

    def _pre_hook(self, module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise UnsupportedModelError(
                f"a2ats does not support this {model_type(self.model)} model: {type(module).__name__} does not receive "
                "position_embeddings (cos, sin) from its decoder layer; "
                "A²ATS supports models whose attention applies the shared rotary embedding (Llama, Mistral, Qwen2/3, ...)"
            )
        self._current = (pe, kwargs.get("past_key_values"))

    def kv_heads(self, n_local: int) -> slice:
        """The global KV heads this process holds: all of them, or this rank's block under tensor parallelism."""
        if n_local == self.held.stop - self.held.start:
            return self.held
        raise UnsupportedModelError(
            f"a2ats does not support this {model_type(self.model)} model: its attention passes {n_local} KV heads where "
            f"its configuration has {self.num_kv_heads}, of which this process holds {self.held.stop - self.held.start} "
            "(attention experts, or a tensor-parallel shard made by hand: load the model with transformers' "
            "tp_plan='auto' instead)")

    def enable(self):
        if self._handles:
            return self
        self._prev_impl = getattr(self.model.config, "_attn_implementation", None)
        for m in self.modules:
            m._a2ats_patch = self
            self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        return self

    def disable(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.modules:
            if getattr(m, "_a2ats_patch", None) is self:
                del m._a2ats_patch
        if self._prev_impl is not None:
            self.model.set_attn_implementation(self._prev_impl)

    def __enter__(self):
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        raise NotImplementedError




# Known rotary layouts other than rotate-half, named in the refusal (the probe below finds any).
KNOWN_LAYOUTS = {"cohere": "interleaved pairs (rotate_half over even/odd dimensions)",
                 "cohere2": "interleaved pairs (rotate_half over even/odd dimensions)",
                 "gpt_oss": "cos/sin of half the rotated width, applied to each half"}


class _RotaryProbe(ModelPatch):
    """Records layer 0's post-RoPE queries and keys and the cos/sin the model rotated them by; attends densely."""

    seen = None

    def attention(self, module, query, key, value, mask, scaling, dropout, kwargs):
        if module.layer_idx == self.modules[0].layer_idx and self.seen is None:
            self.seen = (query.detach().float(), key.detach().float(), *self._current[0])
        return dense(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _rebuilt_score_error(model: nn.Module, tokens: int) -> tuple[float, float]:
    """(largest |WRoPE score rebuilt from the un-rotated q, k - the model's own q·k|, largest |q·k|) in layer 0."""
    probe = _RotaryProbe(model)
    vocab = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                    "vocab_size", 100)
    ids = torch.arange(tokens, device=next(model.parameters()).device).view(1, -1) * 7919 % max(vocab - 1, 1) + 1
    base = getattr(model, model.base_model_prefix, model)
    with probe:
        base(input_ids=ids, use_cache=False)
    if probe.seen is None:
        raise UnsupportedModelError(f"a2ats does not support this {model_type(model)} model: none of its attention "
                                    "modules called the attention function a2ats registers")
    q, k, cos, sin = probe.seen
    Hq, Hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    q_pre, k_pre = undo_rotation(q, cos, sin), undo_rotation(k, cos, sin)
    last = tokens - 1
    worst, scale = 0.0, 0.0
    for j in range(last):
        est = WRoPE(probe.rotary, last - j).query(q_pre[0, :, last]).view(Hkv, Hq // Hkv, d)
        est = (est * k_pre[0, :, j, None]).sum(-1)
        true = (q[0, :, last].view(Hkv, Hq // Hkv, d) * k[0, :, j, None]).sum(-1)
        worst, scale = max(worst, float((est - true).abs().max())), max(scale, float(true.abs().max()))
    return worst, scale


@torch.no_grad()
def check_rotary_layout(model: nn.Module, tokens: int = 8) -> None:
    """Refuse a model whose rotary layout a2ats cannot invert, by running it once on ``tokens`` tokens.

    WRoPE scores a key at distance b as ``(R_b q_pre) · k_pre``, where q_pre and k_pre are the model's post-RoPE
    query and key rotated back by :func:`undo_rotation` (rotate-half over the first ``rot`` dims). On a model
    whose rotation is laid out otherwise (interleaved pairs, half-width cos/sin) that differs from the model's
    own score ``q · k`` at distance b; this checks it for distances 1..tokens-1 in layer 0 and raises
    :class:`UnsupportedModelError` naming the model type when it fails. Also runs the other support checks.
    Done once per model."""
    check_supported(model)
    if getattr(model, "_a2ats_rotary_checked", False):
        return
    try:
        worst, scale = _rebuilt_score_error(model, tokens)
    except UnsupportedModelError:
        raise
    except Exception as e:  # an attention a2ats cannot host: named, not a traceback from deep inside the model
        raise UnsupportedModelError(
            f"a2ats does not support this {model_type(model)} model: its attention does not run as a2ats expects "
            f"(query and key heads rotated by the shared cos/sin, a softmax over q·k per head): {type(e).__name__}: {e}"
        ) from e
    tol = (1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2) * max(scale, 1.0)
    if worst > tol:
        kind = model_type(model)
        layout = KNOWN_LAYOUTS.get(kind, "a layout other than rotate-half over the first rotary dimensions")
        raise UnsupportedModelError(
            f"a2ats does not support this {kind} model: its rotary embedding uses {layout}, which a2ats does not "
            f"invert (scores rebuilt from the un-rotated query and key differ from the model's by {worst:.3g}, "
            f"scores are up to {scale:.3g})")
    model._a2ats_rotary_checked = True
