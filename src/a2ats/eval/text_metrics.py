"""Text metrics of a method on held-out prose, from one teacher-forced continuation after a shared prefill:
its perplexity, and the attention mass and top-K recall of its selections at the first positions."""

from __future__ import annotations

import math

import torch

from a2ats.core.config import A2ATSConfig
from a2ats.eval.attention_metrics import MassProbe
from a2ats.eval.prefill import Prefill, fork
from a2ats.hf import A2ATS
from a2ats.methods import Method


def attention_scaling(model) -> float:
    mod = next(m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx"))
    return float(mod.scaling)


@torch.inference_mode()
def continuation_metrics(
    model, method: Method, config: A2ATSConfig, pre: Prefill, continuation: torch.Tensor, mass_steps: int
) -> tuple[float, MassProbe]:
    """Teacher-force ``continuation`` (1-D ids) after ``pre``, each step decoding under ``method``.

    Returns exp(mean NLL) of the continuation, and the probe holding mass and recall at its first
    ``mass_steps`` positions (those steps run on the reference path, the probe's; the rest on the method's own).
    """
    probe = MassProbe(method, attention_scaling(model))
    cont = continuation.to(pre.ids.device)
    logits, nll = pre.last_logits, 0.0
    phases = [(probe, range(0, min(mass_steps, len(cont)))), (method, range(min(mass_steps, len(cont)), len(cont)))]
    cache = None
    for m, steps in phases:
        if not len(steps):
            continue
        with A2ATS(model, config=config, method=m) as a2:
            cache = cache if cache is not None else fork(pre, a2)
            for i in steps:
                nll -= float(torch.log_softmax(logits.float(), -1)[0, cont[i]])
                if i + 1 < len(cont):
                    logits = model(input_ids=cont[i].view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
    return math.exp(nll / len(cont)), probe
