"""One dense prefill shared by every method and budget: only decoding differs between them.

A prefill is computed once (dense attention is what every method does at prefill), then *forked*
into a fresh cache per method: K/V are copied and the method sees the prompt's keys through its
usual ``on_append`` (codes, PQ fit, ...), exactly as if it had run the prefill itself. What
``on_append`` built is kept with the prefill, so later forks for the same method (other budgets,
reductions) copy it instead of encoding the prompt again: it depends only on the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from a2ats.core.config import A2ATSConfig
from a2ats.core.rope import undo_rotation
from a2ats.hf import A2ATS
from a2ats.hf.cache import A2ATSCache
from a2ats.hf.precision import autocast
from a2ats.methods import FullMethod


@dataclass
class Prefill:
    ids: torch.Tensor  # (1, n)
    cache: A2ATSCache
    last_logits: torch.Tensor  # (1, vocab)
    built: dict = field(default_factory=dict)  # id(method) -> (method, per layer what its on_append built from the prompt)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, compute_dtype: torch.dtype | None = None) -> Prefill:
    """Dense prefill of ``ids``; ``compute_dtype`` (bf16) runs it under autocast, the cache staying in the model's dtype."""
    ids = ids.view(1, -1).to(next(model.parameters()).device)
    with A2ATS(model, config=A2ATSConfig(budget=1.0), method=FullMethod()) as a2, autocast(ids.device, compute_dtype):
        cache = a2.new_cache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    dtype = next(model.parameters()).dtype
    for layer in cache.layers:  # under autocast some projections come out in bf16: decode expects the model's dtype
        if layer.keys.dtype != dtype or layer.values.dtype != dtype:
            layer.cast(dtype)
    return Prefill(ids, cache, out.logits[:, -1].to(dtype))


@torch.inference_mode()
def fork(pre: Prefill, a2: A2ATS) -> A2ATSCache:
    """A fresh cache holding the prefill's K/V, with ``a2.method``'s per-token metadata built from them
    (by its ``on_append`` the first time, copied from that on later forks for the same method)."""
    n = pre.ids.shape[1]
    new = a2.new_cache()
    # keyed by identity (methods are dataclasses: equal is not the same, and unhashable); the method is kept
    # beside its metadata so its id cannot be reused while the entry lives
    built = pre.built.get(id(a2.method), (None, None))[1]
    if built is None:
        probe = pre.cache.layers[0].keys
        cos, sin = a2.rotary(probe.float(), position_ids=torch.arange(n, device=probe.device).unsqueeze(0))
    for layer, (src, dst) in enumerate(zip(pre.cache.layers, new.layers)):
        dst.update(src.keys.clone(), src.values.clone())
        if built is not None:
            dst.restore_metadata(built[layer])
            continue
        k_post = dst.keys
        a2.method.on_append(layer, dst, undo_rotation(k_post, cos, sin), k_post, a2.kv_heads(k_post.shape[1]))
    if built is None:
        pre.built[id(a2.method)] = (a2.method, [dst.snapshot_metadata() for dst in new.layers])
    return new


@torch.inference_mode()
def greedy_decode(
    model, a2: A2ATS, pre: Prefill, max_new_tokens: int, eos: set[int], stop: Callable[[list[int]], bool] | None = None
) -> tuple[list[int], str]:
    """Greedy tokens after the shared prefill, decoding under ``a2`` (which must be enabled), and why it stopped:
    ``eos``, ``length`` or ``answered`` (``stop(tokens)`` said the output can no longer change its score)."""
    cache = fork(pre, a2)
    tok = pre.last_logits.argmax(-1, keepdim=True)
    out = [int(tok)]
    while True:
        if out[-1] in eos:
            return out, "eos"
        if len(out) >= max_new_tokens:
            return out, "length"
        if stop is not None and stop(out):
            return out, "answered"
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out.append(int(tok))
