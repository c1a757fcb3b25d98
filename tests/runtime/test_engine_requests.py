"""What a request may ask of the engine beyond greedy tokens: sampling (temperature, top_p, seed, penalties, biases,
log probabilities), its own retrieval budget, cancellation (the slot frees at once), and a failure that ends its
sequence alone."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from a2ats import A2ATSConfig
from a2ats.core.config import Budget
from a2ats.core.stats import SelectionTrace
from a2ats.runtime import Engine, Request, Sampling, SamplingError
from a2ats.runtime.sequence import Status
from conftest import padded_batch, random_codebooks, tiny_model

CFG = A2ATSConfig(budget=0.05, sinks=2, window=8)
LENGTHS = (300, 201, 257, 45)


def _prompts(lengths=LENGTHS, seed=3):
    ids, mask = padded_batch(seed=seed, lengths=lengths)
    return [ids[i][mask[i].bool()].tolist() for i in range(len(lengths))]


def _engine(model, slots=2, cb=True, cfg=CFG, path="auto"):
    """Chunks run through within their step (no stall): what a step prefills does not depend on timing."""
    return Engine(model, random_codebooks(model) if cb else None, cfg, slots=slots, max_context=320, path=path, dense_below=0,
                  decode_weights="model", prefill_dtype="model", prefill_stall=None)


def _run(engine, requests) -> dict:
    """Step to the end; {request index: completion}."""
    idx = [engine.add(r) for r in requests]
    done = {}
    while engine.has_work:
        for i, c in engine.step().finished:
            done[i] = c
    assert sorted(done) == idx
    return done


def test_temperature_zero_is_greedy_and_seeds_reproduce_whatever_the_batch():
    model = tiny_model("llama")
    prompts = _prompts()
    greedy = _run(_engine(model), [Request(p, 8) for p in prompts])
    explicit = _run(_engine(model), [Request(p, 8, sampling=Sampling(temperature=0.0, seed=5)) for p in prompts])
    assert [c.tokens for c in explicit.values()] == [c.tokens for c in greedy.values()]
    # one sampled request, alone and among greedy ones in other slots
    alone = _run(_engine(model, slots=1), [Request(prompts[0], 12, sampling=Sampling(temperature=1.2, top_p=0.9, seed=11))])[0].tokens
    mixed = _run(_engine(model, slots=3), [Request(prompts[1], 5), Request(prompts[0], 12, sampling=Sampling(
                                                                             temperature=1.2, top_p=0.9, seed=11)), Request(prompts[2], 9)])
    assert mixed[1].tokens == alone
    assert mixed[0].tokens == greedy[1].tokens[:5]
    other = _run(_engine(model, slots=1), [Request(prompts[0], 12, sampling=Sampling(temperature=1.2, top_p=0.9, seed=12))])[0].tokens
    assert other != alone
    # a nucleus holding one token is the argmax
    nucleus = _run(_engine(model, slots=1), [Request(prompts[0], 8, sampling=Sampling(temperature=1.0, top_p=1e-9, seed=1))])[0].tokens
    assert nucleus == greedy[0].tokens


def test_sampling_draws_from_the_tempered_distribution():
    """Many first tokens of one prompt at a high temperature: not all the argmax, every one within the nucleus."""
    model = tiny_model("llama")
    prompt = _prompts()[3]
    engine = _engine(model, slots=4)
    logits = engine.generate(torch.tensor([prompt]), max_new_tokens=1, keep_logits=True).logits[0][0]
    p = torch.softmax(logits / 2.0, -1)
    order = p.argsort(descending=True)
    nucleus = set(order[: int((p[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    firsts = [c.tokens[0] for c in _run(engine, [Request(prompt, 1, sampling=Sampling(temperature=2.0, top_p=0.5, seed=s))
                                                 for s in range(24)]).values()]
    assert set(firsts) <= nucleus and len(set(firsts)) > 1


@pytest.mark.parametrize("path", ["auto", "reference"])
def test_a_requests_budget_selects_as_an_engine_configured_with_it(path):
    model = tiny_model("qwen3")
    prompts = _prompts()
    own = Budget(fraction=0.2)
    engine = _engine(model, slots=3, path=path)
    engine.trace = engine.runner.trace = SelectionTrace()  # rows: request indices
    got = _run(engine, [Request(prompts[0], 6), Request(prompts[1], 6, budget=own), Request(prompts[2], 6, budget=64)])
    for i, budget in ((0, CFG.budget), (1, own), (2, Budget(tokens=64))):
        cfg = A2ATSConfig(budget=budget, sinks=2, window=8)
        ref = _engine(model, slots=1, cfg=cfg, path=path).generate(torch.tensor([prompts[i]]), max_new_tokens=6, trace=True)
        assert got[i].tokens == ref.tokens[0].tolist()
        for (layer, row), sets in ref.trace.sets.items():
            assert engine.trace.sets[(layer, i)] == sets
    assert engine.runner.budgets == [None] * 3  # a finished sequence leaves no budget behind


def test_request_settings_are_checked():
    for bad, match in [(dict(budget=1.5), "budget fraction"), (dict(budget="lots"), "not a number"),
                       (dict(sampling={"temperature": 1.0}), "a2ats.runtime.Sampling")]:
        with pytest.raises(ValueError, match=match):
            Request([1, 2, 3], 4, **bad)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="attends to every token"):
        _engine(model, cb=False).add(Request([1, 2, 3], 4, budget=0.1))


def test_cancel_frees_the_slot_at_once_and_leaves_the_others_alone():
    model = tiny_model("llama")
    prompts = _prompts()
    base = _run(_engine(model, slots=2), [Request(p, 10) for p in prompts])
    engine = _engine(model, slots=2)
    idx = [engine.add(Request(p, 10)) for p in prompts]
    res = engine.step()  # both slots admitted
    assert set(res.tokens) == {idx[0], idx[1]}
    engine.step()
    c = engine.cancel(idx[0])  # in flight
    assert c.finish_reason == "cancelled" and c.tokens == base[0].tokens[:2]
    w = engine.cancel(idx[3])  # waiting
    assert w.finish_reason == "cancelled" and w.tokens == []
    assert engine.cancel(idx[0]) is None and engine.cancel(99) is None
    res = engine.step()  # the freed slot is filled beside the running sequence's decode
    assert idx[1] in res.tokens and res.decode_rows == 1
    assert res.prefill_tokens == min(len(prompts[2]), engine.scheduler.budget)
    done = {}
    while engine.has_work:
        done.update(engine.step().finished)
    assert done[idx[1]].tokens == base[1].tokens and done[idx[2]].tokens == base[2].tokens


@pytest.mark.parametrize("where", ["prefill", "token"])
def test_a_failing_sequence_ends_alone(monkeypatch, where):
    model = tiny_model("llama")
    prompts = _prompts()
    base = _run(_engine(model, slots=2), [Request(p, 6) for p in prompts])
    engine = _engine(model, slots=2)
    poison = prompts[1]
    if where == "prefill":
        prefill = engine._prefill

        def faulty(chunk, res, *rest):
            if chunk.seq.prompt == poison:
                raise RuntimeError("bad prefill")
            return prefill(chunk, res, *rest)

        monkeypatch.setattr(engine, "_prefill", faulty)
    else:
        take = engine._take

        def faulty(seq, token, logits, res):
            if seq.prompt == poison and len(seq.tokens) == 3:
                raise RuntimeError("bad token")
            return take(seq, token, logits, res)

        monkeypatch.setattr(engine, "_take", faulty)
    got = _run(engine, [Request(p, 6) for p in prompts])
    assert got[1].finish_reason == "error" and f"RuntimeError: bad {where}" == got[1].error
    assert got[1].tokens == ([] if where == "prefill" else base[1].tokens[:3])
    for i in (0, 2, 3):
        assert got[i].tokens == base[i].tokens and got[i].error is None


@pytest.mark.parametrize("chunk,budget,stall", [(4096, None, None), (4096, 64, None), (32, 64, None), (7, 13, None),
                                                (50, 1, None), (32, 64, 0.0), (7, 13, 0.0), (4096, 64, 0.5)])
def test_prompt_chunks_beside_decode_give_the_same_tokens(chunk, budget, stall):
    """Whatever the chunk, the budget and the stall, each sequence's tokens are those it gets alone; while sequences
    decode, every step decodes all of them and, unsliced, prefills at most the budget. With a stall of 0 a step runs
    one prompt layer: chunks go through the model over several steps."""
    model = tiny_model("llama")
    prompts, new = _prompts(), (4, 9, 6, 5)  # sequences end at different steps: later prompts prefill beside decode
    alone = [_run(_engine(model, slots=1), [Request(p, n)])[0].tokens for p, n in zip(prompts, new)]
    engine = Engine(model, random_codebooks(model), CFG, slots=2, max_context=320, dense_below=0,
                    decode_weights="model", prefill_dtype="model", prefill_chunk=chunk, prefill_budget=budget,
                    prefill_stall=stall)
    idx = [engine.add(Request(p, n)) for p, n in zip(prompts, new)]
    done, running, sliced = {}, set(), 0
    while engine.has_work:
        res = engine.step()
        assert res.decode_rows == len(running)
        if running and budget is not None and stall is None:
            assert res.prefill_tokens <= budget
        if running and stall == 0.0:
            assert engine._layers_run <= 1
        sliced += any(s is not None and s.partial is not None for s in engine.scheduler.slots)
        running |= set(res.tokens)
        for i, c in res.finished:
            done[i] = c
            running.discard(i)
    assert [done[i].tokens for i in idx] == alone
    if stall == 0.0:
        assert sliced


def test_a_new_chunk_beside_decode_is_cut_to_what_one_layer_can_do_in_the_time_left():
    """While sequences decode (a stall set), a new chunk keeps the tokens one of its layers can take before the
    step's deadline, as its sequence's last chunk ran (never fewer than MIN_FITTED_CHUNK): its first layer runs
    whatever the time, so an uncut chunk would hold the decoding sequences that long. The tokens do not change."""
    from a2ats.runtime.engine import MIN_FITTED_CHUNK

    model = tiny_model("llama")
    short, long = _prompts()[3], _prompts()[0]
    alone = [_run(_engine(model, slots=1), [Request(p, n)])[0].tokens for p, n in ((short, 20), (long, 4))]
    engine = Engine(model, random_codebooks(model), CFG, slots=2, max_context=320, dense_below=0,
                    decode_weights="model", prefill_dtype="model", prefill_chunk=4096, prefill_budget=None,
                    prefill_stall=1.0)
    a = engine.add(Request(short, 20))
    done = dict(engine.step().finished)  # the short prompt, whole: it decodes from the next step on
    b = engine.add(Request(long, 4))
    seq = engine._sequences[b]
    seq.layer_token_seconds = 10.0  # as if its last chunk's layer took 10 s a token: no room for more than the least
    res = engine.step()
    assert res.decode_rows == 1 and res.prefill_tokens <= MIN_FITTED_CHUNK
    assert (seq.partial.end if seq.partial is not None else seq.prefilled) == MIN_FITTED_CHUNK
    assert seq.layer_token_seconds < 10.0  # measured again on the chunk's layers
    done.update(res.finished)
    while engine.has_work:
        done.update(engine.step().finished)
    assert [done[a].tokens, done[b].tokens] == alone


def test_a_chunk_under_way_whose_layer_outgrew_the_step_goes_on_in_pieces():
    """A chunk begun before any sequence decoded was sized without a decode step's time; once one decodes, a layer
    of it longer than the step may give would hold that sequence as long. Such a chunk is split at its layer: as
    many first positions as one layer does in the time go on alone (never fewer than MIN_FITTED_CHUNK), the others
    wait at that layer and follow. The tokens do not change."""
    from a2ats.runtime.engine import MIN_FITTED_CHUNK

    model = tiny_model("llama")
    short, long = _prompts()[3], _prompts()[0]
    alone = [_run(_engine(model, slots=1), [Request(p, n)])[0].tokens for p, n in ((short, 20), (long, 4))]
    engine = Engine(model, random_codebooks(model), CFG, slots=2, max_context=320, dense_below=0,
                    decode_weights="model", prefill_dtype="model", prefill_chunk=4096, prefill_budget=None,
                    prefill_stall=1.0, prefill_step_seconds=0.0)
    b = engine.add(Request(long, 4))
    engine.step()  # nothing has decoded yet: the whole prompt is one chunk, one layer a step
    seq = engine._sequences[b]
    assert (seq.partial.start, seq.partial.through, seq.partial.pass_.layer) == (0, len(long), 1)
    a = engine.add(Request(short, 20))
    done: dict = {}
    while engine._sequences[a].status is not Status.RUNNING:
        done.update(engine.step().finished)
    assert seq.partial.rest is None and seq.partial.pass_.layer == 1
    seq.partial.layer_seconds = 10.0  # as if its next layer took 10 s: a decode step may give it far less
    res = engine.step()
    assert res.decode_rows == 1 and res.prefill_tokens == MIN_FITTED_CHUNK == seq.prefilled
    assert (seq.partial.start, seq.partial.through, seq.partial.pass_.layer) == (MIN_FITTED_CHUNK, len(long), 1)
    done.update(res.finished)
    pieces = 1
    while engine.has_work:
        res = engine.step()
        pieces += res.prefill_tokens > 0
        done.update(res.finished)
    assert pieces > 2  # the rest kept its share of the long layer: it went on in pieces too
    assert [done[a].tokens, done[b].tokens] == alone


def test_a_piece_is_split_only_when_its_layer_runs_well_past_the_time_left():
    """Layer times vary from step to step: a piece cut to fit is not split again for running a little over (a
    trail of small pieces, each its own forward), only past SPLIT_OVERRUN times the time left, and then to what
    one layer does in that time."""
    from a2ats.runtime.engine import SPLIT_OVERRUN
    from a2ats.runtime.sequence import Partial, Sequence

    engine = _engine(tiny_model("llama"))
    seq = Sequence(0, Request(_prompts()[0], 4))
    n = len(seq.prompt)
    lean = engine.lean
    for over, split in ((0.9, False), (SPLIT_OVERRUN * 0.99, False), (SPLIT_OVERRUN * 1.01, True), (3.0, True)):
        seq.partial = Partial(0, n, lean.begin(torch.tensor([seq.prompt]), torch.arange(n)[None]), over * 1.0)
        engine._fit_piece(seq, 1.0)
        part = seq.partial
        assert (part.rest is not None) == split
        if split:
            assert part.end == int(n / over) and part.rest.through == n
            assert part.pass_.x.shape[1] == part.end and part.rest.pass_.x.shape[1] == n - part.end
            assert abs(part.layer_seconds + part.rest.layer_seconds - over) < 1e-9


@pytest.mark.parametrize("stall", [None, 0.0])
def test_requests_arriving_mid_run_get_the_tokens_they_get_alone(stall):
    """Requests added while others decode: each gets the tokens it gets alone; every step decodes every running
    sequence, and (unsliced) prefills at most the budget beside them."""
    model = tiny_model("llama")
    prompts = _prompts()
    alone = [_run(_engine(model, slots=1), [Request(p, 12)])[0].tokens for p in prompts]
    engine = Engine(model, random_codebooks(model), CFG, slots=4, max_context=320, dense_below=0,
                    decode_weights="model", prefill_dtype="model", prefill_budget=40, prefill_stall=stall)
    arrivals = {0: 3, 2: 0, 4: 1, 5: 2}  # step -> prompt
    idx, done, step = {}, {}, 0
    while step < 200 and (engine.has_work or len(idx) < len(arrivals)):
        if step in arrivals:
            idx[arrivals[step]] = engine.add(Request(prompts[arrivals[step]], 12))
        running = sum(s is not None and s.status is Status.RUNNING for s in engine.scheduler.slots)
        res = engine.step()
        assert res.decode_rows == running
        if running and stall is None:
            assert res.prefill_tokens <= 40
        done.update(res.finished)
        step += 1
    assert {p: done[i].tokens for p, i in idx.items()} == dict(enumerate(alone))


def test_penalties_biases_and_logprobs_follow_the_reference_step_by_step():
    """Each token is the argmax of the raw logits adjusted as :mod:`a2ats.runtime.sampling` says (biases added,
    presence and frequency penalties for the tokens generated so far), its log probabilities those of the adjusted
    logits; a plain request batched beside it keeps its greedy tokens and reports none."""
    model = tiny_model("llama")
    prompts = _prompts()
    plain = _run(_engine(model, slots=1), [Request(prompts[0], 12)])[0].tokens
    beside = _run(_engine(model, slots=1), [Request(prompts[1], 10)])[0].tokens
    bias = ((plain[0], -100.0), (17, 3.0))
    s = Sampling(presence_penalty=0.7, frequency_penalty=1.3, logit_bias=bias, logprobs=4)
    engine = _engine(model, slots=2)
    engine.keep_logits = True
    got = _run(engine, [Request(prompts[0], 12, sampling=s), Request(prompts[1], 10)])
    c = got[0]
    assert len(c.logprobs) == len(c.tokens) == 12
    counts = Counter()
    for raw, token, lp in zip(c.logits, c.tokens, c.logprobs):
        x = raw.clone()
        for t, b in bias:
            x[t] += b
        for t, n in counts.items():
            x[t] -= 1.3 * n + 0.7
        assert token == int(x.argmax())
        ref = torch.log_softmax(x, -1)
        top = ref.topk(4)
        assert lp.token == token and lp.logprob == pytest.approx(float(ref[token]), abs=1e-5)
        assert [a for a, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
        counts[token] += 1
    assert c.tokens != plain
    assert got[1].tokens == beside and got[1].logprobs is None


def test_logit_bias_past_the_vocabulary_is_refused():
    model = tiny_model("llama")
    with pytest.raises(SamplingError, match="past the vocabulary"):
        _engine(model).add(Request([1, 2, 3], 4, sampling=Sampling(logit_bias=((10**6, 1.0),))))


def test_a_request_arriving_during_a_whole_prompt_is_planned_at_the_next_step():
    """With nothing decoding, a step's prompt work stops after prefill_step_seconds (0: one layer), so a short
    request added while a long prompt is part-way through the model gets its first token before the long one; each
    gets the tokens it gets alone."""
    model = tiny_model("llama")
    prompts = _prompts()
    long, short = prompts[0], prompts[3]  # 300 and 45 tokens
    alone = [_run(_engine(model, slots=1), [Request(p, 4)])[0].tokens for p in (long, short)]
    engine = Engine(model, random_codebooks(model), CFG, slots=2, max_context=320, dense_below=0,
                    decode_weights="model", prefill_dtype="model", prefill_step_seconds=0.0)
    a = engine.add(Request(long, 4))
    engine.step()  # the long prompt's first layer
    assert engine.scheduler.slots[0].partial is not None and engine._layers_run == 1
    b = engine.add(Request(short, 4))
    first, got, step = {}, {a: [], b: []}, 0
    while engine.has_work:
        res = engine.step()
        step += 1
        for i, token in res.tokens.items():
            first.setdefault(i, step)
            got[i].append(token)
    assert first[b] < first[a]
    assert [got[a], got[b]] == alone
