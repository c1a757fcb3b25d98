"""The long-context evaluation model, Qwen2.5-Coder-0.5B-Instruct, from its verified package parts
(assembled and converted on first use, ~1 min): it loads by name, answers, and its fast path selects
what its reference path selects, token for token up to near-ties."""

import pytest
import torch

from a2ats import A2ATS, A2ATSConfig, kernels
from a2ats.core.codebook import CodebookSettings
from a2ats.eval.harness import held_out_ids
from a2ats.hf.calibrate import calibrate
from a2ats.hf.generate import encode_prompt
from agreement import assert_paths_agree

pytestmark = pytest.mark.eval_model

# small for CI: 256 centroids from ~5K tokens (the paper's 4096 from ~80K are for the evaluation)
SMALL = CodebookSettings(n_centroids=256, text_tokens=4096, uuid_tokens=1024, seq_len=1024, sink_prefix=True, max_iter=4)

# the selection path at every step, K/V at the model's precision: what the tests compare is the path
SELECT = dict(dense_below=0, kv_dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen():
    from a2ats.assets.models import load_model

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
def test_fast_path_selects_exactly_what_the_reference_path_selects(qwen, codebooks, runtime):
    """A left-padded batch of two prompts (1,100 and 837 tokens), the default selection (banded, max reduction at
    10%: K = 110 and 83 per KV head over the max of 7 heads' scores): per decode step and layer the same token sets
    per KV head up to near-ties, the same tokens, close logits.
    Both fast runtimes: the lean engine (the CLI's) and the kernels inside transformers' generate (the harness's)."""
    from a2ats.runtime import Engine

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
    if runtime == "engine":
        ref = Engine(model, codebooks, cfg, path="reference", decode_weights="model", prefill_dtype="model", **SELECT).generate(
            ids, mask, max_new_tokens=steps, pad_token_id=tok.pad_token_id, keep_logits=True, trace=True)
        ref_tokens, ref_logits, ref_trace = ref.tokens, ref.logits, ref.trace
        out = Engine(model, codebooks, cfg, path="fast", decode_weights="model", prefill_dtype="model", **SELECT).generate(
            ids, mask, max_new_tokens=steps, pad_token_id=tok.pad_token_id, keep_logits=True, trace=True)
        tokens, logits, trace = out.tokens, out.logits, out.trace
    else:
        kw = dict(attention_mask=mask.long(), max_new_tokens=steps, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=None)
        with torch.inference_mode(), A2ATS(model, codebooks, cfg, path="reference", trace=True) as a2:
            ref = model.generate(input_ids=ids, **kw)
        ref_tokens, ref_logits, ref_trace = ref.sequences[:, n0:], ref.scores, a2.trace
        with torch.inference_mode(), A2ATS(model, codebooks, cfg, path="fast", trace=True) as a2:
            out = model.generate(input_ids=ids, **kw)
        tokens, logits, trace = out.sequences[:, n0:], out.scores, a2.trace

    assert len(ref_trace.sets) == 2 * model.config.num_hidden_layers
    # the same tokens, logits and token sets up to near-ties: past the first layer of the first step the two paths'
    # inputs differ in rounding (the kernel's online softmax against SDPA's), so a token whose score is within
    # that rounding of the threshold may trade places (tests/agreement.py says what holds on any machine)
    assert_paths_agree(ref_tokens, ref_logits, ref_trace, tokens, logits, trace)
    # the budget really selects: well below the context, at least sinks + window + the shorter row's K
    sizes = [len(s) for sets in ref_trace.sets.values() for step in sets for s in step]
    assert 8 + 64 + 83 <= sum(sizes) / len(sizes) < 0.5 * n1
