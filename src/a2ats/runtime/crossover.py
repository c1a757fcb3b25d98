"""When A²ATS selection pays for itself: which decode steps attend to every token instead of selecting.

Selection scores every cached token from its int16 code, then attends to the K tokens it keeps; dense attention
reads every token's K and V. Scoring a token costs a fraction of reading its K/V, so selection wins once the
context is long enough, loses below that, and loses at any context when K is near the whole cache. Where the
crossover lies depends on the CPU, the kernels, the model's heads and the K/V dtype, so it is measured, never
assumed: :func:`measure` times the engine's own runner code for one row, dense and selecting, on synthetic data of
this model's shapes in this cache's dtype (a cache large enough to leave the CPU's caches, as a real step's
layers do), at two contexts and two budgets, and fits :class:`Costs`. :class:`DenseRule` then decides each decode
step: dense where the fitted cost of selecting is not below the dense one at the step's length and budgets. The
measurement times attention alone: what a step's attention does to the rest of the step (a dense step's K/V
streaming through the CPU's caches ahead of the next layer's weights) is not in it.

A dense step keeps encoding keys (:meth:`~a2ats.runtime.runner.Runner.begin_decode`), so the first selecting step
finds every code it needs; its output is the dense engine's for the same cache, token for token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from a2ats.core.config import A2ATSConfig, Budget

AUTO = "auto"
# Contexts measured; the lines extrapolate beyond them. The per-token slopes are small differences of larger
# times, so the contexts lie far apart (on a busy 2-core EPYC, 1K and 4K put the crossover anywhere from 3.6K to
# past 35K from one measurement to the next; 1K and 8K between 5K and 8K). They lie where selection can pay:
# scoring's cost per token falls with the context (banded WRoPE's tables fill: a 32K context carries about 0.4
# used entries per token, a 2K one about 0.9), so a line through short contexts overstated it at long ones (on
# SmolLM2 it put the crossover past 1M tokens, yet selecting measured faster than dense at 32K); a line
# through 4K and 32K errs toward dense below 4K, where selection cannot pay anyway (see docs/design.md).
MEASURE_LENGTHS = (4096, 32768)
MEASURE_FRACTIONS = (1 / 16, 1 / 2)  # budgets measured (of the context): selection's cost per attended row
# Passes over the layers per point, interleaved across the points; each point's cost is its fastest call (other
# processes only ever slow a call down). Passes stop once every point's two fastest passes agree within
# MEASURE_AGREE (the floor seen twice), after three; or at MEASURE_SECONDS, after two; or after MEASURE_ROUNDS.
MEASURE_ROUNDS = 12
MEASURE_AGREE = 0.05
MEASURE_SECONDS = 2.0
# K/V bytes the measurement cycles through: past a CPU's last-level cache, as a real step's layers are, whose rows
# come from memory, not from the cache the previous call left them in
MEASURE_FOOTPRINT = 64 << 20
HORIZON = 1 << 20  # longest context a crossover is looked for at


@dataclass(frozen=True)
class Costs:
    """Milliseconds of one layer's decode attention for one row, as measured (:func:`measure`) or given.

    Dense over a context of n tokens: ``dense_ms + dense_per_token * n``. Selecting over n tokens and attending to
    k rows per KV head: ``select_ms + select_per_token * n + select_per_row * k`` (scoring every code, the top-K,
    the sparse attention over the kept rows, the runner's bookkeeping).
    """

    dense_ms: float
    dense_per_token: float
    select_ms: float
    select_per_token: float
    select_per_row: float
    seconds: float = 0.0  # what measuring took (0: given)
    rounds: int = 0  # timed passes per point
    settled: bool = True  # every point's two fastest passes agreed (else other work kept the CPU busy throughout)

    def __post_init__(self) -> None:
        values = (self.dense_ms, self.dense_per_token, self.select_ms, self.select_per_token, self.select_per_row)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"Costs need finite numbers (ms and ms per token or row), got {values}")
        if min(self.dense_per_token, self.select_per_token, self.select_per_row) < 0:
            raise ValueError(f"Costs' per-token and per-row terms must be >= 0, got {values}")

    def dense(self, n):
        return self.dense_ms + self.dense_per_token * n

    def selection(self, n, k):
        return self.select_ms + self.select_per_token * n + self.select_per_row * k

    def crossover(self, budget: Budget, config: A2ATSConfig, group: int, horizon: int = HORIZON) -> int | None:
        """The shortest context from which selecting one row at ``budget`` costs less than dense attention at every
        longer context up to ``horizon`` (None: not within it). The same arithmetic as :meth:`DenseRule.decide`."""
        n = torch.arange(1, horizon + 1, dtype=torch.float64)
        k = attended(n, budget, config, group)
        dense = ~(self.dense(n) > self.selection(n, k.to(torch.float64))) | (k >= n)
        if bool(dense[-1]):
            return None
        last = dense.nonzero()
        return 1 if last.numel() == 0 else int(last[-1]) + 2  # index i is context i + 1; the next one selects

    def __str__(self) -> str:
        return (f"dense {self.dense_ms:.4f} ms + {1e3 * self.dense_per_token:.4f} us/token; selection "
                f"{self.select_ms:.4f} ms + {1e3 * self.select_per_token:.4f} us/token + "
                f"{1e3 * self.select_per_row:.4f} us/row attended (per layer and row)")


def attended(n, budget: Budget, config: A2ATSConfig, group: int):
    """Rows one KV head attends to at context ``n`` (an int, or a float64 tensor of contexts) under ``budget``:
    sinks, window and the retrieved tokens, at most the context. ``union`` keeps each of a GQA group's ``group``
    query heads' top-K, so it counts the most that can be (the group's selections disjoint)."""
    per = group if config.reduction == "union" else 1
    extra = config.sinks + config.window
    if isinstance(n, torch.Tensor):
        got = torch.floor(n * budget.fraction) if budget.fraction is not None else torch.full_like(n, budget.tokens)
        return torch.minimum(n, extra + per * got)
    # as Budget.tokens_for computes it: floor of the float64 product
    got = math.floor(float(n) * budget.fraction) if budget.fraction is not None else budget.tokens
    return min(n, extra + per * got)


def check_setting(value) -> int | str | Costs:
    """``dense_below`` as given, once checked: ``"auto"``, a context in tokens >= 0, or :class:`Costs`."""
    if isinstance(value, Costs) or value == AUTO:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"dense_below must be 'auto' (measure where selection pays on this machine), a context in "
                     f"tokens >= 0 below which decode steps attend densely (0: always select), or measured "
                     f"a2ats.runtime.crossover.Costs; got {value!r}")


class _Fixed:
    """A rule that answers the same for every step (the measurement's own steps)."""

    def __init__(self, reason: str | None):
        self.reason = reason

    def decide(self, lengths, active, budgets) -> str | None:
        return self.reason


class DenseRule:
    """Which decode steps of an A²ATS engine attend to every token. ``setting``: a context in tokens (steps whose
    longest row is shorter go dense; 0: never), ``"auto"`` (measured :class:`Costs`, once, when first needed, through
    ``measure``), or :class:`Costs` to use as they are. A batch goes one way as a whole: dense where the measured cost
    of attending densely to the longest row is not above that of selecting over it with the rows' mean K; under
    ``"auto"`` or Costs also wherever every row's budget already covers its whole context."""

    def __init__(self, setting, config: A2ATSConfig, group: int, measure=None):
        self.setting = check_setting(setting)
        self.config, self.group = config, group
        self._measure = measure
        self._costs = self.setting if isinstance(self.setting, Costs) else None
        self._crossovers: dict[Budget, int | None] = {}

    @property
    def measured(self) -> bool:
        return self.setting == AUTO

    @property
    def costs(self) -> Costs | None:
        """The costs the rule compares (measured on first use under ``"auto"``); None for a fixed context."""
        if self._costs is None and self.setting == AUTO:
            if self._measure is None:
                raise ValueError("dense_below='auto' needs a measurement, and this rule was built without one")
            self._costs = self._measure()
        return self._costs

    def prepare(self) -> None:
        """Measure the costs now under ``"auto"`` (about a second), not when the first decode step needs them."""
        if self.measured:
            _ = self.costs

    def crossover(self, budget: Budget | None = None) -> int | None:
        """The context below which a lone row at ``budget`` (default: the config's) attends densely; None: always."""
        if isinstance(self.setting, int):
            return self.setting
        budget = budget or self.config.budget
        if budget not in self._crossovers:
            self._crossovers[budget] = self.costs.crossover(budget, self.config, self.group)
        return self._crossovers[budget]

    def decide(self, lengths: list[int], active: list[bool], budgets: list[Budget | None]) -> str | None:
        """Why this decode step attends densely (None: it selects). ``lengths``: every slot's context including
        this step's token; ``active``: which slots decode; ``budgets``: each slot's own budget, if any."""
        rows = [(n, b or self.config.budget) for n, a, b in zip(lengths, active, budgets) if a]
        if not rows:
            return None
        longest = max(n for n, _ in rows)
        if isinstance(self.setting, int):
            return f"context below {self.setting:,} tokens: dense_below={self.setting}" if longest < self.setting else None
        ks = [attended(n, b, self.config, self.group) for n, b in rows]
        if all(k >= n for k, (n, _) in zip(ks, rows)):
            return "the budget covers every token"
        costs = self.costs
        if costs.dense(longest) > costs.selection(longest, sum(ks) / len(ks)):
            return None
        kinds = {b for _, b in rows}
        source = "measured" if self.measured else "given costs'"
        if len(kinds) > 1:
            return f"{source} costs at the batch's budgets"
        (budget,) = kinds
        at = self.crossover(budget)
        if at is None:
            return f"selection at {budget} does not pay below {HORIZON:,} tokens ({source} costs)"
        return f"context below {at:,} tokens: {source} crossover"

    def describe(self) -> str:
        """One line for logs: where selection starts at the config's budget, and from what."""
        if isinstance(self.setting, int):
            return "always selects (dense_below=0)" if self.setting == 0 else \
                f"dense below {self.setting:,} tokens (dense_below={self.setting})"
        at = self.crossover()
        where = f"selects from {at:,} tokens" if at is not None else f"dense at every context up to {HORIZON:,} tokens"
        how = f"measured in {self.costs.seconds:.2f} s" if self.measured else "given costs"
        if not self.costs.settled:
            how += ", unsettled: the CPU was busy; give dense_below for a fixed rule"
        return f"{where} at budget {self.config.budget} ({how}: {self.costs})"


# One measurement per process for each set of shapes, dtypes and settings that decide the costs: engines of the
# same model (a benchmark's variants, a test's engines) share it.
_measured: dict[tuple, Costs] = {}


def measure_key(lean, method, config: A2ATSConfig, kv_dtype: torch.dtype, host: torch.device) -> tuple:
    from a2ats import kernels

    s = method.codebooks.settings
    return (lean.heads, lean.kv_heads, lean.head_dim, str(lean.dtype), str(lean.device), str(kv_dtype), str(host),
            type(method).__name__, s.n_centroids, method.wrope.banded, method.post_rope, config.sinks,
            config.window, config.reduction, config.wrope_band_ratio, torch.get_num_threads(),
            getattr(kernels.cpu_backend(), "__name__", None))


def measured(lean, method, config: A2ATSConfig, kv_dtype: torch.dtype, host: torch.device) -> Costs:
    """:func:`measure`, once per process for these shapes and settings."""
    key = measure_key(lean, method, config, kv_dtype, host)
    if key not in _measured:
        _measured[key] = measure(lean, method, config, kv_dtype, host)
    return _measured[key]


@torch.inference_mode()
def measure(lean, method, config: A2ATSConfig, kv_dtype: torch.dtype, host: torch.device,
            lengths: tuple[int, int] = MEASURE_LENGTHS, rounds: int = MEASURE_ROUNDS) -> Costs:
    """One row's decode attention per layer, timed through the runner's own code (the fast path) on a synthetic
    cache of this model's shapes in ``kv_dtype``: dense at both ``lengths``; selecting at both lengths with the
    smaller budget fraction, and at the longer with the larger one. Lines through those points are the costs."""
    from a2ats.runtime.runner import Runner
    from a2ats.runtime.slots import SlotCache

    t_start = time.perf_counter()
    n1, n2 = lengths
    if not 0 < n1 < n2:
        raise ValueError(f"measure needs two increasing contexts, got {lengths}")
    Hq, Hkv, d, dev = lean.heads, lean.kv_heads, lean.head_dim, lean.device
    row = 2 * d * torch.empty(0, dtype=kv_dtype).element_size() + (8 if kv_dtype == torch.int8 else 0)
    layers = max(1, min(lean.num_layers, -(-MEASURE_FOOTPRINT // (Hkv * n2 * row))))
    cache = SlotCache(layers, 1, Hkv, d, n2, kv_dtype, dev, host)
    g = torch.Generator().manual_seed(0)
    C = method.codebooks.settings.n_centroids
    # K/V values do not change the work (a block repeated fills the cache quickly); the codes decide what
    # selection keeps, so they are drawn for every token
    block = torch.randn(2, Hkv, 64, d, generator=g).to(dev, lean.dtype).repeat(1, 1, -(-n2 // 64), 1)[:, :, :n2]
    for i in range(layers):
        cache.put(i, (0, slice(None), slice(0, n2)), block[0], block[1])
        cache.codes[i][0] = torch.randint(0, C, (Hkv, n2), generator=g, dtype=torch.int16).to(cache.accelerator)
    runner = Runner(lean, method, config, cache, overlap=1, fast=True)
    q_pre, q = (torch.randn(1, Hq, 1, d, generator=g).to(dev, lean.dtype) for _ in range(2))
    k_pre, k, v = (torch.randn(1, Hkv, 1, d, generator=g).to(dev, lean.dtype) for _ in range(3))
    active = torch.ones(1, dtype=torch.bool, device=cache.accelerator)
    sync = torch.cuda.synchronize if dev.type == "cuda" or host.type == "cuda" else (lambda: None)
    # (context, budget fraction or None for dense)
    points = [(n1, None), (n2, None), (n1, MEASURE_FRACTIONS[0]), (n2, MEASURE_FRACTIONS[0]), (n2, MEASURE_FRACTIONS[1])]
    steps = []
    for n, fraction in points:  # each point's step, prepared once; a call attends with whichever is current
        cache.filled(0, n - 1)  # the step's token makes it n
        runner.rule = _Fixed("measure" if fraction is None else None)
        step = runner.begin_decode(active, [True])
        step.flush = None  # the step's key encoding is common to both paths: left out
        if fraction is not None:
            step.budget = torch.full((1,), int(n * fraction), dtype=torch.long, device=cache.accelerator)
        steps.append(step)
    passes: list[list[float]] = [[] for _ in points]  # each pass's fastest call, per point
    rows = [0.0] * len(points)  # rows attended per KV head at each selecting point
    # The points take turns call by call, so a busy spell of other processes slows them alike; each call reads
    # another layer than the call before it, so no call finds its K/V in the cache its predecessor left.
    spread = max(layers // len(points), 1)

    # A real step's layers each read their own codebook, so every call's centroid rows come from memory; the few
    # layers measured would find theirs in the CPU's caches (on SmolLM2 that understated selection's cost at 32K,
    # where a real step measured slower selecting than dense): reading this buffer before each call evicts them.
    evict = torch.ones(MEASURE_FOOTPRINT // 4, device=host) if host.type == "cpu" else None

    def one_pass(warm: bool) -> list[float]:
        best = [float("inf")] * len(points)
        for first in range(layers):
            for i, step in enumerate(steps):
                runner.step = step
                runner.attended.zero_()
                if evict is not None:
                    evict.sum()
                sync()
                t = time.perf_counter()
                runner._decode((first + i * spread) % layers, q_pre, q, k_pre, k, v)
                sync()
                best[i] = min(best[i], time.perf_counter() - t)
                if warm:
                    rows[i] = float(runner.attended) / Hkv
        return [1e3 * b for b in best]

    def settled() -> bool:
        return all(len(p) > 1 and sorted(p)[1] <= min(p) * (1 + MEASURE_AGREE) for p in passes)

    for r in range(rounds + 1):  # the first round warms up (kernels, allocations, the pages of the cache)
        if r > 2 and (time.perf_counter() - t_start > MEASURE_SECONDS or r > 3 and settled()):
            break
        for i, ms in enumerate(one_pass(warm=r == 0)):
            if r:
                passes[i].append(ms)
    d1, d2, s1, s2, s3 = (min(p) for p in passes)
    _, _, k1, k2, k3 = rows
    dense_slope = max((d2 - d1) / (n2 - n1), 0.0)
    per_row = max((s3 - s2) / max(k3 - k2, 1.0), 0.0)
    per_token = max((s2 - s1 - per_row * (k2 - k1)) / (n2 - n1), 0.0)
    return Costs(dense_ms=d1 - dense_slope * n1, dense_per_token=dense_slope,
                 select_ms=s1 - per_token * n1 - per_row * k1, select_per_token=per_token, select_per_row=per_row,
                 seconds=time.perf_counter() - t_start, rounds=len(passes[0]), settled=settled())
