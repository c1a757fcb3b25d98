"""The OpenAI-compatible server through the official openai client and plain HTTP (httpx): answers served among
concurrent others equal those served alone, streaming equals not streaming, stop strings, sampling, the budget
extension, cancellation, back-pressure, and a sequence that fails alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from http_harness import (
    MODEL,
    PROMPTS,
    complete,
    metrics,
    running,
    server,
    slow,
    tokenizer,
)


@pytest.fixture(scope="module")
def srv():
    s = server(slots=4, max_context=512, max_queue=32)
    yield s
    s.stop()


def _client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.config.api_key or "unused", max_retries=0, **kw)


def test_models_health_and_metrics(srv):
    assert [m.id for m in _client(srv).models.list()] == [MODEL]
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    m = metrics(srv)
    for name in ("a2ats_queue_depth", "a2ats_busy_slots", "a2ats_decode_tokens_per_second",
                 "a2ats_prefill_tokens_per_second", "a2ats_attended_share", 'a2ats_requests_total{outcome="stop"}',
                 'a2ats_requests_total{outcome="overloaded"}'):
        assert name in m


def test_answer_among_16_concurrent_equals_alone(srv):
    """Greedy: each of 17 prompts (4 slots, the rest queued) answered exactly as when it was served alone."""
    client = _client(srv)

    def ask(prompt: str) -> tuple[str, int]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert together == alone
    assert all(n == 12 for _, n in alone)
    m = metrics(srv)
    assert m["a2ats_busy_slots"] == 0 and m["a2ats_queue_depth"] == 0
    assert 0 < m["a2ats_attended_share"] < 1  # A²ATS attended part of each cache


def test_streaming_equals_non_streaming(srv):
    client = _client(srv)
    for prompt in PROMPTS[3:6] + PROMPTS[8:9]:
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == plain.choices[0].text
        assert "\ufffd" not in text or "\ufffd" in plain.choices[0].text  # deltas never split a character
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 16
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": PROMPTS[1]}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "length"


def test_chat_uses_the_models_template(srv):
    tok = tokenizer()
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = _client(srv).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    same = complete(srv, list(ids), max_tokens=8)
    assert chat.choices[0].message.content == same["choices"][0]["text"]
    assert chat.usage.prompt_tokens == len(ids) == same["usage"]["prompt_tokens"]


def test_stop_strings_cut_the_text_and_free_the_slot(srv):
    full = complete(srv, PROMPTS[0], max_tokens=24)["choices"][0]["text"]
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string here")
    expect = full[: full.find(stop)]
    got = complete(srv, PROMPTS[0], max_tokens=24, stop=[stop, "never appears 12345"])
    assert got["choices"][0]["text"] == expect and got["choices"][0]["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] < 24
    chunks = list(_client(srv).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                                  stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expect
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_among_others(srv):
    client = _client(srv)

    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0.9, top_p=0.95,
                                         seed=seed).choices[0].text

    first = sample(7)
    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(sample, [7, 8, 7, 9, 7, 10]))
    assert runs[0] == runs[2] == runs[4] == first
    assert len({first, runs[1], runs[3], runs[5]}) > 1  # other seeds, other draws
    greedy = complete(srv, PROMPTS[2], max_tokens=12)["choices"][0]["text"]
    assert client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0.9, top_p=1e-9,
                                     seed=3).choices[0].text == greedy  # a nucleus of one token is greedy


def test_budget_extension(srv):
    client = _client(srv)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0,
                                  extra_body={"budget": 1.0})
    assert r.usage.completion_tokens == 6
    r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0,
                                  extra_body={"budget": 16})
    assert r.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError, match="budget fraction must be in"):
        client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, extra_body={"budget": 1.5})


def _wait(cond, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_and_frees_the_slot(stream):
    """One slot, no queue: while a long request holds the slot another is refused 429; the client drops it
    (mid-stream, or a timed-out plain request) and the next request gets the slot at once."""
    with running(slots=1, max_context=2048, max_queue=0) as s:
        slow(s, 0.005)  # 2,000 tokens take 10 s or more: the request is still decoding when it is dropped
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 2000, "temperature": 0}
        with httpx.Client(timeout=60) as c:
            if stream:
                with c.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first token came: it holds the slot
                    assert c.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 2}).status_code == 429
            else:
                def busy() -> bool:
                    return metrics(s)["a2ats_busy_slots"] == 1

                hold = threading.Thread(target=lambda: _swallow(httpx.post, f"{s.url}/v1/completions", json=body,
                                                                timeout=0.5))
                hold.start()
                _wait(busy)
                assert c.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 2}).status_code == 429
                hold.join()
        freed = _wait(lambda: metrics(s)["a2ats_busy_slots"] == 0)
        assert freed < 2.0
        assert complete(s, PROMPTS[0], max_tokens=4)["usage"]["completion_tokens"] == 4  # the slot is free
        m = metrics(s)
        assert m['a2ats_requests_total{outcome="cancelled"}'] == 1
        assert m["a2ats_decode_tokens_total"] < 1500  # the dropped request did not decode to its end


def _swallow(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except httpx.TimeoutException:
        pass


def test_overload_answers_429_with_retry_after():
    with running(slots=1, max_context=2048, max_queue=1, retry_after_seconds=3) as s:
        slow(s, 0.005)
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{s.url}/v1/completions", json=body) as first, \
                c.stream("POST", f"{s.url}/v1/completions", json=body) as second:
            assert first.status_code == second.status_code == 200  # one decoding, one waiting
            r = c.post(f"{s.url}/v1/completions", json={**body, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert "at capacity" in r.json()["error"]["message"] and r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                _client(s).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert metrics(s)['a2ats_requests_total{outcome="overloaded"}'] == 2
        _wait(lambda: metrics(s)["a2ats_busy_slots"] == 0)
        assert complete(s, "hi", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_a_failing_sequence_gets_500_and_the_others_go_on(srv, monkeypatch):
    engine = srv.service.engine
    poison = tokenizer()("poison pill")["input_ids"]
    take = engine._take

    def faulty(seq, token, logits, res):
        if seq.prompt[: len(poison)] == poison and len(seq.tokens) >= 2:
            raise RuntimeError("injected fault in one sequence")
        return take(seq, token, logits, res)

    alone = [complete(srv, p, max_tokens=10)["choices"][0]["text"] for p in PROMPTS[:4]]
    monkeypatch.setattr(engine, "_take", faulty)

    def ask(prompt):
        return httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 10,
                                                             "temperature": 0}, timeout=60)

    with ThreadPoolExecutor(5) as pool:
        rs = list(pool.map(ask, PROMPTS[:2] + ["poison pill, then more"] + PROMPTS[2:4]))
    bad = rs.pop(2)
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert "injected fault in one sequence" in err["message"] and err["code"] == "decode_error"
    assert "Traceback" not in bad.text
    assert [r.json()["choices"][0]["text"] for r in rs] == alone
    # streamed, the failure arrives as an error event: the openai client raises it
    with pytest.raises(openai.APIError, match="injected fault"):
        list(_client(srv).completions.create(model=MODEL, prompt="poison pill", max_tokens=10, stream=True))
    monkeypatch.undo()
    assert complete(srv, PROMPTS[0], max_tokens=10)["choices"][0]["text"] == alone[0]
