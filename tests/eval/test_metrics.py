"""Evaluation metrics against cases small enough to compute by hand."""


import pytest
import torch

from a2ats import A2ATSConfig
from a2ats.core.selection import DecodeStep
from a2ats.eval.attention_metrics import MassProbe
from a2ats.methods import Method


class Fixed(Method):
    """Selects a fixed set of tokens, whatever the query."""

    def __init__(self, keep):
        self.keep = torch.tensor(keep).view(1, 1, -1)

    def select(self, step, config):
        return self.keep


def one_step(query_values):
    # one KV head shared by len(query_values) query heads, d = 1: logits are q * k, keys are ln w, so with
    # q = 1 the attention weights are w / sum(w), and with q = 2 they are w^2 / sum(w^2)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keys = w.log().view(1, 1, 4, 1)
    q = torch.tensor(query_values, dtype=torch.float32).view(1, -1, 1)
    return DecodeStep(layer=0, query=q, q_pre=q, keys=keys, valid=torch.ones(1, 4, dtype=torch.bool),
                      store=None, kv_heads=slice(0, 1))


# sinks = window = 1: tokens 0 and 3 always kept; tokens 1 and 2 compete for one slot, token 2 wins
CONFIG = A2ATSConfig(budget=1, sinks=1, window=1)


@pytest.mark.parametrize(
    "keep, mass, recall",
    [
        ([True, False, False, True], [5 / 10, 17 / 30], [0.0, 0.0]),  # sinks + window only
        ([True, False, True, True], [8 / 10, 26 / 30], [1.0, 1.0]),  # the true top-1 candidate
        ([True, True, False, True], [7 / 10, 21 / 30], [0.0, 0.0]),  # the wrong candidate
        ([True, True, True, True], [1.0, 1.0], [1.0, 1.0]),
    ],
)
def test_mass_and_recall_by_hand(keep, mass, recall):
    probe = MassProbe(Fixed(keep), scaling=1.0)
    out = probe.select(one_step([1.0, 2.0]), CONFIG)
    assert torch.equal(out, torch.tensor(keep).view(1, 1, -1))  # the probe only watches
    assert probe.mass[0] == pytest.approx(mass, abs=1e-6)
    assert probe.recall[0] == pytest.approx(recall)
    assert probe.mean() == pytest.approx(sum(mass) / 2, abs=1e-6)
    assert probe.mean("attended") == sum(keep)
    assert probe.oracle_mass[0] == pytest.approx([8 / 10, 26 / 30], abs=1e-6)  # both heads' true top-1 is token 2


@pytest.mark.parametrize("reduction, oracle", [("union", [1.0, 1.0]), ("max", [8 / 10, 19 / 25])])
def test_oracle_mass_follows_the_reduction(reduction, oracle):
    """Heads q = 1 and q = -1 disagree: head 0 prefers token 2 (w = 3), head 1 token 1 (weights 1/w). The union
    keeps both for both heads; max scores each token by its best head (ln 3 > ln 2: token 2) and keeps one."""
    probe = MassProbe(Fixed([True, True, True, True]), scaling=1.0)
    probe.select(one_step([1.0, -1.0]), A2ATSConfig(budget=1, sinks=1, window=1, reduction=reduction))
    assert probe.oracle_mass[0] == pytest.approx(oracle, abs=1e-6)


def test_mass_ignores_padding():
    step = one_step([1.0])
    step.valid = torch.tensor([[False, True, True, True]])  # token 0 is padding: weights 2, 3, 4 over 9
    probe = MassProbe(Fixed([False, True, False, True]), scaling=1.0)
    probe.select(step, A2ATSConfig(budget=0, sinks=1, window=1))
    assert probe.mass[0] == pytest.approx([6 / 9], abs=1e-6)
    assert probe.recall[0] == [0.0]  # no budget: nothing to recall, reported as 0 hits of 0 wanted


def test_scaling_is_applied():
    probe = MassProbe(Fixed([True, False, False, False]), scaling=2.0)  # q = 1 scaled by 2 acts as q = 2
    probe.select(one_step([1.0]), CONFIG)
    assert probe.mass[0] == pytest.approx([1 / 30], abs=1e-6)


def test_step_bytes_by_hand():
    from a2ats.eval.cost import step_bytes

    a = step_bytes("a2ats-banded", context=1000, attended=100, head_dim=64)
    assert (a.scoring, a.attended, a.shared) == (2000, 100 * 2 * 64 * 2, 4096 * 64 * 2)
    assert a.per_sequence(batch=4) == 2000 + 25600 + 524288 / 4
    r = step_bytes("a2ats-banded-rerank2", context=1000, attended=100, head_dim=64, shortlist=250)
    assert r.scoring == 2000 + 250 * 64 * 2 and r.attended == a.attended  # plus the shortlist's keys
    assert step_bytes("a2ats-banded", 1000, 100, 64, shortlist=250) == a  # no re-rank: nothing read for it
    q = step_bytes("quest", context=1000, attended=100, head_dim=64)
    assert q.scoring == 63 * 2 * 64 * 2 and q.shared == 0  # 63 pages of 16, min and max keys
    assert step_bytes("full", 1000, 1000, 64).attended == 1000 * 256
    assert step_bytes("oracle", 1000, 100, 64).scoring == 1000 * 128  # every key, to score exactly
    assert step_bytes("pqcache", 1000, 100, 64).scoring == 1000 * 2 * 6 / 8 + 64 * 64 * 2
    with pytest.raises(ValueError, match="no byte count"):
        step_bytes("magic", 1, 1, 64)


def test_the_evaluation_reads_its_methods_from_the_registry():
    """Every registered method has a byte count and runs in the presets; the paper's set and the goal's rows are
    the registry's roles, in its order."""
    from a2ats.eval import harness, report
    from a2ats.eval.cost import step_bytes
    from a2ats.methods import registry

    for name in registry.NAMES:
        assert step_bytes(name, 1000, 100, 64) == step_bytes(f"{name}+max", 1000, 100, 64)
    assert harness.METHODS == registry.NAMES
    assert harness.PAPER_METHODS == ("full", "oracle", "streaming", "quest", "pqcache", "a2ats", "a2ats-euclid",
                                     "a2ats-postrope")
    assert report.GOAL_METHODS[1:] == tuple((m, 0.03) for m in ("a2ats-banded", "a2ats", "oracle", "quest", "pqcache"))
    with pytest.raises(ValueError, match="unknown role"):
        registry.names("baseline")
