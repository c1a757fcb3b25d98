"""The scheduler's plans, without a model: who decodes, which prompt chunks a step carries, in what order."""

from __future__ import annotations

from a2ats.runtime import Request
from a2ats.runtime.scheduler import Scheduler
from a2ats.runtime.sequence import Partial, Sequence, Status


def _seq(index: int, prompt: int, prefilled: int = 0, status: Status = Status.WAITING) -> Sequence:
    seq = Sequence(index, Request(list(range(1, prompt + 1)), 4))
    seq.prefilled, seq.status = prefilled, status
    return seq


def _scheduler(chunk: int, budget: int | None, *placed: Sequence, slots: int = 4, shares: bool = False) -> Scheduler:
    s = Scheduler(chunk, budget, shares)
    s.resize(slots)
    for i, seq in enumerate(placed):
        seq.slot = i
        s.slots[i] = seq
    return s


def _chunks(plan) -> list[tuple[int, int, int]]:
    return [(c.seq.index, c.start, c.end) for c in plan.prefill]


def test_the_prompt_with_fewest_tokens_left_goes_first():
    """A prompt mostly in the prefix cache (30 tokens left) is planned before a long one that arrived earlier."""
    running = _seq(0, 10, 10, Status.RUNNING)
    long = _seq(1, 1000, 0, Status.PREFILLING)
    cached = _seq(2, 1030, 1000, Status.PREFILLING)
    plan = _scheduler(256, 64, running, long, cached).schedule(lambda s: True, lambda s: True)
    assert plan.decode == [running]
    assert _chunks(plan) == [(2, 1000, 1030), (1, 0, 34)]


def test_a_chunk_begun_is_carried_on_whole_whatever_the_budget():
    running = _seq(0, 10, 10, Status.RUNNING)
    long = _seq(1, 1000, 256, Status.PREFILLING)
    long.partial = Partial(256, 512, pass_=None)
    short = _seq(2, 40, 0, Status.PREFILLING)
    plan = _scheduler(256, 64, running, long, short).schedule(lambda s: True, lambda s: True)
    assert _chunks(plan) == [(2, 0, 40), (1, 256, 512)]  # over the budget: nothing after the chunk begun


def test_a_chunk_split_at_a_layer_is_carried_on_whole_with_its_rest():
    """A chunk under way split into pieces (its later positions waiting at a layer) is planned as one chunk to the
    end of its last piece, and nothing is planned over the positions its pieces hold."""
    running = _seq(0, 10, 10, Status.RUNNING)
    long = _seq(1, 1000, 256, Status.PREFILLING)
    long.partial = Partial(256, 300, pass_=None, rest=Partial(300, 512, pass_=None))
    plan = _scheduler(256, None, running, long).schedule(lambda s: True, lambda s: True)
    assert _chunks(plan)[:2] == [(1, 256, 512), (1, 512, 768)]


def test_waiting_requests_take_free_slots_in_order_even_when_the_budget_is_spent():
    """Admission costs no prefill: a waiting request takes a free slot at once (its prefix-cache rows copied in), so
    next step it competes for the budget by what it has left; the first that does not fit holds the others back."""
    running = _seq(0, 10, 10, Status.RUNNING)
    long = _seq(1, 1000, 0, Status.PREFILLING)
    s = _scheduler(256, 64, running, long, slots=4)
    a, big, b = _seq(2, 50), _seq(3, 5000), _seq(4, 20)
    for seq in (a, big, b):
        s.add(seq)
    admitted = []

    def admit(seq):
        admitted.append(seq.index)
        seq.prefilled = 45 if seq is a else 0  # a's prompt found in the prefix cache but for 5 tokens
        return True

    plan = s.schedule(lambda seq: seq is not big, admit)
    assert admitted == [2] and list(s.waiting) == [big, b]
    assert _chunks(plan) == [(2, 45, 50), (1, 0, 59)]


def test_a_failed_admission_gets_no_chunks():
    s = _scheduler(256, None)
    bad, good = _seq(0, 30), _seq(1, 20)
    s.add(bad)
    s.add(good)
    plan = s.schedule(lambda seq: True, lambda seq: seq is good)
    assert _chunks(plan) == [(1, 0, 20)]
    assert s.slots[:2] == [bad, good]  # the engine ends the failed one and frees its slot


def test_with_nothing_decoding_prompts_go_in_whole_in_chunks():
    s = _scheduler(100, 64, _seq(0, 250, 0, Status.PREFILLING), _seq(1, 30, 0, Status.PREFILLING))
    plan = s.schedule(lambda seq: True, lambda seq: True)
    assert plan.decode == []
    assert _chunks(plan) == [(1, 0, 30), (0, 0, 100), (0, 100, 200), (0, 200, 250)]


def _prompted(index: int, prompt: list[int], prefilled: int) -> Sequence:
    seq = Sequence(index, Request(prompt, 4))
    seq.prefilled, seq.status = prefilled, Status.PREFILLING
    return seq


def test_a_prompt_waits_for_another_prefilling_its_next_positions_when_prefills_are_shared():
    """With a prefix cache, a prompt whose next position another prompt in a slot prefills too (the same tokens up
    to it) waits, the one further on (or, level, the earlier) going on; where the tokens part, or at its own last
    token, or for a chunk begun, each prefills its own. Without a prefix cache nobody waits."""
    doc = list(range(1, 1001))
    lead, late = _prompted(0, doc + [7, 7], 512), _prompted(1, doc + [8, 8, 8], 256)
    plan = _scheduler(256, None, lead, late, shares=True).schedule(lambda s: True, lambda s: True)
    assert {c.seq.index for c in plan.prefill} == {0} and late.follows and not lead.follows
    # level: the earlier arrival goes on
    a, b = _prompted(0, doc + [7], 256), _prompted(1, doc + [8], 256)
    plan = _scheduler(256, None, b, a, shares=True).schedule(lambda s: True, lambda s: True)
    assert {c.seq.index for c in plan.prefill} == {0} and b.follows
    # parted: where the tokens differ, each its own
    a, b = _prompted(0, doc + [7, 7, 7], 1001), _prompted(1, doc + [8, 8, 8], 1000)
    plan = _scheduler(256, None, a, b, shares=True).schedule(lambda s: True, lambda s: True)
    assert {c.seq.index for c in plan.prefill} == {0, 1} and not b.follows
    # a prompt at its last token prefills it (its logits give its first token)
    a, b = _prompted(0, doc + [7, 7], 1001), _prompted(1, doc[:600], 599)
    plan = _scheduler(256, None, a, b, shares=True).schedule(lambda s: True, lambda s: True)
    assert {c.seq.index for c in plan.prefill} == {0, 1}
    # a chunk begun is carried on whatever the other does
    a, b = _prompted(0, doc + [7], 512), _prompted(1, doc + [8], 256)
    b.partial = Partial(256, 300, pass_=None)
    plan = _scheduler(256, None, a, b, shares=True).schedule(lambda s: True, lambda s: True)
    assert (1, 256, 300) in _chunks(plan) and not b.follows
    # a few shared tokens (a system prompt) are not worth a wait
    a, b = _prompted(0, doc[:40] + [7] * 600, 256), _prompted(1, doc[:40] + [8] * 600, 0)
    plan = _scheduler(256, None, a, b, shares=True).schedule(lambda s: True, lambda s: True)
    assert {c.seq.index for c in plan.prefill} == {0, 1} and not b.follows
    # no prefix cache: both prefill
    lead, late = _prompted(0, doc + [7, 7], 512), _prompted(1, doc + [8, 8, 8], 256)
    plan = _scheduler(256, None, lead, late).schedule(lambda s: True, lambda s: True)
    assert {c.seq.index for c in plan.prefill} == {0, 1} and not late.follows
