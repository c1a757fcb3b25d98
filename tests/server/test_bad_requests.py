"""Every bad request gets its 4xx with a message in OpenAI's error shape, never a traceback, and the server goes on
serving: after each, a good request is answered."""

from __future__ import annotations

import json

import httpx
import pytest
from http_harness import MODEL, complete, metrics, server

KEY = "test-key-0123456789"
MAX_CONTEXT = 256
LIMIT = 4096  # body bytes


@pytest.fixture(scope="module")
def srv():
    s = server(slots=2, max_context=MAX_CONTEXT, api_key=KEY, max_body_bytes=LIMIT)
    yield s
    s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": MODEL, "prompt": "Hello there", "max_tokens": 3}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

# (name, path, body: dict to send as JSON or raw bytes, headers, status, words the message holds)
CASES = [
    ("malformed JSON", "completions", b'{"model": "tiny", "prompt": "x", ', AUTH, 400, "not valid JSON"),
    ("not an object", "completions", b"[1, 2, 3]", AUTH, 400, "JSON object"),
    ("prompt of the wrong type", "completions", {**GOOD, "prompt": 5}, AUTH, 400, "'prompt'"),
    ("max_tokens of the wrong type", "completions", {**GOOD, "max_tokens": "ten"}, AUTH, 400, "'max_tokens'"),
    ("a number as a string", "completions", {**GOOD, "max_tokens": "3"}, AUTH, 400, "'max_tokens'"),
    ("stream of the wrong type", "completions", {**GOOD, "stream": "yes"}, AUTH, 400, "'stream'"),
    ("messages of the wrong type", "chat/completions", {**CHAT, "messages": "hi"}, AUTH, 400, "'messages'"),
    ("a message without a role", "chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, AUTH, 400, "required"),
    ("an unknown role", "chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, AUTH, 400, "role"),
    ("unknown model", "completions", {**GOOD, "model": "gpt-9"}, AUTH, 404, "'gpt-9' does not exist"),
    ("missing model", "completions", {"prompt": "x"}, AUTH, 400, "'model' is required"),
    ("empty prompt", "completions", {**GOOD, "prompt": ""}, AUTH, 400, "prompt is empty"),
    ("empty token list", "completions", {**GOOD, "prompt": []}, AUTH, 400, "prompt is empty"),
    ("no messages", "chat/completions", {**CHAT, "messages": []}, AUTH, 400, "'messages'"),
    ("token id outside the vocabulary", "completions", {**GOOD, "prompt": [1, 10**7]}, AUTH, 400, "token ids must be in"),
    ("prompt longer than a slot", "completions", {**GOOD, "prompt": [100] * (MAX_CONTEXT + 5)}, AUTH, 400,
     f"more than a slot holds: {MAX_CONTEXT} tokens"),
    ("max_tokens 0", "completions", {**GOOD, "max_tokens": 0}, AUTH, 400, "'max_tokens'"),
    ("max_tokens negative", "completions", {**GOOD, "max_tokens": -4}, AUTH, 400, "'max_tokens'"),
    ("max_tokens absurd", "completions", {**GOOD, "max_tokens": 10**12}, AUTH, 400,
     f"more than a slot holds: {MAX_CONTEXT} tokens"),
    ("max_completion_tokens absurd", "chat/completions", {**CHAT, "max_completion_tokens": 10**6}, AUTH, 400,
     "more than a slot holds"),
    ("unknown field", "completions", {**GOOD, "frobnicate": True}, AUTH, 400, "unknown field 'frobnicate'"),
    ("unknown field in a message", "chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "mood": 1}]},
     AUTH, 400, "unknown field"),
    ("temperature out of range", "completions", {**GOOD, "temperature": 3.5}, AUTH, 400, "'temperature'"),
    ("top_p of 0", "completions", {**GOOD, "top_p": 0}, AUTH, 400, "'top_p'"),
    ("several choices", "completions", {**GOOD, "n": 2}, AUTH, 400, "'n'"),
    ("five stop strings", "completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, AUTH, 400, "'stop'"),
    ("a budget that is not a number", "completions", {**GOOD, "budget": "lots"}, AUTH, 400, "is not a number"),
    ("a budget over 1", "completions", {**GOOD, "budget": 2.5}, AUTH, 400, "budget fraction must be in"),
    ("a seed past 64 bits", "completions", {**GOOD, "seed": 2**64}, AUTH, 400, "seed must be an integer in"),
    ("a seed below -2**63", "chat/completions", {**CHAT, "seed": -(2**63) - 1}, AUTH, 400, "seed must be an integer"),
    ("presence_penalty out of range", "completions", {**GOOD, "presence_penalty": 2.5}, AUTH, 400,
     "presence_penalty must be in [-2, 2]"),
    ("frequency_penalty out of range", "chat/completions", {**CHAT, "frequency_penalty": -3}, AUTH, 400,
     "frequency_penalty must be in [-2, 2]"),
    ("a logit_bias key that is not a token id", "completions", {**GOOD, "logit_bias": {"hello": 1}}, AUTH, 400,
     "logit_bias keys must be token ids"),
    ("a logit_bias over 100", "completions", {**GOOD, "logit_bias": {"5": 150}}, AUTH, 400,
     "logit_bias values must be in [-100, 100]"),
    ("a logit_bias past the vocabulary", "chat/completions", {**CHAT, "logit_bias": {str(10**7): 1}}, AUTH, 400,
     "past the vocabulary"),
    ("top_logprobs without logprobs", "chat/completions", {**CHAT, "top_logprobs": 2}, AUTH, 400,
     "top_logprobs needs logprobs: true"),
    ("top_logprobs over 20", "chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, AUTH, 400,
     "must be in [0, 20]"),
    ("completions logprobs over 20", "completions", {**GOOD, "logprobs": 30}, AUTH, 400, "must be in [0, 20]"),
    ("echo with logprobs", "completions", {**GOOD, "echo": True, "logprobs": 1}, AUTH, 400,
     "prompt's log probabilities"),
    ("two prompts in one request", "completions", {**GOOD, "prompt": ["a", "b"]}, AUTH, 400, "one prompt per request"),
    ("several candidates", "completions", {**GOOD, "best_of": 3}, AUTH, 400, "'best_of'"),
    ("a text/plain body", "completions", GOOD, {**AUTH, "Content-Type": "text/plain"}, 415,
     "Content-Type: application/json"),
    ("a form body", "chat/completions", CHAT, {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, 415,
     "Content-Type: application/json"),
    ("body over the size limit", "completions", {**GOOD, "prompt": "x" * (LIMIT + 10)}, AUTH, 413,
     f"limit of {LIMIT} bytes"),
    ("no API key", "completions", GOOD, {}, 401, "API key is required"),
    ("a wrong API key", "completions", GOOD, {"Authorization": "Bearer not-the-key"}, 401, "API key is required"),
    ("a key without Bearer", "chat/completions", CHAT, {"Authorization": KEY}, 401, "API key is required"),
]


def _post(srv, path: str, body, headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{srv.url}/v1/{path}", content=content, timeout=30,
                      headers={"Content-Type": "application/json", **headers})


def _assert_error_shape(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"] and err["type"]
    assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.mark.parametrize("name,path,body,headers,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_and_the_server_goes_on(srv, name, path, body, headers, status, words):
    r = _post(srv, path, body, headers)
    _assert_error_shape(r, status, words)
    # streamed requests are refused the same way, before any event
    if isinstance(body, dict) and "stream" not in body and status != 413:
        _assert_error_shape(_post(srv, path, {**body, "stream": True}, headers), status, words)
    assert complete(srv, "Hello there", max_tokens=3)["usage"]["completion_tokens"] == 3
    r = _post(srv, "chat/completions", CHAT, AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_routes_and_methods(srv):
    _assert_error_shape(httpx.get(f"{srv.url}/v1/nothing-here"), 404, "no route GET /v1/nothing-here")
    _assert_error_shape(httpx.get(f"{srv.url}/v1/completions"), 405, "GET is not allowed")
    _assert_error_shape(httpx.get(f"{srv.url}/v1/models"), 401, "API key")
    _assert_error_shape(httpx.get(f"{srv.url}/metrics"), 401, "API key")
    assert httpx.get(f"{srv.url}/health").status_code == 200  # liveness needs no key
    assert httpx.get(f"{srv.url}/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL


def test_oversized_body_without_a_length_is_refused(srv):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(LIMIT // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    r = httpx.post(f"{srv.url}/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    _assert_error_shape(r, 413, f"limit of {LIMIT} bytes")


def test_outcomes_are_counted(srv):
    before = metrics(srv)
    _post(srv, "completions", GOOD, {})
    _post(srv, "completions", {**GOOD, "max_tokens": 0}, AUTH)
    after = metrics(srv)
    assert after['a2ats_requests_total{outcome="unauthorized"}'] == before['a2ats_requests_total{outcome="unauthorized"}'] + 1
    assert after['a2ats_requests_total{outcome="invalid"}'] == before['a2ats_requests_total{outcome="invalid"}'] + 1
