"""Selection methods by name: the one grammar the evaluation, the command line, the scripts and the tests share.

A name is a base method and an optional GQA reduction, ``BASE[+max]``:

- ``full``, ``oracle``, ``streaming``, ``quest``, ``pqcache``: no codebook;
- ``a2ats`` (the paper's: one WRoPE distance), ``a2ats-euclid`` (plain k-means), ``a2ats-postrope`` (post-RoPE
  keys, no WRoPE), ``a2ats-banded`` (banded WRoPE, the library's scoring): A²ATS over the codebook each names;
- ``a2ats-hybrid[SHARE]``: SHARE of each head's budget by the paper's score, the rest by the banded score;
- ``a2ats[-banded]-rerank[FACTOR]``: the estimate shortlists FACTOR x K tokens, exact keys choose K;
- ``+max``: one top-K per KV head by the max of its group's scores (default: the union of per-head top-Ks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from a2ats.core.codebook import Codebooks
from a2ats.core.config import DEFAULT_BAND_RATIO
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.methods.base import Method
from a2ats.methods.full import FullMethod
from a2ats.methods.hybrid import HybridMethod
from a2ats.methods.oracle import OracleMethod
from a2ats.methods.pqcache import PQCacheMethod
from a2ats.methods.quest import QuestMethod
from a2ats.methods.rerank import RerankMethod
from a2ats.methods.streaming import StreamingMethod

# What a method is to the evaluation: "reference" (what every score is a share of), "ceiling" (the best any
# selection at the budget does), "window" (no retrieval), "retrieval" (another retrieval method), "paper" (A²ATS
# as the paper scores), "ablation" (the paper's with one part removed), "library" (the library's default
# scoring), "extension" (beyond the paper, not the default).
ROLES = ("reference", "ceiling", "window", "retrieval", "paper", "ablation", "library", "extension")


@dataclass(frozen=True)
class MethodInfo:
    """What the evaluation, the byte count and the help need to know of a method beside how it is built.

    ``reads``: what a decode step reads to choose its tokens (:func:`a2ats.eval.cost.step_bytes` counts it):
    ``cache`` (attends to every token), ``keys`` (every key, exactly), ``nothing``, ``page bounds`` (per-page
    min and max keys), ``pq codes``, ``codes`` (int16 codes and a shared codebook). ``codebook``: the
    CodebookSettings fields its codebook differs by (None: it needs none)."""

    role: str
    reads: str
    codebook: dict | None = None


# The paper's method and its ablations keep one WRoPE distance whatever the library's default; the hybrid and the
# re-rank use their estimate's codebook.
METHODS = {
    "full": MethodInfo("reference", "cache"),
    "oracle": MethodInfo("ceiling", "keys"),
    "streaming": MethodInfo("window", "nothing"),
    "quest": MethodInfo("retrieval", "page bounds"),
    "pqcache": MethodInfo("retrieval", "pq codes"),
    "a2ats": MethodInfo("paper", "codes", {"wrope_band_ratio": None}),
    "a2ats-euclid": MethodInfo("ablation", "codes", {"query_aware": False, "wrope_band_ratio": None}),
    "a2ats-postrope": MethodInfo("ablation", "codes", {"post_rope": True, "wrope_band_ratio": None}),
    "a2ats-banded": MethodInfo("library", "codes", {"wrope_band_ratio": DEFAULT_BAND_RATIO}),
    "a2ats-hybrid": MethodInfo("extension", "codes", {"wrope_band_ratio": None}),
}
NAMES = tuple(METHODS)
WITHOUT_CODEBOOK = {"full": FullMethod, "oracle": OracleMethod, "streaming": StreamingMethod, "quest": QuestMethod,
                    "pqcache": PQCacheMethod}
HYBRID_SHARE = 0.5  # a2ats-hybrid: share of the budget chosen by the paper's score
RERANK_FACTOR = 2.0  # a2ats[-banded]-rerank: shortlist of 2 x K per query head
REDUCTIONS = ("union", "max")
KNOWN = (f"{', '.join(NAMES)} (a2ats-hybrid0.75: another share; a2ats-rerank / a2ats-banded-rerank[FACTOR]: a shortlist "
         "of FACTOR x K re-scored with exact keys; a '+max' suffix: the max GQA reduction)")


def names(*roles: str) -> tuple[str, ...]:
    """The method names of ``roles``, in the registry's order, role by role as given."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; choose from {ROLES}")
    return tuple(n for r in roles for n, info in METHODS.items() if info.role == r)


def hybrid_share(base: str) -> float | None:
    """The share in an ``a2ats-hybrid[SHARE]`` name, or None for any other name."""
    m = re.fullmatch(r"a2ats-hybrid(0?\.\d+|[01])?", base)
    return None if m is None else float(m.group(1) or HYBRID_SHARE)


def rerank(base: str) -> tuple[str, float] | None:
    """(estimate's method, shortlist factor) of an ``a2ats[-banded]-rerank[FACTOR]`` name, or None."""
    m = re.fullmatch(r"(a2ats|a2ats-banded)-rerank(\d+(?:\.\d+)?)?", base)
    if m is None or (m.group(2) is not None and float(m.group(2)) < 1):
        return None
    return m.group(1), float(m.group(2) or RERANK_FACTOR)


def parse_method(name: str) -> tuple[str, str]:
    """(base method, GQA reduction) of a name such as ``a2ats`` or ``a2ats+max``; ValueError naming the known ones."""
    base, plus, reduction = name.partition("+")
    reduction = reduction if plus else "union"
    known = base in METHODS or hybrid_share(base) is not None or rerank(base) is not None
    if not known or reduction not in REDUCTIONS:
        raise ValueError(f"unknown method {name!r}; known: {KNOWN}")
    return base, reduction


def info(name: str) -> MethodInfo:
    """The registry's entry for any method name (``a2ats-hybrid0.75``: the hybrid's; a re-rank: its estimate's)."""
    base = parse_method(name)[0]
    if rerank(base) is not None:
        return METHODS[rerank(base)[0]]
    return METHODS["a2ats-hybrid"] if hybrid_share(base) is not None else METHODS[base]


def codebook_variant(base: str) -> dict | None:
    """The CodebookSettings fields of the codebook method ``base`` scores over (None: it needs no codebook)."""
    return info(base).codebook


def build_method(base: str, model, codebooks: Codebooks | None = None) -> Method:
    """The method ``base`` names (no ``+`` suffix; see :func:`parse_method`) for ``model``, over ``codebooks`` (those
    of :func:`codebook_variant`) when it needs one."""
    parse_method(base)
    if base in WITHOUT_CODEBOOK:
        return WITHOUT_CODEBOOK[base]()
    if codebooks is None:
        raise ValueError(f"{base} scores over a codebook: calibrate one with the settings of codebook_variant({base!r})")
    rotary = find_rotary_embedding(model)
    s = codebooks.settings
    if hybrid_share(base) is not None:
        return HybridMethod(codebooks, rotary, s.wrope_distance, DEFAULT_BAND_RATIO, hybrid_share(base))
    if rerank(base) is not None:
        estimate, factor = rerank(base)
        return RerankMethod(build_method(estimate, model, codebooks), factor)
    return A2ATSMethod(codebooks, WRoPE(rotary, s.wrope_distance, s.wrope_band_ratio))
