"""The lean decode runtime: a static-cache Llama-family decoder over a Hugging Face model's own weights.

- :mod:`.model`: the arithmetic of one forward (fused projections, RMSNorm, RoPE, MLP), nothing else.
- :mod:`.batch_cache`: preallocated K, V, codes and padding of every layer, laid out for the CPU kernels.
- :mod:`.step`: what one step shares across layers (positions, lengths, budgets, band offsets).
- :mod:`.runner`: prefill (dense) and decode (A²ATS selection + sparse attention, or dense) per layer.
- :mod:`.engine`: greedy generation over a batch, with per-step timing.

Serving (the paper's heterogeneous system, docs/design.md §1.4):

- :mod:`.slots`: one slot per sequence, each its own length; K/V on the host, codes on the accelerator.
- :mod:`.preflight`: what a batch needs on each side against what is free; refuses with the largest fit.
- :mod:`.offload`: per-layer attention across the two placements (selection on the accelerator, exact
  attention over the selection on the host), optionally in micro-batches that overlap the two.
- :mod:`.server`: a queue of requests, continuous batching, completions kept across a failure.

transformers' ``generate`` stays available through :class:`a2ats.hf.A2ATS`; this engine exists because
its per-step overhead, not attention, dominates a small model's step on a CPU.
"""

from a2ats.runtime.engine import Engine, EngineOutput
from a2ats.runtime.preflight import PreflightError
from a2ats.runtime.server import Completion, Request, ServeError, Server, ServeResult

__all__ = ["Completion", "Engine", "EngineOutput", "PreflightError", "Request", "ServeError", "ServeResult", "Server"]
