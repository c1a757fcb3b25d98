"""Incremental detokenization and stop strings, on SmolLM2's byte-level tokenizer."""

from __future__ import annotations

import pytest
from http_harness import tokenizer

from a2ats.server.text import TextStream

TEXTS = ["Plain ASCII, with spaces  and\nnew lines.", "Crème brûlée à la française — ça coûte 5 €.",
         "漢字とかなの混じった文章です。", "Emoji: 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵", "mixed: x² + y² = z², ∑∫∂"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character_and_add_up(text):
    tok = tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    deltas = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids) == stream.text
    assert not any("\ufffd" in d for d in deltas)


def test_the_tokenizer_does_split_characters():
    """What the test above guards against happens: alone, some tokens of these texts are part of a character."""
    tok = tokenizer()
    ids = tok(TEXTS[3] + TEXTS[2], add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids)


def test_end_of_sequence_tokens_are_not_text():
    tok = tokenizer()
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, skip={tok.eos_token_id})
    out = "".join(stream.push(t) for t in ids + [tok.eos_token_id]) + stream.finish()
    assert out == "Hello world"


@pytest.mark.parametrize("stop,expect", [
    (["world"], "Hello "), ([" wor", "xyz"], "Hello"), (["lo w", "Hel"], ""), (["d!"], "Hello worl"),
    (["absent"], "Hello world! Goodbye."), (["Good", "world"], "Hello "),
])
def test_stop_strings(stop, expect):
    tok = tokenizer()
    ids = tok("Hello world! Goodbye.", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=stop)
    deltas = []
    for t in ids:
        deltas.append(stream.push(t))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    assert "".join(deltas) == expect == stream.text
    assert stream.stopped == (expect != "Hello world! Goodbye.")


def test_text_that_may_start_a_stop_string_is_held_back():
    tok = tokenizer()
    stream = TextStream(tok, stop=["###"])
    ids = tok("ab ## cd", add_special_tokens=False)["input_ids"]
    out = [stream.push(t) for t in ids]
    assert "".join(out) + stream.finish() == "ab ## cd"
    assert not stream.stopped
