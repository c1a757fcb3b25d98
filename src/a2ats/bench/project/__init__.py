"""`a2ats bench project`: a performance model of the paper's heterogeneous serving system.

Every figure this module produces is a **projection** (arithmetic over ceilings, measured
efficiencies and labelled assumptions), never a measurement. It projects decode throughput
(tokens/s) against batch size and context length for two systems on one host:

* **full attention**: weights and the whole bf16 KV cache on the accelerator; the batch is what
  fits in accelerator memory beside the weights; a step reads the weights once and every
  sequence's whole KV cache from HBM.
* **A²ATS offload** (docs/design.md §1.4): weights, codebooks, the int16 codes of every token, the
  lookup tables and top-K on the accelerator; the whole KV cache in host memory; the exact
  attention over the selected rows on the CPU; per layer the query, the selected indices, the new
  k/v and the attention output cross PCIe (never the retrieved KV). The batch is what fits in host
  RAM (and the accelerator memory for codes and score buffers).

Per decode step of a batch of B sequences at context n (bytes and FLOPs, then seconds):

    full:   t = W/(HBM*e_w) + B*n*KV/(HBM*e_att)          (or the compute time, if larger) + overhead
    A²ATS:  t_gpu  = W/(HBM*e_w) + CB/(HBM*e_w) + B*(codes + top-K passes over fp32 scores)/(HBM*e_s)
            t_host = B*rows*kv*layers*(2*d*bytes)/(host_read*e_host)        (or the CPU FLOPs, if larger)
            t_pcie = max(D2H/bw_d2h, H2D/bw_h2d) + 2*layers*latency
            overlapped (micro-batches pipelined, B >= 2): max(t_gpu, t_host, t_pcie) + overhead
            serial (no overlap):                          t_gpu + t_host + t_pcie + overhead

with rows = min(n, ceil(u*K) + sinks + window), K = int(rho*n) per query head and u the GQA union
inflation (the union of the G heads' top-K over the per-head budget). tokens/s = B / t.

Pure Python (no torch): every function returns plain dicts and lists, ready for JSON.

Modules: :mod:`.inputs` (shapes, hardware, efficiencies, workload), :mod:`.model` (the arithmetic),
:mod:`.report` (markdown), :mod:`.cli` (the command: its options and run).
"""

from a2ats.bench.project.cli import (
    add_arguments,
    from_args,
    main,
)
from a2ats.bench.project.inputs import (
    GB,
    GIB,
    H100_HOST,
    LABEL,
    MAX_BATCH,
    MEASURED_UNION,
    SHAPES,
    TARGET_CONTEXT,
    TARGET_RATIO,
    UNION_PER_EXTRA_HEAD,
    Efficiencies,
    Hardware,
    ModelShape,
    Workload,
    default_efficiencies,
    default_union_inflation,
    local_hardware,
)
from a2ats.bench.project.model import (
    a2ats_fits,
    a2ats_max_batch,
    a2ats_step,
    assumptions,
    beside_measured,
    context_projection,
    full_max_batch,
    full_step,
    load_measured,
    project,
    variant_rows,
    variant_specs,
)
from a2ats.bench.project.report import (
    render_markdown,
    verdict,
)

__all__ = ["Efficiencies", "GB", "GIB", "H100_HOST", "Hardware", "LABEL", "MAX_BATCH", "MEASURED_UNION", "ModelShape", "SHAPES", "TARGET_CONTEXT", "TARGET_RATIO", "UNION_PER_EXTRA_HEAD", "Workload", "a2ats_fits", "a2ats_max_batch", "a2ats_step", "add_arguments", "assumptions", "beside_measured", "context_projection", "default_efficiencies", "default_union_inflation", "from_args", "full_max_batch", "full_step", "load_measured", "local_hardware", "main", "project", "render_markdown", "variant_rows", "variant_specs", "verdict"]
