"""The lean decode runtime: one engine that keeps sequences in slots and decodes them together, over a
Hugging Face model's own weights.

- :mod:`.model`: the arithmetic of one forward (fused projections, RMSNorm, RoPE, MLP), nothing else.
- :mod:`.slots`: where sequences live: one slot per sequence, each its own length; K/V on the host side,
  codes on the accelerator side (one memory on a CPU-only machine).
- :mod:`.preflight`: what a batch needs on each side against what is free; refuses with the largest fit.
- :mod:`.step`: what one forward shares across layers (positions, lengths, budgets, band offsets), a timer.
- :mod:`.runner`: per-layer attention: dense prefill; decode = A²ATS selection + exact attention over it
  (kernels, or the torch reference), across the two placements, optionally in overlapping micro-batches.
- :mod:`.requests`: requests, completions, a step's and a run's results.
- :mod:`.sampling`: how a sequence picks its tokens (penalties, biases, temperature, top_p, seed, log probabilities).
- :mod:`.crossover`: where selection pays: a start-up measurement of dense vs selecting attention on the
  engine's own shapes, and the rule that sends shorter contexts down the dense path.
- :mod:`.settings`: :class:`EngineSettings`, how an engine runs (one frozen set, checked on construction).
- :mod:`.sequence`, :mod:`.scheduler`, :mod:`.prefix_cache`: a request in flight; each step's decode and prompt
  chunks; prompt prefixes already prefilled.
- :mod:`.engine`: :class:`Engine`: ``add``/``step`` (continuous batching), ``serve`` a queue, ``generate`` a batch.

transformers' ``generate`` stays available through :class:`a2ats.hf.A2ATS`; this engine exists because
its per-step overhead, not attention, dominates a small model's step on a CPU.
"""

from a2ats.runtime.engine import Engine
from a2ats.runtime.preflight import PreflightError
from a2ats.runtime.requests import (
           Completion,
           EngineOutput,
           Request,
           ServeError,
           ServeResult,
           StepResult,
)
from a2ats.runtime.sampling import Sampling, SamplingError, TokenLogprobs
from a2ats.runtime.settings import EngineSettings
from a2ats.runtime.slots import KVState

__all__ = ["Completion", "Engine", "EngineOutput", "EngineSettings", "KVState", "PreflightError", "Request", "Sampling", "SamplingError",
           "ServeError", "ServeResult", "StepResult", "TokenLogprobs"]
