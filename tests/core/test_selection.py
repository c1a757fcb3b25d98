import pytest
import torch

from a2ats.core.config import A2ATSConfig, Budget
from a2ats.core.selection import select


def slow_select(scores, valid, hkv, cfg):
    """Obviously-correct loops: per row, per head, rank the candidates and take the best k."""
    B, Hq, n = scores.shape
    G = Hq // hkv
    out = torch.zeros(B, hkv, n, dtype=torch.bool)
    for b in range(B):
        real = [j for j in range(n) if valid[b, j]]
        length = len(real)
        always = set(real[: cfg.sinks]) | set(real[max(length - cfg.window, 0) :])
        cands = [j for j in real if j not in always]
        k = int(length * cfg.budget.fraction) if cfg.budget.fraction is not None else cfg.budget.tokens
        for h in range(hkv):
            chosen = set(always)
            if cfg.reduction == "union":
                for g in range(G):
                    ranked = sorted(cands, key=lambda j: -float(scores[b, h * G + g, j]))
                    chosen |= set(ranked[:k])
            else:
                ranked = sorted(cands, key=lambda j: -max(float(scores[b, h * G + g, j]) for g in range(G)))
                chosen |= set(ranked[:k])
            for j in chosen:
                out[b, h, j] = True
    return out


@pytest.mark.parametrize("reduction", ["union", "max"])
@pytest.mark.parametrize("budget", [0.03, 0.2, 1.0, 0, 5, 1000])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 3), (8, 1), (9, 3)])
def test_select_matches_slow_reference(reduction, budget, hq, hkv):
    g = torch.Generator().manual_seed(hq * 31 + hkv)
    B, n = 3, 157
    scores = torch.randn(B, hq, n, generator=g)  # continuous: no ties
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :40] = False  # left padding
    valid[2, :150] = False  # a row shorter than sinks + window
    cfg = A2ATSConfig(budget=budget, sinks=4, window=9, reduction=reduction)
    got = select(scores, valid, hkv, cfg)
    assert torch.equal(got, slow_reference := slow_select(scores, valid, hkv, cfg))
    # sinks and window always present; padding never
    assert not (got & ~valid[:, None]).any()
    assert slow_reference.any(-1).all()


def test_union_and_max_budgets():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 4, 500, generator=g)
    valid = torch.ones(1, 500, dtype=torch.bool)
    u = select(scores, valid, 1, A2ATSConfig(budget=10, sinks=0, window=1, reduction="union"))
    m = select(scores, valid, 1, A2ATSConfig(budget=10, sinks=0, window=1, reduction="max"))
    assert int(m.sum()) == 11  # bounded: budget + window per KV head
    assert 11 < int(u.sum()) <= 41  # the union grows with the group


def test_budget_parsing_and_validation():
    assert Budget.parse("0.03").fraction == 0.03
    assert Budget.parse("512").tokens == 512
    assert Budget.parse("1.0").fraction == 1.0
    assert Budget.parse(256).tokens == 256
    for bad in ["0.0", "-0.1", "1.5", "-3", "abc"]:
        with pytest.raises(ValueError, match="budget"):
            Budget.parse(bad)
    assert Budget(fraction=0.03).tokens_for(torch.tensor([1000, 99])).tolist() == [30, 2]
    with pytest.raises(ValueError):
        A2ATSConfig(reduction="mean")


def test_default_budget_follows_the_reduction():
    """No budget given: 10% per KV head with the max reduction (the default), the paper's 3% per query head with
    the union; a given budget is kept whatever the reduction."""
    assert (A2ATSConfig().reduction, A2ATSConfig().budget) == ("max", Budget(fraction=0.1))
    assert A2ATSConfig(reduction="union").budget == Budget(fraction=0.03)
    assert A2ATSConfig(budget=0.05, reduction="union").budget == Budget(fraction=0.05)
    assert A2ATSConfig(budget=512).budget == Budget(tokens=512)
    assert A2ATSConfig().budget_label == "rho=0.1 per KV head (max)"
    assert A2ATSConfig(reduction="union").budget_label == "rho=0.03 per query head (union)"
