"""Tensor parallelism as a2ats sees it: which KV heads this process holds, and the few facts of the run.

transformers' tensor-parallel plan (``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))``
under ``torchrun``) shards q/k/v by output rows, so when the rank count divides the KV heads each rank computes
a contiguous block of whole KV heads with their query groups. a2ats then keeps, per rank, the codebooks, codes
and cache of those heads only and selects over them: a GQA group never spans ranks, so selection needs no
communication. In one process every function here answers as for a single rank holding every head.
"""

from __future__ import annotations

import torch


class TensorParallelError(ValueError):
    """A tensor-parallel run a2ats cannot serve (a rank count that splits KV heads, a step only one process can do)."""


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_dtensor(t) -> bool:
    # by name: importing torch.distributed.tensor costs a second and a warning on builds without it
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded). No communication."""
    if not is_dtensor(t):
        return t.detach()
    with torch.inference_mode(False), torch.no_grad():  # DTensor's wrappers cannot be made inside inference mode
        return t.to_local().detach()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``: gathered from every rank when it is sharded (a collective: every rank must call it,
    in the same order), ``t`` itself otherwise. Safe under inference mode."""
    if not is_dtensor(t):
        return t.detach()
    with torch.inference_mode(False), torch.no_grad():
        return t.full_tensor().detach()


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a model's config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hq = cfg.num_attention_heads
    return hq, getattr(cfg, "num_key_value_heads", None) or hq, getattr(cfg, "head_dim", None) or cfg.hidden_size // hq


def valid_sizes(num_kv_heads: int) -> list[int]:
    """Rank counts that give every rank whole KV heads (the query heads, a multiple of them, follow)."""
    return [n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0]


def check_size(config, size: int) -> None:
    """Refuse ``size`` tensor-parallel ranks for a model whose KV heads they do not divide, naming the counts that work."""
    hq, hkv, _ = head_counts(config)
    if size > 1 and (hkv % size or hq % size):
        raise TensorParallelError(
            f"{size} tensor-parallel ranks cannot split this model's {hkv} KV heads ({hq} query heads): a2ats needs "
            f"each rank to hold whole KV heads with their query groups, so that it selects per head without crossing "
            f"ranks. Run {' or '.join(map(str, valid_sizes(hkv)))} processes (torchrun --nproc-per-node N)")


def shard_dim(t: torch.Tensor) -> tuple[int | None, int, int, object]:
    """(dim, ranks, this rank's index, process group) of a sharded ``t``; (None, 1, 0, None) when it is whole."""
    if not is_dtensor(t):
        return None, 1, 0, None
    mesh = t.device_mesh
    for i, p in enumerate(t.placements):
        if p.is_shard():
            return p.dim % t.dim(), mesh.size(i), mesh.get_local_rank(i), mesh.get_group(i)
    return None, 1, 0, None


def kv_heads_held(model: torch.nn.Module) -> slice:
    """The global KV heads this process computes: all of them in one process, this rank's block under tensor
    parallelism (read from how the first key projection is sharded). Refuses a rank count that splits heads."""
    hq, hkv, d = head_counts(model.config)
    k = next((p for n, p in model.named_parameters() if n.endswith("k_proj.weight")), None)
    dim, size, index, _ = shard_dim(k) if k is not None else (None, 1, 0, None)
    if dim is None:
        return slice(0, hkv)
    check_size(model.config, size)
    if dim != 0:
        raise TensorParallelError(f"a2ats expects key projections sharded by output rows (transformers' 'colwise' "
                                  f"plan); this model's are sharded along dim {dim}: use tp_plan='auto'")
    n = hkv // size
    return slice(index * n, (index + 1) * n)
