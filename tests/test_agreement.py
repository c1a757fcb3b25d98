"""The comparison the path-equality tests rest on (tests/agreement.py) passes near-ties and catches real faults."""

import pytest
import torch

from a2ats.core.stats import SelectionTrace
from agreement import assert_paths_agree

T, V, LAYERS, HEADS, N = 5, 50, 3, 2, 300


def run(seed=0, swap_at=None, swap=2, logit_noise=1e-5, token_flip_at=None):
    """A fake pair of runs: identical selections of 100 of N tokens, except ``swap`` tokens swapped from decode step
    ``swap_at`` on (per layer 0, head 0); logits equal up to ``logit_noise``, or shifted by 0.1 from ``swap_at``."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(1, V, generator=g) * 10 for _ in range(T)]
    ref_trace, trace = SelectionTrace(), SelectionTrace()
    for layer in range(LAYERS):
        for step in range(1, T):
            heads = [frozenset(torch.randperm(N, generator=g)[:100].tolist()) for _ in range(HEADS)]
            ref_trace.sets.setdefault((layer, 0), []).append(tuple(heads))
            mine = list(heads)
            if swap_at is not None and step >= swap_at and layer == 0:
                out = sorted(mine[0])[:swap]
                new = sorted(set(range(N)) - mine[0])[:swap]
                mine[0] = (mine[0] - set(out)) | set(new)
            trace.sets.setdefault((layer, 0), []).append(tuple(mine))
    mine = [x + logit_noise * torch.randn(x.shape, generator=g) for x in logits]
    if swap_at is not None:
        mine = [x + (0.1 if i >= swap_at else 0) * torch.randn(x.shape, generator=g) for i, x in enumerate(mine)]
    ref_tokens = torch.stack([x.argmax(-1) for x in logits], 1)
    tokens = torch.stack([x.argmax(-1) for x in mine], 1)
    if token_flip_at is not None:
        tokens[0, token_flip_at] = (tokens[0, token_flip_at] + 1) % V
    return (ref_tokens, logits, ref_trace), (tokens, mine, trace)


def test_equal_runs_agree_and_report_no_difference():
    ref, out = run()
    assert assert_paths_agree(*ref, *out)[0] == {"first_diff": T, "sets_compared": (T - 1) * LAYERS * HEADS,
                                                 "token_diff": T}


def test_a_near_tie_moves_logits_after_it_only():
    ref, out = run(swap_at=3)
    assert assert_paths_agree(*ref, *out)[0]["first_diff"] == 3


def test_a_wrong_selection_fails():
    ref, out = run(swap_at=2, swap=40)
    with pytest.raises(AssertionError, match="more than near-ties"):
        assert_paths_agree(*ref, *out)


def test_logits_apart_with_the_same_selections_fail():
    ref, out = run(logit_noise=1e-2)
    with pytest.raises(AssertionError, match="same selections so far"):
        assert_paths_agree(*ref, *out)


def test_a_different_token_with_the_same_selections_fails():
    ref, out = run(token_flip_at=2)
    with pytest.raises(AssertionError, match="with the same selections so far"):
        assert_paths_agree(*ref, *out)


def test_paths_without_selections_pass_a_near_tie_and_fail_a_flip():
    """Full-attention paths (no traces): only logits and tokens compared; a token may differ at a near-tie only."""
    (ref_tokens, logits, _), (tokens, mine, _) = run()
    tie = logits[2].clone()
    top = int(tie.argmax())
    tie[0, (top + 1) % V] = tie[0, top] - 1e-4  # the runner-up within rounding of the top
    near = [tie if i == 2 else x for i, x in enumerate(logits)]
    mine_near = [tie + 1e-5 if i == 2 else x for i, x in enumerate(mine)]
    flipped = tokens.clone()
    flipped[0, 2] = (top + 1) % V
    assert assert_paths_agree(ref_tokens, near, None, flipped, mine_near, None)[0] == {
        "first_diff": T, "sets_compared": 0, "token_diff": 2}
    with pytest.raises(AssertionError, match="logit margin"):
        assert_paths_agree(ref_tokens, logits, None, flipped, mine, None)
