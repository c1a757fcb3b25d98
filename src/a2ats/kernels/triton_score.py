"""Triton kernel for LUT scoring + union top-K selection on the accelerator (docs/design.md §1.3 steps 2-4).

Returns exactly the set of :func:`a2ats.kernels.reference.reference_score_select` (ties included), as
the CPU kernel does, and works the same way: the top-K is found on the lookup table, not on the tokens.
A token's score is its table entry's, so

1. ``hist``: one pass over the codes counts the candidates (valid tokens that are neither sinks nor
   window) carrying each table entry, per (batch row, KV head): counts (B*Hkv, T).
2. torch, per query head on (B, Hq, T) only: sort the entries by score, accumulate their counts, and
   read off the threshold score (that of the k-th best candidate) and ``take``, how many candidates
   scored exactly at the threshold make the top (ties go to the latest tokens).
3. ``ties``: per block of tokens and query head, how many candidates score exactly the threshold; a
   reversed cumsum over blocks (torch, small) gives how many tied candidates come after each block.
4. ``mark``: per block and KV head, a token is kept if it is a sink/window token, or, for any query
   head of the group, scores above the threshold or is one of the ``take`` latest tied candidates.
   The union over the group is taken in registers; one byte per (b, KV head, token) is written.
5. ``compact``: a prefix sum over blocks (torch) and one within each block write the kept positions
   in ascending order.

Scores are compared as int32 keys ordered like the floats (the reference's order, so -0.0 < +0.0
and NaNs sort by their bits). The gather from the table happens inside the kernels: no (B, Hq, n)
score tensor is materialized. One host sync (the output length and the out-of-table check) per call.

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter, for
tests; the variable must be set before triton is first imported, which importing a2ats does through
torch._dynamo, as triton decorates its own helpers then). Triton is imported on first use, so
``import a2ats`` does not need it; the kernels are decorated on first use too, once per interpreter
setting, as ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates.
"""

from __future__ import annotations

import functools
import os

import torch

from a2ats.core.selection import always_kept, float_order

__all__ = ["triton_available", "triton_score_select"]

tl = None  # triton.language, bound by _kernels(): the kernel bodies below resolve it as a global

_CANDIDATE, _ALWAYS = 1, 2  # token kinds passed to the kernels (0: padding)
_MAX_BLOCK = 1024  # tokens per program (tests lower it to cross block boundaries at small n)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or broken (e.g. a wheel for another platform)
        return False
    return True


def triton_available() -> bool:
    """True when the Triton kernel can run: triton imports, and there is a GPU or the interpreter is on."""
    return _triton_importable() and (torch.cuda.is_available() or _interpret())


# Kernel bodies: plain functions, jitted by _kernels(). Grid: (token blocks, B*Hkv).
# Tokens: j in [0, n); kind[b, j]: 0 padding, 1 candidate, 2 always kept (sink or window).
# G (query heads per KV head) is a compile-time constant: fixed per model, and a loop over a
# runtime int breaks triton 3.6's interpreter under numpy 2.


def _hist_kernel(codes_ptr, cs0, cs1, off_ptr, kind_ptr, counts_ptr, bad_ptr, H, n, T,
                 HAS_OFF: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit row offsets: B*Hkv*n may pass 2**31
    b = bh // H
    h = bh % H
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inb = j < n
    e = tl.load(codes_ptr + b * cs0 + h * cs1 + j, mask=inb, other=0).to(tl.int32)
    if HAS_OFF:
        e += tl.load(off_ptr + b * n + j, mask=inb, other=0)
    kind = tl.load(kind_ptr + b * n + j, mask=inb, other=0)
    inside = (e >= 0) & (e < T)
    # Every token is checked, padding included, as the reference's gather would.
    nbad = tl.sum((inb & ~inside).to(tl.int32), axis=0)
    tl.atomic_add(bad_ptr, nbad)
    cand = inb & inside & (kind == 1)
    tl.atomic_add(counts_ptr + bh * T + tl.where(cand, e, 0), tl.full((BLOCK,), 1, tl.int32), mask=cand)


def _ties_kernel(lut_ptr, codes_ptr, cs0, cs1, off_ptr, kind_ptr, thr_ptr, ties_ptr, H, n, T, nblk,
                 G: tl.constexpr, HAS_OFF: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inb = j < n
    e = tl.load(codes_ptr + b * cs0 + h * cs1 + j, mask=inb, other=0).to(tl.int32)
    if HAS_OFF:
        e += tl.load(off_ptr + b * n + j, mask=inb, other=0)
    kind = tl.load(kind_ptr + b * n + j, mask=inb, other=0)
    cand = inb & (e >= 0) & (e < T) & (kind == 1)
    e = tl.where(cand, e, 0)
    for g in range(G):
        row = bh * G + g
        x = tl.load(lut_ptr + row * T + e, mask=cand, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed-int order
        eq = cand & (key == tl.load(thr_ptr + row))
        tl.store(ties_ptr + row * nblk + blk, tl.sum(eq.to(tl.int32), axis=0))


def _mark_kernel(lut_ptr, codes_ptr, cs0, cs1, off_ptr, kind_ptr, thr_ptr, take_ptr, after_ptr, mask_ptr, blkcnt_ptr,
                 H, n, T, nblk, G: tl.constexpr, HAS_OFF: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inb = j < n
    e = tl.load(codes_ptr + b * cs0 + h * cs1 + j, mask=inb, other=0).to(tl.int32)
    if HAS_OFF:
        e += tl.load(off_ptr + b * n + j, mask=inb, other=0)
    kind = tl.load(kind_ptr + b * n + j, mask=inb, other=0)
    cand = inb & (e >= 0) & (e < T) & (kind == 1)
    e = tl.where(cand, e, 0)
    sel = inb & (kind == 2)
    for g in range(G):
        row = bh * G + g
        x = tl.load(lut_ptr + row * T + e, mask=cand, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        thr = tl.load(thr_ptr + row)
        eq = cand & (key == thr)
        eqi = eq.to(tl.int32)
        # Tied candidates after token j: in later blocks, plus in this block (total minus inclusive
        # prefix). The `take` latest tied ones are kept, as the reference's (score, rank) order does.
        later = tl.load(after_ptr + row * nblk + blk) + tl.sum(eqi, axis=0) - tl.cumsum(eqi, axis=0)
        sel = sel | (cand & (key > thr)) | (eq & (later < tl.load(take_ptr + row)))
        # (later < take) holds for every tie when take is all of them, as for k >= candidates.
    tl.store(mask_ptr + bh * n + j, sel.to(tl.int8), mask=inb)
    tl.store(blkcnt_ptr + bh * nblk + blk, tl.sum(sel.to(tl.int32), axis=0))


def _compact_kernel(mask_ptr, base_ptr, idx_ptr, n, L, nblk, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inb = j < n
    sel = tl.load(mask_ptr + bh * n + j, mask=inb, other=0).to(tl.int32)
    pos = tl.load(base_ptr + bh * nblk + blk) + tl.cumsum(sel, axis=0) - 1
    tl.store(idx_ptr + bh * L + pos, j.to(tl.int32), mask=sel > 0)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels, for the interpreter or the GPU (``interpret`` is only the cache key:
    ``triton.jit`` itself reads the environment)."""
    global tl
    import triton
    import triton.language as language

    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        # triton's own jitted helpers (tl.sum, tl.cumsum) are decorated when triton is imported,
        # and the interpreter cannot call compiled ones: the variable must predate that import.
        if not isinstance(language.sum, InterpretedFunction):
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported (importing a2ats or "
                               "torch._dynamo imports it): set it before starting Python")
    tl = language
    return tuple(triton.jit(f) for f in (_hist_kernel, _ties_kernel, _mark_kernel, _compact_kernel))


def triton_score_select(
    lut: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor | None,
    valid: torch.Tensor,
    k: torch.Tensor,
    sinks: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`a2ats.kernels.reference.reference_score_select` in Triton: (idx (B, Hkv, L) int32,
    ascending in the first count entries, -1 after, L = max count; count (B, Hkv) int32).

    lut (B, Hkv, G, T) float32; codes (B, Hkv, n) int16 (int32 accepted; any strides but the token
    one); offsets (B, n) int32 or None; valid (B, n) bool; k (B,) tokens per query head.
    All tensors on one device: CUDA, or CPU with ``TRITON_INTERPRET=1``.
    """
    hist, ties, mark, compact = _kernels(_interpret())
    B, H, G, T = lut.shape
    n = codes.shape[-1]
    dev = lut.device
    if B * H == 0 or n == 0:
        return torch.full((B, H, 0), -1, dtype=torch.int32, device=dev), torch.zeros(B, H, dtype=torch.int32, device=dev)

    lut = lut.to(torch.float32).contiguous()
    if codes.dtype not in (torch.int16, torch.int32):
        codes = codes.to(torch.int32)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    has_off = offsets is not None
    off = offsets.to(torch.int32).contiguous() if has_off else torch.zeros(1, dtype=torch.int32, device=dev)

    always, candidates, _ = always_kept(valid.to(dev), int(sinks), int(window))
    kind = (candidates.to(torch.int8) * _CANDIDATE + always.to(torch.int8) * _ALWAYS).contiguous()
    m = candidates.sum(-1)  # (B,)
    keff = k.to(device=dev, dtype=torch.long).clamp(min=0).minimum(m)

    BLOCK = max(16, min(_MAX_BLOCK, _next_pow2(n)))
    nblk = -(-n // BLOCK)
    grid = (nblk, B * H)
    cs0, cs1 = codes.stride(0), codes.stride(1)

    counts = torch.zeros(B * H, T, dtype=torch.int32, device=dev)
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    hist[grid](codes, cs0, cs1, off, kind, counts, bad, H, n, T, HAS_OFF=has_off, BLOCK=BLOCK)

    # Threshold per query head, on the table: entries sorted by key, candidates accumulated; the
    # k-th best candidate sits at the first entry where the running count reaches k.
    if G > 0 and T > 0:
        keys, order = float_order(lut).sort(-1, descending=True)  # (B, H, G, T)
        w = counts.view(B, H, 1, T).expand(B, H, G, T).gather(-1, order)
        run = w.cumsum(-1)  # int64
        kq = keff.view(B, 1, 1, 1).expand(B, H, G, 1).contiguous()
        pos = torch.searchsorted(run, kq).clamp_(max=T - 1)
        thr = keys.gather(-1, pos)  # k = 0: the largest key, with take = 0 below: nothing kept
        above = (w * (keys > thr)).sum(-1, keepdim=True)
        take = (kq - above).clamp_(min=0)
        thr = thr.reshape(-1).to(torch.int32).contiguous()
        take = take.reshape(-1).to(torch.int32).contiguous()
    else:  # nothing to rank (no query heads) or no table (then every token is out of it: raised below)
        thr = torch.zeros(max(B * H * G, 1), dtype=torch.int32, device=dev)
        take = torch.zeros_like(thr)

    ntie = torch.zeros(B * H * G, nblk, dtype=torch.int32, device=dev)
    if G > 0:
        ties[grid](lut, codes, cs0, cs1, off, kind, thr, ntie, H, n, T, nblk, G=G, HAS_OFF=has_off, BLOCK=BLOCK)
    after = (ntie.flip(-1).cumsum(-1).flip(-1) - ntie).to(torch.int32).contiguous()  # ties in later blocks

    mask = torch.empty(B * H, n, dtype=torch.int8, device=dev)
    blkcnt = torch.empty(B * H, nblk, dtype=torch.int32, device=dev)
    mark[grid](lut, codes, cs0, cs1, off, kind, thr, take, after, mask, blkcnt, H, n, T, nblk,
               G=G, HAS_OFF=has_off, BLOCK=BLOCK)

    run = blkcnt.cumsum(-1)
    count = run[:, -1].to(torch.int32)
    base = (run - blkcnt).to(torch.int32).contiguous()
    L, nbad = (int(v) for v in torch.stack([count.max().long(), bad[0].long()]).tolist())  # the one sync
    if nbad:
        raise RuntimeError(f"code + offset outside the lookup table of {T} entries")
    idx = torch.full((B * H, L), -1, dtype=torch.int32, device=dev)
    if L:
        compact[grid](mask, base, idx, n, L, nblk, BLOCK=BLOCK)
    return idx.view(B, H, L), count.view(B, H)


def _next_pow2(x: int) -> int:
    """Smallest power of two >= x (tl.arange needs one)."""
    return 1 << max(0, int(x) - 1).bit_length()
