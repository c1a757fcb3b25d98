"""SIGTERM drains: no new requests, those in flight finish (or are answered 503 after the grace period), exit 0.
In process (the drain itself) and as a real `a2ats serve --http` process sent SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from http_harness import MODEL, PROMPTS, server, slow, tiny_llama, tokenizer


def _stream(url: str, body: dict, out: list) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        out.append(r.status_code)
        out.extend(line for line in r.iter_lines() if line)


def test_drain_lets_requests_in_flight_finish():
    srv = server(slots=2, max_context=256)
    slow(srv, 0.02)
    url, events = srv.url, []
    t = threading.Thread(target=_stream, args=(url, {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40,
                                                     "temperature": 0}, events))
    t.start()
    while len(events) < 2:  # 200, then the first token
        time.sleep(0.01)
    stopper = threading.Thread(target=srv.stop, kwargs={"drain": True})
    stopper.start()
    while not srv.service.draining:
        time.sleep(0.01)
    try:  # refused: 503 until uvicorn has closed its socket (it looks every 0.1 s), then no connection at all
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass
    t.join(30)
    stopper.join(30)
    assert events[0] == 200 and events[-1] == "data: [DONE]"
    final = json.loads(events[-2][6:])
    assert final["choices"][0]["finish_reason"] == "length"
    assert not srv._thread.is_alive()


def test_drain_answers_503_after_the_grace_period():
    srv = server(slots=1, max_context=512, drain_seconds=0.3)
    slow(srv, 0.05)
    url, events, plain = srv.url, [], []
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0}
    streamed = threading.Thread(target=_stream, args=(url, body, events))
    streamed.start()
    while len(events) < 2:
        time.sleep(0.01)
    waiting = threading.Thread(target=lambda: plain.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
    waiting.start()  # queued behind the first (one slot)
    while srv.service.worker.outstanding < 2:
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop(drain=True)
    assert time.monotonic() - t0 < 10
    streamed.join(10)
    waiting.join(10)
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "shutting_down" and "grace period" in error["message"]
    assert plain[0].status_code == 503 and "grace period" in plain[0].json()["error"]["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_and_exits_0(tmp_path):
    """The command line's server: SIGTERM while a request streams; the request completes, the process exits 0."""
    folder = tmp_path / "tiny"
    tiny_llama(len(tokenizer())).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "a2ats", "serve", "--http", "--model", str(folder), "--dense",
                             "--port", str(port), "--slots", "2", "--max-context", "512", "--drain-seconds", "20"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "A2ATS_API_KEY": "sesame"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": "Bearer sesame"}
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0, (tmp_path / "server.log").read_text()
        assert "draining: no new requests; 1 in flight" in (tmp_path / "server.log").read_text()
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
