"""The lean engine under transformers' tensor-parallel plan: each rank's shards, and the messages between ranks.

Each rank multiplies by the shards transformers gave it: q/k/v and gate/up by output rows (its KV heads with
their query groups, its part of the MLP), o and down by input columns, whose partial sums one all-reduce per
projection adds up (their replicated biases are added once, after it). An LM head sharded by vocabulary rows
gives each rank a slice of the logits; one all-gather makes them whole on every rank, so every rank picks the
same token and the ranks stay in step without other messages.

Compact decode weights are quantized as one process quantizes the whole weight (int8 has a scale per output
row: a rank holding part of a row must not scale by its part alone), then cut to this rank's part, so N ranks
multiply by the numbers one process multiplies by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2ats.core.distributed import full, local, shard_dim
from a2ats.kernels import weights as packed_weights


@dataclass(frozen=True)
class Part:
    """One weight as this rank holds it: ``local``, the slice [offset, offset + len) of dim ``dim`` (None: whole)."""

    local: torch.Tensor
    dim: int | None
    offset: int
    group: object  # the process group of the ranks that share the weight (None: whole)


def part(param: torch.Tensor) -> Part:
    dim, size, index, group = shard_dim(param)
    t = local(param)
    if dim is None:
        return Part(t, None, 0, None)
    chunk = -(-param.shape[dim] // size)  # torch.chunk's split: every rank but the last holds ceil(n / ranks)
    return Part(t, dim, index * chunk, group)


def packed(param: torch.Tensor, fmt: str) -> packed_weights.PackedWeight:
    """This rank's part of ``param`` in decode format ``fmt``, quantized as the whole weight is."""
    p = part(param)
    if p.dim != 1 or fmt == "bf16":  # whole rows (per-row scales, input groups) or elementwise: packs alike
        return packed_weights.pack(p.local, fmt)
    whole = packed_weights.pack(full(param), fmt)  # a collective: every rank packs every weight, in one order
    lo, n = p.offset, p.local.shape[1]
    if fmt == "int8":
        return packed_weights.PackedWeight(fmt, whole.data[:, lo : lo + n].contiguous(), whole.scale)
    g = packed_weights.GROUP
    if lo % g or n % g:
        raise ValueError(f"int4 decode weights quantize groups of {g} inputs; this rank's columns {lo}..{lo + n - 1} "
                         "cut a group: use the int8 or bf16 format")
    cols = slice(lo // g, (lo + n) // g)
    return packed_weights.PackedWeight(fmt, whole.data[:, lo // 2 : (lo + n) // 2].contiguous(),
                                       whole.scale[:, cols].contiguous(), whole.mins[:, cols].contiguous())


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over the ranks of ``x`` (every rank's partial product), in place."""
    torch.distributed.all_reduce(x, group=group)
    return x


def gather_last(x: torch.Tensor, group, width: int) -> torch.Tensor:
    """The ranks' ``x`` side by side along the last dim, in rank order, ``width`` in all (the vocabulary slices
    of the logits). Shards may be uneven (the last one shorter): each is padded to the longest for the gather."""
    ranks = torch.distributed.get_world_size(group)
    chunk = -(-width // ranks)
    x = torch.nn.functional.pad(x, (0, chunk - x.shape[-1])).contiguous()
    parts = [torch.empty_like(x) for _ in range(ranks)]
    torch.distributed.all_gather(parts, x, group=group)
    return torch.cat(parts, -1)[..., :width]
