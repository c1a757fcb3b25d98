"""The long-context evaluation model, Qwen2.5-Coder-0.5B-Instruct, from its verified package parts
(assembled and converted on first use, ~1 min): it loads by name, answers, and its fast path selects
exactly what its reference path selects, token for token."""

import pytest
import torch

from a2ats import A2ATS, A2ATSConfig, kernels
from a2ats.calibrate import calibrate
from a2ats.codebook import CodebookSettings
from a2ats.eval.harness import held_out_ids
from a2ats.generate import encode_prompt
from a2ats.kernels.reference import indices_to_mask

pytestmark = pytest.mark.eval_model

# small for CI: 256 centroids from ~5K tokens (the paper's 4096 from ~80K are for the evaluation)
SMALL = CodebookSettings(n_centroids=256, text_tokens=4096, uuid_tokens=1024, seq_len=1024, sink_prefix=True, max_iter=4)


@pytest.fixture(scope="module")
def qwen():
    from a2ats.assets import load_model

    return load_model("qwen2.5-coder-0.5b", log=lambda *_: None)


@pytest.fixture(scope="module")
def codebooks(qwen):
    model, tok = qwen
    return calibrate(model, tok, SMALL, progress=False)


def test_loads_by_name_with_its_architecture_and_answers(qwen):
    model, tok = qwen
    cfg = model.config
    assert (type(model).__name__, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "Qwen2ForCausalLM", 24, 14, 2)
    assert (cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // 14) == 64
    assert cfg.max_position_embeddings == 32768 and not cfg.tie_word_embeddings
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # q/k/v biases
    ids = encode_prompt(tok, "What is 17 + 25? Answer with the number only.")
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert "42" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("runtime", ["engine", "transformers"])
def test_fast_path_selects_exactly_what_the_reference_path_selects(qwen, codebooks, monkeypatch, runtime):
    """A left-padded batch of two prompts (1,100 and 837 tokens), the default selection (banded, max reduction at
    10%: K = 110 and 83 per KV head over the max of 7 heads' scores): per decode step and layer the same token sets
    per KV head, the same tokens, close logits.
    Both fast runtimes: the lean engine (the CLI's) and the kernels inside transformers' generate (the harness's)."""
    from a2ats.engine import Engine

    if kernels.cpu_backend() is None:
        pytest.skip("CPU kernels not built here")
    model, tok = qwen
    text = held_out_ids(tok, 2000)
    n0, n1 = 1100, 837
    ids = torch.full((2, n0), tok.pad_token_id)
    ids[0] = text[:n0]
    ids[1, n0 - n1:] = text[1000:1000 + n1]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0] = True
    mask[1, n0 - n1:] = True
    cfg = A2ATSConfig()
    steps = 6

    # each runtime against its own reference path (same prefill, same keys): the engine's fused projections
    # round differently from transformers' separate ones, so codes near a tie may differ between runtimes
    ref_sets, fast_sets = [], []
    score_select = kernels.score_select

    def recording(lut, codes, offsets, valid, k, sinks, window):
        idx, count = score_select(lut, codes, offsets, valid, k, sinks, window)
        fast_sets.append(indices_to_mask(idx, count, codes.shape[-1]))
        return idx, count

    if runtime == "engine":
        import a2ats.engine.runner as runner

        select = runner.select
        monkeypatch.setattr(runner, "select", lambda *a: ref_sets.append(select(*a)) or ref_sets[-1])
        ref = Engine(model, codebooks, cfg, path="reference").generate(
            ids, mask, max_new_tokens=steps, pad_token_id=tok.pad_token_id, keep_logits=True)
        ref_tokens, ref_logits = ref.tokens, ref.logits
        monkeypatch.setattr(kernels, "score_select", recording)
        out = Engine(model, codebooks, cfg, path="fast").generate(
            ids, mask, max_new_tokens=steps, pad_token_id=tok.pad_token_id, keep_logits=True)
        tokens, logits = out.tokens, out.logits
    else:
        kw = dict(attention_mask=mask.long(), max_new_tokens=steps, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=None)
        with torch.inference_mode(), A2ATS(model, codebooks, cfg, path="reference") as a2:
            select = a2.method.select
            a2.method.select = lambda step, config: ref_sets.append(select(step, config)) or ref_sets[-1]
            ref = model.generate(input_ids=ids, **kw)
        ref_tokens, ref_logits = ref.sequences[:, n0:], ref.scores
        monkeypatch.setattr(kernels, "score_select", recording)
        with torch.inference_mode(), A2ATS(model, codebooks, cfg, path="fast"):
            out = model.generate(input_ids=ids, **kw)
        tokens, logits = out.sequences[:, n0:], out.scores

    assert len(ref_sets) == len(fast_sets) == (steps - 1) * model.config.num_hidden_layers
    for i, (r, f) in enumerate(zip(ref_sets, fast_sets)):
        assert torch.equal(r, f), f"step {i // 24 + 1}, layer {i % 24}: selections differ"
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    # the budget really selects: well below the context, at least sinks + window + the shorter row's K
    counts = torch.stack([r.sum(-1) for r in ref_sets]).float()
    assert 8 + 64 + 83 <= counts.mean() < 0.5 * n1
