"""What ``GET /metrics`` reports, in Prometheus' text format: gauges of the engine now, rates over its recent
steps, counters since start-up."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

# Every way a request can end, so each counter series exists (at 0) from the start.
OUTCOMES = ("stop", "length", "cancelled", "error", "invalid", "unauthorized", "overloaded", "unavailable")


class Metrics:
    """Written by the engine's worker thread (steps) and the server's event loop (outcomes); read by /metrics.

    Rates are over the steps of the last ``window`` seconds, per second of step time: what the engine does
    while it works (the counters' ``rate()`` in Prometheus gives the rate over wall time)."""

    def __init__(self, slots: int, method: str, window: float = 30.0):
        self.slots, self.method, self.window = slots, method, window
        self._lock = threading.Lock()
        self.queue_depth = 0  # requests accepted and waiting for a slot
        self.busy_slots = 0
        self.outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.totals = Counter(decode_tokens=0, prefill_tokens=0, decode_seconds=0.0, prefill_seconds=0.0)
        # (time, tokens, seconds) per step, and (time, attended, context) per decode step with A²ATS
        self._decode: deque[tuple[float, int, float]] = deque()
        self._prefill: deque[tuple[float, int, float]] = deque()
        self._attended: deque[tuple[float, int, int]] = deque()
        self.prefix = None  # the engine's PrefixCache, when it has one (read as it is: counters of the engine thread)

    def outcome(self, name: str) -> None:
        with self._lock:
            self.outcomes[name] += 1

    def step(self, prefill: bool, tokens: int, seconds: float, attended: int = 0, context: int = 0) -> None:
        """One engine step: ``tokens`` prompt tokens prefilled, or tokens decoded."""
        now = time.monotonic()
        with self._lock:
            kind = "prefill" if prefill else "decode"
            self.totals[f"{kind}_tokens"] += tokens
            self.totals[f"{kind}_seconds"] += seconds
            (self._prefill if prefill else self._decode).append((now, tokens, seconds))
            if context:
                self._attended.append((now, attended, context))
            for q in (self._decode, self._prefill, self._attended):
                while q and q[0][0] < now - self.window:
                    q.popleft()

    def render(self) -> str:
        with self._lock:
            decode = _rate(self._decode)
            prefill = _rate(self._prefill)
            attended = sum(a for _, a, _ in self._attended)
            context = sum(c for _, _, c in self._attended)
            share = attended / context if context else (1.0 if self.method == "dense" else 0.0)
            lines: list[str] = []
            _metric(lines, "a2ats_queue_depth", "gauge", "Requests accepted and waiting for a slot.", self.queue_depth)
            _metric(lines, "a2ats_busy_slots", "gauge", "Slots holding a sequence.", self.busy_slots)
            _metric(lines, "a2ats_slots", "gauge", "Slots of the engine (sequences decoded together at most).", self.slots)
            _metric(lines, "a2ats_decode_tokens_per_second", "gauge",
                    f"Tokens decoded per second of decode step time, over the last {self.window:g} s.", decode)
            _metric(lines, "a2ats_prefill_tokens_per_second", "gauge",
                    f"Prompt tokens prefilled per second of prefill time, over the last {self.window:g} s.", prefill)
            _metric(lines, "a2ats_attended_share", "gauge",
                    f"Share of cached tokens attended per decode step ({self.method}; dense attends all), over the "
                    f"last {self.window:g} s.", share)
            for kind in ("decode", "prefill"):
                _metric(lines, f"a2ats_{kind}_tokens_total", "counter", f"Tokens {kind}d since start-up.",
                        self.totals[f"{kind}_tokens"])
                _metric(lines, f"a2ats_{kind}_seconds_total", "counter", f"Seconds spent in {kind} steps.",
                        self.totals[f"{kind}_seconds"])
            if self.prefix is not None:
                p, st = self.prefix, self.prefix.stats
                _metric(lines, "a2ats_prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache.",
                        st.lookups)
                _metric(lines, "a2ats_prefix_cache_hits_total", "counter",
                        "Prompts that began with at least one cached block.", st.hits)
                _metric(lines, "a2ats_prefix_cache_hit_rate", "gauge", "Hits over lookups since start-up.",
                        st.hits / st.lookups if st.lookups else 0.0)
                _metric(lines, "a2ats_prefix_cache_tokens_reused_total", "counter",
                        "Prompt tokens copied from the prefix cache instead of prefilled.", st.tokens_reused)
                _metric(lines, "a2ats_prefix_cache_bytes_reused_total", "counter",
                        "Bytes of K/V and codes copied from the prefix cache.", st.bytes_reused)
                _metric(lines, "a2ats_prefix_cache_bytes", "gauge", "Bytes the prefix cache holds.", p.bytes)
                _metric(lines, "a2ats_prefix_cache_capacity_bytes", "gauge", "The prefix cache's cap.", p.capacity)
                _metric(lines, "a2ats_prefix_cache_evicted_total", "counter", "Blocks evicted for room.", st.evicted)
            lines += ["# HELP a2ats_requests_total Requests answered, by outcome.", "# TYPE a2ats_requests_total counter"]
            lines += [f'a2ats_requests_total{{outcome="{o}"}} {n}' for o, n in sorted(self.outcomes.items())]
        return "\n".join(lines) + "\n"


def _rate(steps: deque[tuple[float, int, float]]) -> float:
    seconds = sum(s for _, _, s in steps)
    return sum(n for _, n, _ in steps) / seconds if seconds else 0.0


def _metric(lines: list[str], name: str, kind: str, help: str, value: float) -> None:
    lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value:g}" if isinstance(value, float)
              else f"{name} {value}"]
