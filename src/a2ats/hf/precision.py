"""Lower-precision compute for the dense passes (prefill, calibration forward), weights untouched.

Under ``torch.autocast`` the projections and dense attention run in bf16 while the weights, the
residual stream's norms and the KV cache stay in the model's dtype (fp32 here), so decode after it
runs unchanged. On CPUs with bf16 instructions (AVX-512 BF16, AMX) it halves a long prefill.
"""

from __future__ import annotations

import contextlib

import torch

from a2ats.kernels.cpu import native_bf16

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name; ``"auto"``: bf16 where the CPU has native bf16, else None (the model's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if native_bf16() else None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (a no-op for None or float32)."""
    device = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device | str):
    """Autocast off: statistics computed inside an autocast region stay in fp32."""
    return torch.autocast(torch.device(device).type, enabled=False)


def bf16_exact(model: torch.nn.Module) -> bool:
    """Whether every Linear weight of ``model`` is a bf16 value (e.g. an fp32 model loaded from a bf16 checkpoint)."""
    return all(torch.equal(m.weight, m.weight.bfloat16().to(m.weight.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear))


@contextlib.contextmanager
def bf16_weight_reads(model: torch.nn.Module, max_rows: int = 16):
    """Decode-sized calls (at most ``max_rows`` rows) of the model's fp32 Linear layers read bf16 copies of their
    weights, with fp32 math (:func:`a2ats.kernels.linear_bf16w`): half the bytes a step reads. For a model whose
    weights are bf16 values (:func:`bf16_exact`) the products are the same numbers, summed in another order."""
    from a2ats.kernels import linear_bf16w

    patched = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            w16 = m.weight.detach().bfloat16()
            original = m.forward

            def forward(x, _m=m, _w16=w16, _orig=original):
                if x.dtype == torch.float32 and x[..., 0].numel() <= max_rows and not torch.is_autocast_enabled("cpu"):
                    return linear_bf16w(x, _w16, None if _m.bias is None else _m.bias.detach())
                return _orig(x)

            m.forward = forward
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward  # the class's forward again
