"""How an :class:`~a2ats.runtime.Engine` runs: one frozen set of settings, each checked once, on construction."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from a2ats import kernels
from a2ats.runtime import crossover
from a2ats.runtime.crossover import Costs

PLACEMENTS = ("local", "offload")
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
# Prompt tokens a step prefills beside its decode tokens while sequences decode: the smallest chunk whose prefill
# rate is near whole-prompt prefill (docs/bench/speed, "Prefill beside decode").
PREFILL_BUDGET = 256
# While sequences decode, a step's prompt work stops once it has taken this multiple of the step's decode forward,
# and a chunk part-way goes on, layer by layer, in the next steps: a running sequence's time between two tokens
# stays within about (1 + PREFILL_STALL) decode forwards. 1 brought the docqa workload's inter-token p99 to about
# three times its p50, where 2 left it well above (docs/bench/serve, "Prompts sliced by layers").
PREFILL_STALL = 1.0
# With nothing decoding, a step's prompt work stops after this many seconds (a chunk goes on layer by layer in the next
# steps), so a request that arrives meanwhile is planned at the next step: a question over a cached document does
# not wait for another document's whole prefill.
PREFILL_STEP_SECONDS = 1.0
PREFILL_CHUNK = 4096  # prompt tokens per prefill forward at most (a whole prompt's, with nothing decoding)
SERVER_PREFIX_CACHE_GIB = 2.0  # the HTTP server's prefix cache (a library engine has none unless sized)


@dataclass(frozen=True)
class EngineSettings:
    """``path``: ``fast`` selects and attends with the kernels (:mod:`a2ats.kernels`), ``reference`` scores every
    token with torch and applies the selection as a mask; ``auto`` is fast where K/V sit in CPU memory and the C++
    kernels build (:func:`a2ats.kernels.resolve_path`). Both select the same tokens.

    ``placement``: ``local``, or ``offload`` (K/V in host memory, selection beside the model: the paper's system).

    ``slots``/``max_context``: the cache, allocated when the engine is built, after a memory preflight that refuses
    (naming the largest batch that fits) rather than failing mid-run; left out, the cache is sized to each run,
    through the same preflight. ``overlap``: micro-batches per decode step, so the host attends one while the
    accelerator selects the next.

    ``prefill_chunk``: prompt tokens per prefill forward at most; ``prefill_budget``: prompt tokens a step prefills
    beside its decode while sequences decode (None: whole prompts first, the running sequences waiting);
    ``prefill_stall``: while sequences decode, a step's prompt work stops after this multiple of its decode
    forward's time, and a chunk part-way continues layer by layer in the next steps. A new chunk is cut to the
    tokens one of its layers can take in that time, at the cost per token the last chunk measured (a layer runs
    whole once begun), also when nothing decodes yet, since whatever starts decoding meanwhile waits on its
    remaining layers (a prompt alone: twice that time). None: each step runs its chunks through.
    ``prefill_step_seconds``: the same with nothing decoding, a step's prompt work stopping after
    that many seconds so that a request arriving meanwhile is planned at the next step (None: whole prompts in one
    step). Slicing a chunk by layers changes none of its arithmetic.
    ``prefix_cache``: bytes of host memory for prompt prefixes already prefilled (:mod:`.prefix_cache`; 0: none):
    a prompt that begins with one copies its K/V and codes instead of prefilling them.

    ``kv_dtype``: how K/V are stored; bf16 under an fp32 model halves the bytes held and read per row, int8 (a
    float32 scale per row) quarters them. None: bf16 for a float32 model loaded from a 16-bit checkpoint with K/V
    in CPU memory, whose kernels read bf16 rows natively; the model's dtype otherwise
    (:func:`~a2ats.runtime.engine.default_kv_dtype`).

    ``dense_below``: which decode steps of an A²ATS engine attend to every token instead of selecting, where
    selection cannot pay (:mod:`.crossover`): ``"auto"`` measures, once per process for this model's shapes and
    K/V dtype, what a layer's dense attention and its selection cost, and goes dense wherever selecting would cost
    more; a context in tokens fixes it (0: always select); measured :class:`~.crossover.Costs` are used as given.
    The reference path selects at every step under ``"auto"`` (it exists to check the selection).

    ``decode_weights``: what decode steps of a float32 model read for the projections: ``"auto"`` (int8 copies),
    ``"int8"``, ``"int4"``, ``"bf16"`` or ``"model"`` (its own fp32 weights), always with fp32 math.
    ``prefill_dtype``: ``"bf16"`` runs a float32 model's prefill projections and attention in bf16 (fp32 out),
    ``"model"`` in its dtype, ``"auto"`` bf16 where the CPU multiplies bf16 natively. (These two are checked by
    :class:`~a2ats.runtime.model.LeanModel`, which reads them.)

    ``host_free``/``accelerator_free`` override the measured free memory (tests, planning).
    ``beyond_model_context``: allow contexts past the model's trained positions (speed benchmarks only).
    """

    path: str = "auto"
    placement: str = "local"
    slots: int | None = None
    max_context: int | None = None
    overlap: int = 1
    prefill_chunk: int = PREFILL_CHUNK
    prefill_budget: int | None = PREFILL_BUDGET
    prefill_stall: float | None = PREFILL_STALL
    prefill_step_seconds: float | None = PREFILL_STEP_SECONDS
    prefix_cache: int = 0
    kv_dtype: torch.dtype | None = None
    dense_below: int | str | Costs = crossover.AUTO
    decode_weights: str = "auto"
    prefill_dtype: str = "auto"
    host_free: int | None = None
    accelerator_free: int | None = None
    beyond_model_context: bool = False

    def __post_init__(self) -> None:
        def count(name: str, low: int, none: bool = False) -> None:
            v = getattr(self, name)
            if (v is None and none) or (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                return
            raise ValueError(f"{name} must be an integer >= {low}{' or None' if none else ''}, got {v!r}")

        kernels.resolve_path(self.path, "cpu")  # a bad name is refused before any work
        crossover.check_setting(self.dense_below)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for name, low, none in (("slots", 1, True), ("max_context", 1, True), ("overlap", 1, False),
                                ("prefill_chunk", 1, False), ("prefill_budget", 1, True), ("prefix_cache", 0, False),
                                ("host_free", 0, True), ("accelerator_free", 0, True)):
            count(name, low, none)
        for name, what in (("prefill_stall", "a multiple of a decode forward's time"), ("prefill_step_seconds", "seconds")):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
                raise ValueError(f"{name} must be a number >= 0 ({what}) or None, got {v!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be float32, bfloat16, float16 or int8 (or None: the default), got "
                             f"{self.kv_dtype}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
