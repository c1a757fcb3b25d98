"""RULER-style task generators: answers placed once, lengths on target, seeded, and RULER's string-match scores."""

import re
from collections import Counter

import pytest

from a2ats.eval.tasks import TASKS, Sample, generate, score, score_part

LENGTHS = [1000, 3000]
NIAH = [t for t in TASKS if t.startswith("niah_")]
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from a2ats.assets.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def samples(tok):
    cache = {}

    def get(task, length, seed=0):
        if (task, length, seed) not in cache:
            cache[task, length, seed] = generate(task, tok, length, seed)
        return cache[task, length, seed]

    return get


def test_task_names():
    assert list(TASKS) == [
        "niah_single_number_essay", "niah_single_uuid_noise", "niah_single_number_sotu", "niah_multikey",
        "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words", "frequent_words",
    ]


def test_unknown_task(tok):
    with pytest.raises(ValueError, match="niah_multikey.*common_words"):
        generate("niah_nonsense", tok, 1000, 0)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(TASKS))
def test_length_and_fields(samples, tok, task, length):
    s = samples(task, length)
    n = len(tok.encode(s.prompt, add_special_tokens=False))
    assert length - max(16, length // 100) <= n <= length, (task, length, n)
    assert (s.task, s.target_tokens, s.seed) == (task, length, 0)
    assert s.answers and all(isinstance(a, str) and a for a in s.answers)
    assert 16 <= s.max_new_tokens <= 128


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(TASKS))
def test_seeded(samples, tok, task, length):
    s = samples(task, length)
    assert generate(task, tok, length, 0) == s
    other = samples(task, length, 1)
    assert other.prompt != s.prompt and other.answers != s.answers


def _question(prompt):
    body, question = prompt.rsplit("\n", 1)
    return body, question


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", NIAH)
def test_niah_needles(samples, task, length):
    s = samples(task, length)
    body, question = _question(s.prompt)
    assert question.startswith("What are all the special magic ")
    assert question.endswith("mentioned in the provided text?")
    needles = [(m.group(2), m.group(3), m.start()) for m in NEEDLE.finditer(body)]
    kind = "uuids" if "uuid" in task else "numbers"
    assert {m.group(1) for m in NEEDLE.finditer(body)} == {kind}
    assert len(needles) == {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
    values = [v for _, v, _ in needles]
    for v in values:  # every value, answer or distractor, occurs exactly once: in its needle
        assert s.prompt.count(v) == 1, v
        assert re.fullmatch(r"\d{7}" if kind == "numbers" else r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", v)
    keys = {k for k, _, _ in needles}
    asked = {k for k, v, _ in needles if v in s.answers}
    assert sorted(v for k, v, _ in needles if k in asked) == sorted(s.answers)
    assert all(k in question for k in asked) and not any(k in question for k in keys - asked)
    if task == "niah_multikey":
        assert len(keys) == 4 and len(s.answers) == 1
    elif task == "niah_multivalue":
        assert len(keys) == 1 and len(s.answers) == 4
    elif task == "niah_multiquery":
        assert len(keys) == 4 and len(s.answers) == 4 and asked == keys
    else:
        assert len(s.answers) == 1
    context_start = body.index("\n") + 1
    for _, _, at in needles:  # at a sentence or line boundary, within the 10-90% depth band (slack: one sentence)
        before = body[:at]
        assert before.endswith("\n") or re.search(r"[.!?][\"')\]]*\s*$", before), before[-40:]
        assert 0.05 <= (at - context_start) / (len(body) - context_start) <= 0.95


@pytest.mark.parametrize("length", LENGTHS)
def test_variable_tracking(samples, length):
    s = samples("variable_tracking", length)
    body, question = _question(s.prompt)
    value = question.split()[-5]
    assert question == f"Question: Find all variables that are assigned the value {value} in the text above."
    assert re.fullmatch(r"\d{5}", value) and s.prompt.count(value) == 2  # its assignment and the question
    chain = re.findall(r"^VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.$", body, flags=re.M)
    assert len(chain) == 5 and [name for name, _ in chain] == list(s.answers)
    assert chain[0][1] == value
    for (prev, _), (_, source) in zip(chain, chain[1:]):
        assert source == f"VAR {prev}"
    for name in s.answers:  # each assigned exactly once
        assert len(re.findall(rf"VAR {name} =", body)) == 1
    assert "The grass is green." in body


def _counts(words):
    counts = Counter(words)
    return counts, [w for w, _ in counts.most_common()]


@pytest.mark.parametrize("length", LENGTHS)
def test_common_words(samples, length):
    s = samples("common_words", length)
    body, question = _question(s.prompt)
    assert question == "Question: What are the 10 most common words in the above list?"
    items = re.findall(r"(\d+)\. ([a-z]+)", body.split("\n", 1)[1])
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts, _ = _counts(w for _, w in items)
    assert len(s.answers) == 10 and set(s.answers) <= set(counts)
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    assert len(counts) > 20


@pytest.mark.parametrize("length", LENGTHS)
def test_frequent_words(samples, length):
    s = samples("frequent_words", length)
    body, question = _question(s.prompt)
    assert question.endswith("What are the three most frequently appeared words in the above coded text?")
    words = body.split("coded words. ", 1)[1].split()
    counts, ranked = _counts(w for w in words if w != "....")
    assert ranked[:3] == list(s.answers)
    assert counts[ranked[2]] > counts[ranked[3]]
    assert Counter(words)["...."] > counts[ranked[0]]


@pytest.mark.parametrize("task", list(TASKS))
def test_score(samples, task):
    s = samples(task, 1000)
    answers = s.answers
    assert score(s, "Answer: " + ", ".join(a.upper() for a in answers) + ".") == 1.0
    assert score(answers, " ".join(answers)) == 1.0
    assert score(s, "I could not find anything.") == 0.0
    k = len(answers) // 2
    if k:
        assert score(s, "They are " + " and ".join(answers[:k])) == pytest.approx(k / len(answers))
        assert score_part(answers, answers[-1].title()) == 1.0
    assert score_part(answers, "nothing") == 0.0


def test_score_examples():
    s = Sample("x", "p", ("7654321", "Lisbon", "abc", "zzz"), 100, 0, 32)
    assert score(s, "7654321 lisbon ABC zzz") == 1.0
    assert score(s, "The numbers are 7654321 and LISBON") == 0.5
    assert score(s, "no idea") == 0.0
    assert score(["7654321"], "it is 7654321.") == 1.0
    assert score("7654321", "it is 7654321.") == 1.0  # a bare string is one answer, not its characters
    assert score_part(s.answers, "only ZZZ") == 1.0 and score_part(s.answers, "none") == 0.0
    with pytest.raises(ValueError):
        score((), "anything")


@pytest.mark.parametrize("task", list(TASKS))
def test_answer_prefix_starts_the_answer_without_giving_it(samples, task):
    s = samples(task, LENGTHS[0])
    assert s.answer_prefix.strip()
    assert not any(a.lower() in s.answer_prefix.lower() for a in s.answers)
    if task.startswith("niah"):
        assert s.answer_prefix.split(" for ")[1].split(" mentioned")[0] in s.prompt.splitlines()[-1]
