"""The factory picks the runtime and path asked for, and refuses by name what cannot run."""

import pytest
import torch

from a2ats import A2ATS, A2ATSConfig, factory, kernels
from a2ats.methods.registry import build_method
from a2ats.runtime import Engine
from conftest import padded_batch, random_codebooks, tiny_model


def test_decoder_picks_the_engine_where_it_runs_and_transformers_elsewhere():
    model = tiny_model("llama")
    cb, cfg = random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8)
    fast = kernels.cpu_backend() is not None
    eng = factory.decoder(model, cb, cfg)
    assert isinstance(eng, Engine) and eng.path == ("fast" if fast else "reference") and eng.method.name == "a2ats-banded"
    ref = factory.decoder(model, cb, cfg, path="reference")
    assert isinstance(ref, A2ATS) and ref.path == "reference"
    assert isinstance(factory.decoder(model, cb, cfg, path="reference", runtime="engine"), Engine)
    hf = factory.decoder(model, cb, cfg, runtime="transformers")
    assert isinstance(hf, A2ATS) and hf.path == ("fast" if fast else "reference")
    assert factory.describe(hf) == ("fast path: transformers' generate + kernels" if fast else
                                    "reference path: selection applied as a mask on one device, for accuracy, not speed")
    assert factory.describe(ref).startswith("reference path") and "lean engine" in factory.describe(eng)
    assert "int8 decode weights" in factory.describe(factory.decoder(model, cb, cfg, runtime="engine"))
    assert factory.decoder(model).method is None  # no codebooks: the dense engine
    # a method the engine does not run goes to transformers, on the reference path
    said = []
    hybrid = factory.decoder(model, config=cfg, method=build_method("a2ats-hybrid0.5", model, cb), log=said.append)
    assert isinstance(hybrid, A2ATS) and hybrid.path == "reference" and "runs in transformers" in said[0]


def test_the_engines_own_settings_make_an_engine_on_either_path():
    """A server's settings (slots, placement, K/V dtype): only the engine takes them, so `auto` is the engine even on
    the reference path, and transformers is refused by name."""
    model = tiny_model("llama")
    cb, cfg = random_codebooks(model), A2ATSConfig(budget=0.1, sinks=2, window=8)
    eng = factory.decoder(model, cb, cfg, path="reference", slots=2, max_context=64, placement="offload",
                          kv_dtype=torch.bfloat16, decode_weights="bf16")
    assert isinstance(eng, Engine) and eng.path == "reference" and eng.slots == 2 and eng.max_context == 64
    assert (eng.placement, eng.kv_dtype, eng.lean.decode_weights) == ("offload", torch.bfloat16, "bf16")
    assert factory.decoder(model, slots=1, max_context=32).method is None  # dense
    with pytest.raises(ValueError, match="max_context, slots are the lean engine's"):
        factory.decoder(model, cb, cfg, runtime="transformers", slots=2, max_context=64)
    with pytest.raises(ValueError, match="runs in transformers"):
        factory.decoder(model, config=cfg, method=build_method("a2ats-hybrid0.5", model, cb), slots=2)


def test_engine_and_transformers_decode_the_same_tokens():
    model = tiny_model("qwen3")
    cb, cfg = random_codebooks(model), A2ATSConfig(budget=0.05, sinks=2, window=8)
    ids, mask = padded_batch(seed=2, lengths=(130,))
    eng = factory.decoder(model, cb, cfg, dense_below=0).generate(ids, max_new_tokens=6)  # selecting at every step
    with factory.decoder(model, cb, cfg, path="reference"):
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert eng.tokens[0].tolist() == ref[0, ids.shape[1]:].tolist()


def test_what_cannot_run_is_refused_by_name():
    model = tiny_model("llama")
    cb = random_codebooks(model)
    hybrid = build_method("a2ats-hybrid0.5", model, cb)
    with pytest.raises(ValueError, match="runtime must be one of"):
        factory.decoder(model, cb, runtime="vllm")
    with pytest.raises(ValueError, match="runs in transformers"):
        factory.decoder(model, method=hybrid, runtime="engine")
    with pytest.raises(ValueError, match="fast path .* serves the A²ATS method itself"):
        factory.decoder(model, method=hybrid, path="fast")
    with pytest.raises(ValueError, match="decode weights 'bf16' are the lean engine's"):
        factory.decoder(model, cb, runtime="transformers", decode_weights="bf16")
    with pytest.raises(ValueError, match="needs codebooks"):
        factory.decoder(model, runtime="transformers")
    with pytest.raises(ValueError, match="path must be one of"):
        factory.decoder(model, cb, path="gpu")
    import transformers as T

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="lean engine runs .* not GPT2LMHeadModel"):
        factory.decoder(gpt2, runtime="engine")
