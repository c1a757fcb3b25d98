"""The prefix cache (:mod:`a2ats.runtime.prefix_cache`): blocks keyed by their whole prefix, copied exactly,
evicted least recently used from the ends of chains, and the rows of a partial block reused token by token;
through the engine, a prompt that begins with cached rows gets the tokens it gets without the cache, prefilling
only the rest."""

from __future__ import annotations

import pytest
import torch

from a2ats import A2ATSConfig
from a2ats.runtime import Engine, Request
from a2ats.runtime.prefix_cache import PrefixCache
from a2ats.runtime.settings import EngineSettings
from a2ats.runtime.slots import SlotCache
from conftest import random_codebooks, tiny_model

CFG = A2ATSConfig(budget=0.05, sinks=2, window=8)


def _filled(dtype=torch.bfloat16, slots=2, capacity=256, seed=0) -> SlotCache:
    g = torch.Generator().manual_seed(seed)
    cache = SlotCache(2, slots, 3, 16, capacity, dtype, "cpu")
    for layer in range(2):
        k, v = torch.randn(2, slots, 3, capacity, 16, generator=g)
        cache.put(layer, (slice(None), slice(None), slice(None)), k, v)
        cache.codes[layer].copy_(torch.randint(0, 99, cache.codes[layer].shape, generator=g, dtype=torch.int16))
    return cache


def _same(a: SlotCache, sa: int, b: SlotCache, sb: int, end: int) -> bool:
    return all(torch.equal(x[sa, :, :end], y[sb, :, :end]) for xs, ys in zip(a._stores(), b._stores())
               for x, y in zip(xs, ys))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_blocks_come_back_exactly_and_only_after_the_same_prefix(dtype):
    src, dst = _filled(dtype), _filled(dtype, seed=1)
    store = PrefixCache(1 << 30, block=32)
    prompt = list(range(100, 200))  # 3 full blocks of 32, and a tail of 4 tokens
    store.store(prompt, src, 1, len(prompt))
    assert len(store) == 4
    # the last token is always left to prefill: 3 blocks and 3 of the tail's 4 rows
    assert store.load(prompt, dst, 0) == 99 and _same(src, 1, dst, 0, 99)
    # a prompt ending inside a block takes that block's rows up to its own last token but one
    assert store.load(prompt[:90], dst, 0) == 89 and _same(src, 1, dst, 0, 89)
    # the same second block after another first one is another block
    other = [7] + prompt[1:]
    assert store.load(other, dst, 1) == 0
    assert store.stats.lookups == 3 and store.stats.hits == 2 and store.stats.tokens_reused == 99 + 89


def test_a_tail_serves_the_tokens_a_prompt_shares_with_it_and_gives_way_to_what_covers_it():
    src, dst = _filled(torch.float32), _filled(torch.float32, seed=1)
    store = PrefixCache(1 << 30, block=32)
    doc = list(range(100, 150))  # a block and a tail of 18
    store.store(doc + [1, 2, 3], src, 0, 53)
    assert len(store) == 2
    # a question over the document: the document's rows, the tail's shared ones included; then its own
    assert store.load(doc + [9, 9, 9, 9], dst, 1) == 50 and _same(src, 0, dst, 1, 50)
    # a longer tail after the same block that begins with the held one replaces it
    store.store(doc + [1, 2, 3, 4, 5], src, 0, 55)
    assert len(store) == 2 and store.load(doc + [1, 2, 3, 4, 5, 6], dst, 1) == 55
    # a tail that diverges is kept beside it; the prompt takes the one it shares more with
    store.store(doc + [8, 8], src, 0, 52)
    assert len(store) == 3 and store.load(doc + [8, 8, 0], dst, 0) == 52 and _same(src, 0, dst, 0, 52)
    # the second block, once stored whole, serves every tail it begins with: they go
    store.store(doc + [1, 2, 3, 4, 5] + list(range(9)), src, 0, 64)
    assert len(store) == 3  # two blocks, and the [8, 8] tail the new block does not begin with
    before = store.bytes
    store.clear()
    assert len(store) == 0 and store.bytes == 0 < before


def test_eviction_takes_chains_from_their_ends_and_respects_the_cap():
    cache = _filled(torch.float32)
    store = PrefixCache(1 << 30, block=32)
    store.store(list(range(96)), cache, 0, 96)
    per = store.bytes // 3
    store = PrefixCache(4 * per, block=32)
    a, b = list(range(96)), list(range(1000, 1096))
    store.store(a, cache, 0, 96)
    store.store(b, cache, 1, 96)  # b's last two blocks take the room of a's last two
    assert store.bytes <= 4 * per and store.stats.evicted == 2
    assert store.load(a + [0], cache, 1) == 32  # a's head kept: it still serves its first block
    assert store.load(b + [0], cache, 0) == 96
    with pytest.raises(ValueError, match="prefix_cache must be an integer >= 0"):
        EngineSettings(prefix_cache=-1)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_engine_with_a_prefix_cache_gives_the_same_tokens_and_prefills_less(kv_dtype):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 97, (300,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 40, 1)] + [shared[:200]]

    def engine(prefix_cache: int) -> Engine:
        return Engine(model, random_codebooks(model), CFG, slots=2, max_context=400, dense_below=0,
                      decode_weights="model", prefill_dtype="model", kv_dtype=kv_dtype, prefix_cache=prefix_cache)

    plain = engine(0)
    want = [plain.serve([Request(p, 6)]).completions[0].tokens for p in prompts]
    cached = engine(1 << 30)
    prefilled = []
    for p in prompts:  # one at a time: each finds what the ones before it left
        seen = []
        got = cached.serve([Request(p, 6)], on_step=seen.append).completions[0].tokens
        prefilled.append(sum(r.prefill_tokens for r in seen))
        assert got == want[len(prefilled) - 1]
    block = cached.prefix.block
    assert 300 % block  # the shared part ends inside a block: its rows come from the first prompt's tail
    assert prefilled[0] == len(prompts[0])
    assert prefilled[1] == len(prompts[1]) - 300
    assert prefilled[2] == len(prompts[2]) - 300
    assert prefilled[3] == 1  # a prefix of the first block: all its rows but the last token's
    # one cancelled part-way through its prompt while another decodes: the others' tokens stay the same
    eng = Engine(model, random_codebooks(model), CFG, slots=2, max_context=400, dense_below=0, decode_weights="model",
                 prefill_dtype="model", kv_dtype=kv_dtype, prefix_cache=1 << 30, prefill_budget=16,
                 prefill_stall=None)
    first = eng.add(Request(prompts[0], 6))
    eng.step()
    second = eng.add(Request(prompts[1], 6))
    res = eng.step()
    assert res.decode_rows == 1 and res.prefill_tokens == 16  # 16 of the 40 its cached 300 leave
    assert eng.cancel(second).finish_reason == "cancelled"
    third = eng.add(Request(prompts[2], 6))
    done = {}
    while eng.has_work:
        done.update(eng.step().finished)
    assert done[first].tokens == want[0] and done[third].tokens == want[2]
    assert eng.prefix.stats.hits == 2  # the second and the third found the first's blocks


def test_loading_again_copies_only_what_the_slot_lacks():
    """A catch-up (``have``): the positions the slot holds stay as they are, the rest is copied, and it counts as
    no new lookup; nothing new leaves the count where it was."""
    src, dst = _filled(torch.float32), _filled(torch.float32, seed=1)
    store = PrefixCache(1 << 30, block=32)
    prompt = list(range(100, 200))
    store.store(prompt, src, 1, 40)  # a block and 8 rows of the next
    assert store.load(prompt, dst, 0) == 40 and _same(src, 1, dst, 0, 40)
    store.store(prompt, src, 1, 90)
    mark = dst.k[0][0, :, :40].clone()
    dst.k[0][0, :, :40] = 0  # what a slot holds already is not copied again
    assert store.load(prompt, dst, 0, have=40) == 90
    assert bool((dst.k[0][0, :, :40] == 0).all())
    dst.k[0][0, :, :40] = mark
    assert _same(src, 1, dst, 0, 90)
    assert store.load(prompt, dst, 0, have=90) == 90 and store.load(prompt, dst, 0, have=95) == 95
    assert store.stats.lookups == 1 and store.stats.hits == 1 and store.stats.tokens_reused == 90
    assert store.load(prompt, dst, 1, have=0) == 90 and store.stats.hits == 2  # a catch-up from nothing: a hit


@pytest.mark.parametrize("budget", [None, 40])
def test_two_prompts_over_one_document_prefill_it_once(budget):
    """Two questions over one document arrive together (neither in the cache): the second waits while the first
    prefills the document, copies in its rows as they are stored, and prefills only its question; each gets the
    tokens it gets alone."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(11)
    doc = torch.randint(3, 97, (290,), generator=g).tolist()
    prompts = [doc + torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 12)]

    def engine() -> Engine:
        return Engine(model, random_codebooks(model), CFG, slots=3, max_context=400, dense_below=0,
                      decode_weights="model", prefill_dtype="model", prefix_cache=1 << 30, prefill_chunk=64,
                      prefill_budget=budget, prefill_stall=None)

    short = torch.randint(3, 97, (20,), generator=g).tolist()  # decoding meanwhile: the budget applies
    requests = [Request(short, 40)] + [Request(p, 5) for p in prompts]
    alone = [engine().serve([r]).completions[0].tokens for r in requests]
    seen = []
    eng = engine()
    got = eng.serve(requests, on_step=seen.append).completions
    assert [c.tokens for c in got] == alone
    assert sum(r.prefill_tokens for r in seen) == len(short) + len(prompts[0]) + 12  # the document once
    if budget is not None:  # the second copied the rows in as the first stored them: a hit, no new lookup
        stats = eng.prefix.stats
        assert (stats.lookups, stats.hits, stats.tokens_reused) == (3, 1, 290)
    # without a prefix cache both prefill it
    plain = Engine(model, random_codebooks(model), CFG, slots=3, max_context=400, dense_below=0, decode_weights="model",
                   prefill_dtype="model", prefill_chunk=64, prefill_budget=budget, prefill_stall=None)
    seen = []
    plain.serve(requests, on_step=seen.append)
    assert sum(r.prefill_tokens for r in seen) == len(short) + sum(map(len, prompts))


def test_a_given_cache_is_not_kept_as_a_prefix():
    model = tiny_model("llama")
    eng = Engine(model, random_codebooks(model), CFG, slots=1, max_context=400, dense_below=0, decode_weights="model",
                 prefill_dtype="model", prefix_cache=1 << 30)
    prompt = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    kv = eng.serve([Request(prompt, 1, keep_kv=True)]).completions[0].kv
    eng.prefix.clear()
    eng.serve([Request(prompt + [5, 6], 2, kv=kv)])
    assert len(eng.prefix) == 0


@pytest.mark.parametrize("stall", [None, 0.0])
def test_a_question_over_a_cached_document_overtakes_a_long_prompt(stall):
    """A long new prompt and a question over a cached document arrive together while a sequence decodes: the
    question, with fewer tokens left, is prefilled first and answers first; every sequence gets its tokens alone."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(8)
    doc = torch.randint(3, 97, (300,), generator=g).tolist()
    first, question = doc + [7, 8, 9], doc + torch.randint(3, 97, (20,), generator=g).tolist()
    long = torch.randint(3, 97, (330,), generator=g).tolist()

    def engine() -> Engine:
        return Engine(model, random_codebooks(model), CFG, slots=3, max_context=400, dense_below=0,
                      decode_weights="model", prefill_dtype="model", prefix_cache=1 << 30, prefill_budget=40,
                      prefill_stall=stall)

    alone = {name: engine().serve([Request(p, n)]).completions[0].tokens
             for name, p, n in (("first", first, 30), ("question", question, 4), ("long", long, 4))}
    eng = engine()
    ids = {"first": eng.add(Request(first, 30))}
    got = {"first": list(eng.step().tokens.values())}  # the document alone: prefilled whole, kept in the prefix cache
    ids["long"], ids["question"] = eng.add(Request(long, 4)), eng.add(Request(question, 4))  # long arrived first
    first_token, step = {}, 1
    got.update(long=[], question=[])
    names = {i: name for name, i in ids.items()}
    while eng.has_work:
        res = eng.step()
        step += 1
        for i, token in res.tokens.items():
            first_token.setdefault(names[i], step)
            got[names[i]].append(token)
    assert first_token["question"] < first_token["long"]
    assert got == alone
    assert eng.prefix.stats.hits == 1  # the question found the document's blocks
