"""Every selection method behind the one interface: parametrized over all of them."""

import math

import pytest
import torch
import transformers as T

from a2ats import A2ATS, A2ATSConfig
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.core.selection import DecodeStep
from a2ats.eval.attention_metrics import attention_mass
from a2ats.methods import (
    A2ATSMethod,
    FullMethod,
    HybridMethod,
    OracleMethod,
    PQCacheMethod,
    QuestMethod,
    RerankMethod,
    StreamingMethod,
)
from conftest import padded_batch, random_codebooks, tiny_model


def make(name, model):
    return {
        "full": FullMethod,
        "oracle": OracleMethod,
        "streaming": StreamingMethod,
        "quest": QuestMethod,
        "pqcache": lambda: PQCacheMethod(subspaces=2, bits=4),
        "a2ats": lambda: A2ATSMethod(random_codebooks(model), WRoPE(find_rotary_embedding(model), 2048)),
        "a2ats-banded": lambda: A2ATSMethod(random_codebooks(model), WRoPE(find_rotary_embedding(model), band_ratio=2, first_edge=8)),
        "a2ats-hybrid": lambda: HybridMethod(random_codebooks(model), find_rotary_embedding(model), 2048, 2.0, 0.5),
        "a2ats-banded-rerank": lambda: RerankMethod(make("a2ats-banded", model), 2.0),
    }[name]()


METHODS = ["full", "oracle", "streaming", "quest", "pqcache", "a2ats", "a2ats-banded", "a2ats-hybrid", "a2ats-banded-rerank"]


@pytest.mark.parametrize("name", METHODS)
def test_budget_covering_everything_equals_full(name):
    model = tiny_model("llama")
    ids, mask = padded_batch(lengths=(90, 61))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with A2ATS(model, config=A2ATSConfig(budget=1.0, sinks=2, window=4), method=make(name, model)):
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _g1_model():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("oracle", "full")])
def test_oracle_captures_at_least_as_much_mass(name):
    model = _g1_model()  # one query head per KV head: exact top-K is the best any K tokens can do
    ids = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(1))
    cfg = A2ATSConfig(budget=0.1, sinks=2, window=4)
    oracle = attention_mass(model, OracleMethod(), cfg, ids, decode_last=4)
    other = attention_mass(model, make(name, model), cfg, ids, decode_last=4)
    o = [v for vs in oracle.mass.values() for v in vs]
    m = [v for vs in other.mass.values() for v in vs]
    assert len(o) == len(m) > 0
    assert all(a >= b - 1e-6 for a, b in zip(o, m))


class _Inverted(OracleMethod):
    """The oracle's scores negated: the K least attended candidates, a selection that must lose mass."""

    name = "inverted"

    def scores(self, step):
        return -super().scores(step)


def test_the_mass_test_can_fail_a_wrong_selection():
    """The comparison above is not vacuous: the oracle's measured mass is the probe's independently computed top-K
    mass, and a wrong selection of the same size (the least attended tokens) loses mass at every head and step."""
    model = _g1_model()
    ids = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(1))
    cfg = A2ATSConfig(budget=0.1, sinks=2, window=4)
    oracle = attention_mass(model, OracleMethod(), cfg, ids, decode_last=4)
    wrong = attention_mass(model, _Inverted(), cfg, ids, decode_last=4)
    for layer, masses in oracle.mass.items():
        assert masses == pytest.approx(oracle.oracle_mass[layer], abs=1e-6)
    o = [v for vs in oracle.mass.values() for v in vs]
    w = [v for vs in wrong.mass.values() for v in vs]
    assert [len(s) for s in (o, w)] == [len(o)] * 2
    assert all(a > b for a, b in zip(o, w))
    assert oracle.mean("attended") == wrong.mean("attended")  # the same number of tokens, chosen wrongly


def _step(keys, query, valid=None, store=None):
    B, H, n, d = keys.shape
    valid = torch.ones(B, n, dtype=torch.bool) if valid is None else valid
    return DecodeStep(layer=0, query=query, q_pre=query, keys=keys, valid=valid, store=store, kv_heads=slice(0, H))


def test_quest_bound_is_an_upper_bound_of_its_pages():
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(2, 2, 77, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    valid = torch.ones(2, 77, dtype=torch.bool)
    valid[1, :13] = False
    bound = QuestMethod(page_size=16).scores(_step(keys, q, valid))
    true = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 2, 8), keys).reshape(2, 4, 77)
    assert (bound[valid[:, None].expand_as(bound)] >= true[valid[:, None].expand_as(true)] - 1e-5).all()
    # pages follow the real tokens: row 1's first real token starts a page of 16
    rank = valid[1].long().cumsum(0) - 1
    for p in range(4):
        members = (valid[1] & (rank // 16 == p)).nonzero().squeeze(1)
        assert torch.unique(bound[1, 0, members]).numel() == 1


def test_streaming_keeps_the_most_recent_tokens():
    keys, q = torch.randn(1, 1, 100, 4), torch.randn(1, 2, 4)
    from a2ats.core.selection import select

    step = _step(keys, q)
    keep = select(StreamingMethod().scores(step), step.valid, 1, A2ATSConfig(budget=10, sinks=3, window=5))
    expect = torch.zeros(100, dtype=torch.bool)
    expect[:3] = True
    expect[100 - 15 :] = True
    assert torch.equal(keep[0, 0], expect)


def test_pqcache_codes_are_nearest_subcentroids():
    from a2ats.hf.cache import A2ATSLayer

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 200, 8, generator=g)
    layer = A2ATSLayer()
    layer.update(k, k)
    m = PQCacheMethod(subspaces=2, bits=3)
    m.on_append(0, layer, k, k, slice(0, 2))
    cent = layer.state["pq"].view(1, 2, 2, 8, 4)
    codes = layer.extra("pq_codes")  # (1, 2, 200, 2)
    for h in range(2):
        for s in range(2):
            part = k[0, h, :, s * 4 : (s + 1) * 4]
            ref = torch.cdist(part, cent[0, h, s]).argmin(-1)
            assert torch.equal(codes[0, h, :, s].long(), ref)
    # a decode-time key is encoded with the prefill's codebooks, not refit
    new = torch.randn(1, 2, 1, 8, generator=g)
    layer.update(new, new)
    m.on_append(0, layer, new, new, slice(0, 2))
    assert torch.equal(layer.state["pq"].view(1, 2, 2, 8, 4), cent)
    assert layer.extra("pq_codes").shape == (1, 2, 201, 2)


class _CheckedBanded(A2ATSMethod):
    """Banded A²ATS whose every score is checked against a token-by-token computation."""

    checked = 0

    def scores(self, step):
        est = super().scores(step)
        B, Hq, n = est.shape
        G = step.group
        centroids = self.rows(step.layer, step.kv_heads, "cpu").float()  # the rows it scores from (score precision)
        codes = step.store.extra("codes").long()
        for b in range(B):
            real = step.valid[b].nonzero().flatten()
            for r, j in enumerate(real.tolist()):
                distance = len(real) - 1 - r
                band = int(self.wrope.band_of(torch.tensor([distance]))[0])
                q = WRoPE(self.wrope.rotary, self.wrope.band_distance(band)).query(step.q_pre[b])  # (Hq, d)
                q = q.to(self.score_dtype).float()  # queries at the score precision too
                want = torch.stack([q[h] @ centroids[h // G, codes[b, h // G, j]] for h in range(Hq)])
                torch.testing.assert_close(est[b, :, j], want, rtol=1e-4, atol=1e-4)
        _CheckedBanded.checked += 1
        return est


def test_banded_scores_match_a_token_by_token_computation():
    model = tiny_model("qwen3")
    rot = find_rotary_embedding(model)
    method = _CheckedBanded(random_codebooks(model), WRoPE(rot, band_ratio=2, first_edge=5))
    assert method.name == "a2ats-banded"
    ids, mask = padded_batch(lengths=(45, 30))  # bands 0-3 present, rows of different lengths
    with torch.inference_mode(), A2ATS(model, config=A2ATSConfig(budget=0.2, sinks=2, window=4), method=method):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert _CheckedBanded.checked >= 2 * model.config.num_hidden_layers


class _CheckedHybrid(HybridMethod):
    """Checks each step's selection against the two scorings run on their own."""

    checked = 0

    def select(self, step, config):
        from a2ats.core.selection import always_kept, select, topk_mask

        keep = super().select(step, config)
        G, Hkv = step.group, step.keys.shape[1]
        paper = select(self.content.scores(step), step.valid, Hkv, config)
        banded = select(self.position.scores(step), step.valid, Hkv, config)
        if self.share == 1.0:
            assert torch.equal(keep, paper)
        elif self.share == 0.0:
            assert torch.equal(keep, banded)
        else:  # share x K by the paper's score, the rest from the banded top K: nothing else
            always, cand, length = always_kept(step.valid, config.sinks, config.window)
            k = config.budget.tokens_for(length)
            k1 = (k.double() * self.share).floor().long()
            s1, s2 = self.content.scores(step), self.position.scores(step)
            B, Hq, n = s1.shape
            if config.reduction == "max":
                s1, s2 = s1.view(B, Hkv, G, n).amax(2), s2.view(B, Hkv, G, n).amax(2)
            first, second = topk_mask(s1, cand, k1), topk_mask(s2, cand, k)
            if config.reduction != "max":
                first, second = first.view(B, Hkv, G, n).any(2), second.view(B, Hkv, G, n).any(2)
            chosen = keep & cand.unsqueeze(1)
            assert (first <= chosen).all() and (chosen <= (first | second)).all()
            per = torch.minimum(k, cand.sum(-1)).unsqueeze(1)
            assert (chosen.sum(-1) >= per).all() and (chosen.sum(-1) <= per * (1 if config.reduction == "max" else G)).all()
            if config.reduction == "max":
                assert (chosen.sum(-1) == per).all()
        _CheckedHybrid.checked += 1
        return keep


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["union", "max"])
def test_hybrid_splits_the_budget_between_the_two_scorings(share, reduction):
    model = tiny_model("llama")
    rot = find_rotary_embedding(model)
    method = _CheckedHybrid(random_codebooks(model), rot, 2048, 2.0, share)
    method.position.wrope.first_edge = 5  # several bands in a short test sequence
    _CheckedHybrid.checked = 0
    ids, mask = padded_batch(lengths=(70, 43))
    cfg = A2ATSConfig(budget=0.2, sinks=2, window=4, reduction=reduction)
    with torch.inference_mode(), A2ATS(model, config=cfg, method=method):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert _CheckedHybrid.checked >= 2 * model.config.num_hidden_layers


def test_hybrid_share_out_of_range_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="share"):
        HybridMethod(random_codebooks(model), find_rotary_embedding(model), share=1.5)


class _Fixed:
    """An estimate given outright: the re-rank's shortlist is then known token by token."""

    name = "fixed"

    def __init__(self, scores):
        self.est = scores

    def scores(self, step):
        return self.est


@pytest.mark.parametrize("reduction", ["union", "max"])
@pytest.mark.parametrize("factor", [1.0, 2.5, 1000.0])
def test_rerank_keeps_the_exact_best_of_the_estimates_shortlist(reduction, factor):
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, n, d = 2, 2, 3, 53, 8
    keys, q = torch.randn(B, Hkv, n, d, generator=g), torch.randn(B, Hkv * G, d, generator=g)
    est = torch.randn(B, Hkv * G, n, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :11] = False  # row 1 left-padded
    cfg = A2ATSConfig(budget=0.12, sinks=2, window=3, reduction=reduction)
    method = RerankMethod(_Fixed(est), factor)
    keep = method.select(_step(keys, q, valid), cfg)
    exact = torch.einsum("bhgd,bhnd->bhgn", q.view(B, Hkv, G, d), keys)
    for b in range(B):
        real = valid[b].nonzero().flatten().tolist()
        L = len(real)
        k = int(cfg.budget.tokens_for(torch.tensor([L]))[0])
        always = set(real[:2] + real[-3:])
        cand = [j for j in real if j not in always]
        for h in range(Hkv):
            m = math.ceil(k * factor)
            if reduction == "max":  # ceil(factor * K) best by the group's max estimate
                short = set(sorted(cand, key=lambda j: -max(est[b, h * G + gg, j].item() for gg in range(G)))[:m])
            else:  # each query head's ceil(factor * K) best estimates, unioned over the group
                short = set()
                for gg in range(G):
                    short |= set(sorted(cand, key=lambda j: -est[b, h * G + gg, j].item())[:m])
            assert method.shortlisted  # recorded for the bytes it reads
            if reduction == "max":
                by = {j: max(exact[b, h, gg, j].item() for gg in range(G)) for j in short}
                want = set(sorted(short, key=lambda j: -by[j])[:k])
            else:
                want = set()
                for gg in range(G):
                    want |= set(sorted(short, key=lambda j: -exact[b, h, gg, j].item())[:k])
            got = set(keep[b, h].nonzero().flatten().tolist())
            assert got == want | always
    if factor == 1000.0:  # a shortlist of everything: the oracle's selection
        from a2ats.core.selection import select

        assert torch.equal(keep, select(exact.reshape(B, Hkv * G, n), valid, Hkv, cfg))


def test_rerank_factor_below_one_is_refused():
    with pytest.raises(ValueError, match="factor"):
        RerankMethod(OracleMethod(), 0.5)
