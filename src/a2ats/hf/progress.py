"""One progress bar over a whole calibration: the forward pass, then k-means for every layer (of every codebook set
fitted from it). Its remaining time is every phase's work left times that phase's measured seconds per unit of
work; a phase that has measured nothing yet counts at its guess (k-means: from a short timed probe), or leaves the
estimate blank, so the figure shown is never a rate borrowed from another phase's units."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass
class _Phase:
    label: str
    units: int
    unit_name: str
    guess: float | None  # seconds per unit before any is measured
    done: int = 0
    started: float | None = None
    spent: float = 0.0  # seconds in this phase so far

    def per_unit(self) -> float | None:
        return self.spent / self.done if self.done else self.guess

    def left(self) -> float | None:
        rate = self.per_unit()
        return None if rate is None else (self.units - self.done) * rate


class CalibrationProgress:
    """The bar counts seconds: its position is the time spent, its total that plus the estimate of what is left,
    so the bar's own remaining-time figure is that estimate."""

    def __init__(self, disable: bool = False):
        self._phases: dict[str, _Phase] = {}
        self._t0 = time.perf_counter()
        self._bar = tqdm(total=None, desc="calibration", unit="s", disable=disable, smoothing=0,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def plan(self, name: str, label: str, units: int, unit_name: str, guess: float | None = None) -> None:
        """Add a phase of ``units`` of work (``guess``: seconds per unit until one is measured)."""
        if name in self._phases:
            self._phases[name].units += units
        else:
            self._phases[name] = _Phase(label, units, unit_name, guess)
        self._show(name)

    def start(self, name: str) -> None:
        self._phases[name].started = time.perf_counter()
        self._show(name)

    def done(self, name: str, units: int = 1) -> None:
        """``units`` of ``name`` finished since :meth:`start` or the last call."""
        p, now = self._phases[name], time.perf_counter()
        p.spent += now - (p.started if p.started is not None else now)
        p.started = now
        p.done += units
        self._show(name)

    def estimate_left(self) -> float | None:
        """Seconds of work left in every phase, or None while a phase has neither a measurement nor a guess."""
        parts = [p.left() for p in self._phases.values()]
        return None if any(x is None for x in parts) else sum(parts)

    def _show(self, name: str) -> None:
        p = self._phases[name]
        elapsed = time.perf_counter() - self._t0
        left = self.estimate_left()
        self._bar.total = None if left is None else elapsed + left
        self._bar.n = elapsed
        self._bar.set_description_str(f"calibration, {p.label} {p.done}/{p.units} {p.unit_name}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> CalibrationProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
