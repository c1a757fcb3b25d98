"""Per-layer attention of a served batch across two placements (docs/design.md §1.4).

The *accelerator* (CUDA when present; the CPU stands in for it) runs the model, encodes keys, builds
the lookup tables and selects; the *host* holds K and V (:class:`SlotCache`) and attends exactly over
the selection with the CPU kernel. Per layer and decode step only the query, the new k/v, the
selected indices and the attention output cross between them, never the retrieved K/V.

Prefill runs one sequence at a time, dense, on the accelerator; each layer's K/V is copied to its
slot on the host without blocking the next layer (pinned memory, asynchronous copy). Without
codebooks the same runner attends densely over each slot's cache where it lives: the full-attention
baseline (placed with ``host`` = the accelerator, it is the cache-on-GPU system the paper compares with).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from a2ats import kernels
from a2ats.core.config import A2ATSConfig
from a2ats.core.stats import SelectionTrace
from a2ats.kernels import quantize_rows
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.runtime.model import LeanModel
from a2ats.runtime.slots import SlotCache
from a2ats.runtime.step import Timer


@dataclass
class SlotStep:
    """What every layer of one forward shares (nano-vllm's per-step context)."""

    decode: bool
    slot: int = -1  # prefill: the slot being filled
    start: int = 0  # prefill: first position of this chunk
    end: int = 0  # prefill: end of this chunk
    pos: torch.Tensor | None = None  # decode: (S,) position written by each slot, on the accelerator
    pending: torch.Tensor | None = None  # decode: (S,) each slot's place for its new key in the pending buffer
    flush: list[tuple[int, int, int]] | None = None  # decode: (slot, first position, keys) to encode now
    host_pos: torch.Tensor | None = None  # decode: the same on the host
    rows: torch.Tensor | None = None  # decode: arange(S) on each side, for the scatters
    host_rows: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # decode: (S, n) bool on the accelerator
    host_valid: torch.Tensor | None = None  # decode, dense: the same on the host
    budget: torch.Tensor | None = None  # decode: (S,) tokens per query head
    bands: int = 1
    offsets: torch.Tensor | None = None
    active: list[bool] | None = None  # decode: which slots hold a sequence (host)


class OffloadRunner:
    def __init__(self, lean: LeanModel, method: A2ATSMethod | None, config: A2ATSConfig, cache: SlotCache,
                 overlap: int = 1):
        if overlap < 1:
            raise ValueError(f"overlap (micro-batches per decode step) must be >= 1, got {overlap}")
        self.lean, self.method, self.config, self.cache = lean, method, config, cache
        self.overlap = overlap  # micro-batches per step: selection of part i+1 overlaps host attention of part i
        self.kv_heads = slice(0, lean.kv_heads)
        self.step: SlotStep | None = None
        # Decode keys are encoded when they are about to leave the window, window + 1 at a time (as the
        # lean engine does): window keys are always attended, so their codes are not needed earlier, and
        # one batch reads the codebook once instead of once per step. They wait here, pre-RoPE.
        self.pending = None if method is None else torch.zeros(
            lean.num_layers, cache.slots, lean.kv_heads, config.window + 1, lean.head_dim, dtype=lean.dtype,
            device=cache.accelerator)
        self.timer: Timer | None = None
        self.trace: SelectionTrace | None = None  # every decode step's selection per slot, when asked for (tests)
        self.trace_ids: list | None = None  # the trace's row of each slot (the server: its request's index)
        self.attended = torch.zeros((), dtype=torch.long, device=lean.device)  # summed over decode layer-steps
        self.context = torch.zeros((), dtype=torch.long, device=lean.device)
        self.heads = 0
        self.crossed = 0  # bytes moved between the sides at decode (what PCIe would carry)
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

    def begin_prefill(self, slot: int, start: int, end: int) -> SlotStep:
        self.step = SlotStep(decode=False, slot=slot, start=start, end=end)
        return self.step

    def begin_decode(self, active: torch.Tensor, host_active: list[bool]) -> SlotStep:
        """One new token for every active slot (active (S,) bool on the accelerator); idle slots compute a
        throwaway row at position 0 of their (free) slot and attend to nothing."""
        cache = self.cache
        pos = torch.where(active, cache.lengths, 0)
        cache.lengths += active.long()
        old = cache.host_lengths
        host_lengths = [n + a for n, a in zip(old, host_active)]
        cache.host_lengths = host_lengths
        n = max(max(host_lengths), 1)
        S, acc, host = cache.slots, cache.accelerator, cache.host
        step = SlotStep(decode=True, active=list(host_active), pos=pos, host_pos=pos.to(host), rows=torch.arange(S, device=acc),
                        host_rows=torch.arange(S, device=host), valid=cache.valid(cache.lengths, n))
        if self.method is None:
            # An idle row must see one slot, or softmax over nothing turns it to NaN.
            step.valid[:, 0] |= ~active
            step.host_valid = step.valid.to(host)
        else:
            enc, W = cache.encoded, self.config.window
            step.pending = torch.tensor([o - e if a else 0 for o, e, a in zip(old, enc, host_active)], device=acc)
            # Every slot's keys before (its length - window) must have codes by this step's selection: when one
            # slot needs it, every busy slot encodes all it holds pending (so slots fall back in phase).
            if any(a and m - W > e for m, e, a in zip(host_lengths, enc, host_active)):
                step.flush = [(b, enc[b], host_lengths[b] - enc[b]) for b in range(S) if host_active[b]]
                for b, _, _ in step.flush:
                    enc[b] = host_lengths[b]
            length = cache.lengths
            step.budget = self.config.budget.tokens_for(length)
            lean = self.lean
            self.context += length.sum() * (lean.kv_heads * lean.num_layers)
            self.heads += int(sum(host_active)) * lean.kv_heads * lean.num_layers
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
        if start == 0:
            keys, values = k, v
        elif cache.host == q.device and cache.dtype == q.dtype:
            keys, values = cache.k[layer][s : s + 1, :, :end], cache.v[layer][s : s + 1, :, :end]
        else:  # earlier chunks come back from the host (in the model's dtype)
            self.host_ready()
            prev_k, prev_v = cache.rows(layer, slice(s, s + 1), start, q.dtype, q.device)
            keys, values = torch.cat([prev_k, k], 2), torch.cat([prev_v, v], 2)
        t = end - start
        causal = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(start)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, scale=self.lean.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        return out.transpose(1, 2).reshape(1, t, -1)

    def _decode(self, layer: int, q_pre, q, k_pre, k, v) -> torch.Tensor:
        step, cache, host = self.step, self.cache, self.cache.host
        S, Hq, _, d = q.shape
        self._lap("weights")
        # The new k/v go to the host (they sit in the window: attended this very step).
        cache.put(layer, (step.host_rows, slice(None), step.host_pos), k[:, :, 0], v[:, :, 0])
        if self.method is None:
            n = step.valid.shape[1]
            self._lap("transfers")
            qh = q.to(host)
            mask = step.host_valid[:, None, None, :]
            keys, values = cache.rows(layer, slice(None), n, qh.dtype, host)
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask,
                                                 scale=self.lean.scaling, enable_gqa=Hq != cache.kv_heads)
            self._lap("host attention")
            out = out.to(q.device)
            self._lap("transfers")
            return out.reshape(S, 1, Hq * d)
        pending = self.pending[layer]
        pending[step.rows, :, step.pending] = k_pre[:, :, 0]
        if step.flush:
            keys = max(m for _, _, m in step.flush)
            codes = self.method.encode(layer, pending[:, :, :keys], None, self.kv_heads)  # (S, Hkv, keys)
            for b, first, m in step.flush:
                cache.codes[layer][b, :, first : first + m] = codes[b, :, :m]
        q1, q1_pre = q[:, :, 0], q_pre[:, :, 0].float()
        n = step.valid.shape[1]
        c, m = self.config, self.method
        qh = q1.to(host)

        def select(rows: slice):
            idx, count = m.select_rows(layer, q1_pre[rows], q1[rows], cache.codes[layer][rows, :, :n], step.valid[rows],
                                       step.budget[rows], c, self.kv_heads, step.bands,
                                       None if step.offsets is None else step.offsets[rows])
            return rows, count, _to_host(idx, host), _to_host(count, host)

        parts = _split(S, self.overlap)
        if self.pool is not None and len(parts) > 1:
            # Micro-batches: a worker thread selects part after part (GPU kernels; host syncs block only
            # it) while this thread attends each part on the host as soon as its indices have arrived.
            futures = [self.pool.submit(select, rows) for rows in parts]
            results = (f.result() for f in futures)
        else:
            results = (select(rows) for rows in parts)  # one part, or nothing to overlap with (CPU)
        outs = []
        for rows, count_acc, (idx, ready), (count, _) in results:
            self.attended += count_acc.sum()
            if ready is not None:
                ready.synchronize()
            self._lap("scoring")
            scales = (cache.k_scale[layer][rows], cache.v_scale[layer][rows]) if cache.quantized else (None, None)
            outs.append(kernels.sparse_attention(qh[rows], cache.k[layer][rows], cache.v[layer][rows], idx, count,
                                                 self.lean.scaling, *scales))
            self._lap("host attention")
            if self.trace is not None:
                busy = [i - rows.start for i in range(rows.start, rows.stop) if step.active[i]]
                ids = self.trace_ids or range(S)
                self.trace.add_rows(layer, idx[busy], count[busy], step.valid[rows][busy], [ids[rows.start + i] for i in busy])
            self.crossed += idx.numel() * 4 + count.numel() * 4  # indices and counts
        self.crossed += (2 * qh.numel() + 2 * k[:, :, 0].numel()) * q.element_size()  # q, new k/v, output
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.device)
        self._lap("transfers")
        return out.reshape(S, 1, Hq * d)


def _split(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous row ranges of near-equal size covering range(n) (fewer when n < parts)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _to_host(x: torch.Tensor, host: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``x`` on the host, and an event that completes when it has arrived (None: it is there already)."""
    if x.device == host:
        return x, None
    buf = torch.empty(x.shape, dtype=x.dtype, device=host, pin_memory=True)
    buf.copy_(x, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return buf, ev
