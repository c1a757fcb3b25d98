"""Tensor parallelism: transformers' ``tp_plan="auto"`` under torchrun, gloo on the CPU. N ranks decode the tokens
one process decodes, on the transformers path (reference and fast) and in the lean engine; they find the codebooks
one process cached, and refuse to calibrate; `torchrun -m a2ats generate` prints what one process prints, once;
a rank count that splits KV heads is refused with the counts that work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import tp_worker

from a2ats import kernels
from a2ats.core.codebook import CodebookError, weights_digest
from a2ats.core.distributed import TensorParallelError, check_size, valid_sizes
from a2ats.hf.calibrate import default_codebook_path
from conftest import random_codebooks, tiny_model

DECODERS = ["reference", "engine"] + (["fast"] if kernels.cpu_backend() is not None else [])
# the embedded models: the lean engine and transformers' fast path (the reference path selects what the fast
# path selects, held in tests/integration; on these models it costs most of the time, so the tiny model tests it)
REAL_DECODERS = [d for d in DECODERS if d != "reference"] if "fast" in DECODERS else DECODERS


def torchrun(n: int, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node n ARGS`` (a free port of its own), one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def run_ranks(n: int, spec: dict, tmp_path: Path, env: dict | None = None) -> list[dict]:
    """What each of ``n`` ranks of :mod:`tp_worker` saw for ``spec``."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "ranks"
    out.mkdir()
    p = torchrun(n, [str(Path(tp_worker.__file__)), str(tmp_path / "spec.json"), str(out)], env)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


# Ranks sum their partial o/down products, then sum those across ranks: fp32 sums in another order than one
# process's. That moves an int8 decode copy's activations across rounding steps now and then, and a selection's
# scores across the top-K threshold where random codebooks' coarse codes tie many tokens: on the default model the
# engine's logits at a step with the same inputs differ by ~0.1-0.25 between 3 ranks and one process, by rows or in
# tiles alike (measured; its prefill's by ~1e-5). A greedy token may therefore differ only where one process's logit
# for it lies within that of its top one; a wrong shard moves logits by whole units.
NEAR_TIE = 0.3


@torch.inference_mode()
def one_process(model, codebooks, spec: dict) -> dict[str, tuple[list[int], list]]:
    """Per decoder: its greedy tokens and each step's top five logits (values, token ids)."""
    return {name: tp_worker.decode(model, codebooks, spec, name) for name in spec["decoders"]}


def assert_same_as_one_process(model, codebooks, spec, ranks: list[dict]) -> None:
    want = one_process(model, codebooks, spec)
    for r, seen in enumerate(ranks):
        assert "error" not in seen, seen["error"]
        assert seen["digest"] == weights_digest(model), f"rank {r}: the digest of the whole key projections"
        assert seen["tokens"].keys() == want.keys(), f"rank {r}: decoders {sorted(seen['tokens'])}"
        for name, (tokens, top) in want.items():
            got = seen["tokens"][name]
            assert len(got) == len(tokens), f"rank {r} {name}: {len(got)} tokens, one process {len(tokens)}"
            i = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), None)
            if i is None:
                continue
            values, ids = top[i]
            gap = values[0] - values[ids.index(got[i])] if got[i] in ids else float("inf")
            assert gap <= NEAR_TIE, (
                f"rank {r} {name}: token {i} is {got[i]} against one process's {tokens[i]}, whose logit for it is "
                f"{gap:.3g} below its top one (top five {dict(zip(ids, values))}): {got} against {tokens}")


# -- one process: the rules -------------------------------------------------------------------------------------


def test_a_rank_count_that_splits_kv_heads_is_refused_with_the_counts_that_work():
    cfg = tiny_model("qwen3").config  # 8 query heads, 2 KV heads
    check_size(cfg, 2)
    with pytest.raises(TensorParallelError, match=r"3 tensor-parallel ranks cannot split this model's 2 KV heads.*Run 1 or 2 processes"):
        check_size(cfg, 3)
    assert valid_sizes(12) == [1, 2, 3, 4, 6, 12]


def test_a_rank_keeps_the_codebooks_of_its_heads_addressed_as_before():
    model = tiny_model("llama")  # 2 KV heads
    cb = random_codebooks(model, 16)
    part = cb.for_heads(slice(1, 2))
    assert part.num_kv_heads == 1 and part.heads == slice(1, 2)
    for a, b in zip(part.tensors_for(0, slice(1, 2), torch.device("cpu")), cb.tensors_for(0, slice(1, 2), torch.device("cpu"))):
        assert torch.equal(a, b)
    k = torch.randn(1, 1, 5, 16)
    assert torch.equal(part.encode(1, k, slice(1, 2)), cb.encode(1, k, slice(1, 2)))
    with pytest.raises(CodebookError, match="hold heads 1..1"):
        part.tensors_for(0, slice(0, 1), torch.device("cpu"))
    with pytest.raises(CodebookError, match="one tensor-parallel rank"):
        part.save("/nonexistent/never-written.safetensors")
    assert cb.for_heads(slice(0, 2)) is cb


# -- ranks on the CPU (gloo) ------------------------------------------------------------------------------------


def test_two_ranks_decode_what_one_process_decodes_from_the_cached_codebooks(tmp_path, monkeypatch):
    """A tiny Llama (2 KV heads, an odd vocabulary: uneven logit shards): every decoder, the codebooks found in
    the cache under the digest one process computes; a set not cached is refused on every rank, never calibrated."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path / "cache"))  # where the cache is, here and in the ranks
    cb = random_codebooks(model, 16)
    cb.save(default_codebook_path(model, cb.settings))
    prompt = torch.randint(3, 97, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    missing = {**asdict(cb.settings), "n_centroids": 32}
    spec = dict(model=str(folder), settings=asdict(cb.settings), prompt=prompt, new_tokens=8, decoders=DECODERS,
                missing=missing)
    ranks = run_ranks(2, spec, tmp_path)
    for seen in ranks:  # after decoding, each rank looked for a set not cached: refused, with the command to run
        error = seen.pop("error")
        assert "CodebookError" in error and "does not calibrate" in error and "a2ats calibrate --model" in error
    assert_same_as_one_process(model, cb, spec, ranks)


def _byte_tokenizer(folder: Path):
    """A tokenizer of the 256 bytes and an end token, for a tiny model the CLI can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return len(vocab)


def test_torchrun_generate_prints_what_one_process_prints_once_and_refuses_a_bad_rank_count(tmp_path):
    import transformers as T

    folder = tmp_path / "tiny"
    vocab = _byte_tokenizer(folder)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    cb = random_codebooks(model, 16)
    cb.save(tmp_path / "cb.safetensors")
    (tmp_path / "prompt.txt").write_text("The quick brown fox jumps over the lazy dog. " * 6)
    args = ["generate", "--model", str(folder), "--codebooks", str(tmp_path / "cb.safetensors"), "--prompt-file",
            str(tmp_path / "prompt.txt"), "--no-chat-template", "--max-new-tokens", "12", "--prefill-dtype", "model"]
    one = subprocess.run([sys.executable, "-m", "a2ats", *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-4000:]
    want = one.stdout
    p = torchrun(2, ["-m", "a2ats", *args])
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout == want and want.strip()
    assert p.stderr.count("new tokens at") == 1  # rank 0 alone logs

    odd = tmp_path / "odd"  # 3 KV heads: refused before its weights (there are none) or tokenizer are read
    odd.mkdir()
    T.LlamaConfig(**{**cfg.to_dict(), "num_attention_heads": 6, "num_key_value_heads": 3}).to_json_file(odd / "config.json")
    p = torchrun(2, ["-m", "a2ats", *args[:2], str(odd), *args[3:]])
    assert p.returncode != 0
    assert p.stderr.count("2 tensor-parallel ranks cannot split this model's 3 KV heads") == 1, p.stderr[-4000:]
    assert "Run 1 or 3 processes" in p.stderr


# -- the embedded models ----------------------------------------------------------------------------------------


def _real_prompt(tok, n: int = 300) -> list[int]:
    from a2ats.eval.harness import held_out_ids

    return held_out_ids(tok, n).tolist()


@pytest.mark.default_model
def test_three_ranks_on_the_default_model(default_model, tmp_path):
    """SmolLM2-135M (3 KV heads, tied embeddings) on 3 ranks: a 300-token prompt, 8 new tokens."""
    from a2ats.assets.models import resolve_model

    model, tok = default_model
    cb = random_codebooks(model, 64)
    cb.save(tmp_path / "cb.safetensors")
    spec = dict(model=str(resolve_model(None)), codebooks=str(tmp_path / "cb.safetensors"), prompt=_real_prompt(tok),
                new_tokens=8, decoders=REAL_DECODERS)
    assert_same_as_one_process(model, cb, spec, run_ranks(3, spec, tmp_path))


@pytest.mark.eval_model
def test_two_ranks_on_the_eval_model(tmp_path):
    """Qwen2.5-Coder-0.5B (2 KV heads, q/k/v biases, a 151,936-token vocabulary) on 2 ranks in the lean engine:
    a 300-token prompt, 4 new tokens (its int8 copies alone take ~12 s to pack per process on 2 cores). Skipped
    where its asset packages are missing."""
    from a2ats.assets.models import AssetError, load_model, resolve_model

    try:
        folder = resolve_model("qwen2.5-coder-0.5b", log=lambda *_: None)
    except AssetError as e:
        pytest.skip(f"the evaluation model is not installed here: {e}")
    model, tok = load_model(folder, log=lambda *_: None)
    cb = random_codebooks(model, 64)
    cb.save(tmp_path / "cb.safetensors")
    spec = dict(model=str(folder), codebooks=str(tmp_path / "cb.safetensors"), prompt=_real_prompt(tok),
                new_tokens=4, decoders=["engine"])  # transformers' paths: on the models above (time)
    assert_same_as_one_process(model, cb, spec, run_ranks(2, spec, tmp_path))
