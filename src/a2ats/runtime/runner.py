"""Per-layer attention of the runtime: dense at prefill; at decode, A²ATS selection + exact attention over
the selection (or dense attention without a method), across two placements (docs/design.md §1.4).

``fast`` selects with :meth:`A2ATSMethod.select_rows` and attends with :func:`a2ats.kernels.sparse_attention`
(the kernels); the reference path scores every token (:meth:`A2ATSMethod.score_tokens`), selects with
:func:`a2ats.core.selection.select` and applies the selection as a mask (:func:`a2ats.core.attention.attend_selected`).
Both select the same tokens; tests hold them equal.

Placement ``offload``: the *accelerator* (CUDA when present; the CPU stands in for it) runs the model, encodes keys, builds
the lookup tables and selects; the *host* holds K and V (:class:`SlotCache`) and attends exactly over
the selection with the CPU kernel. Per layer and decode step only the query, the new k/v, the
selected indices and the attention output cross between them, never the retrieved K/V.

A decode step of an A²ATS engine may attend densely instead (:mod:`.crossover`: where selection costs more
than it saves); it still encodes its keys, so the codes are complete when selection resumes.

Prefill runs one sequence at a time, dense, on the accelerator; each layer's K/V is copied to its
slot on the host without blocking the next layer (pinned memory, asynchronous copy). Without
codebooks the same runner attends densely over each slot's cache where it lives: the full-attention
baseline (placed with ``host`` = the accelerator, it is the cache-on-GPU system the paper compares with).
Placement ``local`` is the same code with ``host`` = the accelerator: on a CPU-only machine, one memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from a2ats import kernels
from a2ats.core.attention import attend_selected
from a2ats.core.config import A2ATSConfig, Budget
from a2ats.core.selection import select
from a2ats.core.stats import SelectionTrace
from a2ats.kernels import quantize_rows
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.runtime.model import LeanModel
from a2ats.runtime.slots import SlotCache, head_rows
from a2ats.runtime.step import StepContext, Timer

if TYPE_CHECKING:
    from a2ats.runtime.crossover import DenseRule


class Runner:
    def __init__(self, lean: LeanModel, method: A2ATSMethod | None, config: A2ATSConfig, cache: SlotCache,
                 overlap: int = 1, fast: bool = True):
        if overlap < 1:
            raise ValueError(f"overlap (micro-batches per decode step) must be >= 1, got {overlap}")
        self.lean, self.method, self.config, self.cache, self.fast = lean, method, config, cache, fast
        self.overlap = overlap  # micro-batches per step: selection of part i+1 overlaps host attention of part i
        self.kv_heads = lean.kv_slice  # the model's KV heads this process holds (a tensor-parallel rank: a block)
        self.step: StepContext | None = None
        # Decode keys are encoded when they are about to leave the window, window + 1 at a time (as the
        # lean engine does): window keys are always attended, so their codes are not needed earlier, and
        # one batch reads the codebook once instead of once per step. They wait here, pre-RoPE.
        self.pending = None if method is None else torch.zeros(
            lean.num_layers, cache.slots, lean.kv_heads, config.window + 1, lean.head_dim, dtype=lean.dtype,
            device=cache.accelerator)
        self._pending_rows = head_rows(cache.slots, lean.kv_heads, config.window + 1, cache.accelerator)
        self.budgets: list[Budget | None] = [None] * cache.slots  # a sequence's own budget, else the config's
        # Which decode steps attend to every token although a method could select (:class:`~.crossover.DenseRule`):
        # None, every step selects.
        self.rule: DenseRule | None = None
        self.timer: Timer | None = None
        self.trace: SelectionTrace | None = None  # every decode step's selection per slot, when asked for (tests)
        self.trace_ids: list | None = None  # the trace's row of each slot (the server: its request's index)
        # This decode step's counts, over layers, rows and KV heads (tensors: counting costs no device sync).
        self.attended = torch.zeros((), dtype=torch.long, device=lean.device)  # tokens attended
        self.context = torch.zeros((), dtype=torch.long, device=lean.device)  # the rows' lengths
        self.heads = 0  # (layer, row, KV head) terms
        self.crossed = 0  # bytes moved between the sides (what PCIe would carry)
        # Prefill's K/V go to the host on a side stream, so the copy of layer i overlaps layer i+1's compute.
        offloaded = cache.accelerator.type == "cuda" and cache.host.type == "cpu"
        self.copy_stream = torch.cuda.Stream(cache.accelerator) if offloaded else None
        # Overlap needs two workers that do not share cores: the GPU selecting while the CPU attends.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="a2ats-select") if offloaded and overlap > 1 else None

    def _copy_to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.copy_stream is None:
            dst.copy_(src)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(src.device))  # src is computed
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)  # pinned destination: asynchronous
        src.record_stream(self.copy_stream)  # keep src's memory until the copy has read it

    def host_ready(self) -> None:
        """Wait for prefill's copies: before the host reads K/V (decode) or sends them back (next chunk)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    # -- per step ---------------------------------------------------------------------------------------------

    def begin_prefill(self, slot: int, start: int, end: int) -> StepContext:
        self.step = StepContext(decode=False, slot=slot, start=start, end=end)
        return self.step

    def begin_decode(self, active: torch.Tensor, host_active: list[bool]) -> StepContext:
        """One new token for every active slot (active (S,) bool on the accelerator); idle slots (free, or
        prefilling between steps) compute a throwaway row and attend to nothing."""
        cache = self.cache
        self.attended.zero_()
        self.context.zero_()
        self.heads = self.crossed = 0
        pos = torch.where(active, cache.lengths, 0)
        # An idle row's throwaway k/v go to its slot's last position, which no prompt reaches (a prompt leaves room
        # for a new token): a slot whose prompt is still being prefilled keeps its rows.
        write = torch.where(active, cache.lengths, cache.capacity - 1)
        cache.lengths += active.long()
        old = cache.host_lengths
        host_lengths = [n + a for n, a in zip(old, host_active)]
        cache.host_lengths = host_lengths
        n = max(max(host_lengths), 1)
        S, acc, host = cache.slots, cache.accelerator, cache.host
        step = StepContext(decode=True, active=list(host_active), pos=pos, valid=cache.valid(cache.lengths, n),
                           kv_rows=cache.flat_index(write), parts=_split(S, self.overlap))
        if self.method is not None and self.rule is not None:
            step.dense = self.rule.decide(host_lengths, host_active, self.budgets)
        if self.method is None or step.dense:
            # An idle row must see one slot, or softmax over nothing turns it to NaN. (A method's own valid stays
            # the rows' tokens.)
            valid = step.valid if self.method is None else step.valid.clone()
            valid[:, 0] |= ~active
            step.host_valid = valid.to(host)
            if self.fast and cache.dtype in (torch.bfloat16, torch.int8) and host.type == "cpu":
                # SDPA would read a float copy of every row made first; the attention kernel reads them as stored
                count = torch.tensor([m if a else 1 for m, a in zip(host_lengths, host_active)], dtype=torch.int32)
                step.all_rows = (torch.arange(n, dtype=torch.int32).expand(S, cache.kv_heads, n).contiguous(),
                                 count[:, None].expand(S, cache.kv_heads).contiguous())
        if self.method is not None:
            enc, W = cache.encoded, self.config.window
            waiting = torch.tensor([o - e if a else 0 for o, e, a in zip(old, enc, host_active)], device=acc)
            step.pending = (self._pending_rows + waiting[:, None]).reshape(-1)
            # Every slot's keys before (its length - window) must have codes by this step's selection: when one
            # slot needs it, every busy slot encodes all it holds pending (so slots fall back in phase).
            if any(a and m - W > e for m, e, a in zip(host_lengths, enc, host_active)):
                step.flush = [(b, enc[b], host_lengths[b] - enc[b]) for b in range(S) if host_active[b]]
                for b, _, _ in step.flush:
                    enc[b] = host_lengths[b]
            length, lean = cache.lengths, self.lean
            self.context += length.sum() * (lean.kv_heads * lean.num_layers)
            self.heads += int(sum(host_active)) * lean.kv_heads * lean.num_layers
            if step.dense:  # every token attended; no selection to prepare
                self.attended += length.sum() * (lean.kv_heads * lean.num_layers)
            else:
                step.budget = self.config.budget.tokens_for(length)
                if any(b is not None for b in self.budgets):
                    step.budget = step.budget.clone()
                    for b, own in enumerate(self.budgets):
                        if own is not None:
                            step.budget[b] = own.tokens_for(length[b : b + 1])[0]
                step.bands, step.offsets = self.method.band_offsets(step.valid)
        self.step = step
        return step

    def _lap(self, name: str) -> None:
        if self.timer is not None:
            self.timer.lap(name)

    # -- per layer --------------------------------------------------------------------------------------------

    def attend(self, layer: int, q_pre, q, k_pre, k, v) -> torch.Tensor:
        step = self.step
        if step.decode:
            return self._decode(layer, q_pre, q, k_pre, k, v)
        return self._prefill(layer, q, k_pre, k, v)

    def _prefill(self, layer: int, q, k_pre, k, v) -> torch.Tensor:
        step, cache = self.step, self.cache
        s, start, end = step.slot, step.start, step.end
        where = (s, slice(None), slice(start, end))
        if cache.quantized:  # quantized beside the model; the int8 rows and their scales cross
            (kq, ks), (vq, vs) = quantize_rows(k[0]), quantize_rows(v[0])
            pairs = [(cache.k[layer], kq), (cache.k_scale[layer], ks), (cache.v[layer], vq), (cache.v_scale[layer], vs)]
        else:
            pairs = [(cache.k[layer], k[0]), (cache.v[layer], v[0])]
        for dst, src in pairs:
            self._copy_to_host(dst[where], src)
        if self.method is not None:
            cache.codes[layer][s, :, start:end] = self.method.encode(layer, k_pre, k, self.kv_heads)[0]
        bf16 = self.lean.prefill_dtype == "bf16"
        if start == 0:
            keys, values = k, v
        elif cache.host == q.device and cache.dtype == (torch.bfloat16 if bf16 else q.dtype):
            # the slot's rows as stored, this chunk's just written: read in place (bf16 rows are what a bf16
            # prefill attends to anyway)
            keys, values = cache.k[layer][s : s + 1, :, :end], cache.v[layer][s : s + 1, :, :end]
        else:  # earlier chunks come back from the host (in the model's dtype)
            self.host_ready()
            prev_k, prev_v = cache.rows(layer, slice(s, s + 1), start, q.dtype, q.device)
            keys, values = torch.cat([prev_k, k], 2), torch.cat([prev_v, v], 2)
        t = end - start
        if bf16:  # as the projections: bf16 products, fp32 sums (the kernel: ~2.5x torch's bf16 attention)
            out = kernels.causal_attention(q, keys, values, self.lean.scaling, start)
        else:
            out = kernels.torch_causal_attention(q, keys, values, self.lean.scaling, start)
        return out.to(self.lean.dtype).transpose(1, 2).reshape(1, t, -1)

    def _decode(self, layer: int, q_pre, q, k_pre, k, v) -> torch.Tensor:
        step, cache, host = self.step, self.cache, self.cache.host
        S, Hq, _, d = q.shape
        self._lap("weights")
        # The new k/v go to the host (they sit in the window: attended this very step).
        cache.put_rows(layer, step.kv_rows, k[:, :, 0], v[:, :, 0])
        if self.method is not None:  # a dense step too: the next selecting step needs these keys' codes
            self._keep_codes(layer, k_pre)
            self.crossed += (2 * q[:, :, 0].numel() + 2 * k[:, :, 0].numel()) * q.element_size()  # q, new k/v, output
            self._lap("scoring")
        if self.method is None or step.dense:
            n = step.valid.shape[1]
            self._lap("transfers")
            qh = q.to(host)
            if step.all_rows is not None:
                scales = (cache.k_scale[layer], cache.v_scale[layer]) if cache.quantized else (None, None)
                out = kernels.sparse_attention(qh[:, :, 0], cache.k[layer], cache.v[layer], *step.all_rows,
                                               self.lean.scaling, *scales)
            else:
                mask = step.host_valid[:, None, None, :]
                keys, values = cache.rows(layer, slice(None), n, qh.dtype, host)
                out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask,
                                                     scale=self.lean.scaling, enable_gqa=Hq != cache.kv_heads)
            self._lap("host attention")
            out = out.to(q.device)
            self._lap("transfers")
            return out.reshape(S, 1, Hq * d)
        q1, q1_pre = q[:, :, 0], q_pre[:, :, 0].float()
        n = step.valid.shape[1]
        c, m = self.config, self.method
        if not self.fast:
            return self._decode_reference(layer, q, q1_pre, q1, n).reshape(S, 1, Hq * d)
        qh = q1.to(host)
        codes = cache.codes[layer][:, :, :n]

        def select(rows: slice | None):
            idx, count = m.select_rows(layer, _part(q1_pre, rows), _part(q1, rows), _part(codes, rows),
                                       _part(step.valid, rows), _part(step.budget, rows), c, self.kv_heads, step.bands,
                                       _part(step.offsets, rows))
            return rows, count, _to_host(idx, host), _to_host(count, host)

        parts = step.parts
        if self.pool is not None and len(parts) > 1:
            # Micro-batches: a worker thread selects part after part (GPU kernels; host syncs block only
            # it) while this thread attends each part on the host as soon as its indices have arrived.
            futures = [self.pool.submit(select, rows) for rows in parts]
            results = (f.result() for f in futures)
        else:
            results = (select(rows) for rows in parts)  # one part, or nothing to overlap with (CPU)
        outs = []
        k_all, v_all = cache.k[layer], cache.v[layer]
        scales = (cache.k_scale[layer], cache.v_scale[layer]) if cache.quantized else (None, None)
        for rows, count_acc, (idx, ready), (count, _) in results:
            self.attended += count_acc.sum()
            if ready is not None:
                ready.synchronize()
            self._lap("scoring")
            outs.append(kernels.sparse_attention(_part(qh, rows), _part(k_all, rows), _part(v_all, rows), idx, count,
                                                 self.lean.scaling, _part(scales[0], rows), _part(scales[1], rows)))
            self._lap("host attention")
            if self.trace is not None:
                first = 0 if rows is None else rows.start
                busy = [i for i in range(idx.shape[0]) if step.active[first + i]]
                ids = self.trace_ids or range(S)
                self.trace.add_rows(layer, idx[busy], count[busy], _part(step.valid, rows)[busy], [ids[first + i] for i in busy])
            self.crossed += idx.numel() * 4 + count.numel() * 4  # indices and counts
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.device)
        self._lap("transfers")
        return out.reshape(S, 1, Hq * d)

    def _keep_codes(self, layer: int, k_pre) -> None:
        """This step's pre-RoPE keys into the pending buffer, and the codes of those due (selecting or not)."""
        step, cache, d = self.step, self.cache, self.lean.head_dim
        pending = self.pending[layer]
        pending.view(-1, d).index_copy_(0, step.pending, k_pre[:, :, 0].reshape(-1, d))
        if step.flush:
            keys = max(m for _, _, m in step.flush)
            codes = self.method.encode(layer, pending[:, :, :keys], None, self.kv_heads)  # (S, Hkv, keys)
            for b, first, m in step.flush:
                cache.codes[layer][b, :, first : first + m] = codes[b, :, :m]

    def _decode_reference(self, layer: int, q, q1_pre, q1, n: int) -> torch.Tensor:
        """Every token scored, the selection applied as a mask over the slot's whole cache (on the host)."""
        step, cache, m = self.step, self.cache, self.method
        scores = m.score_tokens(layer, q1_pre, q1, cache.codes[layer][:, :, :n], step.bands, step.offsets, self.kv_heads)
        keep = select(scores, step.valid, cache.kv_heads, self.config, step.budget)  # (S, Hkv, n)
        self.attended += keep.sum()
        if self.trace is not None:
            busy = [b for b in range(len(step.active)) if step.active[b]]
            ids = self.trace_ids or range(len(step.active))
            self.trace.add_mask(layer, keep[busy], step.valid[busy], [ids[b] for b in busy])
        self.crossed += keep.numel()  # the mask, a byte per token
        self._lap("scoring")
        keep = keep.clone()
        keep[:, :, 0] |= ~torch.tensor(step.active, device=keep.device)[:, None]  # an idle row attends to one slot, not none
        keys, values = cache.rows(layer, slice(None), n, q.dtype, cache.host)
        out = attend_selected(q.to(cache.host), keys, values, keep.to(cache.host), self.lean.scaling)
        self._lap("host attention")
        out = out.to(q.device)
        self._lap("transfers")
        return out


def _split(n: int, parts: int) -> list[slice | None]:
    """``parts`` contiguous row ranges of near-equal size covering range(n) (fewer when n < parts); [None]: one
    part, the whole batch."""
    parts = max(1, min(parts, n))
    if parts == 1:
        return [None]
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _part(x: torch.Tensor | None, rows: slice | None) -> torch.Tensor | None:
    """``x[rows]``; the whole tensor, with no indexing op, when ``rows`` is None (one part: the common case)."""
    return x if rows is None or x is None else x[rows]


def _to_host(x: torch.Tensor, host: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``x`` on the host, and an event that completes when it has arrived (None: it is there already)."""
    if x.device == host:
        return x, None
    buf = torch.empty(x.shape, dtype=x.dtype, device=host, pin_memory=True)
    buf.copy_(x, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return buf, ev
