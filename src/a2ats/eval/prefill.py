"""One dense prefill shared by every method and budget: only decoding differs between them.

A prefill is computed once (dense attention is what every method does at prefill), then *forked*
into a fresh cache per method: K/V are copied and the method sees the prompt's keys through its
usual ``on_append`` (codes, PQ fit, ...), exactly as if it had run the prefill itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import A2ATSCache
from ..config import A2ATSConfig
from ..hf import A2ATS
from ..methods import FullMethod
from ..rope import undo_rotation


@dataclass
class Prefill:
    ids: torch.Tensor  # (1, n)
    cache: A2ATSCache
    last_logits: torch.Tensor  # (1, vocab)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> Prefill:
    ids = ids.view(1, -1).to(next(model.parameters()).device)
    with A2ATS(model, config=A2ATSConfig(budget=1.0), method=FullMethod()) as a2:
        cache = a2.new_cache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return Prefill(ids, cache, out.logits[:, -1])


@torch.inference_mode()
def fork(pre: Prefill, a2: A2ATS) -> A2ATSCache:
    """A fresh cache holding the prefill's K/V, with ``a2.method``'s per-token metadata built from them."""
    n = pre.ids.shape[1]
    new = a2.new_cache()
    probe = pre.cache.layers[0].keys
    cos, sin = a2.rotary(probe.float(), position_ids=torch.arange(n, device=probe.device).unsqueeze(0))
    for layer, (src, dst) in enumerate(zip(pre.cache.layers, new.layers)):
        dst.update(src.keys.clone(), src.values.clone())
        k_post = dst.keys
        a2.method.on_append(layer, dst, undo_rotation(k_post, cos, sin), k_post, a2.kv_heads(k_post.shape[1]))
    return new


@torch.inference_mode()
def greedy_decode(model, a2: A2ATS, pre: Prefill, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy tokens after the shared prefill, decoding under ``a2`` (which must be enabled)."""
    cache = fork(pre, a2)
    tok = pre.last_logits.argmax(-1, keepdim=True)
    out = [int(tok)]
    while len(out) < max_new_tokens and out[-1] not in eos:
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out.append(int(tok))
    return out
