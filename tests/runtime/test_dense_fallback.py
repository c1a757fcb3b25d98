"""The dense fallback: where selection cannot pay, an A²ATS engine's decode step attends to every token; the tokens
are the dense engine's there and the selecting engine's beyond, keys keep their codes throughout, and the rule is
measured (or fixed, or given) and reported."""

import math

import pytest
import torch

from a2ats import A2ATSConfig, kernels
from a2ats.core.config import Budget
from a2ats.core.rope import find_rotary_embedding, undo_rotation
from a2ats.runtime import Engine, Request, crossover
from a2ats.runtime.crossover import Costs, DenseRule
from a2ats.runtime.engine import default_kv_dtype
from conftest import padded_batch, random_codebooks, tiny_model

CFG = A2ATSConfig(budget=0.1, sinks=2, window=8)
PLAIN = dict(decode_weights="model", prefill_dtype="model")  # the model's fp32 arithmetic throughout
# Selection over n tokens attending k rows: 100 + 0.25 n + k; dense: n. At rho=0.1 with 2 sinks and a window of 8,
# k = 10 + floor(0.1 n): selection pays from 169 tokens (110 + 0.25 n + floor(0.1 n) < n).
COSTS = Costs(dense_ms=0.0, dense_per_token=1.0, select_ms=100.0, select_per_token=0.25, select_per_row=1.0)
CROSSOVER = 169
needs_kernels = pytest.mark.skipif(kernels.cpu_backend() is None, reason="CPU kernels could not be built here")


def _prompt(n: int, seed: int = 3) -> list[int]:
    ids, mask = padded_batch(seed=seed, lengths=(n,))
    return ids[0][mask[0].bool()].tolist()


def _serve(engine: Engine, prompt: list[int], new: int, **kw):
    return engine.serve([Request(prompt, new, keep_kv=kw.pop("keep_kv", False))], keep_logits=True, **kw)


def test_given_costs_cross_where_their_lines_do():
    rule = DenseRule(COSTS, CFG, group=3)
    assert rule.crossover() == CROSSOVER
    assert rule.decide([CROSSOVER - 1], [True], [None]) == f"context below {CROSSOVER} tokens: given costs' crossover"
    assert rule.decide([CROSSOVER], [True], [None]) is None
    # a batch goes one way: by its longest row, with the rows' mean K; an idle slot's length does not count
    assert rule.decide([CROSSOVER, 20], [True, True], [None, None]) is None
    assert rule.decide([CROSSOVER - 1, 5000], [True, False], [None, None]) is not None
    # a larger budget moves the crossover out; union counts each query head's K (3 per KV head here)
    assert rule.crossover(Budget(fraction=0.3)) > CROSSOVER
    union = DenseRule(COSTS, A2ATSConfig(budget=0.1, sinks=2, window=8, reduction="union"), group=3)
    assert union.crossover() > CROSSOVER
    # every n the rule is asked about agrees with the crossover it reports
    for cfg, group in ((CFG, 3), (A2ATSConfig(budget=40, sinks=2, window=8, reduction="union"), 2)):
        r = DenseRule(COSTS, cfg, group)
        at = r.crossover()
        assert [r.decide([n], [True], [None]) is None for n in range(1, 2 * at)] == [n >= at for n in range(1, 2 * at)]
    # selection at a budget of 90% never pays against these costs (0.25 + 0.9 per token > 1)
    assert DenseRule(COSTS, A2ATSConfig(budget=0.9, sinks=2, window=8), 3).crossover() is None


@needs_kernels
def test_fallback_below_the_crossover_equals_dense_and_beyond_it_equals_selection():
    """A sequence that grows past the crossover: its dense steps are the dense engine's, token and logits; keys
    keep their codes meanwhile; its selecting steps are those of an engine that always selects, on the same cache."""
    model = tiny_model("llama")
    cb = random_codebooks(model)
    P = CROSSOVER - 20
    prompt = _prompt(P)
    switching = Engine(model, cb, CFG, dense_below=COSTS, **PLAIN)
    run = _serve(switching, prompt, 30, trace=True)
    got = run.completions[0]
    # decode step i runs at context P + i: dense for P + i < 169, i.e. steps 1-19; then 10 selecting steps
    assert run.stats.dense == {f"context below {CROSSOVER} tokens: given costs' crossover": CROSSOVER - P - 1}
    assert run.stats.decode_steps == 29 and run.trace.steps() == 29 - (CROSSOVER - P - 1)
    assert f"dense: 19 of 29 steps (context below {CROSSOVER} tokens: given costs' crossover)" in run.stats.summary()

    dense = _serve(Engine(model, **PLAIN), prompt, 30).completions[0]
    n_dense = CROSSOVER - P  # the prefill's token and the dense steps'
    assert got.tokens[:n_dense] == dense.tokens[:n_dense]
    for a, b in zip(got.logits[:n_dense], dense.logits[:n_dense]):
        assert torch.equal(a, b)  # the very same arithmetic

    # The cache after the prefill and 18 dense steps (its last a step that encodes the keys that waited): every
    # key's code equals a direct encoding of the key, written while no step selected.
    head = _serve(Engine(model, cb, CFG, dense_below=COSTS, **PLAIN), prompt, 19, keep_kv=True).completions[0]
    assert head.tokens == got.tokens[:19]
    kv = head.kv
    assert kv.length == P + 18
    cos, sin = find_rotary_embedding(model)(kv.k[0][None], torch.arange(kv.length)[None])
    for layer in range(len(kv.k)):
        assert torch.equal(kv.codes[layer], cb.encode(layer, undo_rotation(kv.k[layer][None], cos, sin))[0])
    # An engine that always selects, handed that cache: its token from the prompt's last (a dense prefill, as the
    # switching engine's step 19 was dense) and every selecting step after it are the switching engine's.
    selecting = Engine(model, cb, CFG, dense_below=0, **PLAIN)
    cont = selecting.serve([Request(prompt + got.tokens[:19], 11, kv=kv)], keep_logits=True, trace=True)
    assert cont.stats.dense == {} and cont.trace.steps() == 10
    assert cont.completions[0].tokens == got.tokens[19:]
    for a, b in zip(cont.completions[0].logits, got.logits[19:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for layer in range(model.config.num_hidden_layers):
        assert cont.trace.sets[(layer, 0)] == run.trace.sets[(layer, 0)]


def test_fixed_settings_and_budgets_that_cover_the_cache():
    model = tiny_model("llama")
    cb = random_codebooks(model)
    prompt = _prompt(120)
    dense = _serve(Engine(model, **PLAIN), prompt, 6).completions[0].tokens
    # a context far beyond the run's: every step dense, the dense engine's tokens
    always = _serve(Engine(model, cb, CFG, dense_below=100_000, **PLAIN), prompt, 6, trace=True)
    assert always.completions[0].tokens == dense and always.trace.steps() == 0
    assert always.stats.dense == {"context below 100,000 tokens: dense_below=100000": 5}
    # 0: every step selects, even where the budget covers every token
    full = A2ATSConfig(budget=1.0, sinks=2, window=8)
    never = _serve(Engine(model, cb, full, dense_below=0, **PLAIN), prompt, 6, trace=True)
    assert never.trace.steps() == 5 and never.stats.dense == {} and "dense:" not in never.stats.summary()
    # under "auto" a budget of the whole context (a fraction of 1, or more tokens than the context holds) falls
    # back without measuring anything
    for budget in (1.0, 10_000):
        eng = Engine(model, cb, A2ATSConfig(budget=budget, sinks=2, window=8), **PLAIN)
        res = _serve(eng, prompt, 6, trace=True)
        assert res.completions[0].tokens == dense and res.trace.steps() == 0
        assert res.stats.dense == {"the budget covers every token": 5}
        assert "dense: 5 of 5 steps (the budget covers every token)" in res.stats.summary()
        assert eng.dense_rule._costs is None  # nothing measured
    # a request's own budget counts as the config's does
    eng = Engine(model, cb, CFG, dense_below=COSTS, **PLAIN)
    res = eng.serve([Request(prompt, 6, budget=1.0)])
    assert res.stats.dense == {"the budget covers every token": 5}
    # the reference path checks the selection: it selects at every step unless a context is given
    assert Engine(model, cb, CFG, path="reference", **PLAIN).dense_rule is None
    ref = Engine(model, cb, CFG, path="reference", dense_below=100_000, **PLAIN)
    assert _serve(ref, prompt, 6).completions[0].tokens == dense
    assert Engine(model, **PLAIN).dense_rule is None  # dense already


@pytest.mark.parametrize("bad", [-1, "always", 1.5, True, None])
def test_bad_settings_are_refused_by_name(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dense_below must be 'auto'"):
        Engine(model, random_codebooks(model), CFG, dense_below=bad, **PLAIN)
    with pytest.raises(ValueError, match="finite"):
        Costs(float("nan"), 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        Costs(0.0, -1.0, 1.0, 1.0, 1.0)


@needs_kernels
def test_auto_measures_once_per_process_and_decides_by_what_it_measured():
    model = tiny_model("qwen3")
    cb = random_codebooks(model)
    crossover._measured.clear()
    eng = Engine(model, cb, CFG, **PLAIN)
    assert eng.dense_rule is not None and eng.dense_rule._costs is None  # measured when first needed
    res = _serve(eng, _prompt(90), 4)
    costs = eng.dense_rule.costs
    assert len(crossover._measured) == 1 and 0 < costs.seconds < 30
    assert all(math.isfinite(v) for v in (costs.dense_ms, costs.select_ms))
    # another engine of the same model and dtypes reuses the measurement
    other = Engine(model, random_codebooks(model, seed=1), CFG, **PLAIN)
    assert other.dense_rule.costs is costs and len(crossover._measured) == 1
    # the steps went the way the measured costs say, and the line says so
    at = eng.dense_rule.crossover()
    dense_steps = sum(res.stats.dense.values())
    if at is None or at >= 94:  # contexts 91-93
        assert dense_steps == 3 and "measured" in res.stats.summary()
    elif at <= 91:
        assert dense_steps == 0
    assert "measured in" in eng.dense_rule.describe()
    if at is not None and at > 1:
        assert eng.dense_rule.decide([at - 1], [True], [None]) is not None
        assert eng.dense_rule.decide([at], [True], [None]) is None


def test_kv_default_is_bf16_for_a_16bit_checkpoint_in_float32():
    model = tiny_model("llama")
    cpu = torch.device("cpu")
    assert Engine(model, **PLAIN).kv_dtype == torch.float32  # float32 weights: the model's dtype
    with torch.no_grad():  # as loaded from a bf16 checkpoint into float32
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    eng = Engine(model, **PLAIN)
    assert eng.kv_dtype == torch.bfloat16 and default_kv_dtype(eng.lean, cpu) == torch.bfloat16
    assert Engine(model, kv_dtype=torch.float32, **PLAIN).kv_dtype == torch.float32  # asked for
    assert default_kv_dtype(eng.lean, torch.device("meta")) == torch.float32  # K/V off the CPU: the model's dtype
    low = tiny_model("llama").to(torch.bfloat16)
    assert Engine(low).kv_dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_dense_attention_over_a_compact_cache_reads_its_rows_as_stored(kv_dtype):
    """The fast path attends densely over bf16 or int8 rows with the attention kernel over every row (no float
    copy of the cache first): the reference path's SDPA over that copy, within float rounding; the dense fallback of
    an A²ATS engine is the same arithmetic, token for token."""
    model = tiny_model("qwen2")
    ids, mask = padded_batch(seed=4, lengths=(140, 97))
    runs = {path: Engine(model, path=path, kv_dtype=kv_dtype, **PLAIN).generate(ids, mask, max_new_tokens=8,
                                                                              keep_logits=True)
            for path in ("fast", "reference")}
    assert torch.equal(runs["fast"].tokens, runs["reference"].tokens)
    for a, b in zip(runs["fast"].logits, runs["reference"].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fallback = Engine(model, random_codebooks(model), CFG, kv_dtype=kv_dtype, dense_below=100_000, **PLAIN)
    out = fallback.generate(ids, mask, max_new_tokens=8, keep_logits=True)
    assert torch.equal(out.tokens, runs["fast"].tokens)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, runs["fast"].logits))


@needs_kernels
def test_an_engine_with_its_slots_measures_when_built():
    """Built with its cache (a server), the engine measures under "auto" at once: no request's first decode step
    waits for it."""
    model = tiny_model("qwen3")
    crossover._measured.clear()
    eng = Engine(model, random_codebooks(model), CFG, slots=2, max_context=200, **PLAIN)
    assert eng.dense_rule._costs is not None and len(crossover._measured) == 1
    fixed = Engine(model, random_codebooks(model), CFG, slots=2, max_context=200, dense_below=0, **PLAIN)
    assert fixed.dense_rule.costs is None  # a fixed context: nothing to measure
