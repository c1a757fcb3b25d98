"""The lean decode engine: a static-cache Llama-family decoder over a Hugging Face model's own weights.

- :mod:`.model`: the arithmetic of one forward (fused projections, RMSNorm, RoPE, MLP), nothing else.
- :mod:`.cache`: preallocated K, V, codes and padding of every layer, laid out for the CPU kernels.
- :mod:`.context`: what one step shares across layers (positions, lengths, budgets, band offsets).
- :mod:`.runner`: prefill (dense) and decode (A²ATS selection + sparse attention, or dense) per layer.
- :mod:`.loop`: greedy generation over a batch, with per-step timing.

transformers' ``generate`` stays available through :class:`a2ats.hf.A2ATS`; this engine exists because
its per-step overhead, not attention, dominates a small model's step on a CPU.
"""

from .loop import Engine, EngineOutput

__all__ = ["Engine", "EngineOutput"]
