"""Long-context serving workloads for `a2ats bench serve --workload`, driven through the official openai client
against any OpenAI-compatible base URL (ours, or llama.cpp's llama-server):

- ``docqa``: a few long documents (State of the Union addresses, a document each), several questions on each,
  the requests arriving as a Poisson process; every question repeats its document first, so a prefix cache
  serves all but the first question of a document.
- ``chat``: conversations that grow turn by turn (each turn sends every earlier turn and the answers the server
  gave), the conversations running side by side, each starting after a Poisson wait.

Per request the client records the time to the first text and every gap between two text chunks (inter-token
latency as a user sees it); :func:`summarize` reports rates and percentiles over them.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

WORKLOADS = ("docqa", "chat")


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0-100) of ``xs``; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 100)) - 1))]


@dataclass
class Exchange:
    """One request as the client saw it."""

    conversation: int
    turn: int
    status: str = "ok"  # or the error's text
    prompt_tokens: int = 0  # the server's usage count
    tokens: int = 0
    sent: float = 0.0  # seconds after the run began
    seconds: float = 0.0  # sent to last chunk
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive text chunks


def documents(tok, count: int, tokens: int) -> list[str]:
    """``count`` different documents of about ``tokens`` tokens each: consecutive State of the Union addresses
    joined until long enough, cut at that many tokens."""
    from a2ats.assets.corpus import speeches

    texts, out, i = speeches(), [], 0
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tok.encode(texts[i % len(texts)] + "\n\n", add_special_tokens=False)
            i += 1
        out.append(tok.decode(ids[:tokens]))
    return out


def docqa_requests(tok, docs: int, doc_tokens: int, questions: int) -> list[tuple[int, list[dict]]]:
    """(document, messages) per request, the documents' questions interleaved: d0 q0, d1 q0, ..., d0 q1, ..."""
    texts = documents(tok, docs, doc_tokens)
    out = []
    for q in range(questions):
        for d, text in enumerate(texts):
            ask = (f"Question {q + 1}: in two sentences, what does part {q % 4 + 1} of the four parts of the address "
                   "above say?")
            out.append((d, [{"role": "system", "content": "Answer from the document the user gives."},
                            {"role": "user", "content": text + "\n\n" + ask}]))
    return out


def chat_turns(tok, conversations: int, turns: int, first_tokens: int) -> list[list[str]]:
    """Each conversation's user messages: a document of ``first_tokens`` tokens to discuss, then follow-ups."""
    texts = documents(tok, conversations, first_tokens)
    follow = ["Summarize it in three sentences.", "What is the most important point?", "Say more about that.",
              "Which part did you leave out?", "Give one quotation from it.", "What would a critic say?"]
    return [[text + "\n\nWhat is this text about?"] + [follow[t % len(follow)] for t in range(turns - 1)]
            for text in texts]


async def _ask(client, model: str, messages: list[dict], max_tokens: int, ex: Exchange, t0: float) -> str:
    """Stream one chat completion into ``ex``; its text."""
    ex.sent = time.perf_counter() - t0
    start = last = time.perf_counter()
    parts: list[str] = []
    try:
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                ex.prompt_tokens, ex.tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                now = time.perf_counter()
                if ex.ttft is None:
                    ex.ttft = now - start
                else:
                    ex.gaps.append(now - last)
                last = now
                parts.append(text)
    except Exception as e:
        ex.status = f"{type(e).__name__}: {e}"[:300]
    ex.seconds = time.perf_counter() - start
    return "".join(parts)


def _client(base: str, api_key: str | None, connections: int):
    import httpx
    import openai

    http = httpx.AsyncClient(timeout=httpx.Timeout(3600.0),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key or "unused", max_retries=0, http_client=http)


def warm_requests(requests: list[tuple[int, list[dict]]]) -> list[tuple[int, list[dict]]]:
    """One request per document that is none of its questions: its messages up to the document, then an
    instruction to answer in a word. Sent before the timed run, it leaves each document in the server's prefix
    cache, so the timed questions measure the cached-document case."""
    first: dict[int, list[dict]] = {}
    for doc, messages in requests:
        first.setdefault(doc, messages)
    return [(doc, messages[:-1] + [{"role": "user", "content": messages[-1]["content"].rsplit("\n\n", 1)[0]
                                    + "\n\nReply with one word: ready."}]) for doc, messages in first.items()]


async def warm_docqa(base: str, model: str, requests: list[tuple[int, list[dict]]],
                     api_key: str | None = None) -> list[Exchange]:
    """:func:`warm_requests`, one after the other; their exchanges (a document's prefill is its TTFT)."""
    client = _client(base, api_key, 1)
    out, t0 = [], time.perf_counter()
    for doc, messages in warm_requests(requests):
        ex = Exchange(doc, -1)
        await _ask(client, model, messages, 1, ex, t0)
        out.append(ex)
    await client.close()
    return out


async def run_docqa(base: str, model: str, requests: list[tuple[int, list[dict]]], rate: float, max_tokens: int,
                    api_key: str | None = None, seed: int = 0) -> tuple[list[Exchange], float]:
    """Every request, sent at Poisson arrival times of ``rate`` per second (each waits for nothing else)."""
    rng = random.Random(seed)
    client = _client(base, api_key, len(requests))
    t0 = time.perf_counter()
    at, tasks, exchanges = 0.0, [], []
    for i, (doc, messages) in enumerate(requests):
        at += rng.expovariate(rate)
        ex = Exchange(doc, i)
        exchanges.append(ex)

        async def one(ex=ex, messages=messages, at=at):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            await _ask(client, model, messages, max_tokens, ex, t0)

        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    return exchanges, wall


async def run_chat(base: str, model: str, conversations: list[list[str]], rate: float, max_tokens: int,
                   api_key: str | None = None, seed: int = 0) -> tuple[list[Exchange], float]:
    """Each conversation turn by turn (a turn is sent when the previous answer has arrived), conversations side
    by side, each starting at a Poisson arrival time of ``rate`` per second."""
    rng = random.Random(seed)
    client = _client(base, api_key, len(conversations))
    t0 = time.perf_counter()
    exchanges: list[Exchange] = []

    async def converse(c: int, users: list[str], at: float) -> None:
        await asyncio.sleep(at)
        messages: list[dict] = []
        for t, text in enumerate(users):
            messages.append({"role": "user", "content": text})
            ex = Exchange(c, t)
            exchanges.append(ex)
            answer = await _ask(client, model, messages, max_tokens, ex, t0)
            if ex.status != "ok":
                return
            messages.append({"role": "assistant", "content": answer})

    starts, at = [], 0.0
    for _ in conversations:
        at += rng.expovariate(rate)
        starts.append(at)
    await asyncio.gather(*(converse(c, users, s) for c, (users, s) in enumerate(zip(conversations, starts))))
    wall = time.perf_counter() - t0
    await client.close()
    return exchanges, wall


def summarize(system: str, workload: str, exchanges: list[Exchange], wall: float) -> dict:
    ok = [e for e in exchanges if e.status == "ok"]
    gaps = [g for e in ok for g in e.gaps]
    ttft = [e.ttft for e in ok if e.ttft is not None]
    tokens = sum(e.tokens for e in ok)
    decode_s = sum(sum(e.gaps) for e in ok)  # a sequence's tokens after its first, over the time they took

    def ms(x):
        return None if x is None else 1e3 * x

    return {"system": system, "workload": workload, "requests": len(exchanges), "ok": len(ok),
            "errors": [e.status for e in exchanges if e.status != "ok"][:5],
            "prompt_tokens": [min((e.prompt_tokens for e in ok), default=0), max((e.prompt_tokens for e in ok), default=0)],
            "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall if wall else 0.0,
            "sequence_tokens_per_s": len(gaps) / decode_s if decode_s else None,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)),
            "exchanges": [e.__dict__ for e in exchanges]}


def prefix_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The prefix cache's hit rate and tokens reused during the run, from the server's counters (ours only)."""
    if "a2ats_prefix_cache_lookups_total" not in after:
        return {"prefix_hit_rate": None, "prefix_tokens_reused": None}
    lookups = after["a2ats_prefix_cache_lookups_total"] - before["a2ats_prefix_cache_lookups_total"]
    hits = after["a2ats_prefix_cache_hits_total"] - before["a2ats_prefix_cache_hits_total"]
    return {"prefix_hit_rate": hits / lookups if lookups else None,
            "prefix_tokens_reused": after["a2ats_prefix_cache_tokens_reused_total"]
            - before["a2ats_prefix_cache_tokens_reused_total"]}


def workload_table(rows: list[dict]) -> str:
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    lines = ["| system | workload | requests (ok) | prompt tokens | wall s | requests/s | output tok/s | "
             "per-sequence tok/s | TTFT p50 / p99 s | inter-token p50 / p99 ms | prefix hit rate | peak RSS GiB |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['workload']} | {r['requests']} ({r['ok']}) | "
                     f"{r['prompt_tokens'][0]}–{r['prompt_tokens'][1]} | {r['wall_s']:.1f} | "
                     f"{r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.2f} | {f(r['sequence_tokens_per_s'], '.1f')} | "
                     f"{f(r['ttft_p50_s'], '.2f')} / {f(r['ttft_p99_s'], '.2f')} | "
                     f"{f(r['itl_p50_ms'], '.0f')} / {f(r['itl_p99_ms'], '.0f')} | {f(r.get('prefix_hit_rate'), '.2f')} | "
                     f"{f(r.get('peak_rss_gib'), '.2f')} |")
    return "\n".join(lines) + "\n"
