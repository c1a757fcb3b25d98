"""The one decode runtime: sequences in slots, continuous batching, and a public :meth:`Engine.step`.

Each :meth:`~Engine.step` is schedule, run, post-process (:mod:`.scheduler`, one :class:`~.sequence.Sequence` per
request): one decode token for every running sequence (A²ATS selection + exact attention over it, or dense
attention without codebooks), and beside it prompt chunks up to a token budget (``prefill_budget``), a dense
prefill a chunk at a time, so a running sequence never waits behind a whole prompt; a prompt's last chunk yields
its first token. :meth:`~Engine.serve` steps a queue of requests to the end; :meth:`~Engine.generate` serves a
padded batch one row per slot. Greedy decoding unless a request's :class:`~.sampling.Sampling` says otherwise
(temperature, top_p, seed, penalties, biases, log probabilities); every sequence's tokens are its own (slots never
mix). :meth:`~Engine.cancel` frees a request's slot at once; a failure in one sequence's prefill or token ends that
sequence alone (``finish_reason="error"``), a failure of a whole decode step drops every sequence.

Placements: ``local`` keeps K/V where the model runs; ``offload`` keeps them in host memory and selects on
the accelerator (the paper's system, :mod:`.runner`). On a CPU-only machine both are one memory and the
offload code path still runs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn

from a2ats import kernels
from a2ats.core.codebook import Codebooks
from a2ats.core.config import A2ATSConfig
from a2ats.core.stats import SelectionStats, SelectionTrace
from a2ats.core.support import check_context
from a2ats.methods.a2ats import A2ATSMethod
from a2ats.runtime import crossover
from a2ats.runtime.crossover import DenseRule
from a2ats.runtime.model import POST_ROPE_REFUSAL, LeanModel
from a2ats.runtime.prefix_cache import PrefixCache
from a2ats.runtime.preflight import MemoryPlan, plan
from a2ats.runtime.requests import (
    Completion,
    EngineOutput,
    Request,
    ServeError,
    ServeResult,
    StepResult,
)
from a2ats.runtime.runner import Runner
from a2ats.runtime.scheduler import Chunk, Scheduler
from a2ats.runtime.sequence import Partial, Sequence, Status
from a2ats.runtime.settings import EngineSettings
from a2ats.runtime.slots import SlotCache
from a2ats.runtime.step import Timer

# A new prompt chunk beside decoding sequences is cut to what one of its layers can do in the step's time left,
# but not below this many tokens (below it a layer's fixed cost outweighs its tokens).
MIN_FITTED_CHUNK = 32
# A chunk under way is split only when its layer would take this many times what the step may give: a layer's time
# varies from step to step by more than a tenth, and splitting a piece cut to fit again for that would leave a trail
# of small pieces, each a forward of its own.
SPLIT_OVERRUN = 1.5
LONE_CHUNK_SHARE = 2  # a prompt alone in the slots: its layers may take twice the stall (chunks of ~1K tokens cost
# no more than whole ones, measured on SmolLM2; a request arriving meanwhile waits that long at most a token)


class Engine:
    """Greedy decoding of a Llama-family HF model with A²ATS (``codebooks`` or an A²ATS ``method`` given) or
    dense attention, over slots of sequences, as :class:`~.settings.EngineSettings` say: ``settings``, or those
    settings by name (``Engine(model, cb, slots=4, max_context=8192)``), or both (the names override). Build the
    engine after moving the model to its device and dtype."""

    def __init__(self, model: nn.Module, codebooks: Codebooks | None = None, config: A2ATSConfig | None = None, *,
                 method: A2ATSMethod | None = None, settings: EngineSettings | None = None, **overrides):
        unknown = sorted(set(overrides) - set(EngineSettings.names()))
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; the settings are {', '.join(EngineSettings.names())}")
        self.settings = s = replace(settings or EngineSettings(), **overrides)  # checked on construction
        self.scheduler = Scheduler(s.prefill_chunk, s.prefill_budget, shares=bool(s.prefix_cache))
        self.prefix = PrefixCache(s.prefix_cache) if s.prefix_cache else None
        self.model, self.config = model, config or A2ATSConfig()
        self.lean = lean = LeanModel(model, s.decode_weights, s.prefill_dtype)
        limit = getattr(model.config, "max_position_embeddings", None)
        if s.max_context is not None and limit and s.max_context > limit and not s.beyond_model_context:
            raise ValueError(f"max_context {s.max_context} exceeds the model's context of {limit} positions")
        if method is None and codebooks is not None:
            method = A2ATSMethod.for_model(model, codebooks, self.config)
        if method is not None and not isinstance(method, A2ATSMethod):
            raise ValueError(f"the runtime decodes with A²ATS; {method.name} runs on the transformers path: "
                             "a2ats.A2ATS(model, method=...)")
        if method is not None and method.post_rope:
            raise ValueError(POST_ROPE_REFUSAL)
        self.method = method
        self.placement, self.prefill_chunk, self.overlap = s.placement, s.prefill_chunk, s.overlap
        self.beyond_model_context = s.beyond_model_context
        self.host = torch.device("cpu") if s.placement == "offload" else lean.device
        self.kv_dtype = s.kv_dtype or default_kv_dtype(lean, self.host)
        self.path = kernels.resolve_path(s.path, self.host)  # where attention reads K/V decides
        self.dense_rule: DenseRule | None = None  # None: every decode step selects (or, without a method, none)
        if method is not None and not (s.dense_below == crossover.AUTO and self.path == "reference"):
            kv, host, config = self.kv_dtype, self.host, self.config
            self.dense_rule = DenseRule(s.dense_below, config, lean.heads // lean.kv_heads,
                                        lambda: crossover.measured(lean, method, config, kv, host))
        self._fixed_slots = s.slots
        self._fixed_context = s.max_context or ((limit or 4096) if s.slots is not None else None)
        self._host_free, self._accelerator_free = s.host_free, s.accelerator_free
        self.cache: SlotCache | None = None
        self.runner: Runner | None = None
        self.plan: MemoryPlan | None = None
        # What a run asks for; serve() and generate() set them, a caller of step() may too.
        self.stop_tokens: set[int] = set()
        self.keep_logits = False
        self.profile = False
        self.trace: SelectionTrace | None = None  # every decode step's selection, rows = request indices
        self.dense_step: str | None = None  # why the last decode step attended to every token (None: it selected)
        self._layers_run = 0  # prompt layers this step has run (a step runs one at least)
        self._decode_forward = 0.0  # the last decode forward's seconds: what a prompt layer beside decode may take
        self._layer_token_seconds = 0.0  # the last prompt layer's seconds per token, any sequence's
        self._prefix_seen = -1  # the prefix cache's version at the last catch-up
        self._sequences: dict[int, Sequence] = {}  # every request in flight (queued or in a slot), by index
        self._next = 0
        self._owner: list[int | None] = []  # request index in each slot
        self._last = torch.zeros(0, dtype=torch.long)
        if s.slots is not None:
            self._allocate(s.slots, self._fixed_context)
            if self.dense_rule is not None:  # an engine built to serve: measured now, not in a request's first step
                self.dense_rule.prepare()

    # -- what the engine is ------------------------------------------------------------------------------------

    @property
    def method_name(self) -> str:
        return "dense" if self.method is None else self.method.name

    @property
    def slots(self) -> int:
        return 0 if self.cache is None else self.cache.slots

    @property
    def max_context(self) -> int | None:
        return self._fixed_context or (None if self.cache is None else self.cache.capacity)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def release(self) -> None:
        """Free the cache (an idle engine sized to its runs allocates again on the next)."""
        if self.has_work:
            raise RuntimeError("the engine has sequences in flight: finish them (step) before releasing its cache")
        if self._fixed_slots is None:
            self.cache = self.runner = None
            self.scheduler.resize(0)
            self._owner = []

    def _allocate(self, slots: int, capacity: int) -> None:
        self.cache = self.runner = None  # free the old cache before the new one is counted
        lean, method = self.lean, self.method
        self.plan = plan(lean.num_layers, slots, lean.kv_heads, lean.heads, lean.head_dim, capacity, self.kv_dtype,
                         lean.device, self.host, self.prefill_chunk, codes=method is not None,
                         host_free=self._host_free, accelerator_free=self._accelerator_free,
                         reserved=self.prefix.capacity if self.prefix is not None else 0)
        self.plan.check()
        self.cache = SlotCache(lean.num_layers, slots, lean.kv_heads, lean.head_dim, capacity, self.kv_dtype,
                               lean.device, self.host, codes=method is not None)
        self.runner = Runner(lean, method, self.config, self.cache, self.overlap, fast=self.path == "fast")
        self.runner.rule = self.dense_rule
        self.scheduler.resize(slots)
        self._owner = [None] * slots  # request index in each slot: the rows of a selection trace
        self._last = torch.zeros(slots, dtype=torch.long, device=lean.device)
        self.runner.trace, self.runner.trace_ids = self.trace, self._owner

    def _fit_waiting(self) -> None:
        """An idle engine sized to its runs: room for every waiting request at once."""
        if self._fixed_slots is not None:
            return
        reqs = [s.request for s in self.scheduler.waiting]
        slots = len(reqs)
        capacity = self._fixed_context or max(len(r.prompt) + r.max_new_tokens for r in reqs)
        if self.cache is None or self.cache.slots < slots or self.cache.capacity < capacity:
            self._allocate(slots, capacity)

    # -- requests in, steps ------------------------------------------------------------------------------------

    def check(self, r: Request) -> None:
        """A clear error, before any work, when ``r`` cannot run on this engine."""
        need = len(r.prompt) + r.max_new_tokens
        if self._fixed_context is not None and need > self._fixed_context:
            raise ValueError(f"request {r.id!r}: prompt of {len(r.prompt)} tokens + {r.max_new_tokens} new tokens "
                             f"exceeds the engine's max_context of {self._fixed_context}: build the engine with a "
                             "larger max_context, or shorten the prompt")
        if not self.beyond_model_context:
            check_context(self.model, len(r.prompt), r.max_new_tokens)
        r.sampling.check_vocab(self.lean.vocab)
        if r.budget is not None and self.method is None:
            raise ValueError(f"request {r.id!r} sets a retrieval budget; this engine attends to every token (no "
                             "A²ATS codebooks): leave the budget out")
        if r.kv is not None:
            lean = self.lean
            r.kv.check(lean.num_layers, lean.kv_heads, lean.head_dim, codes=self.method is not None)

    def add(self, request: Request) -> int:
        """Queue ``request``; returns its index (the key of its tokens and completion in :class:`StepResult`)."""
        i = self._next
        if request.id is None:
            request.id = i
        self.check(request)
        self._next += 1
        seq = Sequence(i, request)
        self._sequences[i] = seq
        self.scheduler.add(seq)
        return i

    @torch.inference_mode()
    def step(self) -> StepResult:
        """One step as the scheduler plans it (:mod:`.scheduler`): one decode token for every running sequence,
        then prompt chunks (new requests take free slots; a prompt's last chunk yields its first token). A failure
        in one sequence's prefill or token finishes that sequence with ``finish_reason="error"``; any other
        failure drops every sequence in flight (the engine stays usable) and is raised."""
        try:
            res = StepResult({}, [], 0.0)
            if not self.has_work:
                return res
            if not self.scheduler.busy:
                self._fit_waiting()
            t = time.perf_counter()
            self._catch_up()
            failed: list[tuple[Sequence, Exception]] = []
            plan = self.scheduler.schedule(self._fits, lambda seq: self._start(seq, failed))
            for seq, e in failed:
                self._fail(seq, e, res)
            deadline, fit = None, None
            stall = self.settings.prefill_stall
            if plan.decode:
                t_decode = time.perf_counter()
                self._decode(plan.decode, res)
                res.decode_seconds = self._decode_forward = time.perf_counter() - t_decode
                if stall is not None:
                    deadline = time.perf_counter() + stall * res.decode_seconds
                    fit = deadline
            elif self.settings.prefill_step_seconds is not None:  # so an arrival is planned soon
                deadline = time.perf_counter() + self.settings.prefill_step_seconds
            if fit is None and stall is not None and self._decode_forward > 0:
                # nothing decodes now, but a chunk begun now is carried on beside whatever decodes before its last
                # layer (another sequence in a slot, or a request arriving meanwhile), one layer a step at least:
                # its layers keep to what a step may add, twice that for a prompt alone (fewer, larger chunks)
                fit = time.perf_counter() + (1 if self._in_slots() > 1 else LONE_CHUNK_SHARE) * stall * self._decode_forward
            self._layers_run = 0
            for chunk in plan.prefill:
                seq = chunk.seq
                if self._sequences.get(seq.index) is not seq:
                    continue  # it failed at an earlier chunk
                try:
                    if not self._prefill(chunk, res, deadline, fit):
                        break  # the step's time for prompts is spent: the chunk goes on in the next step
                except Exception as e:  # this sequence alone: the others' slots are untouched
                    self._fail(seq, e, res)
            res.seconds = time.perf_counter() - t
            res.prefill_seconds = res.seconds - res.decode_seconds
            return res
        except Exception:
            self._abort()
            raise

    def _catch_up(self) -> None:
        """Prompts that waited for another one prefilling the same tokens (the scheduler's ``follows``) copy in
        what it stored in the prefix cache since (looked up only when the cache took something new)."""
        if self.prefix is None or self.prefix.version == self._prefix_seen:
            return
        self._prefix_seen = self.prefix.version
        for seq in self.scheduler.slots:
            if seq is not None and seq.follows and seq.partial is None:
                seq.prefilled = self.prefix.load(seq.prompt, self.cache, seq.slot, have=seq.prefilled)

    def _fits(self, seq: Sequence) -> bool:
        """Whether ``seq`` fits the cache as allocated (an engine sized to its runs grows when idle)."""
        return seq.need <= self.cache.capacity

    def _start(self, seq: Sequence, failed: list) -> bool:
        """``seq`` takes its slot: its given cache, or the prefix cache's blocks of its prompt, and its budget.
        False (the error in ``failed``) when that fails: the sequence alone ends."""
        try:
            self._owner[seq.slot] = seq.index
            if seq.request.kv is not None:
                self.cache.load(seq.slot, seq.request.kv)
            elif self.prefix is not None:
                seq.prefilled = self.prefix.load(seq.prompt, self.cache, seq.slot)
            self.runner.budgets[seq.slot] = seq.request.budget
            return True
        except Exception as e:
            failed.append((seq, e))
            return False

    def _prefill(self, chunk: Chunk, res: StepResult, deadline: float | None = None,
                 fit: float | None = None) -> bool:
        """Dense prefill of prompt positions [start, end) of a sequence into its slot, layer by layer until
        ``deadline`` (None: all of them; a step runs one layer at least, so every prompt moves on); the prompt's
        last chunk picks the first token from the last position's logits. False: the chunk is part-way, kept in
        ``seq.partial`` for the next step, or was cut; the step's prompt work ends. ``fit`` (a time): a new chunk
        keeps the tokens one of its layers can take before it, at the cost per token its sequence's last chunk
        (else any sequence's) measured: a chunk's first layer in a step runs whatever the time, and a chunk part-way
        goes on one layer a step at least, so a layer longer than that would hold decoding sequences past it; for
        the same reason a chunk under way whose layer grew longer than that is split (:meth:`_fit_piece`)."""
        lean, runner, cache, device = self.lean, self.runner, self.cache, self.lean.device
        seq, slot = chunk.seq, chunk.seq.slot
        s, e = chunk.start, chunk.end  # at most prefill_chunk tokens: one forward
        cut = False
        if fit is not None and seq.partial is None:
            left = fit - time.perf_counter()
            if self._layers_run and left <= 0:
                return False  # the step's time is spent: the chunk begins in the next step
            per_token = seq.layer_token_seconds or self._layer_token_seconds  # its own chunks, else any's
            if per_token > 0 and e - s > _fitted(left, per_token):
                chunk = Chunk(seq, s, s + _fitted(left, per_token))
                e, cut = chunk.end, True
        if seq.partial is None:  # its layer time a guess until one ran: whether the first fits what is left
            seq.partial = Partial(s, e, lean.begin(torch.tensor([seq.prompt[s:e]], device=device),
                                                  torch.arange(s, e, device=device)[None]),
                                  layer_seconds=(seq.layer_token_seconds or self._layer_token_seconds) * (e - s))
        while seq.partial is not None:
            if not self._layers_run and fit is not None:
                self._fit_piece(seq, fit - time.perf_counter())
            part = seq.partial
            runner.begin_prefill(slot, part.start, part.end)  # again on every step: decode steps reset the runner
            if deadline is None:
                lean.run_layers(part.pass_, runner.attend)
            while not part.pass_.done(lean.num_layers):
                now = time.perf_counter()
                if self._layers_run and now + part.layer_seconds > deadline:
                    return False
                lean.run_layers(part.pass_, runner.attend, 1)
                part.layer_seconds = time.perf_counter() - now
                seq.layer_token_seconds = self._layer_token_seconds = part.layer_seconds / (part.end - part.start)
                self._layers_run += 1
            seq.partial, seq.prefilled = part.rest, part.end
            res.prefill_tokens += part.end - part.start
            if self.prefix is not None and seq.request.kv is None:  # a given cache's rows were not prefilled here
                runner.host_ready()  # the rows it copies have arrived
                self.prefix.store(seq.prompt, cache, slot, part.end)
        if chunk.last:
            runner.host_ready()
            cache.filled(slot, len(seq.prompt))
            seq.status = Status.RUNNING
            logits = lean.logits(part.pass_)[0, -1]
            token = self._pick(seq, logits, int(logits.argmax()), res)
            self._last[slot] = token
            self._take(seq, token, logits, res)
        return not cut  # a cut chunk's plan went further: the rest is planned again next step

    def _fit_piece(self, seq: Sequence, left: float) -> None:
        """Before a step's first prompt layer: when one layer of ``seq``'s chunk under way would run well past the
        ``left`` seconds the step may give it (SPLIT_OVERRUN times; one layer is run whatever the time, and a chunk
        begun before any sequence decoded was sized without knowing a decode step's time), its first positions, as
        many as one layer does in that time, go on alone; the others wait at this layer (:meth:`Partial.split`)."""
        part, left = seq.partial, max(left, 0.0)
        n = part.end - part.start
        if part.layer_seconds > SPLIT_OVERRUN * left and _fitted(left, part.layer_seconds / n) < n:
            seq.partial = part.split(_fitted(left, part.layer_seconds / n))

    def _in_slots(self) -> int:
        return sum(s is not None for s in self.scheduler.slots)

    def _decode(self, running: list[Sequence], res: StepResult) -> None:
        runner, device = self.runner, self.lean.device
        busy = [False] * self.slots
        for seq in running:
            busy[seq.slot] = True
        timer = Timer() if self.profile else None
        runner.timer = timer
        if timer is not None:
            timer.start()
        ctx = runner.begin_decode(torch.tensor(busy, device=device), busy)
        if timer is not None:
            timer.lap("rest")
        logits = self.lean.forward(self._last[:, None], ctx.pos[:, None], runner.attend, timer=timer)[:, -1]
        self._last = logits.argmax(-1)
        tokens = self._last.tolist()  # the step's tokens are known here (a device sync on a GPU)
        if timer is not None:
            timer.lap("rest")
            res.breakdown = dict(timer.totals)
        runner.timer = None
        if runner.method is not None:
            res.attended, res.context = int(runner.attended), int(runner.context)
        res.heads, res.crossed, res.decode_rows = runner.heads, runner.crossed, len(running)
        self.dense_step = ctx.dense
        for seq in running:
            try:
                token = self._pick(seq, logits[seq.slot], tokens[seq.slot], res)
                if token != tokens[seq.slot]:
                    self._last[seq.slot] = token
                self._take(seq, token, logits[seq.slot], res)
            except Exception as e:  # this sequence alone: the batch's forward is done, the others go on
                self._fail(seq, e, res)

    def _pick(self, seq: Sequence, logits: torch.Tensor, argmax: int, res: StepResult) -> int:
        """The token ``seq`` produces from ``logits`` (its argmax given), recorded in ``res``."""
        token = argmax
        if seq.sampler is not None:
            token, logprobs = seq.sampler.pick(logits)
            if logprobs is not None:
                res.logprobs[seq.index] = logprobs
                seq.logprobs.append(logprobs)
        res.tokens[seq.index] = token
        return token

    def _take(self, seq: Sequence, token: int, logits: torch.Tensor, res: StepResult) -> None:
        seq.tokens.append(token)
        if self.keep_logits:
            seq.logits.append(logits.float().cpu())
        if token in self.stop_tokens:
            self._finish(seq, "eos", res)
        elif len(seq.tokens) >= seq.request.max_new_tokens:
            self._finish(seq, "length", res)

    def _finish(self, seq: Sequence, reason: str, res: StepResult, error: str | None = None) -> None:
        r = seq.request
        kv = None
        if r.keep_kv and reason in ("eos", "length"):
            kv = self.cache.export(seq.slot, self.lean.dtype)
        res.finished.append((seq.index, seq.completion(reason, error, kv, self.keep_logits)))
        self._drop(seq)

    def _fail(self, seq: Sequence, e: Exception, res: StepResult) -> None:
        """End ``seq`` with ``finish_reason="error"`` and the error's text (or, when its completion is already
        out, only free what it holds)."""
        if any(i == seq.index for i, _ in res.finished):
            self._drop(seq)
        else:
            self._finish(seq, "error", res, f"{type(e).__name__}: {e}")

    def _drop(self, seq: Sequence) -> None:
        """``seq`` out of the engine: its queue place or its slot freed."""
        if self._sequences.pop(seq.index, None) is None:
            return
        self.scheduler.remove(seq)
        if seq.slot is not None:
            self._owner[seq.slot] = None
            self.runner.budgets[seq.slot] = None
            self.cache.free(seq.slot)

    def cancel(self, index: int) -> Completion | None:
        """Drop request ``index`` now: out of the queue, or out of its slot (free for the next step to admit
        another). Returns its completion so far (``finish_reason="cancelled"``); None when the engine no
        longer holds it (finished, or never added). Call it between steps, from the thread that steps."""
        seq = self._sequences.get(index)
        if seq is None:
            return None
        self._drop(seq)
        return seq.completion("cancelled", logits=self.keep_logits)

    def _abort(self) -> None:
        for seq in list(self._sequences.values()):
            self._drop(seq)
        self.scheduler.clear()

    # -- runs ---------------------------------------------------------------------------------------------------

    def serve(self, requests: Iterable[Request], eos_token_id: int | list[int] | None = None,
              on_finish: Callable[[int, Completion], None] | None = None, profile: bool = False,
              keep_logits: bool = False, trace: bool = False,
              on_step: Callable[[StepResult], None] | None = None) -> ServeResult:
        """Serve ``requests`` in order of arrival; ``on_finish(index, completion)`` as each one ends, ``on_step``
        after every step. ``trace``: record every decode step's selection (:class:`~a2ats.core.stats.SelectionTrace`;
        its rows are the requests' indices; a step that attended densely selected nothing and is not recorded). A failure mid-run raises :class:`ServeError` holding every
        completion finished before it."""
        if self.has_work:
            raise RuntimeError("serve() needs an idle engine; this one has requests added through add(): step them first")
        reqs = list(requests)
        for i, r in enumerate(reqs):
            if r.id is None:
                r.id = i
            self.check(r)  # every request before any work
        self.stop_tokens = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                               else eos_token_id)
        self.keep_logits, self.profile = keep_logits, profile
        self.trace = SelectionTrace() if trace and self.method is not None else None
        if self.runner is not None:
            self.runner.trace = self.trace
        self._next = 0
        for r in reqs:
            self.add(r)
        done: list[Completion | None] = [None] * len(reqs)
        prefill_s = decode_s = 0.0
        steps = decode_tokens = attended = heads = context = crossed = 0
        breakdown: dict[str, float] = defaultdict(float)
        dense: dict[str, int] = defaultdict(int)  # decode steps that attended to every token, by why
        step_seconds: list[float] = []
        try:
            while self.has_work:
                res = self.step()
                prefill_s += res.prefill_seconds
                if res.decoded:
                    decode_s += res.decode_seconds
                    step_seconds.append(res.decode_seconds)
                    steps += 1
                    decode_tokens += res.decode_rows
                    attended, heads, context = attended + res.attended, heads + res.heads, context + res.context
                    crossed += res.crossed
                    if self.dense_step:
                        dense[self.dense_step] += 1
                    for k, v in res.breakdown.items():
                        breakdown[k] += v
                for i, c in res.finished:
                    done[i] = c
                    if on_finish is not None:
                        on_finish(i, c)
                if on_step is not None:
                    on_step(res)
        except Exception as e:
            self._abort()
            finished = sum(c is not None for c in done)
            raise ServeError(f"serving failed after {finished} of {len(reqs)} sequences finished: {e}", done) from e
        stats = None
        if self.method is not None and heads:
            stats = SelectionStats(self.config, steps=steps * self.lean.num_layers, attended=float(attended),
                                   heads=heads, context=float(context), last_length=max(len(r.prompt) for r in reqs),
                                   decode_steps=steps, dense=dict(dense))
        return ServeResult(done, prefill_s, decode_s, steps, decode_tokens, dict(breakdown), stats,
                           crossed, self.trace, step_seconds)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 on_token: Callable[[torch.Tensor], None] | None = None, profile: bool = False,
                 keep_logits: bool = False, trace: bool = False) -> EngineOutput:
        """Greedy continuation of a padded batch ``input_ids`` (B, n) (padding where ``attention_mask`` is 0, on
        either side), one request per row; ``on_token`` receives each new (B,) column as soon as every row has
        produced it (rows that ended: ``pad_token_id``)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B, n = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
        empty = [b for b, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"row(s) {empty} of the batch hold no tokens (attention_mask all 0)")
        produced: list[list[int]] = [[] for _ in range(B)]
        ended = [False] * B
        emitted = 0

        def stream(res: StepResult) -> None:
            nonlocal emitted
            for i, token in res.tokens.items():
                produced[i].append(token)
            for i, _ in res.finished:
                ended[i] = True
            while on_token is not None and any(len(p) > emitted for p in produced) and \
                    all(len(p) > emitted or e for p, e in zip(produced, ended)):
                on_token(torch.tensor([p[emitted] if len(p) > emitted else pad_token_id for p in produced]))
                emitted += 1

        res = self.serve([Request(r, max_new_tokens) for r in rows], eos_token_id=eos_token_id, profile=profile,
                         keep_logits=keep_logits, trace=trace, on_step=stream)
        lengths = [len(c.tokens) for c in res.completions]
        width = max(lengths)
        tokens = torch.full((B, width), pad_token_id, dtype=torch.long)
        for b, c in enumerate(res.completions):
            tokens[b, : len(c.tokens)] = torch.tensor(c.tokens)
        logits = None
        if keep_logits:
            blank = torch.full_like(res.completions[0].logits[0], float("nan"))
            logits = [torch.stack([c.logits[t] if t < len(c.logits) else blank for c in res.completions])
                      for t in range(width)]
        return EngineOutput(tokens, lengths, n, res.prefill_seconds, res.step_seconds, res.breakdown, res.stats, logits,
                            res.trace)


def _fitted(left: float, per_token: float) -> int:
    """Prompt tokens one layer takes in ``left`` seconds at ``per_token`` seconds a token (MIN_FITTED_CHUNK at
    least)."""
    return max(int(left / per_token), MIN_FITTED_CHUNK)


def default_kv_dtype(lean: LeanModel, host: torch.device) -> torch.dtype:
    """How an engine stores K/V unless told: bfloat16 for a float32 model whose weights are 16-bit values (a bf16 or
    fp16 checkpoint loaded in float32: its embedding rows round-trip through one of them exactly, which float32
    training leaves no weight doing) when K/V sit in CPU memory, where the kernels read bf16 rows natively: half the
    bytes per row, at the precision the model was shipped in. The model's own dtype otherwise."""
    if lean.dtype != torch.float32 or host.type != "cpu":
        return lean.dtype
    sample = lean.embed[:64].detach().cpu()
    if any(torch.equal(sample, sample.to(low).float()) for low in (torch.bfloat16, torch.float16)):
        return torch.bfloat16
    return torch.float32
