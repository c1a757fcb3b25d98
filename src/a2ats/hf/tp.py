"""A model under ``torchrun``, sharded by transformers' own tensor-parallel plan: joining the ranks, checking the
rank count against the model before its weights load, and loading it.

Each rank then holds its block of KV heads (q/k/v by output rows, o/down by input columns); a2ats keeps the
codebooks, codes and cache of those heads only (:func:`a2ats.core.distributed.kv_heads_held`). The ranks talk
over gloo on the CPU and nccl on CUDA GPUs, one GPU per local rank; ``torchrun --nnodes`` spans machines.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from a2ats.core.distributed import (
    TensorParallelError,
    check_size,
    is_distributed,
    rank,
    world_size,
)

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def launched() -> bool:
    """True in a process ``torchrun`` started as one of several (it sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _accelerator() -> str:
    # where transformers' plan puts each rank: the machine's accelerator, else the CPU
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return "cpu" if acc is None else acc.type


def start(device: str = "cpu") -> None:
    """Join the ranks ``torchrun`` started (its environment says where and how many): gloo on the CPU, nccl on
    CUDA with this rank's GPU. ``device`` must be where transformers' plan will place the model."""
    if is_distributed():
        return
    kind, acc = torch.device(device).type, _accelerator()
    if kind != acc:
        raise TensorParallelError(
            f"under torchrun transformers' tensor-parallel plan places each rank on this machine's "
            f"{'CPU' if acc == 'cpu' else acc.upper() + ' device of its local rank'}, not {device}: pass --device {acc}")
    if kind not in BACKENDS:
        raise TensorParallelError(f"a2ats runs tensor-parallel on CPUs (gloo) and CUDA GPUs (nccl), not {kind}")
    device_id = None
    if kind == "cuda":  # one GPU per local rank, bound before the group so nccl knows it
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)
    torch.distributed.init_process_group(BACKENDS[kind], device_id=device_id)


def finish() -> None:
    if is_distributed():
        torch.distributed.destroy_process_group()


@contextmanager
def rank0_first():
    """Rank 0 runs the block first, the others after it (a one-time conversion into the shared cache, done once)."""
    if rank() != 0:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if rank() == 0:
            torch.distributed.barrier()


def load_sharded(path: str | Path, dtype: torch.dtype = torch.float32):
    """The checkpoint at ``path`` sharded over the ranks (joined with :func:`start`) by transformers' plan,
    ``tp_plan="auto"``. A rank count that does not divide the model's KV heads is refused before any weight loads."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    check_size(AutoConfig.from_pretrained(path), world_size())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
    return model.eval()


def load(model: str | Path | None, dtype: torch.dtype = torch.float32, device: str = "cpu", log=print):
    """(model, tokenizer) of a named model or checkpoint folder (None: the default model), sharded over the ranks
    ``torchrun`` started; a named model's one-time conversion runs on rank 0 while the others wait."""
    from transformers import AutoTokenizer

    from a2ats.assets.models import resolve_model

    start(device)
    with rank0_first():
        path = resolve_model(model, log=log if rank() == 0 else lambda *_: None)
    sharded = load_sharded(path, dtype)
    return sharded, AutoTokenizer.from_pretrained(path)
