"""Perplexity of a continuation decoded token by token under a method, after a shared dense prefill."""

from __future__ import annotations

import math

import torch

from a2ats.eval.prefill import Prefill, fork
from a2ats.hf import A2ATS


@torch.inference_mode()
def continuation_perplexity(model, a2: A2ATS, pre: Prefill, continuation: torch.Tensor) -> float:
    """exp(mean NLL) of ``continuation`` (1-D ids) teacher-forced after ``pre``, each step decoding under ``a2``."""
    cache = fork(pre, a2)
    logits = pre.last_logits
    nll = 0.0
    cont = continuation.to(pre.ids.device)
    for i, tok in enumerate(cont):
        nll -= float(torch.log_softmax(logits.float(), -1)[0, tok])
        if i + 1 < len(cont):
            logits = model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
    return math.exp(nll / len(cont))
