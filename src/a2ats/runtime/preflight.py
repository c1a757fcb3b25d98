"""Memory preflight: before allocating a served batch, what it needs on the host and on the accelerator,
against what each has free; a refusal names the largest batch that fits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from a2ats.runtime.slots import SlotBytes

GiB = 1024**3


class PreflightError(MemoryError, ValueError):
    """The requested batch does not fit; the message names the largest that does."""


def host_available() -> int:
    """Bytes of host memory available to a new allocation (Linux MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def accelerator_available(device: torch.device) -> int:
    """Free bytes on a CUDA device."""
    return torch.cuda.mem_get_info(device)[0]


@dataclass(frozen=True)
class MemoryPlan:
    slots: int
    capacity: int
    per_slot: SlotBytes  # what one more sequence costs on each side
    workspace: int  # transient bytes of a prefill chunk (attention scores, activations)
    host_free: int
    accelerator_free: int | None  # None: the accelerator is the host (both sides draw on host_free)
    reserved: int = 0  # host bytes held back from host_free (a prefix cache's cap)

    @property
    def host_need(self) -> int:
        shared = self.accelerator_free is None
        per = self.per_slot.host + (self.per_slot.accelerator if shared else 0)
        return self.slots * per + (self.workspace if shared else 0)

    @property
    def accelerator_need(self) -> int:
        return self.slots * self.per_slot.accelerator + self.workspace

    def largest_batch(self) -> int:
        """Most slots that fit both sides at this capacity."""
        shared = self.accelerator_free is None
        per_host = self.per_slot.host + (self.per_slot.accelerator if shared else 0)
        fit = (self.host_free - (self.workspace if shared else 0)) // max(per_host, 1)
        if not shared:
            fit = min(fit, (self.accelerator_free - self.workspace) // max(self.per_slot.accelerator, 1))
        return max(int(fit), 0)

    def check(self) -> None:
        fits = self.largest_batch()
        if self.slots <= fits:
            return
        where = "host memory" if self.accelerator_free is None else "host or accelerator memory"
        per = self.per_slot.host + self.per_slot.accelerator
        raise PreflightError(
            f"a batch of {self.slots} sequences x {self.capacity} tokens does not fit in {where}: it needs "
            f"{self.host_need / GiB:.2f} GiB on the host ({per / GiB:.3f} GiB per sequence for K, V and codes, "
            f"plus {self.workspace / GiB:.2f} GiB prefill workspace) and {self.host_free / GiB:.2f} GiB is available"
            + (f" besides the {self.reserved / GiB:.2f} GiB held for the prefix cache" if self.reserved else "")
            + ("" if self.accelerator_free is None else
               f"; the accelerator needs {self.accelerator_need / GiB:.2f} GiB and has {self.accelerator_free / GiB:.2f} GiB free")
            + f". The largest batch that fits is {fits}"
            + ("; lower the batch (slots) or the maximum context" if fits else "; lower the maximum context")
        )


def _free(device: torch.device) -> int:
    return host_available() if device.type == "cpu" else accelerator_available(device)


def plan(num_layers: int, slots: int, kv_heads: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
         accelerator: torch.device, host: torch.device, prefill_chunk: int, codes: bool = True,
         host_free: int | None = None, accelerator_free: int | None = None, reserved: int = 0) -> MemoryPlan:
    """The plan for ``slots`` sequences of up to ``capacity`` tokens, K/V on ``host`` (the accelerator
    itself when the cache is placed there); free bytes are measured unless given; ``reserved`` host bytes are
    spoken for (a prefix cache's cap)."""
    per_slot = SlotBytes.of(num_layers, 1, kv_heads, head_dim, capacity, dtype, codes)
    # A prefill chunk's attention scores (fp32) over the whole context, as SDPA's math path holds them.
    workspace = heads * min(prefill_chunk, capacity) * capacity * 4
    accelerator, host = torch.device(accelerator), torch.device(host)
    if host_free is None:
        host_free = _free(host)
    host_free -= reserved
    if accelerator == host:
        accelerator_free = None  # one memory holds both sides
    elif accelerator_free is None:
        accelerator_free = _free(accelerator)
    return MemoryPlan(slots, capacity, per_slot, workspace, host_free, accelerator_free, reserved)
