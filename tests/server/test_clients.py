"""The OpenAI surface clients use, through the official openai client and LangChain's OpenAI adapters: log
probabilities (both endpoints, streamed and not), penalties and logit biases (honoured: the engine's own tokens
for the same settings), echo, any 64-bit seed, the frameworks' default requests, and a chat's later turns served
from the prefix cache."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from http_harness import MODEL, PROMPTS, engine, metrics, running, server, tokenizer

from a2ats.runtime import Request, Sampling
from a2ats.server.text import TextStream


@pytest.fixture(scope="module")
def srv():
    s = server(slots=3, max_context=512)
    yield s
    s.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def _chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _generated(c) -> int:
    """Tokens that carry log probabilities: the generated ones but an end-of-sequence token."""
    return c.usage.completion_tokens - (c.choices[0].finish_reason == "stop")


def test_chat_logprobs_streamed_and_not(srv):
    client = _client(srv)
    kw = dict(model=MODEL, messages=_chat(PROMPTS[1]), max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    c = client.chat.completions.create(**kw)
    content = c.choices[0].logprobs.content
    assert len(content) == _generated(c) > 0
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and math.isfinite(t.logprob)
        # greedy: the pick is the most likely token
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode() == t.token
    streamed = [t for ch in client.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=_chat(PROMPTS[1]), max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == c.choices[0].message.content


def test_completion_logprobs_and_echo(srv):
    client = _client(srv)
    c = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    n = _generated(c)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                        lp.token_logprobs))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2,
                                            stream=True))
    streamed = [(t, v, o) for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t, v, o in zip(ch.choices[0].logprobs.tokens, ch.choices[0].logprobs.token_logprobs,
                                   ch.choices[0].logprobs.text_offset)]
    assert streamed == list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))
    echo = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + c.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True, stream=True) if ch.choices)
    assert streamed == echo.choices[0].text


def test_penalties_and_biases_are_the_engines_own(srv):
    """The server's answer under presence and frequency penalties and a logit bias is the text of the tokens the
    engine itself picks for the same settings, and differs from the plain greedy answer."""
    client = _client(srv)
    prompt = PROMPTS[2]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    ids = list(tokenizer()(prompt)["input_ids"])
    first = engine(slots=1).generate(torch.tensor([ids]), max_new_tokens=1).tokens[0, 0].item()
    settings = dict(presence_penalty=0.8, frequency_penalty=1.5, logit_bias=((first, -100.0),))
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                    presence_penalty=0.8, frequency_penalty=1.5,
                                    logit_bias={str(first): -100}).choices[0].text
    eng = engine(slots=1)
    eos = tokenizer().eos_token_id
    eng.stop_tokens = {eos}
    eng.add(Request(ids, 16, sampling=Sampling(**settings)))
    tokens = []
    while eng.has_work:
        for _, c in eng.step().finished:
            tokens = c.tokens
    text = TextStream(tokenizer(), (), {eos})
    assert got == "".join(text.push(t) for t in tokens) + text.finish()
    assert got != plain


def test_any_64_bit_seed_reproduces(srv):
    client = _client(srv)
    for seed in (2**64 - 1, -(2**63), 0):
        a, b = (client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=1.0, seed=seed)
                .choices[0].text for _ in range(2))
        assert a == b


def test_langchain_chat_and_completions_at_their_defaults(srv):
    """LangChain's ChatOpenAI and OpenAI adapters, as a user builds them (only the endpoint and model named): the
    chat answer is the greedy one the openai client gets, streamed and not; completions answer."""
    import langchain_openai as lc  # a test dependency (pyproject's test extra)

    base = dict(model=MODEL, base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, max_tokens=8)
    chat = lc.ChatOpenAI(**base)
    want = _client(srv).chat.completions.create(model=MODEL, messages=_chat(PROMPTS[6]), max_tokens=8,
                                                temperature=0).choices[0].message.content
    assert chat.invoke(PROMPTS[6]).content == want
    assert "".join(c.content for c in chat.stream(PROMPTS[6])) == want
    with_lp = lc.ChatOpenAI(**base, logprobs=True, top_logprobs=2, frequency_penalty=0.3, seed=3)
    meta = with_lp.invoke(PROMPTS[6]).response_metadata
    assert meta["finish_reason"] in ("stop", "length") and len(meta["logprobs"]["content"][0]["top_logprobs"]) == 2
    text = lc.OpenAI(**base).invoke(PROMPTS[7])  # its defaults sample (temperature 0.7) and send a list of prompts
    assert isinstance(text, str) and text


def test_a_chats_later_turns_hit_the_prefix_cache_and_answer_as_without_it():
    """A conversation over a document, turn by turn, through the chat template: each turn's answer equals a server
    without a prefix cache, and from the second turn on the earlier turns' prompt comes from the cache."""
    doc = " ".join(PROMPTS * 2)
    questions = ["What is first?", "And then?", "Say it again."]

    def converse(srv) -> list[str]:
        client, messages, answers = _client(srv), [{"role": "system", "content": doc}], []
        for q in questions:
            messages.append({"role": "user", "content": q})
            a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
            answers.append(a.choices[0].message.content)
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    with running(slots=2, max_context=768) as plain:
        want = converse(plain)
    with running(slots=2, max_context=768, prefix_cache=1 << 30) as cached:
        assert converse(cached) == want
        m = metrics(cached)
    assert m["a2ats_prefix_cache_lookups_total"] == 3 and m["a2ats_prefix_cache_hits_total"] == 2
    assert m["a2ats_prefix_cache_tokens_reused_total"] >= 2 * 256 and m["a2ats_prefix_cache_bytes"] > 0
