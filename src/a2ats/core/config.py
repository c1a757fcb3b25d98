"""Typed, validated settings: the decode-time selection (`A2ATSConfig`) and the budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Banded WRoPE's ratio of band edges (distances 64-128, 128-256, ...): the library's default selection. The paper
# scores every distance outside the window at one b; on Qwen2.5-Coder-0.5B at 4K-32K, scoring by band keeps
# 93-96% of the oracle's attention mass against the paper's 80-87%, at fewer bytes (docs/eval/qwen).
DEFAULT_BAND_RATIO = 2.0


def check_band_ratio(ratio: float | None) -> None:
    """Banded WRoPE's ratio: > 1, or None for the paper's single distance. Every setting of it (A2ATSConfig,
    CodebookSettings, WRoPE) is checked here."""
    if ratio is not None and not ratio > 1:
        raise ValueError(f"wrope_band_ratio must be > 1 (e.g. 2: bands 64-128, 128-256, ...), or None for the "
                         f"paper's single distance (`--wrope-bands 0` on the command line); got {ratio:g}")


@dataclass(frozen=True)
class Budget:
    """How many tokens each query head (``union``) or KV head (``max``) retrieves per step, beyond sinks and window.

    Either a fraction ``rho`` of the current length (the paper's ``K = int(rho * n)``) or an
    absolute token count. ``Budget.parse("0.03")`` is a fraction, ``Budget.parse("512")`` a count:
    a decimal point makes it a fraction, as on the command line.
    """

    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise ValueError("Budget needs exactly one of fraction=... or tokens=...")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise ValueError(
                f"budget fraction must be in (0, 1], got {self.fraction}; use e.g. 0.03 for 3% of the "
                "context, 1.0 for every token, or an integer such as 512 for a token count"
            )
        if self.tokens is not None and self.tokens < 0:
            raise ValueError(f"budget token count must be >= 0, got {self.tokens}")

    @classmethod
    def parse(cls, text: str | float | int | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, bool):
            raise ValueError(f"budget must be a number, got {text!r}")
        if isinstance(text, int):
            return cls(tokens=text)
        if isinstance(text, float):
            return cls(fraction=text)
        s = str(text).strip()
        try:
            if any(c in s for c in ".eE"):
                return cls(fraction=float(s))
            return cls(tokens=int(s))
        except ValueError as e:
            if "budget" in str(e):
                raise
            raise ValueError(
                f"budget {text!r} is not a number: give a fraction with a decimal point (0.03) or a "
                "token count (512)"
            ) from None

    def tokens_for(self, length: torch.Tensor) -> torch.Tensor:
        """Retrieved tokens per head for each row, given each row's current length (int64 tensor)."""
        if self.fraction is not None:
            # Integer arithmetic on the fraction avoids float rounding differences between devices.
            return torch.floor(length.to(torch.float64) * self.fraction).to(torch.long)
        return torch.full_like(length, self.tokens)

    def __str__(self) -> str:
        return f"rho={self.fraction:g}" if self.fraction is not None else f"{self.tokens} tokens"


Reduction = Literal["union", "max"]

# The default budget of each reduction. 0.03 per query head is the paper's example; with the union of a GQA group
# of 7 query heads (Qwen2.5-Coder-0.5B) it reads about a tenth of each KV head's rows, so 0.10 per KV head with the
# max reduction reads nearly the same bytes there (somewhat more on the task prompts: docs/eval/qwen).
DEFAULT_BUDGETS = {"union": 0.03, "max": 0.10}
SCORE_PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the dtype of the centroid rows and queries scored from


def score_dtype(precision: str) -> torch.dtype:
    """The dtype of the centroid rows scored from at ``precision`` (``A2ATSConfig.score_precision``)."""
    if precision not in SCORE_PRECISIONS:
        raise ValueError(f"score_precision must be one of {', '.join(SCORE_PRECISIONS)}, got {precision!r}")
    return SCORE_PRECISIONS[precision]


@dataclass(frozen=True)
class A2ATSConfig:
    """Decode-time settings. Defaults are the paper's (docs/design.md §1.3) but two, both chosen on a model that
    uses its context (Qwen2.5-Coder-0.5B, docs/eval/qwen): distances are scored by band (banded WRoPE, ratio 2),
    and a GQA group keeps one top-K per KV head by the max of its heads' scores (the ``max`` reduction, 10% of the
    context) where the paper ORs each query head's top-3% (``reduction="union"``, at the same bytes on that model).

    - ``budget``: per KV head (``max``) or per query head (``union``), sinks and window excluded; None (the
      default) takes the reduction's default, ``DEFAULT_BUDGETS``.
    - ``reduction``: ``max`` scores each token by the max over the group's heads and keeps ``budget`` tokens per
      KV head (bounded work per step; the default); ``union`` ORs the per-query-head selections of a GQA group
      (the paper; the work per step varies from 1 to G x budget).
    - ``wrope_distance``: b, the fixed distance every token outside the window is scored at.
    - ``wrope_band_ratio``: banded WRoPE (not in the paper): each geometric band of distances
      (ratio r, from 64 tokens) is scored at its own distance (the default, r = 2); None: the paper's single b.
    - ``score_precision``: the precision of the centroid rows and queries scores are computed from, ``"bf16"``
      (the default: half the bytes a selecting step reads for scoring, and bf16 dot-product instructions at twice
      fp32's rate; products exact, sums in fp32) or ``"fp32"`` (as calibrated). Rounding both operands to bf16
      moves a token's estimated score by at most ~2^-7 of the sum of |q_i c_i|, a small fraction of the
      estimate's own error; tokens within that of the top-K threshold may swap against fp32. Every path
      (reference and fast) scores from the same rounded operands, set when the method is made
      (:meth:`~a2ats.methods.A2ATSMethod.for_model`).
    """

    budget: Budget | float | int | str | None = None  # a Budget once constructed
    sinks: int = 8
    window: int = 64
    wrope_distance: int = 2048
    wrope_band_ratio: float | None = DEFAULT_BAND_RATIO
    reduction: Reduction = "max"
    score_precision: str = "bf16"

    def __post_init__(self) -> None:
        if self.reduction not in ("union", "max"):
            raise ValueError(f"reduction must be 'union' or 'max', got {self.reduction!r}")
        score_dtype(self.score_precision)
        budget = DEFAULT_BUDGETS[self.reduction] if self.budget is None else self.budget
        object.__setattr__(self, "budget", Budget.parse(budget))
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"sinks must be >= 0 and window >= 1 (the current token), got {self.sinks}, {self.window}")
        if self.wrope_distance < 0:
            raise ValueError(f"wrope_distance must be >= 0, got {self.wrope_distance}")
        check_band_ratio(self.wrope_band_ratio)

    @property
    def budget_label(self) -> str:
        """The budget with what it counts per, e.g. ``rho=0.1 per KV head (max)``, for reports and bench JSON."""
        return f"{self.budget} per {'KV head (max)' if self.reduction == 'max' else 'query head (union)'}"
