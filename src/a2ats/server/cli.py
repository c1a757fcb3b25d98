"""``a2ats serve``: a prompts file through the engine's continuous batching (a JSON line out per completion), or
with ``--http`` the OpenAI-compatible server. Either way the engine is built through :func:`a2ats.factory.decoder`.
FastAPI and uvicorn are imported only for ``--http``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from a2ats.assets.models import DEFAULT_MODEL, MODELS
from a2ats.factory import options
from a2ats.factory.options import log
from a2ats.hf.generate import encode_prompt
from a2ats.runtime import Request
from a2ats.runtime.settings import SERVER_PREFIX_CACHE_GIB
from a2ats.server.config import API_KEY_ENV, ServerConfig

KV_DTYPES = {"model": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
HTTP_CONTEXT = 8192  # --http: tokens per slot at most, unless --max-context says


def add_http_args(p) -> None:
    c = ServerConfig
    p.add_argument("--http", action="store_true", help="an OpenAI-compatible HTTP server (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /health, /metrics) instead of a prompts file")
    p.add_argument("--host", default=None, help=f"--http: address to listen on (default {c.host}: this machine only)")
    p.add_argument("--port", type=int, default=None, help=f"--http: port (default {c.port}; 0: any free one)")
    p.add_argument("--api-key", help=f"--http: require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none; "
                                     "the variable keeps the key out of the process list)")
    p.add_argument("--max-queue", type=int, default=None,
                   help=f"--http: requests waiting for a slot before 429 (default {c.max_queue})")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help=f"--http: larger request bodies are answered 413 (default {c.max_body_bytes})")
    p.add_argument("--drain-seconds", type=float, default=None,
                   help=f"--http: after SIGTERM, how long requests in flight may finish before they are answered 503 "
                        f"(default {c.drain_seconds:g})")


def _gib(value: float) -> int:
    """``--prefix-cache`` in bytes."""
    if not value >= 0:
        raise ValueError(f"--prefix-cache takes GiB >= 0 (0: no prefix cache), got {value}")
    return int(value * (1 << 30))


def add_arguments(p) -> None:
    options.add_model_args(p)
    options.add_selection_args(p)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"new tokens per prompt that does not say (default {ServerConfig.default_max_tokens})")
    options.add_runtime_args(p, "path", "decode_weights", "prefill_dtype")
    options.refuse(p, "--runtime", "`a2ats serve` runs the lean engine (continuous batching over slots); transformers' "
                   "generate answers one prompt at a time (`a2ats generate --runtime transformers`): drop --runtime")
    options.add_codebook_args(p)
    p.add_argument("prompts", nargs="?", help='file of prompts: JSON lines {"prompt": ..., "max_new_tokens": ..., "id": ...} '
                   "or one per line (not with --http)")
    p.add_argument("--slots", type=int, default=4, help="sequences decoding together (the batch)")
    p.add_argument("--max-context", type=int, help="tokens per slot (default: the longest prompt + its new tokens; "
                                                   f"--http: the model's context, at most {HTTP_CONTEXT})")
    add_http_args(p)
    p.add_argument("--placement", choices=["offload", "local"], default="offload",
                   help="offload: K/V in host memory, selection beside the model (the paper's system); local: K/V beside the model")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="model",
                   help="how K/V are stored: model (the default): the checkpoint's 16-bit precision, bf16, for a float32 "
                        "model loaded from a bf16 or fp16 checkpoint with K/V in host memory, else the model's dtype; "
                        "float32; bfloat16 (half the host bytes of float32); or int8 with a scale per row (a quarter)")
    options.add_prefill_args(p)
    p.add_argument("--prefix-cache", type=float, default=SERVER_PREFIX_CACHE_GIB, metavar="GIB",
                   help=f"host memory for prompt prefixes already prefilled, in GiB (default {SERVER_PREFIX_CACHE_GIB:g}; 0: "
                        "none): a prompt that begins with one (a document asked again, a chat's earlier turns) "
                        "copies its K/V and codes instead of prefilling them")
    p.add_argument("--dense", action="store_true", help="full attention instead of A²ATS (the baseline)")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as they are, without the chat template")
    p.add_argument("--out", help="append completions to this file (default: stdout), one JSON line each, as they finish")


def read_prompts(path: str, default_new: int) -> list[dict]:
    """JSON lines ({"prompt": ..., "max_new_tokens": ..., "id": ...}) or, for other files, one prompt per line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); give one JSON object or one plain prompt per line") from None
                if not isinstance(obj.get("prompt"), str):
                    raise ValueError(f'{path}:{n}: a JSON line needs a "prompt" string')
            else:
                obj = {"prompt": line.rstrip("\n")}
            obj.setdefault("max_new_tokens", default_new)
            obj.setdefault("id", len(items))
            items.append(obj)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def server_config(a, port: int | None = None) -> ServerConfig:
    """The HTTP server's settings: those given, the dataclass's defaults for the rest (``port``: instead of --port)."""
    name = a.model if a.model in MODELS else Path(a.model).name if a.model else DEFAULT_MODEL
    given = {k: getattr(a, k) for k in ("host", "port", "max_queue", "max_body_bytes", "drain_seconds")
             if getattr(a, k, None) is not None}
    if port is not None:
        given["port"] = port
    if getattr(a, "max_new_tokens", None) is not None:
        given["default_max_tokens"] = a.max_new_tokens
    return ServerConfig(name, api_key=getattr(a, "api_key", None) or os.environ.get(API_KEY_ENV), **given)


def _http():
    """The server's classes; without the `serve` extra, an error that says how to install it."""
    try:
        from a2ats.server.run import HttpServer
        from a2ats.server.service import stop_token_ids
    except ImportError as e:
        raise ValueError(f"the HTTP server needs fastapi and uvicorn ({e}): pip install 'a2ats[serve]'") from None
    return HttpServer, stop_token_ids


def http_server(a, model, tok, *, dense: bool, max_context: int, port: int | None = None, log_level: str = "info",
                **engine):
    """The HTTP server over an engine of ``a``'s selection (``dense``: full attention) with ``--slots`` slots of
    ``max_context`` tokens (the cache allocated now, after the memory preflight); ``engine``: its other settings."""
    HttpServer, stop_token_ids = _http()
    config = server_config(a, port)
    eng = options.decoder(a, model, tok, dense=dense, slots=a.slots, max_context=max_context, **engine)
    return HttpServer(eng, tok, config, stop_token_ids(tok, model), log_level=log_level)


def _serve_http(a) -> int:
    model, tok = options.load(a)
    limit = getattr(model.config, "max_position_embeddings", None) or HTTP_CONTEXT
    server = http_server(a, model, tok, dense=a.dense, max_context=a.max_context or min(limit, HTTP_CONTEXT),
                         placement=a.placement, kv_dtype=KV_DTYPES[a.kv_dtype], prefill_budget=a.prefill_budget,
                         prefill_stall=a.prefill_stall, prefill_step_seconds=a.prefill_step_seconds,
                         prefix_cache=_gib(a.prefix_cache))
    engine, config = server.service.engine, server.config
    log(f"serving {config.model_name} ({engine.method_name}, {engine.slots} slots x {engine.max_context} tokens, "
        f"up to {config.max_queue} waiting) on http://{config.host}:{config.port}/v1; API key "
        f"{'required' if config.api_key else 'not required'}; SIGTERM drains")
    return server.run()


def main(a) -> int:
    if (a.prompts is None) != a.http:
        raise ValueError("give a prompts file (JSON lines mode) or --http (the HTTP server), not both" if a.http
                         else "give a prompts file, or --http for the HTTP server")
    if a.http:
        server_config(a)  # port, queue, limits, key (and the server's packages) refused before the model loads
        _http()
        return _serve_http(a)
    items = read_prompts(a.prompts, a.max_new_tokens or ServerConfig.default_max_tokens)
    model, tok = options.load(a)
    reqs = [Request(encode_prompt(tok, it["prompt"], chat_template=not a.no_chat_template)[0], int(it["max_new_tokens"]),
                    it["id"]) for it in items]
    need = max(len(r.prompt) + r.max_new_tokens for r in reqs)
    engine = options.decoder(a, model, tok, slots=a.slots, max_context=a.max_context or need, placement=a.placement,
                             kv_dtype=KV_DTYPES[a.kv_dtype], prefill_budget=a.prefill_budget,
                             prefill_stall=a.prefill_stall, prefill_step_seconds=a.prefill_step_seconds,
                             prefix_cache=_gib(a.prefix_cache))
    out = open(a.out, "a", encoding="utf-8") if a.out else sys.stdout

    def write(i, c):  # each completion is written (and flushed) as it finishes: a later failure loses nothing
        text = tok.decode(c.tokens[:-1] if c.finish_reason == "eos" else c.tokens)
        out.write(json.dumps({"id": c.id, "completion": text, "prompt_tokens": c.prompt_tokens,
                              "new_tokens": len(c.tokens), "finish_reason": c.finish_reason,
                              **({"error": c.error} if c.error else {})}) + "\n")
        out.flush()

    log(f"serving {len(reqs)} prompts through {a.slots} slots of {engine.max_context} tokens "
        f"({engine.method_name}, K/V {'in host memory' if a.placement == 'offload' else 'beside the model'})")
    res = engine.serve(reqs, eos_token_id=tok.eos_token_id, on_finish=write)
    if res.stats is not None:
        log(res.stats.summary())
    log(f"{sum(len(c.tokens) for c in res.completions)} tokens: {res.tokens_per_s:.1f} decode tokens/s, "
        f"{res.served_tokens_per_s:.1f} tokens/s with prefills ({res.prefill_seconds:.1f} s prefill, "
        f"{res.decode_seconds:.1f} s decode)")
    if a.out:
        out.close()
    return 0
