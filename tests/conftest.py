"""Shared fixtures: tiny random models of each supported family, and the embedded default model."""

from __future__ import annotations

import pytest
import torch

from a2ats.core.codebook import (
    Codebooks,
    CodebookSettings,
    model_fingerprint,
    weights_digest,
)
from a2ats.kernels import cpu as cpu_mod

torch.set_num_threads(2)

TINY = dict(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024)


def tiny_model(family: str, seed: int = 0):
    """A tiny random causal LM: llama, llama3 (rope scaling), mistral, qwen2, qwen3, yarn (llama with YaRN)."""
    import transformers as T

    torch.manual_seed(seed)
    if family in ("llama", "llama3", "yarn", "linear"):
        rope = {
            "llama": {"rope_type": "default", "rope_theta": 10000.0},
            "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
            "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        }[family]
        cfg = T.LlamaConfig(**TINY, num_attention_heads=6, num_key_value_heads=2, head_dim=16, rope_parameters=rope)
        model = T.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = T.MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None)
        model = T.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=1, use_sliding_window=False)
        model = T.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = T.Qwen3Config(**TINY, num_attention_heads=8, num_key_value_heads=2, head_dim=16, use_sliding_window=False)
        model = T.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def padded_batch(seed: int = 0, lengths=(90, 61, 77), vocab: int = 97):
    """(ids, attention_mask) of random prompts of the given lengths, left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, L in enumerate(lengths):
        ids[i, n - L :] = torch.randint(3, vocab, (L,), generator=g)
        mask[i, n - L :] = 1
    return ids, mask


def random_codebooks(model, n_centroids: int = 16, seed: int = 0, wrope_distance: int = 2048) -> Codebooks:
    """Codebooks of the right shape for ``model`` with random centroids and a random SPD factor."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    L, H = cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    a = torch.randn(L, H, d, d, generator=g)
    chol = torch.linalg.cholesky(a @ a.transpose(-1, -2) / d + torch.eye(d))
    return Codebooks(
        torch.randn(L, H, n_centroids, d, generator=g),
        chol,
        model_fingerprint(cfg),
        CodebookSettings(n_centroids=n_centroids, wrope_distance=wrope_distance),
        weights_digest(model),
    )


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct in fp32, with its tokenizer."""
    from a2ats.assets.models import load_model

    return load_model(log=lambda *_: None)


# every ISA this CPU runs, the portable build included: each C++ kernel test runs on each build (`isa_ext`)
RUNNABLE_ISAS = [isa for isa in cpu_mod.ISAS if cpu_mod.ISAS.index(isa) <= cpu_mod.ISAS.index(cpu_mod.detected_isa())]


@pytest.fixture(scope="module", params=RUNNABLE_ISAS)
def isa_ext(request):
    mod = cpu_mod.cpu_backend(request.param)
    if mod is None:
        pytest.skip(f"the {request.param} build of the C++ kernels is unavailable here")
    return mod
