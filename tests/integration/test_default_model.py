"""The embedded default model (SmolLM2-135M-Instruct) with codebooks calibrated here.

Calibration is scaled down for CI (512 centroids, ~20K tokens instead of 4096 and ~80K); one
recorded forward pass serves both the query-aware codebooks and the Euclidean ablation.
"""

import pytest
import torch

from a2ats import A2ATS, A2ATSConfig
from a2ats.assets.corpus import calibration_sequences, speeches
from a2ats.core.codebook import CodebookSettings
from a2ats.core.rope import WRoPE, find_rotary_embedding
from a2ats.eval.attention_metrics import attention_mass, score_error
from a2ats.hf.calibrate import fit, record
from a2ats.methods import A2ATSMethod
from agreement import assert_paths_agree

pytestmark = pytest.mark.default_model

# the paper's single WRoPE distance: the claims below are the paper's; the default (banded) gets its own codebook
SMALL = CodebookSettings(n_centroids=512, text_tokens=16384, uuid_tokens=4096, seq_len=2048, max_iter=10,
                         wrope_band_ratio=None)


@pytest.fixture(scope="module")
def codebooks(default_model):
    """The paper's, the Euclidean ablation's and the library's default (banded) codebooks, from one forward pass."""
    model, tok = default_model
    seqs = calibration_sequences(tok, SMALL.text_tokens, SMALL.uuid_tokens, SMALL.seq_len, SMALL.seed)
    rec = record(model, seqs, SMALL.wrope_distance, progress=False, more_band_ratios=(2.0,))
    return {"paper": fit(rec, SMALL, progress=False),
            "euclid": fit(rec, CodebookSettings(**{**SMALL.__dict__, "query_aware": False}), progress=False),
            "banded": fit(rec, CodebookSettings(**{**SMALL.__dict__, "wrope_band_ratio": 2.0}), progress=False)}


@pytest.fixture(scope="module")
def long_text_ids(default_model):
    """~4K tokens of a State of the Union address from 1900-1930: prose the calibration never saw."""
    _, tok = default_model
    text = next(s for s in speeches()[110:] if len(s) > 30000)
    return torch.tensor(tok.encode(text, add_special_tokens=False)[:4096])


def test_full_budget_generation_equals_dense(default_model, codebooks):
    model, tok = default_model
    prompts = ["The capital of France is", "Write one sentence about the sea, please. The sea"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        ref = model.generate(**batch, **kw)
        with A2ATS(model, codebooks["banded"], A2ATSConfig(budget=1.0)):
            out = model.generate(**batch, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_attention_mass_at_three_percent(default_model, codebooks, long_text_ids):
    """Measured share of the true attention mass A²ATS keeps at rho = 0.03, against sinks + window alone.

    Observed on the 2-core machine with these CI codebooks: A²ATS 0.834, sinks + window only 0.600
    (README has the figures at paper settings). The assertions leave a margin below those.
    """
    model, _ = default_model
    cfg = A2ATSConfig(budget=0.03, reduction="union")
    method = A2ATSMethod(codebooks["paper"], WRoPE(find_rotary_embedding(model), 2048))
    a2ats = attention_mass(model, method, cfg, long_text_ids, decode_last=8).mean()
    window_only = attention_mass(model, method, A2ATSConfig(budget=0), long_text_ids, decode_last=8).mean()
    assert a2ats > 0.78
    assert a2ats > window_only + 0.15


def test_query_aware_beats_euclidean_score_error(default_model, codebooks, long_text_ids):
    """The paper's claim, measured on held-out text: lower mean squared WRoPE-score error than plain k-means."""
    model, _ = default_model
    err = score_error(model, {"qa": codebooks["paper"], "euclid": codebooks["euclid"]}, long_text_ids[:2048], queries=32)
    # Observed here: 64.6 vs 121.2 (ratio 0.53); README has the paper-settings figures.
    assert err["qa"] < 0.7 * err["euclid"]


@pytest.mark.parametrize("selection", ["banded", "paper"])
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_fast_path_equals_reference_path(default_model, codebooks, long_text_ids, bf16_weights, selection):
    """The lean engine with the CPU kernels against transformers' generate with the masked reference
    path, on the real model: a left-padded batch of two long prompts, a budget that really selects; the default
    selection (banded, max reduction at 10% per KV head) and the paper's (one distance, GQA union at 3%)."""
    from a2ats import kernels
    from a2ats.runtime import Engine

    if kernels.cpu_backend() is None:
        pytest.skip("CPU kernels not built here")
    model, tok = default_model
    ids = torch.stack([long_text_ids[:1500], torch.cat([torch.full((300,), tok.pad_token_id), long_text_ids[2000:3200]])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :300] = False
    bands = codebooks[selection].settings.wrope_band_ratio
    cfg = A2ATSConfig(wrope_band_ratio=bands) if selection == "banded" else \
        A2ATSConfig(budget=0.03, wrope_band_ratio=bands, reduction="union")
    if bf16_weights:  # the engine's bf16 copies then hold the model's exact weights
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    try:
        kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=tok.pad_token_id, eos_token_id=None)
        with torch.inference_mode(), A2ATS(model, codebooks[selection], cfg, path="reference", trace=True) as a2:
            ref = model.generate(input_ids=ids, attention_mask=mask.long(), **kw)
        # the selection path at every step, K/V at the reference's precision: what is compared is the path
        eng = Engine(model, codebooks[selection], cfg, path="fast", decode_weights="bf16" if bf16_weights else "model",
                     prefill_dtype="model", dense_below=0, kv_dtype=torch.float32)
        out = eng.generate(ids, mask, max_new_tokens=12, pad_token_id=tok.pad_token_id, keep_logits=True, trace=True)
    finally:
        if bf16_weights:
            model.load_state_dict(saved)
    # the same tokens, logits and token sets up to near-ties (tests/agreement.py says what holds on any machine)
    assert_paths_agree(ref.sequences[:, ids.shape[1]:], ref.scores, a2.trace, out.tokens, out.logits, out.trace)
    assert len(a2.trace.sets) == 2 * model.config.num_hidden_layers
    assert 45 < out.attended < 0.3 * 1500
