"""RULER-style synthetic long-context tasks, generated offline for any Hugging Face tokenizer.

Each generator takes ``(tokenizer, length, seed)`` and returns a :class:`Sample` whose prompt (the user
message; the harness applies the chat template) has at most ``length`` tokens and at least
``length - max(16, length // 100)`` (counted with ``tokenizer.encode(prompt, add_special_tokens=False)``).
The filler (haystack) is sized by a bisection over its number of units (words, noise sentences, list items),
measuring the whole prompt each time.  Everything is seeded by ``(task, seed)``: the same arguments give
the same sample on every machine.

The wording follows RULER (Hsieh et al., 2024; github.com/NVIDIA/RULER, ``scripts/data/synthetic``): every
prompt ends with its question, and RULER's answer prefix is kept apart (``Sample.answer_prefix``) for the
harness to start the model's turn with.  Needles sit at sentence (essay, speech) or line
(noise) boundaries, each at its own seeded depth drawn uniformly from [0.1, 0.9] of the haystack.

Tasks:

* ``niah_single_number_essay``: one 7-digit number for one key, Paul Graham essays.
* ``niah_single_uuid_noise``: one UUID for one key, RULER's repeated noise sentences.
* ``niah_single_number_sotu``: one 7-digit number for one key, State of the Union addresses (newest first).
* ``niah_multikey``: four needles with four keys, one of them queried; the other three are distractors.
* ``niah_multivalue``: four needles with the same key and four different numbers; all four are expected.
* ``niah_multiquery``: four needles with four keys, all four queried; four numbers expected.
* ``variable_tracking``: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of four hops in noise; the answer is
  the five variable names.
* ``common_words``: a numbered list in which 10 words (drawn from the essays' vocabulary) appear many times and
  the others a few times; the answer is those 10.
* ``frequent_words``: "coded text" of random 6-letter words with Zipf (alpha = 2) counts, the top rank being the
  noise token ``....``; the answer is ranks 2 to 4.

The common-words list draws its words from the essays' vocabulary (lowercase, 5 to 12 letters, none a substring
of a common word); RULER's in-context example for that task is left out.

Scoring: RULER scores all of its synthetic tasks (NIAH in every variant, multi-value included, variable
tracking, common and frequent words) with ``string_match_all`` (:func:`score`); ``string_match_part``
(:func:`score_part`) is only used for its QA tasks, so none of the tasks here use it.
"""

from __future__ import annotations

import math
import random
import re
import string
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from a2ats.assets.corpus import essays, haystack_text, random_uuids, speeches

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NOISE_SENTENCES = tuple(s.strip() for s in re.findall(r"[^.]+\.", NOISE))

NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What are all the special magic {kind} for {query} mentioned in the provided text?"
)
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}\n"
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_NOISE = "...."

# Needle keys are adjective-noun pairs, as RULER's ("jittery-hospital"), from two small fixed lists.
ADJECTIVES = (
    "amber", "bold", "brave", "calm", "clever", "cozy", "crimson", "dusty", "eager", "fancy", "fuzzy", "gentle",
    "gloomy", "golden", "hasty", "hollow", "humble", "jagged", "jolly", "keen", "lively", "loyal", "lucky",
    "mellow", "misty", "nimble", "noble", "plucky", "proud", "quiet", "rapid", "rugged", "rusty", "shiny",
    "silent", "sleepy", "snowy", "sturdy", "swift", "tidy", "vivid", "wary", "windy", "witty", "young", "zesty",
)
NOUNS = (
    "anchor", "badger", "beacon", "bridge", "candle", "canyon", "castle", "comet", "desert", "dolphin", "ember",
    "falcon", "feather", "forest", "garden", "glacier", "goblet", "hammock", "harbor", "igloo", "island",
    "jacket", "jungle", "kettle", "ladder", "lantern", "magnet", "meadow", "mirror", "napkin", "nebula",
    "orchard", "otter", "parrot", "pebble", "quarry", "raven", "river", "saddle", "spruce", "summit", "tiger",
    "tunnel", "valley", "violin", "walrus", "willow", "yacht", "zebra",
)


@dataclass(frozen=True)
class Sample:
    task: str  # task name
    prompt: str  # the user message (the harness applies the chat template)
    answers: tuple[str, ...]  # expected values; scoring is RULER's string match
    target_tokens: int  # requested context length
    seed: int
    max_new_tokens: int  # how many tokens an answer needs
    # RULER's answer prefix: the harness starts the model's turn with it, so the answer comes first
    answer_prefix: str = ""


# ----------------------------------------------------------------------------------------------------------
# Scoring (RULER's metrics)


def _answers(sample_or_answers) -> tuple[str, ...]:
    if isinstance(sample_or_answers, Sample):
        answers = sample_or_answers.answers
    elif isinstance(sample_or_answers, str):
        answers = (sample_or_answers,)
    else:
        answers = tuple(sample_or_answers)
    if not answers:
        raise ValueError("no expected answers to score against")
    return answers


def score(sample_or_answers, output: str) -> float:
    """RULER ``string_match_all``: the fraction of expected answers found (case-insensitively) in the output."""
    answers, text = _answers(sample_or_answers), output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def score_part(answers, output: str) -> float:
    """RULER ``string_match_part``: 1.0 if any expected answer is found (case-insensitively), else 0.0.

    RULER uses it for its QA tasks only; all the tasks in this module are scored with :func:`score`."""
    text = output.lower()
    return float(any(a.lower() in text for a in _answers(answers)))


# ----------------------------------------------------------------------------------------------------------
# Length control


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False, verbose=False))


def _fit(tokenizer, length: int, build: Callable[[int], str], upper: int) -> str:
    """``build(n)`` for the largest ``n`` in ``[0, upper]`` whose prompt has at most ``length`` tokens (bisection)."""
    seen: dict[int, tuple[int, str]] = {}

    def size(n: int) -> int:
        if n not in seen:
            prompt = build(n)
            seen[n] = (_count(tokenizer, prompt), prompt)
        return seen[n][0]

    if size(0) > length:
        raise ValueError(f"length {length} is too short: this task's fixed text alone takes {size(0)} tokens")
    lo, hi = 0, upper
    if size(hi) <= length:
        return seen[hi][1]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= length:
            lo = mid
        else:
            hi = mid
    return seen[lo][1]


def _slot(positions: Sequence[int], target: float) -> int:
    """The element of the sorted ``positions`` nearest ``target``."""
    i = bisect_left(positions, target)
    if i == 0:
        return positions[0]
    if i == len(positions):
        return positions[-1]
    return positions[i] if positions[i] - target < target - positions[i - 1] else positions[i - 1]


_ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Gov|Sen|Rep|No|vs|etc|[A-Z])|\b[a-zA-Z]\.[a-zA-Z])\.$")


class _Prose:
    """A prose haystack cut after its first ``n`` words, with inserts at sentence ends.

    A sentence end is ``.``, ``!`` or ``?`` (and any closing quotes or brackets) followed by whitespace or, since
    the packaged essays lost their paragraph breaks ("...stops.The alarming..."), by a capital letter; common
    abbreviations and initials ("Mr.", "U.S.", "F.") are not sentence ends."""

    def __init__(self, text: str):
        self.text = text
        self.word_ends = [m.end() for m in re.finditer(r"\S+", text)]
        ends = (m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s|[A-Z])", text))
        self.stops = [e for e in ends if not _ABBREVIATION.search(text, max(0, e - 8), e)]  # sentence ends

    @property
    def units(self) -> int:
        return len(self.word_ends)

    def render(self, n: int, inserts: Sequence[tuple[float, str]]) -> str:
        cut = self.word_ends[n - 1] if n else 0
        body = self.text[:cut]
        slots = [0] + self.stops[: bisect_left(self.stops, cut)]
        at: dict[int, list[str]] = {}
        for depth, text in inserts:
            at.setdefault(_slot(slots, depth * cut), []).append(text)
        pieces, prev = [], 0
        for pos in sorted(at):
            pieces.append(body[prev:pos])
            group = " ".join(at[pos])
            pieces.append(("" if pos == 0 else " ") + group + ("" if body[pos : pos + 1].isspace() else " "))
            prev = pos
        pieces.append(body[prev:])
        return "".join(pieces)


class _Noise:
    """RULER's noise haystack: its five sentences repeated, five to a line, with inserts on lines of their own."""

    def __init__(self, length: int):
        self.units = length // 3 + 5  # each sentence is at least 3 tokens

    def render(self, n: int, inserts: Sequence[tuple[float, str]]) -> str:
        sentences = [_NOISE_SENTENCES[i % len(_NOISE_SENTENCES)] for i in range(n)]
        lines = [" ".join(sentences[i : i + len(_NOISE_SENTENCES)]) for i in range(0, n, len(_NOISE_SENTENCES))]
        slots = list(range(1, len(lines))) or [len(lines)]
        at: dict[int, list[str]] = {}
        for depth, text in inserts:
            at.setdefault(_slot(slots, depth * len(lines)), []).append(text)
        for pos in sorted(at, reverse=True):
            lines[pos:pos] = at[pos]
        return "\n".join(lines)


def _prose_source(tokenizer, length: int, source: str, skip: int) -> str:
    """At least ``length`` tokens of whole paragraphs of ``source``, starting ``skip`` documents in."""
    want, previous = length + length // 10 + 1024, None
    while True:  # ask for more while a long paragraph stops the text short of ``length``
        text = haystack_text(tokenizer, want, source=source, skip=skip)
        if text and _count(tokenizer, text) >= length:
            return text
        if (text and text == previous) or want > 1 << 40:
            break  # that is the whole corpus
        previous, want = text, 2 * want
    if not text.strip():
        raise ValueError(f"no {source} text found for a haystack")
    while _count(tokenizer, text) < length:  # the corpus is shorter than asked for: repeat it
        text = text + text
    return text


# ----------------------------------------------------------------------------------------------------------
# Needle in a haystack


def _keys(rng: random.Random, count: int) -> list[str]:
    while True:
        keys = [f"{a}-{n}" for a, n in zip(rng.sample(ADJECTIVES, count), rng.sample(NOUNS, count))]
        if not any(a != b and a in b for a in keys for b in keys):
            return keys


def _niah(
    task: str, tokenizer, length: int, seed: int, *, haystack: str, value_kind: str, keys: int, values: int,
    queries: int, max_new_tokens: int,
) -> Sample:
    """``keys`` keys with ``values`` values each; the first ``queries`` keys are asked for."""
    rng = random.Random(f"{task}/{seed}")
    names = _keys(rng, keys)
    if haystack == "noise":
        hay, source = _Noise(length), ""
    else:
        corpus = "essays" if haystack == "essay" else "sotu"
        skip = rng.randrange(len(essays() if corpus == "essays" else speeches()))
        source = _prose_source(tokenizer, length, corpus, skip)
        hay = _Prose(source)
    while True:  # values that are new to the haystack, so that each occurs exactly once
        if value_kind == "numbers":
            found = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(keys * values)]
        else:
            found = random_uuids(keys * values, rng.getrandbits(64))
        if len(set(found)) == len(found) and not any(v in source for v in found):
            break
    needles = [(k, found[i * values + j]) for i, k in enumerate(names) for j in range(values)]
    answers = tuple(v for k, v in needles if k in names[:queries])
    rng.shuffle(needles)
    inserts = [(rng.uniform(0.1, 0.9), NIAH_NEEDLE.format(kind=value_kind, key=k, value=v)) for k, v in needles]
    asked = names[:queries]
    query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]

    def build(n: int) -> str:
        return NIAH_TEMPLATE.format(kind=value_kind, context=hay.render(n, inserts), query=query)

    prompt = _fit(tokenizer, length, build, hay.units)
    prefix = f"The special magic {value_kind} for {query} mentioned in the provided text are"
    return Sample(task, prompt, answers, length, seed, max_new_tokens, prefix)


# name -> (haystack, value kind, keys, values per key, keys queried, max_new_tokens)
_NIAH_VARIANTS = {
    "niah_single_number_essay": ("essay", "numbers", 1, 1, 1, 32),
    "niah_single_uuid_noise": ("noise", "uuids", 1, 1, 1, 64),
    "niah_single_number_sotu": ("sotu", "numbers", 1, 1, 1, 32),
    "niah_multikey": ("essay", "numbers", 4, 1, 1, 32),
    "niah_multivalue": ("essay", "numbers", 1, 4, 1, 128),
    "niah_multiquery": ("essay", "numbers", 4, 1, 4, 128),
}


def _niah_variant(name: str) -> Callable[..., Sample]:
    hay, kind, keys, values, queries, new = _NIAH_VARIANTS[name]
    return lambda tokenizer, length, seed: _niah(name, tokenizer, length, seed, haystack=hay, value_kind=kind,
                                                 keys=keys, values=values, queries=queries, max_new_tokens=new)


# ----------------------------------------------------------------------------------------------------------
# Multi-hop tracing


def variable_tracking(tokenizer, length: int, seed: int, hops: int = 4) -> Sample:
    task = "variable_tracking"
    rng = random.Random(f"{task}/{seed}")
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    inserts = list(zip(sorted(rng.uniform(0.1, 0.9) for _ in statements), statements))  # in chain order
    hay = _Noise(length)

    def build(n: int) -> str:
        return VT_TEMPLATE.format(context=hay.render(n, inserts), query=value)

    prompt = _fit(tokenizer, length, build, hay.units)
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
              f"are assigned the value {value}, they are:")
    return Sample(task, prompt, tuple(names), length, seed, 64, prefix)


# ----------------------------------------------------------------------------------------------------------
# Aggregation


@lru_cache(maxsize=None)
def essay_vocabulary() -> tuple[str, ...]:
    """Lowercase alphabetic words of 5 to 12 letters that occur in the essays, sorted."""
    text = "\n".join(essays())
    return tuple(sorted(set(re.findall(r"(?<![A-Za-z'-])[a-z]{5,12}(?![A-Za-z'-])", text))))


def common_words(tokenizer, length: int, seed: int, num_common: int = 10) -> Sample:
    task = "common_words"
    rng = random.Random(f"{task}/{seed}")
    vocab = essay_vocabulary()
    common = []
    for word in rng.sample(vocab, len(vocab)):
        if not any(word in c or c in word for c in common):
            common.append(word)
            if len(common) == num_common:
                break
    rare = [w for w in vocab if not any(w in c or c in w for c in common)]
    rng.shuffle(rare)
    # RULER repeats the common words 30 times and the others 3; shorter lists scale the common count down,
    # and lists longer than the vocabulary allows repeat the others more often (the common ones stay ahead).
    order_seed = f"{task}/{seed}/order"

    def build(n: int, freq_common: int, freq_rare: int) -> str:  # n: the number of rare items
        items = [w for w in common for _ in range(freq_common)]
        items += [rare[i // freq_rare] for i in range(n)]
        random.Random(order_seed).shuffle(items)
        return CWE_TEMPLATE.format(context=" ".join(f"{i}. {w}" for i, w in enumerate(items, 1)))

    freq_common = min(30, max(4, length // 250))
    freq_rare = min(3, freq_common - 2)
    while 2 * len(rare) * freq_rare < length:  # maybe too few words: measure the longest list
        full = _count(tokenizer, build(len(rare) * freq_rare, max(freq_common, freq_rare + 2), freq_rare))
        if full > length:
            break
        freq_rare = max(freq_rare + 1, math.ceil(freq_rare * length / full))
    freq_common = max(freq_common, freq_rare + 2)
    prompt = _fit(tokenizer, length, lambda n: build(n, freq_common, freq_rare), len(rare) * freq_rare)
    return Sample(task, prompt, tuple(common), length, seed, 128,
                  "Answer: The top 10 words that appear most often in the list are:")


def frequent_words(tokenizer, length: int, seed: int, alpha: float = 2.0, vocab_size: int = 2000) -> Sample:
    task = "frequent_words"
    rng = random.Random(f"{task}/{seed}")
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in vocab:
            vocab.append(word)
    vocab[0] = FWE_NOISE  # the most frequent "word" is noise, as in RULER
    # RULER draws floor(n k^-alpha / zeta(alpha)) copies of the rank-k word for n words in all.  Copy j of rank k
    # arrives when n reaches j zeta k^alpha: taking the copies in that order, one word at a time, keeps the
    # counts on the Zipf curve while the length grows by a word per step.
    zeta = sum(k**-alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
    most = 2 * length  # more words than fit: every word is at least a token
    arrivals = sorted(
        (j * zeta * k**alpha, k)
        for k in range(1, vocab_size + 1)
        for j in range(1, int(most * k**-alpha / zeta) + 1)
    )
    order_seed = f"{task}/{seed}/order"

    def build(n: int) -> str:  # n: the number of words
        items = [vocab[k - 1] for _, k in arrivals[:n]]
        random.Random(order_seed).shuffle(items)
        return FWE_TEMPLATE.format(context=" ".join(items))

    prompt = _fit(tokenizer, length, build, len(arrivals))
    return Sample(task, prompt, tuple(vocab[1:4]), length, seed, 64,
                  "Answer: According to the coded text above, the three most frequently appeared words are:")


# ----------------------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Sample]] = {
    **{name: _niah_variant(name) for name in _NIAH_VARIANTS},
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}


def generate(task: str, tokenizer, length: int, seed: int) -> Sample:
    """One sample of ``task`` whose prompt has at most ``length`` tokens under ``tokenizer``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, not {length!r}")
    return TASKS[task](tokenizer, length, seed)
