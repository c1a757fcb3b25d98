"""Inputs of the projection: model shapes, hardware profiles, efficiencies and the workload, as validated
dataclasses with presets; each number is a ceiling (docs/design.md §2.1), a measurement or a labelled assumption."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

GIB = 1024**3
GB = 1e9
TARGET_RATIO = 2.7  # the paper's long-context serving throughput gain (docs/design.md §1.4)
TARGET_CONTEXT = 131072
LABEL = "PROJECTION: a performance model (ceilings x efficiencies x assumptions), not a measurement"
MAX_BATCH = 1024  # batches are capped here (a serving stack's scheduler would cap them too)


def _check_positive(obj, *names: str, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
        if not ok:
            kind = "a non-negative" if allow_zero else "a positive"
            raise ValueError(f"{type(obj).__name__}.{n} must be {kind} finite number, got {v!r}")


def _check_int(obj, *names: str, minimum: int = 1) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{type(obj).__name__}.{n} must be an integer >= {minimum}, got {v!r}")


def _check_fraction(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 < v <= 1.0):
            raise ValueError(f"{type(obj).__name__}.{n} must be in (0, 1], got {v!r}")




@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (Llama family): what the model reads per token."""

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    weight_bytes: float = 2.0  # bytes per parameter (bf16)
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        _check_int(self, "layers", "q_heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab")
        _check_positive(self, "weight_bytes")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"ModelShape {self.name}: q_heads ({self.q_heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads})")

    @property
    def group(self) -> int:
        """G: query heads per KV head."""
        return self.q_heads // self.kv_heads

    @property
    def params_per_layer(self) -> int:
        """q, k, v, o projections and the gated MLP (norms ignored: < 0.01%)."""
        h, qd, kvd = self.hidden, self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        return h * qd + 2 * h * kvd + qd * h + 3 * h * self.intermediate

    @property
    def params(self) -> int:
        """Resident parameters: layers, embedding, and the LM head unless tied."""
        emb = self.vocab * self.hidden
        return self.layers * self.params_per_layer + emb * (1 if self.tied_embeddings else 2)

    @property
    def weight_bytes_resident(self) -> float:
        return self.params * self.weight_bytes

    @property
    def weight_bytes_read(self) -> float:
        """Weights read per decode step: every layer and the LM head (the embedding is a B-row gather)."""
        return (self.layers * self.params_per_layer + self.vocab * self.hidden) * self.weight_bytes

    @property
    def weight_flops_per_token(self) -> float:
        return 2.0 * (self.layers * self.params_per_layer + self.vocab * self.hidden)

    def kv_bytes_per_token(self, elem_bytes: float = 2.0) -> float:
        """K and V of one token over every layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes


SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("llama-3.1-8b", layers=32, q_heads=32, kv_heads=8, head_dim=128, hidden=4096,
                               intermediate=14336, vocab=128256),
    "smollm2-135m": ModelShape("smollm2-135m", layers=30, q_heads=9, kv_heads=3, head_dim=64, hidden=576,
                               intermediate=1536, vocab=49152, tied_embeddings=True),
}
DEFAULT_SHAPE = "llama-3.1-8b"  # the paper's serving model




@dataclass(frozen=True)
class Hardware:
    """Ceilings of one host. ``unified``: the "accelerator" is the host CPU itself (one memory, one
    bus, one set of cores: the local profile), so nothing crosses PCIe and nothing overlaps."""

    name: str
    gpu_memory_gib: float
    hbm_gbps: float
    gpu_tflops: float  # dense bf16, deliberately conservative
    pcie_h2d_gbps: float
    pcie_d2h_gbps: float
    host_ram_gib: float
    host_read_gbps: float
    host_cores: int
    gpu_reserve_gib: float = 5.0  # CUDA context, activations, allocator slack: not KV
    host_reserve_gib: float = 8.0  # OS, runtime, pinned staging buffers: not KV
    unified: bool = False
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_positive(self, "gpu_memory_gib", "hbm_gbps", "gpu_tflops", "pcie_h2d_gbps", "pcie_d2h_gbps",
                        "host_ram_gib", "host_read_gbps")
        _check_int(self, "host_cores")
        _check_positive(self, "gpu_reserve_gib", "host_reserve_gib", allow_zero=True)
        if self.gpu_reserve_gib >= self.gpu_memory_gib:
            raise ValueError(f"Hardware {self.name}: gpu_reserve_gib ({self.gpu_reserve_gib}) must be below "
                             f"gpu_memory_gib ({self.gpu_memory_gib})")
        if self.host_reserve_gib >= self.host_ram_gib:
            raise ValueError(f"Hardware {self.name}: host_reserve_gib ({self.host_reserve_gib}) must be below "
                             f"host_ram_gib ({self.host_ram_gib})")

    @property
    def accel(self) -> str:
        return "CPU-as-accelerator" if self.unified else "GPU"


H100_HOST = Hardware(
    name="h100-host", gpu_memory_gib=80.0, hbm_gbps=2940.0, gpu_tflops=400.0, pcie_h2d_gbps=55.0,
    pcie_d2h_gbps=55.0, host_ram_gib=125.0, host_read_gbps=95.0, host_cores=16,
    sources={
        "gpu_memory_gib": "docs/design.md §2.1 (H100 80GB)",
        "hbm_gbps": "docs/design.md §2.1 (HBM copy, read+write, 2.94 TB/s)",
        "gpu_tflops": "assumption: conservative dense bf16 rate at decode shapes (~40% of the SXM part's 989 "
                      "TFLOP/s spec); used only as a compute-bound check",
        "pcie_h2d_gbps": "docs/design.md §2.1 (pinned)", "pcie_d2h_gbps": "docs/design.md §2.1 (pinned)",
        "host_ram_gib": "docs/design.md §2.1", "host_read_gbps": "docs/design.md §2.1 (16 cores)", "host_cores": "docs/design.md §2.1",
        "gpu_reserve_gib": "assumption: CUDA context, activations, allocator slack",
        "host_reserve_gib": "assumption: OS, runtime, pinned staging buffers",
    },
)


# The paper's host as we read it: an Intel Xeon Platinum 8469C server (Sapphire Rapids, 48 cores per socket, 8
# DDR5-4800 channels per socket) beside an 80 GB Hopper-class GPU. Everything but the CPU's name is an assumption,
# named in ``sources``; the GPU side is kept equal to the H100 profile's so that only the host differs.
PAPER_HOST = Hardware(
    name="paper-host", gpu_memory_gib=80.0, hbm_gbps=2940.0, gpu_tflops=400.0, pcie_h2d_gbps=55.0,
    pcie_d2h_gbps=55.0, host_ram_gib=1024.0, host_read_gbps=240.0, host_cores=48,
    sources={
        "gpu_memory_gib": "assumption: an 80 GB Hopper-class GPU, as the h100-host profile (the GPU side is held "
                          "equal so the comparison isolates the host)",
        "hbm_gbps": "assumption: as h100-host (docs/design.md §2.1)",
        "gpu_tflops": "assumption: as h100-host",
        "pcie_h2d_gbps": "assumption: PCIe Gen5 x16 pinned, as h100-host", "pcie_d2h_gbps": "assumption: as h100-host",
        "host_ram_gib": "assumption: 1 TiB (16 x 64 GB DDR5 RDIMMs, one per channel on 2 sockets): a typical fill of "
                        "a 2-socket 8469C server; the paper does not state it in what we have",
        "host_read_gbps": "assumption: one socket's 8 DDR5-4800 channels (307 GB/s peak) at ~78% (a STREAM-like "
                          "read on Sapphire Rapids): the CPU attention runs on the GPU's NUMA node",
        "host_cores": "Intel Xeon Platinum 8469C: 48 cores per socket",
        "gpu_reserve_gib": "assumption: CUDA context, activations, allocator slack",
        "host_reserve_gib": "assumption: OS, runtime, pinned staging buffers",
    },
)
HOSTS = {"h100-host": H100_HOST, "paper-host": PAPER_HOST}


def local_hardware(kernels: dict, host_gflops_per_core: float = 50.0) -> Hardware:
    """The machine a ``bench kernels --json`` result was measured on. There is no GPU: the
    "accelerator" is the CPU itself (weights, codes, scoring and the KV all share host memory and
    its bandwidth), so nothing crosses PCIe and the two sides cannot overlap."""
    if not isinstance(kernels, dict):
        raise ValueError("the kernels JSON must be one object, as `a2ats bench kernels --json` prints")
    try:
        read = float(kernels["host_read_gbps"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the kernels JSON has no host_read_gbps: give the output of `a2ats bench kernels --json`") from None
    cores = int(kernels.get("threads") or os.cpu_count() or 1)
    if "host_ram_gib" in kernels:
        ram, ram_src = float(kernels["host_ram_gib"]), "kernels JSON"
    else:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
            ram_src = "this machine's physical memory (os.sysconf; the kernels JSON does not record it)"
        except (ValueError, OSError, AttributeError):
            ram, ram_src = 24.0, "docs/design.md §2.2 (24 GiB; os.sysconf unavailable)"
    tflops = cores * host_gflops_per_core / 1000.0
    return Hardware(
        name="local", gpu_memory_gib=ram, hbm_gbps=read, gpu_tflops=tflops, pcie_h2d_gbps=read,
        pcie_d2h_gbps=read, host_ram_gib=ram, host_read_gbps=read, host_cores=cores, gpu_reserve_gib=2.0,
        host_reserve_gib=2.0, unified=True,
        sources={
            "host_read_gbps": "measured (kernels JSON host_read_gbps)",
            "host_cores": "measured (kernels JSON threads)" if kernels.get("threads") else "os.cpu_count()",
            "host_ram_gib": ram_src,
            "gpu_memory_gib": "no GPU: the accelerator is the CPU and its memory is host RAM",
            "hbm_gbps": "no GPU: the accelerator reads host memory (host_read_gbps)",
            "gpu_tflops": f"assumption: {host_gflops_per_core:g} GFLOP/s per core x {cores} cores",
            "pcie_h2d_gbps": "unused: nothing crosses PCIe", "pcie_d2h_gbps": "unused: nothing crosses PCIe",
            "host_reserve_gib": "assumption: OS and runtime",
            "gpu_reserve_gib": "unused (unified memory: host_reserve_gib applies)",
        },
    )




@dataclass(frozen=True)
class Efficiencies:
    """Fractions of the ceilings each kernel reaches, and small fixed costs."""

    host_attention: float = 0.6175  # CPU sparse attention: selected K/V bytes/s over host read bandwidth
    gpu_weights: float = 0.8  # weight GEMV streams over HBM
    gpu_attention: float = 2.7 / 2.94  # dense SDPA decode over HBM
    gpu_scoring: float = 0.7  # int16 codes and fp32 score streams (LUT lookups, top-K passes)
    gpu_gather: float = 0.3  # scattered 512 B K/V rows from HBM (the second-tier variant)
    topk_passes: float = 3.0  # fp32 score passes: one write, two radix-select reads
    host_gflops_per_core: float = 50.0  # CPU attention FLOPs (bf16->fp32 FMA)
    pcie_latency_us: float = 10.0  # per crossing; two crossings per layer and step
    step_overhead_ms: float = 1.0  # launches, sampling, scheduling: both systems
    micro_batches: int = 2  # A²ATS overlap: micro-batches pipelined, each reading the weights once
    cpu_score_token_heads_per_s: float | None = None  # unified hosts: the fused CPU score+top-K kernel's rate
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_fraction(self, "host_attention", "gpu_weights", "gpu_attention", "gpu_scoring", "gpu_gather")
        _check_positive(self, "topk_passes", "host_gflops_per_core")
        _check_positive(self, "pcie_latency_us", "step_overhead_ms", allow_zero=True)
        _check_int(self, "micro_batches", minimum=2)
        if self.cpu_score_token_heads_per_s is not None:
            _check_positive(self, "cpu_score_token_heads_per_s")

    @classmethod
    def from_kernels(cls, kernels: dict, source: str = "kernels JSON", **overrides) -> Efficiencies:
        """The CPU sparse-attention efficiency from a ``bench kernels --json`` result
        (``attention_gbps / host_read_gbps``); everything else from ``overrides`` or the defaults."""
        try:
            att, read = float(kernels["attention_gbps"]), float(kernels["host_read_gbps"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("the kernels JSON needs attention_gbps and host_read_gbps "
                             "(the output of `a2ats bench kernels --json`)") from None
        if not (att > 0 and read > 0):
            raise ValueError(f"the kernels JSON has non-positive rates (attention_gbps={att}, host_read_gbps={read})")
        eff = min(1.0, att / read)
        src = dict(_DEFAULT_EFF_SOURCES)
        src["host_attention"] = (f"measured: {source}: attention_gbps {att:.3g} / host_read_gbps {read:.3g} "
                                 f"(rows warm in cache; the cold in-step rate is lower, see the variants)")
        return cls(host_attention=eff, sources=src, **overrides)


_DEFAULT_EFF_SOURCES = {
    "host_attention": "measured: docs/bench/kernels.json (2026-11-24, 2 cores): 18.3 / 29.7 GB/s, rows warm",
    "gpu_weights": "assumption: small-batch bf16 GEMV reaches ~80% of the HBM copy rate",
    "gpu_attention": "docs/design.md §2.1: dense SDPA decode at 2.7 TB/s over the 2.94 TB/s copy rate",
    "gpu_scoring": "assumption: codes/score streams with LUT gathers reach ~70% of HBM",
    "gpu_gather": "assumption: scattered 512 B rows from HBM reach ~30% of HBM (second-tier variant only)",
    "topk_passes": "assumption: the scoring kernel writes fp32 scores once, a radix top-K reads them twice",
    "host_gflops_per_core": "assumption: ~50 GFLOP/s per core for the CPU attention arithmetic",
    "pcie_latency_us": "assumption: per PCIe crossing (query out, output back: 2 per layer and step)",
    "step_overhead_ms": "assumption: fixed per-step cost (launches, sampling), both systems",
    "micro_batches": "assumption: A²ATS overlaps GPU and host by pipelining 2 micro-batches, so the GPU reads "
                     "the weights twice per step (no overlap: once)",
}


def default_efficiencies() -> Efficiencies:
    return Efficiencies(sources=dict(_DEFAULT_EFF_SOURCES))


# Measured on the default model (G = 3) in this repo: attended rows per KV head minus sinks and window,
# over the per-head budget K: 1.70 at 32K (docs/bench/decode.json: 1,739 rows, K = 983), 1.84 at 3,879
# tokens (README.md example: 285 rows, K = 116).
MEASURED_UNION = {3: 1.8}
UNION_PER_EXTRA_HEAD = 0.4  # (1.8 - 1) / (3 - 1): the extrapolation for other group sizes


def default_union_inflation(group: int) -> tuple[float, str]:
    """The GQA union inflation for G query heads per KV head, and where the figure comes from."""
    if group == 1:
        return 1.0, "exact: one query head per KV head, no union"
    if group in MEASURED_UNION:
        return MEASURED_UNION[group], ("measured in this repo on SmolLM2 (G=3): 1.70 at 32K, 1.84 at 3.9K "
                                       "(rows minus sinks and window, over K)")
    u = min(float(group), 1.0 + UNION_PER_EXTRA_HEAD * (group - 1))
    return u, (f"assumption for G={group}: linear extrapolation of the G=3 measurement (1.8 = 1 + 0.4 per extra "
               f"head) gives {u:g}; the G=3 range 1.70-1.84 extrapolates to {1 + 0.35 * (group - 1):.2f}-"
               f"{1 + 0.42 * (group - 1):.2f}")


@dataclass(frozen=True)
class Workload:
    """What one A²ATS decode step selects and how the cache is laid out."""

    rho: float = 0.03  # budget per query head, as a fraction of the context (K = int(rho * n))
    budget_tokens: int | None = None  # or an absolute per-head count (overrides rho)
    sinks: int = 8
    window: int = 64
    union_inflation: float | None = None  # None: default_union_inflation(G)
    centroids: int = 4096
    code_bytes: int = 2  # int16 codes
    kv_bytes: float = 2.0  # bf16 K/V elements (full attention; the A²ATS host cache unless host_kv_bytes)
    host_kv_bytes: float | None = None  # bytes per element of the A²ATS cache layout (None: kv_bytes)
    index_bytes: int = 4  # int32 indices cross PCIe
    gpu_tier: bool = False  # the GPU's free memory holds part of the KV (a second tier)

    def __post_init__(self) -> None:
        _check_fraction(self, "rho")
        if self.budget_tokens is not None:
            _check_int(self, "budget_tokens", minimum=0)
        _check_int(self, "sinks", "window", minimum=0)
        _check_int(self, "centroids", "code_bytes", "index_bytes")
        _check_positive(self, "kv_bytes")
        if self.host_kv_bytes is not None:
            _check_positive(self, "host_kv_bytes")
        if self.union_inflation is not None:
            _check_positive(self, "union_inflation")
            if self.union_inflation < 1.0:
                raise ValueError(f"Workload.union_inflation must be >= 1 (the union of the group's top-K holds at "
                                 f"least K tokens), got {self.union_inflation}")

    @property
    def host_bytes(self) -> float:
        return self.kv_bytes if self.host_kv_bytes is None else self.host_kv_bytes

    def budget(self, n: int) -> int:
        """K: tokens each query head retrieves beyond sinks and window."""
        return self.budget_tokens if self.budget_tokens is not None else int(self.rho * n)

    def inflation(self, group: int) -> float:
        u = self.union_inflation if self.union_inflation is not None else default_union_inflation(group)[0]
        if u > group:
            raise ValueError(f"union_inflation {u} exceeds the group size G={group}: the union of G heads' top-K "
                             f"holds at most G*K tokens")
        return u

    def rows(self, n: int, group: int) -> int:
        """Selected tokens per KV head, layer and sequence: the union, plus sinks and window."""
        return min(n, math.ceil(self.inflation(group) * self.budget(n)) + self.sinks + self.window)
