"""What a2ats assumes of a model, checked before any work: positions within its context, and attention that
the transformers integration and the runtime reproduce exactly. A model that breaks an assumption is refused
with its type and what is missing, never run with silently wrong scores or outputs.

The assumptions: every layer attends to the whole context (no sliding windows), the softmax has no learned
sink logit, and the rotary embedding has one set of frequencies that does not change with the length (WRoPE
rotates queries to fixed distances once). The rotary *layout* (rotate-half over the first ``rot`` dims) is
checked by running the model (:func:`a2ats.hf.patch.check_rotary_layout`), so a family not named here is
caught as well.
"""

from __future__ import annotations

from torch import nn

# Rope types whose frequencies depend on the current length: WRoPE's fixed-distance rotations would be stale.
LENGTH_DEPENDENT_ROPE = {"dynamic": "dynamic NTK scaling recomputes the frequencies as the context grows",
                         "longrope": "LongRoPE switches between short and long frequency factors with the length"}


class UnsupportedModelError(ValueError):
    """The model's attention is not one a2ats reproduces; the message names the model type and what is missing."""


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_type(model: nn.Module) -> str:
    return getattr(text_config(model), "model_type", None) or type(model).__name__


# Layer kinds (config.layer_types) that attend to every earlier token through a KV cache.
FULL_ATTENTION_LAYERS = ("full_attention", "attention", "global", "global_attention", "multihead_attention",
                         "multiquery_attention")


def _windowed(kind: str) -> bool:
    return "sliding" in kind or "chunked" in kind or "window" in kind or kind == "local"


def unsupported_reasons(model: nn.Module) -> list[str]:
    """Why a2ats cannot run ``model`` faithfully (empty when it can, as far as its configuration tells)."""
    cfg = text_config(model)
    reasons = []
    layer_types = getattr(cfg, "layer_types", None) or []
    windowed = [i for i, t in enumerate(layer_types) if _windowed(str(t))]
    other = [str(t) for t in layer_types if not _windowed(str(t)) and str(t) not in FULL_ATTENTION_LAYERS]
    if other:
        kinds = ", ".join(f"{other.count(k)} {k}" for k in dict.fromkeys(other))
        reasons.append(f"{len(other)} of its {len(layer_types)} layers are not softmax attention over a KV cache "
                       f"({kinds}: a recurrent or compressed state), so there are no per-token keys to select from")
    if windowed:
        reasons.append(f"{len(windowed)} of its {len(layer_types)} layers attend through a sliding window "
                       f"({getattr(cfg, 'sliding_window', None)} tokens); a2ats selects over the whole context, and "
                       "running plain windowed attention on those layers is not implemented")
    elif getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        reasons.append(f"every layer attends through a sliding window of {cfg.sliding_window} tokens, which a2ats "
                       "would ignore; if the checkpoint was trained without one, set model.config.sliding_window = None")
    if any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules()):
        reasons.append("its attention adds learned sink logits to every softmax, which the exact attention over a "
                       "selection does not add")
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    per_type = params.values() if params and all(isinstance(v, dict) or v is None for v in params.values()) else [params]
    for p in per_type:
        kind = (p or {}).get("rope_type") or (p or {}).get("type")
        if kind in LENGTH_DEPENDENT_ROPE:
            reasons.append(f"rope_type {kind!r}: {LENGTH_DEPENDENT_ROPE[kind]}, and WRoPE rotates queries to fixed "
                           "distances with one set of frequencies")
            break
    return reasons


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the model type and every assumption it breaks."""
    reasons = unsupported_reasons(model)
    if reasons:
        raise UnsupportedModelError(f"a2ats does not support this {model_type(model)} model: " + "; ".join(reasons))


def check_context(model: nn.Module, length: int, max_new_tokens: int = 0) -> None:
    """A clear error, before any work, for inputs the model cannot position."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit and length + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {length} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{limit} positions: shorten the prompt or lower --max-new-tokens"
        )
