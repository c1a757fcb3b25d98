"""The calibration corpus (sequences that start like real prompts) and the bf16 forward (statistics in fp32)."""

import pytest
import torch

from a2ats.assets.corpus import calibration_sequences, prompt_start
from a2ats.core.codebook import Codebooks, CodebookSettings
from a2ats.hf.calibrate import record
from conftest import random_codebooks, tiny_model


class _Tok:
    """A tokenizer stand-in: one id per character, an optional BOS, an optional chat template."""

    def __init__(self, bos=None, adds_bos=False, template=False):
        self.bos_token_id, self.adds_bos = bos, adds_bos
        self.chat_template = "x" if template else None

    def encode(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 90) for c in text]
        return ([self.bos_token_id] if add_special_tokens and self.adds_bos else []) + ids

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [95, 96] + self.encode(messages[0]["content"], add_special_tokens=False) + [97]


def test_prompt_start_is_the_bos_or_the_chat_templates_first_token():
    assert prompt_start(_Tok(bos=1, adds_bos=True, template=True)) == [1]  # Llama 3: the BOS every prompt gets
    assert prompt_start(_Tok(bos=1, adds_bos=False, template=True)) == [95]  # Qwen, SmolLM2: "<|im_start|>"
    assert prompt_start(_Tok()) == []  # neither: nothing to prefix


@pytest.mark.default_model
def test_sequences_start_with_the_sink_token_and_keep_their_length(default_model):
    _, tok = default_model
    start = prompt_start(tok)
    assert tok.convert_ids_to_tokens(start) == ["<|im_start|>"]
    plain = calibration_sequences(tok, 3000, 600, 1024)
    sunk = calibration_sequences(tok, 3000, 600, 1024, prefix=start)
    assert all(len(s) <= 1024 for s in plain + sunk) and max(len(s) for s in sunk) == 1024
    assert all(int(s[0]) == start[0] for s in sunk)
    assert not any(int(s[0]) == start[0] for s in plain)
    # the same corpus either way: the prefix takes a slot, it removes no text
    body = torch.cat([s[1:] for s in sunk])
    assert torch.equal(body, torch.cat(plain))


def test_recipe_is_in_the_file_tag_and_old_files_still_load(tmp_path):
    paper = dict(wrope_band_ratio=None)  # the paper's single distance; the default is banded
    assert CodebookSettings(seq_len=2048, sink_prefix=False, **paper).tag == "c4096-b2048-qa"  # the short recipe's name
    assert CodebookSettings(seq_len=16384, sink_prefix=True, **paper).tag == "c4096-b2048-qa-s16k"
    assert CodebookSettings(seq_len=2048, sink_prefix=True, query_aware=False, **paper).tag == "c4096-b2048-euclid-s2k"
    with pytest.raises(ValueError, match="for_context"):
        CodebookSettings().tag  # noqa: B018 (the length is the model's to say)
    assert CodebookSettings().for_context(32768).tag == "c4096-bands2-qa-s8k"
    model = tiny_model("llama")
    cb = random_codebooks(model)
    meta = cb.metadata()
    import json

    settings = json.loads(meta["settings"])
    settings.pop("sink_prefix")  # a file written before the field existed
    from safetensors.torch import save_file

    save_file({"centroids": cb.centroids, "chol": cb.chol}, str(tmp_path / "old.safetensors"),
              metadata={**meta, "settings": json.dumps(settings)})
    assert Codebooks.load(tmp_path / "old.safetensors").settings.sink_prefix is False


@pytest.mark.parametrize("context,length", [(8192, 2048), (32768, 8192), (131072, 16384), (4096, 2048), (512, 512),
                                            (None, 16384)])
def test_default_sequence_length_is_a_quarter_of_the_context(context, length):
    assert CodebookSettings().for_context(context).seq_len == length
    assert CodebookSettings(seq_len=4096).for_context(context).seq_len == 4096  # a length asked for is kept


def test_bf16_forward_keeps_calibration_statistics_in_fp32():
    """Under a bf16 forward the recorded H is still accumulated in float64 from fp32 queries: within bf16 rounding
    of the activations of the fp32 forward's H, with keys of the same shape."""
    model = tiny_model("qwen2")
    seqs = [torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ref = record(model, seqs, progress=False)
    low = record(model, seqs, progress=False, compute_dtype=torch.bfloat16)
    for h32, h16 in zip(ref.h, low.h):
        assert h16.dtype == torch.float64
        rel = float((h16 - h32).norm() / h32.norm())
        assert rel < 0.02
    assert ref.keys[0].shape == low.keys[0].shape


@pytest.mark.default_model
def test_missing_codebooks_share_forward_passes_and_existing_ones_are_kept(default_model, tmp_path, monkeypatch):
    """The paper's, Euclidean and banded codebooks come from one recorded pass; post-RoPE needs its own; codebooks
    already in the cache are not calibrated again."""
    import a2ats.hf.calibrate as C

    _, tok = default_model
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=1024)).eval()
    small = dict(n_centroids=8, text_tokens=600, uuid_tokens=200, seq_len=256, max_iter=1)
    want = [CodebookSettings(**small, wrope_band_ratio=None), CodebookSettings(**small, query_aware=False, wrope_band_ratio=None),
            CodebookSettings(**small), CodebookSettings(**small, post_rope=True)]
    passes = []
    real = C.record
    monkeypatch.setattr(C, "record", lambda *a, **k: passes.append(a[4:6]) or real(*a, **k))
    written = C.calibrate_missing(model, tok, want, log=lambda *_: None)
    assert sorted(p.name for p in written) == sorted(f"{s.tag}.safetensors" for s in want)
    assert len(passes) == 2  # (post_rope, band ratio) of each pass: one pre-RoPE, one post-RoPE
    for s in want:
        cb = C.load_or_calibrate(model, tok, settings=s, log=lambda *_: None)
        assert cb.settings == s
    banded = Codebooks.load(C.default_codebook_path(model, want[2]))
    paper = Codebooks.load(C.default_codebook_path(model, want[0]))
    assert not torch.equal(banded.chol, paper.chol)  # H pooled over the bands, not the paper's single distance
    assert C.calibrate_missing(model, tok, want, log=lambda *_: None) == [] and len(passes) == 2


@pytest.mark.skipif(__import__("a2ats").kernels.cpu_backend() is None, reason="CPU kernels could not be built here")
def test_kmeans_with_the_kernel_assignment_equals_the_matmul_path():
    """Calibration's k-means runs its assignment in the C++ kernel: the same iterations, centroids and inertia
    as torch's matmul path, on odd sizes (a tile not filled, points not a multiple of anything)."""
    from a2ats.core.kmeans import assign, kmeans
    from a2ats.hf.calibrate import kernel_nearest

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1003, 24, generator=g) * torch.linspace(0.5, 2.0, 24)
    c = torch.randn(2, 37, 24, generator=g)
    (b1, d1), (b2, d2) = assign(x, c), assign(x, c, nearest=kernel_nearest)
    assert torch.equal(b1, b2)
    torch.testing.assert_close(d1, d2, atol=1e-4, rtol=1e-4)
    ref = kmeans(x, 37, max_iter=6, tol=0, seed=1)
    fast = kmeans(x, 37, max_iter=6, tol=0, seed=1, nearest=kernel_nearest)
    assert ref.iterations == fast.iterations and ref.reseeded == fast.reseeded
    torch.testing.assert_close(fast.centroids, ref.centroids, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.inertia, ref.inertia, atol=1e-4, rtol=1e-4)
