"""Servers for the HTTP tests: a tiny random Llama whose vocabulary is the default model's tokenizer's, random
codebooks, the real server (uvicorn) on a free port in a background thread."""

from __future__ import annotations

import contextlib
import functools
import time

import httpx
import torch

from a2ats import A2ATSConfig
from a2ats.runtime import Engine
from a2ats.server import HttpServer, ServerConfig
from conftest import random_codebooks

MODEL = "tiny"


@functools.lru_cache(maxsize=None)
def tokenizer():
    """SmolLM2's tokenizer (with its chat template), from the converted default model's folder."""
    from transformers import AutoTokenizer

    from a2ats.assets.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path(log=lambda *_: None))


@functools.lru_cache(maxsize=None)
def tiny_llama(vocab: int, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        max_position_embeddings=2048, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return T.LlamaForCausalLM(cfg).eval()


def engine(slots: int = 4, max_context: int = 512, dense: bool = False, prefix_cache: int = 0) -> Engine:
    model = tiny_llama(len(tokenizer()))
    cb = None if dense else random_codebooks(model)
    # the model's own fp32 arithmetic and selection at every step: a sequence's tokens do not depend on what it is
    # batched with (the dense fallback decides per step for the whole batch)
    select = {} if dense else {"dense_below": 0}
    return Engine(model, cb, A2ATSConfig(budget=0.25, sinks=2, window=8), slots=slots, max_context=max_context,
                  placement="offload", decode_weights="model", prefill_dtype="model", prefix_cache=prefix_cache, **select)


def server(slots: int = 4, max_context: int = 512, dense: bool = False, prefix_cache: int = 0,
           **config) -> HttpServer:
    """A started server; stop it with ``.stop()`` (or use :func:`running`)."""
    eng = engine(slots, max_context, dense, prefix_cache)
    eos = {tokenizer().eos_token_id}
    return HttpServer(eng, tokenizer(), ServerConfig(MODEL, port=0, **config), eos).start()


@contextlib.contextmanager
def running(**kw):
    srv = server(**kw)
    try:
        yield srv
    finally:
        srv.stop()


def slow(srv: HttpServer, seconds: float) -> None:
    """Each engine step takes at least ``seconds`` more: a long generation stays in flight while a test acts."""
    engine = srv.service.engine
    step = engine.step

    def slower():
        time.sleep(seconds)
        return step()

    engine.step = slower


def complete(srv: HttpServer, prompt, max_tokens: int = 8, **kw) -> dict:
    """A non-streamed completion over plain HTTP; the JSON body (asserting 200)."""
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, **kw}, timeout=60, headers=_auth(srv))
    assert r.status_code == 200, r.text
    return r.json()


def metrics(srv: HttpServer) -> dict[str, float]:
    """The /metrics series as {name (with labels): value}."""
    text = httpx.get(f"{srv.url}/metrics", timeout=10, headers=_auth(srv)).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _auth(srv: HttpServer) -> dict[str, str]:
    key = srv.config.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):",
    "Liste des courses : pommes, poires, crème fraîche,",
    "東京は日本の首都で",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "SELECT name, price FROM",
    "Emoji 🙂🚀 and accents éàü:",
    "Dear Sir or Madam,",
    "The mitochondria is",
    "In 1492,",
    "<html><body>",
    "Roses are red, violets are blue,",
    "A long time ago in a galaxy far, far away....",
    "The answer to life, the universe and everything is",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):",
]
