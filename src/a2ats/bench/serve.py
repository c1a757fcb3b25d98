"""`a2ats bench serve`: a load generator for the OpenAI-compatible server, a plain HTTP client (httpx) that knows
nothing of the server's code. ``clients`` concurrent clients take prompts from one queue and stream their
completions; per request it records the time to the first token and the time per output token after it, and
from the server's /metrics counters what the engine itself did (tokens per second of decode and of prefill).

:func:`soak` sends many short requests, streamed and not, and checks that every one was answered exactly once
(one 200 with its own completion id each, and the server's own request counters grown by exactly that many).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass

from a2ats.bench.output import emit, machine
from a2ats.bench.workloads import WORKLOADS, percentile
from a2ats.factory import options
from a2ats.runtime.settings import SERVER_PREFIX_CACHE_GIB

LENGTHS = (1024, 2048, 4096, 8192)
SYSTEMS = ("a2ats", "dense")  # a2ats: K/V in host memory; dense: full attention, the cache beside the model


@dataclass
class Sample:
    """One request as the client saw it."""

    prompt_tokens: int
    status: int = 0
    tokens: int = 0  # completion tokens (the server's usage count)
    seconds: float = 0.0  # request sent to last byte
    ttft: float | None = None  # request sent to the first text
    tpot: float | None = None  # seconds per output token after the first
    id: str | None = None
    error: str | None = None
    left: bool = False  # the client dropped the connection after the first text (a soak's disconnects)


async def _stream(client, url: str, body: dict, headers: dict, leave: bool = False) -> Sample:
    """One streamed request; ``leave``: drop the connection once the first text has arrived."""
    sample = Sample(len(body["prompt"]) if isinstance(body["prompt"], list) else 0)
    t0 = time.perf_counter()
    first = last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            sample.status = r.status_code
            if r.status_code != 200:
                sample.error = (await r.aread()).decode(errors="replace")[:300]
                return sample
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    sample.error = obj["error"].get("message")
                    break
                sample.id = obj.get("id", sample.id)
                if obj.get("usage"):
                    sample.tokens = obj["usage"]["completion_tokens"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                    if leave:
                        sample.left = True
                        break  # leaving the block closes the connection mid-stream
    except Exception as e:  # a dropped connection is a lost request: counted, never hidden
        sample.error = f"{type(e).__name__}: {e}"
    sample.seconds = time.perf_counter() - t0
    if first is not None:
        sample.ttft = first - t0
        if sample.tokens > 1:
            sample.tpot = (last - first) / (sample.tokens - 1)
    return sample


async def _plain(client, url: str, body: dict, headers: dict) -> Sample:
    sample = Sample(len(body["prompt"]) if isinstance(body["prompt"], list) else 0)
    t0 = time.perf_counter()
    try:
        r = await client.post(url, json=body, headers=headers)
        sample.status = r.status_code
        obj = r.json()
        if r.status_code == 200:
            sample.id, sample.tokens = obj["id"], obj["usage"]["completion_tokens"]
        else:
            sample.error = obj.get("error", {}).get("message")
    except Exception as e:
        sample.error = f"{type(e).__name__}: {e}"
    sample.seconds = time.perf_counter() - t0
    return sample


async def _drive(base: str, model: str, prompts: list, clients: int, max_tokens: int, api_key: str | None,
                 streamed: list[bool], leave: list[bool] | None = None) -> tuple[list[Sample], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples: list[Sample | None] = [None] * len(prompts)
    url = f"{base}/v1/completions"

    async def client_loop(client) -> None:
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            if streamed[i]:
                body.update(stream=True, stream_options={"include_usage": True})
                samples[i] = await _stream(client, url, body, headers, leave=bool(leave and leave[i]))
            else:
                samples[i] = await _plain(client, url, body, headers)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return samples, wall


def summarize(system: str, samples: list[Sample], wall: float, clients: int, max_tokens: int) -> dict:
    ok = [s for s in samples if s.status == 200 and s.error is None and not s.left]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    tpot = [s.tpot for s in ok if s.tpot is not None]
    tokens = sum(s.tokens for s in ok)
    lengths = [s.prompt_tokens for s in samples]
    return {"system": system, "clients": clients, "requests": len(samples), "ok": len(ok),
            "errors": [s.error or f"HTTP {s.status}" for s in samples if s not in ok and not s.left][:5],
            "prompt_tokens": [min(lengths), max(lengths)], "max_tokens": max_tokens, "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_ms": _ms(percentile(tpot, 50)), "tpot_p99_ms": _ms(percentile(tpot, 99)),
            "samples": [asdict(s) for s in samples]}


def _ms(x: float | None) -> float | None:
    return None if x is None else 1e3 * x


def server_metrics(base: str, api_key: str | None = None) -> dict[str, float]:
    """The server's /metrics series, {name with labels: value}."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{base}/metrics", headers=headers, timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _answered(m: dict[str, float]) -> int:
    return int(sum(v for k, v in m.items() if k.startswith("a2ats_requests_total{")))


def _engine_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What the engine did during the run, from its own counters: tokens per second of decode (prefill) step time."""
    out: dict[str, float | None] = {}
    for kind in ("decode", "prefill"):
        tokens = after[f"a2ats_{kind}_tokens_total"] - before[f"a2ats_{kind}_tokens_total"]
        seconds = after[f"a2ats_{kind}_seconds_total"] - before[f"a2ats_{kind}_seconds_total"]
        out[f"engine_{kind}_tokens_per_s"] = tokens / seconds if seconds else None
        out[f"engine_{kind}_seconds"] = seconds
    return out


def load(base: str, model: str, prompts: list[list[int]], clients: int, max_tokens: int, system: str,
         api_key: str | None = None) -> dict:
    """``prompts`` (token ids) through ``clients`` concurrent streaming clients; the figures of the run."""
    before = server_metrics(base, api_key)
    samples, wall = asyncio.run(_drive(base, model, prompts, clients, max_tokens, api_key, [True] * len(prompts)))
    res = summarize(system, samples, wall, clients, max_tokens)
    res.update(_engine_rates(before, server_metrics(base, api_key)))
    return res


def soak(base: str, model: str, prompts: list[list[int]], clients: int, max_tokens: int, system: str,
         api_key: str | None = None, disconnect: float = 0.0, seed: int = 0) -> dict:
    """Every prompt once, half streamed and half not, a ``disconnect`` share of the streamed ones dropped by the
    client after their first text; whether each was answered exactly once (as the client counts: one 200 with its
    own completion id per request it waited for; as the server counts: its answers, cancellations included, grew
    by exactly the number sent) and whether every slot and queue place came back (the gauges back to 0)."""
    import random

    if not 0.0 <= disconnect <= 1.0:
        raise ValueError(f"the share of requests dropped mid-stream must be in [0, 1], got {disconnect}")
    before = server_metrics(base, api_key)
    streamed = [i % 2 == 0 for i in range(len(prompts))]
    rng = random.Random(seed)
    leave = [on and rng.random() < disconnect for on in streamed]
    samples, wall = asyncio.run(_drive(base, model, prompts, clients, max_tokens, api_key, streamed, leave))
    deadline, after = time.monotonic() + 60, server_metrics(base, api_key)
    while (after["a2ats_busy_slots"] or after["a2ats_queue_depth"]) and time.monotonic() < deadline:
        time.sleep(0.2)  # a dropped request frees its slot at the engine's next step
        after = server_metrics(base, api_key)
    answered = _answered(after) - _answered(before)
    res = summarize(system, samples, wall, clients, max_tokens)
    res.update(_engine_rates(before, after))
    ids = [s.id for s in samples if s.id is not None and not s.left]
    left = sum(s.left for s in samples)
    leaked = int(after["a2ats_busy_slots"] + after["a2ats_queue_depth"])
    res.update(soak=True, server_answered=answered, unique_ids=len(set(ids)), left=left, leaked=leaked,
               exactly_once=answered == len(prompts) and res["ok"] == len(prompts) - left == len(set(ids))
               and leaked == 0)
    return res


def table(rows: list[dict]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| system | clients | requests (ok) | prompt tokens | max new | requests/s | output tokens/s | "
             "engine decode tokens/s | engine prefill tokens/s | TTFT p50 / p99 (s) | per-token p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["prompt_tokens"]
        lines.append(f"| {r['system']}{' (soak)' if r.get('soak') else ''} | {r['clients']} | {r['requests']} ({r['ok']}) | "
                     f"{lo}-{hi} | {r['max_tokens']} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | "
                     f"{f(r.get('engine_decode_tokens_per_s'), '.1f')} | {f(r.get('engine_prefill_tokens_per_s'), '.0f')} | "
                     f"{f(r['ttft_p50_s'], '.2f')} / {f(r['ttft_p99_s'], '.2f')} | "
                     f"{f(r['tpot_p50_ms'], '.1f')} / {f(r['tpot_p99_ms'], '.1f')} |")
    soaks = [r for r in rows if r.get("soak")]
    for r in soaks:
        dropped = f", {r['left']} dropped by the client mid-stream" if r.get("left") else ""
        lines.append(f"\nsoak ({r['system']}): {r['requests']} requests{dropped}, {r['ok']} answered 200 with "
                     f"{r['unique_ids']} distinct ids; the server counted {r['server_answered']} answers, and "
                     f"{r.get('leaked', 0)} slots or queue places were still held after: "
                     f"{'every request answered exactly once' if r['exactly_once'] else 'NOT exactly once'}")
    return "\n".join(lines) + "\n"


def prompts_for(tok, lengths, count: int, new_tokens: int, skip: int = 0) -> list[list[int]]:
    """``count`` chat prompts cycling through ``lengths``: a window of the essays to summarize, each its own, so
    that the prompt and ``new_tokens`` fill about (at most) that many tokens."""
    from a2ats.assets.corpus import essays
    from a2ats.hf.generate import encode_prompt

    ids = tok.encode("\n\n".join(essays()), add_special_tokens=False)
    ask = "\n\nSummarize the text above in a few sentences."
    margin = 64  # the chat template and the question
    prompts = []
    for i in range(count):
        n = lengths[i % len(lengths)] - new_tokens - margin
        at = (104729 * (skip + i)) % (len(ids) - n)  # windows spread over the essays
        prompts.append(encode_prompt(tok, tok.decode(ids[at : at + n]) + ask)[0].tolist())
    return prompts


def add_arguments(p) -> None:
    options.add_model_args(p)
    options.add_selection_args(p)
    options.add_runtime_args(p, "path", "decode_weights", "prefill_dtype")
    options.add_codebook_args(p)
    p.add_argument("--lengths", type=options.csv(int),
                   help=f"prompt lengths, cycled through (default {','.join(map(str, LENGTHS))})")
    p.add_argument("--requests", type=int, default=0, help="requests per system (default: 4 per client)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients, each streaming one request at a time")
    p.add_argument("--slots", type=int, default=4, help="the server's slots")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--serve-systems", type=options.csv(str), default=SYSTEMS,
                   help="a2ats (K/V in host memory) and/or dense (full attention, the cache beside the model)")
    p.add_argument("--disconnect", type=float, default=0.0, metavar="P",
                   help="the soak's share of streamed requests the client drops after their first text (default 0)")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="then N short requests (half streamed) to the first system, each checked answered exactly once")
    p.add_argument("--workload", choices=("summaries", *WORKLOADS), default="summaries",
                   help="summaries (the default): essay windows of --lengths through --clients closed-loop clients; "
                        "docqa: --documents documents of --doc-tokens tokens, --questions questions each; chat: "
                        "--conversations conversations of --turns turns growing from --doc-tokens; both streamed "
                        "through the openai client, arriving as a Poisson process of --rate per second")
    p.add_argument("--documents", type=int, default=2, help="docqa: documents")
    p.add_argument("--questions", type=int, default=4, help="docqa: questions per document")
    p.add_argument("--doc-tokens", type=int, default=16384, help="docqa: tokens per document; chat: its first turn's")
    p.add_argument("--conversations", type=int, default=2, help="chat: conversations")
    p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--rate", type=float, default=0.05, help="docqa: requests, chat: conversations, per second")
    p.add_argument("--warm", action="store_true",
                   help="docqa: ask each document once before the timed run (one word), so every timed question "
                        "finds its document in the server's prefix cache: the cached-document case")
    options.add_prefill_args(p)
    p.add_argument("--prefix-cache", type=float, default=SERVER_PREFIX_CACHE_GIB, metavar="GIB",
                   help=f"our server's prefix cache in GiB (default {SERVER_PREFIX_CACHE_GIB:g}; 0: none), as "
                        "`a2ats serve --prefix-cache`")
    p.add_argument("--base-url", help="load this OpenAI-compatible server instead of starting ours (e.g. llama.cpp's "
                                      "llama-server: http://127.0.0.1:8080); docqa and chat only")
    p.add_argument("--served-model", help="--base-url: the model name it serves (default: the one it lists first)")
    p.add_argument("--out", help="folder for serve.json and serve.md")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def _workload(a, tok):
    """The workload's requests and how to run them against a base URL: ``run(base, model, key) -> row``."""
    from a2ats.bench import workloads as w

    for name in ("documents", "questions", "doc_tokens", "conversations", "turns"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.rate > 0:
        raise ValueError(f"--rate must be > 0 (arrivals per second), got {a.rate}")
    if a.warm and a.workload != "docqa":
        raise ValueError("--warm asks each document of the docqa workload once first: add --workload docqa or drop it")
    requests = None
    if a.workload == "docqa":
        requests = w.docqa_requests(tok, a.documents, a.doc_tokens, a.questions)
        need = a.doc_tokens + 128 + a.max_new_tokens

        def go(base, model, key):
            return w.run_docqa(base, model, requests, a.rate, a.max_new_tokens, key)
    else:
        conversations = w.chat_turns(tok, a.conversations, a.turns, a.doc_tokens)
        need = a.doc_tokens + a.turns * (64 + a.max_new_tokens) + 128

        def go(base, model, key):
            return w.run_chat(base, model, conversations, a.rate, a.max_new_tokens, key)

    def run(base: str, model: str, key: str | None, system: str) -> dict:
        warm = asyncio.run(w.warm_docqa(base, model, requests, key)) if a.warm else []
        before = server_metrics(base, key) if not a.base_url else {}
        exchanges, wall = asyncio.run(go(base, model, key))
        row = w.summarize(system, a.workload, exchanges, wall)
        if a.warm:  # each document's prefill alone, before the run: a cold prompt's TTFT
            row["warm"] = [{"status": e.status, "prompt_tokens": e.prompt_tokens, "ttft_s": e.ttft} for e in warm]
        if not a.base_url:
            after = server_metrics(base, key)
            row.update(_engine_rates(before, after))
            row.update(w.prefix_rates(before, after))
            row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # the server's process
        return row

    return run, need


def main(a, http_server) -> int:
    """The HTTP server under load: N concurrent streaming clients, A²ATS and full attention, then a soak run.
    ``http_server(a, model, tok, dense=..., max_context=..., port=0, log_level=..., placement=...)``: the server
    to load (the command line hands in :func:`a2ats.server.cli.http_server`; bench does not import the server)."""
    if a.soak < 0:
        raise ValueError(f"--soak must be >= 0, got {a.soak}")
    unknown = [s for s in a.serve_systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if a.workload != "summaries":
        return _main_workload(a, http_server)
    if a.base_url:
        raise ValueError("--base-url loads another server with the docqa or chat workload: add --workload")
    model, tok = options.load(a)
    lengths = a.lengths or LENGTHS
    requests = a.requests or 4 * a.clients
    prompts = prompts_for(tok, lengths, requests, a.max_new_tokens)
    short = prompts_for(tok, (128, 256), a.soak, 8, skip=requests)  # the soak's
    max_context = max([len(p) + a.max_new_tokens for p in prompts] + [len(p) + 8 for p in short])
    rows = []
    for n, system in enumerate(a.serve_systems):
        dense = system == "dense"
        placement = "local" if dense else "offload"
        server = http_server(a, model, tok, dense=dense, max_context=max_context, port=0, log_level="warning",
                             placement=placement, prefill_budget=a.prefill_budget,
                             prefill_stall=a.prefill_stall, prefill_step_seconds=a.prefill_step_seconds).start()
        try:
            options.log(f"{system}: {requests} requests of {min(lengths)}-{max(lengths)} tokens, {a.clients} clients, "
                        f"{a.slots} slots")
            rows.append(load(server.url, server.config.model_name, prompts, a.clients, a.max_new_tokens,
                             f"{system} ({placement})", server.config.api_key))
            if a.soak and n == 0:  # on the first system
                options.log(f"{system}: soak, {a.soak} short requests through {max(a.clients, 2 * a.slots)} clients")
                rows.append(soak(server.url, server.config.model_name, short, max(a.clients, 2 * a.slots), 8,
                                 f"{system} ({placement})", server.config.api_key, disconnect=a.disconnect))
        finally:
            server.stop()
    res = {"machine": machine(), "model": options.model_label(a), "dtype": a.dtype,
           "budget": options.config(a).budget_label, "slots": a.slots, "command": "a2ats " + " ".join(sys.argv[1:]),
           "prefill_budget": a.prefill_budget, "prefill_stall": a.prefill_stall, "rows": rows}
    emit(res, table(rows), "serve", a.out, None, a.json, options.log)
    lost = [r for r in rows if r.get("soak") and not r["exactly_once"]]
    return 1 if lost else 0


def _main_workload(a, http_server) -> int:
    """docqa or chat, against our server (each of --serve-systems) or another one at --base-url."""
    from a2ats.bench.workloads import workload_table

    unknown = [s for s in a.serve_systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    model, tok = options.load(a)  # its tokenizer measures the documents (and, ours, it is the model served)
    run, need = _workload(a, tok)
    rows = []
    if a.base_url:
        base = a.base_url.rstrip("/")
        name = a.served_model or _served_model(base, a)
        options.log(f"{a.workload} against {base} ({name})")
        rows.append(run(base, name, getattr(a, "api_key", None), f"external ({name})"))
    else:
        for system in a.serve_systems:
            dense = system == "dense"
            placement = "local" if dense else "offload"
            server = http_server(a, model, tok, dense=dense, max_context=need, port=0, log_level="warning",
                                 placement=placement, prefix_cache=int(a.prefix_cache * (1 << 30)),
                                 prefill_budget=a.prefill_budget, prefill_stall=a.prefill_stall,
                                 prefill_step_seconds=a.prefill_step_seconds).start()
            try:
                options.log(f"{system}: {a.workload}, {a.slots} slots")
                rows.append(run(server.url, server.config.model_name, server.config.api_key, f"{system} ({placement})"))
            finally:
                server.stop()
    res = {"machine": machine(), "model": options.model_label(a), "dtype": a.dtype,
           "budget": options.config(a).budget_label, "slots": a.slots, "command": "a2ats " + " ".join(sys.argv[1:]),
           "workload": a.workload, "prefill_budget": a.prefill_budget, "prefill_stall": a.prefill_stall, "rows": rows}
    emit(res, workload_table(rows), "serve", a.out, None, a.json, options.log)
    return 1 if any(r["ok"] < r["requests"] for r in rows) else 0


def _served_model(base: str, a) -> str:
    import httpx

    key = getattr(a, "api_key", None)
    r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)
    return r.json()["data"][0]["id"]
