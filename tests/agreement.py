"""What two decode paths over the same codebooks must agree on, on any machine.

Two paths (the kernels against the torch reference, the lean engine against transformers) compute the same
selection in different arithmetic: fused or separate projections, BLAS or kernel sums, online or two-pass
softmax. Their keys, queries and scores therefore differ in the last bits, and a key that sits within that
rounding of two centroids, or a token within it of the top-K threshold, may land on the other side. Which
keys are that close depends on the codebooks, and the codebooks a test calibrates depend on the CPU's
arithmetic, so no count of such near-ties is a property of the code. What the design guarantees instead:

- up to the first step whose selection differs, the two paths attend to the same tokens, so their logits
  agree within fp32 rounding accumulated through the model (``logit_tol``), and so do their greedy tokens
  unless the reference's own top two logits are within that rounding;
- from then on, while both paths have decoded the same tokens (the same inputs), their selections are
  compared as index sets: a differing set differs by near-ties only, a small share of its tokens
  (``set_slack``), where a wrong selection differs in most of them;
- once the tokens differ, the inputs differ and nothing further is compared.

A failure names the row, step, layer and KV head.
"""

from __future__ import annotations

import torch

# fp32 rounding through a few dozen layers of a small model moves logits of magnitude ~10-30 by ~1e-5-1e-4;
# 1e-3 leaves an order of magnitude, yet one token wrongly kept or dropped moves them by more
LOGIT_TOL = 1e-3
# a near-tie swaps a few tokens of a set of ~100-250; a wrong selection shares a small fraction of them
SET_SLACK = 0.1


def _sets_at(trace, row: int, step: int) -> dict[tuple[int, int], frozenset]:
    """Decode step ``step`` (1-based: logits[step]) of ``row``: {(layer, kv head): token set}."""
    return {(layer, h): s for (layer, r), steps in trace.sets.items() if r == row
            for h, s in enumerate(steps[step - 1])}


def assert_paths_agree(ref_tokens: torch.Tensor, ref_logits, ref_trace, tokens: torch.Tensor, logits, trace, *,
                       logit_tol: float = LOGIT_TOL, set_slack: float = SET_SLACK,
                       logit_rtol: float | None = None) -> dict:
    """``tokens`` (B, T) greedy new tokens, ``logits[i]`` (B, V) the logits that chose ``tokens[:, i]``
    (``logits[0]`` from the prefill, which selects nothing; ``logits[i]`` from decode step i, whose selection is
    ``trace.sets[(layer, row)][i - 1]``; both traces None for paths that select nothing: full attention).
    Returns, per row, the first step whose selection differs (T: none), how many sets were compared and the
    first step whose token differs (T: none), for the caller's own checks."""
    assert ref_tokens.shape == tokens.shape, (ref_tokens.shape, tokens.shape)
    B, T = tokens.shape
    assert len(ref_logits) == len(logits) == T
    selects = trace is not None
    assert (ref_trace is None) == (trace is None), "trace one path's selections and the other's"
    assert not selects or ref_trace.steps() == trace.steps() == T - 1
    report = {}
    for b in range(B):
        first_diff, compared, token_diff = T, 0, T
        for i in range(T):
            if i >= 1 and selects:
                ref_sets, sets = _sets_at(ref_trace, b, i), _sets_at(trace, b, i)
                assert ref_sets.keys() == sets.keys() and ref_sets, f"row {b} step {i}: different layers/heads traced"
                for where, r in ref_sets.items():
                    f = sets[where]
                    compared += 1
                    if r != f:
                        first_diff = min(first_diff, i)
                        assert len(r ^ f) <= set_slack * max(len(r), len(f)), (
                            f"row {b} step {i} (layer, KV head) {where}: {len(r ^ f)} of {max(len(r), len(f))} tokens "
                            "differ, more than near-ties")
            a, e = logits[i][b].float(), ref_logits[i][b].float()
            if i < first_diff:
                torch.testing.assert_close(a, e, rtol=logit_tol if logit_rtol is None else logit_rtol, atol=logit_tol,
                                           msg=lambda m, b=b, i=i: f"row {b} step {i}, same selections so far: {m}")
            if tokens[b, i] != ref_tokens[b, i]:
                top2 = e.topk(2).values
                assert i >= first_diff or float(top2[0] - top2[1]) <= 2 * logit_tol, (
                    f"row {b} step {i}: token {int(tokens[b, i])} against {int(ref_tokens[b, i])} with the same "
                    f"selections so far and a logit margin of {float(top2[0] - top2[1]):.2e}")
                token_diff = i
                break  # different inputs from here on
        report[b] = {"first_diff": first_diff, "sets_compared": compared, "token_diff": token_diff}
    return report
