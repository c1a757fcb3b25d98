"""A sequence's token pick (:mod:`a2ats.runtime.sampling`): its settings checked with the field named, and each
pick against the same arithmetic written out on small logits."""

from __future__ import annotations

import pytest
import torch

from a2ats.runtime import Sampling, SamplingError
from a2ats.runtime.sampling import Sampler

BAD = [
    ("temperature", dict(temperature=-0.1)), ("temperature", dict(temperature=float("nan"))),
    ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.5)),
    ("seed", dict(seed=2**64)), ("seed", dict(seed=-(2**63) - 1)), ("seed", dict(seed=1.5)),
    ("presence_penalty", dict(presence_penalty=2.5)), ("presence_penalty", dict(presence_penalty=float("inf"))),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("logit_bias", dict(logit_bias=((-1, 1.0),))), ("logit_bias", dict(logit_bias=((3, 100.5),))),
    ("logprobs", dict(logprobs=-1)), ("logprobs", dict(logprobs=21)),
]


@pytest.mark.parametrize("field,kw", BAD, ids=[f"{f}-{list(kw.values())[0]}" for f, kw in BAD])
def test_a_setting_out_of_range_is_refused_by_name(field, kw):
    with pytest.raises(SamplingError, match=field) as e:
        Sampling(**kw)
    assert e.value.field == field


def test_the_edges_of_each_range_are_accepted():
    Sampling(seed=2**64 - 1)
    Sampling(seed=-(2**63), temperature=0.5)  # a negative seed is one torch takes
    Sampler(Sampling(seed=-(2**63), temperature=0.5))
    Sampling(presence_penalty=-2, frequency_penalty=2, logit_bias=((0, -100), (5, 100)), logprobs=20)


def test_plain_only_when_the_pick_is_the_argmax_and_nothing_is_reported():
    assert Sampling().plain and Sampling(seed=3).plain
    for kw in (dict(temperature=0.1), dict(presence_penalty=0.1), dict(frequency_penalty=-0.1),
               dict(logit_bias=((1, 0.5),)), dict(logprobs=0)):
        assert not Sampling(**kw).plain


def test_penalties_count_the_tokens_picked_so_far_and_biases_add():
    logits = torch.tensor([1.0, 3.0, 2.9, 2.0, -1.0])
    s = Sampler(Sampling(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((4, 2.5),), logprobs=2))
    picks = [s.pick(logits) for _ in range(4)]
    # by hand: 1 (3.0); 1 falls to 3 - 0.75 = 2.25, so 2 (2.9); 2 falls to 2.15, so 1; 1 falls to 2.0, so 2
    assert [t for t, _ in picks] == [1, 2, 1, 2]
    token, lp = picks[-1]
    x = logits.clone()
    x[4] += 2.5
    x[1] -= 0.5 + 0.25 * 2
    x[2] -= 0.5 + 0.25
    ref = torch.log_softmax(x, -1)
    assert lp.token == 2 and lp.logprob == pytest.approx(float(ref[2]))
    assert [a for a, _ in lp.top] == ref.topk(2).indices.tolist()


def test_logprobs_zero_reports_the_pick_alone():
    token, lp = Sampler(Sampling(logprobs=0)).pick(torch.tensor([0.0, 1.0]))
    assert token == 1 and lp.top == () and lp.logprob == pytest.approx(float(torch.log_softmax(torch.tensor([0.0, 1.0]), -1)[1]))


def test_draws_follow_the_seed_and_the_nucleus():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    draws = [Sampler(Sampling(temperature=1.0, seed=7)).pick(logits)[0] for _ in range(3)]
    assert len(set(draws)) == 1
    spread = {Sampler(Sampling(temperature=2.0, seed=s)).pick(logits)[0] for s in range(30)}
    assert len(spread) > 1
    assert {Sampler(Sampling(temperature=2.0, top_p=1e-9, seed=s)).pick(logits)[0] for s in range(10)} == \
        {int(logits.argmax())}
