"""Model families a2ats would run wrongly are refused by name, before any work; the others run exactly.

Each case is a tiny random model of a family transformers ships. A refusal must name the model type and
what is missing; a supported family must give the reference path's equality (budget 1.0: A²ATS attends
to everything, so its outputs are the model's own).
"""

import pytest
import torch

from a2ats import A2ATS, A2ATSConfig
from a2ats.core.support import UnsupportedModelError
from a2ats.hf.calibrate import calibrate
from a2ats.runtime import Engine
from conftest import TINY, random_codebooks

SMALL = dict(TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _model(name: str):
    import transformers as T

    torch.manual_seed(0)
    if name == "cohere":
        return T.CohereForCausalLM(T.CohereConfig(**SMALL)).eval()
    if name == "gpt_oss":
        cfg = T.GptOssConfig(**{**SMALL, "intermediate_size": 64}, num_local_experts=2, num_experts_per_tok=1,
                             sliding_window=16)
        return T.GptOssForCausalLM(cfg).eval()
    if name == "gpt_oss-no-window":  # the sinks alone
        cfg = T.GptOssConfig(**{**SMALL, "intermediate_size": 64}, num_local_experts=2, num_experts_per_tok=1,
                             layer_types=["full_attention", "full_attention"])
        return T.GptOssForCausalLM(cfg).eval()
    if name == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**SMALL, sliding_window=16)).eval()
    if name == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**SMALL, sliding_window=16)).eval()
    if name == "mistral-window":
        return T.MistralForCausalLM(T.MistralConfig(**SMALL, sliding_window=32)).eval()
    if name == "qwen2-window":
        cfg = T.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=32, max_window_layers=1)
        return T.Qwen2ForCausalLM(cfg).eval()
    if name == "llama-dynamic":
        cfg = T.LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
        return T.LlamaForCausalLM(cfg).eval()
    if name == "phi3-longrope":
        rot = SMALL["hidden_size"] // SMALL["num_attention_heads"] // 2  # phi3 derives head_dim from the width
        small = {k: v for k, v in SMALL.items() if k != "head_dim"}
        cfg = T.Phi3Config(**small, pad_token_id=0, original_max_position_embeddings=256, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * rot, "long_factor": [2.0] * rot})
        return T.Phi3ForCausalLM(cfg).eval()
    if name == "llama-biases":
        cfg = T.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)
        model = T.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # random, non-zero biases: a dropped one changes the logits
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.5)
        return model
    if name == "phi":  # partial rotary (a quarter of head_dim is rotated)
        return T.PhiForCausalLM(T.PhiConfig(**{**SMALL, "partial_rotary_factor": 0.5})).eval()
    if name == "axk1":  # attention that is not the Llama layout: fails inside the model under a2ats's function
        from transformers import CONFIG_MAPPING, AutoConfig

        if "axk1" not in CONFIG_MAPPING:
            pytest.skip("this transformers version does not ship axk1")
        cfg = AutoConfig.for_model("axk1", **SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.AutoModelForCausalLM.from_config(cfg).eval()
    if name == "bamba":  # a hybrid: Mamba-2 layers beside attention layers
        small = {k: v for k, v in SMALL.items() if k != "head_dim"}
        cfg = T.BambaConfig(**small, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=48, mamba_d_state=8,
                            mamba_n_groups=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.BambaForCausalLM(cfg).eval()
    if name == "bailing_hybrid":  # a hybrid: linear-attention layers beside softmax attention
        cfg = T.BailingHybridConfig(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.BailingHybridForCausalLM(cfg).eval()
    if name == "olmo2":
        return T.Olmo2ForCausalLM(T.Olmo2Config(**SMALL, pad_token_id=0)).eval()
    raise ValueError(name)


REFUSED = {  # family -> what the refusal must say
    "cohere": ["cohere", "interleaved"],
    "gpt_oss": ["gpt_oss", "sliding window", "learned sink"],
    "gpt_oss-no-window": ["gpt_oss", "learned sink"],
    "gemma3": ["gemma3", "sliding window"],
    "gemma2": ["gemma2", "sliding window"],
    "mistral-window": ["mistral", "sliding window of 32", "sliding_window = None"],
    "qwen2-window": ["qwen2", "1 of its 2 layers", "sliding window"],
    "llama-dynamic": ["llama", "dynamic"],
    "phi3-longrope": ["phi3", "longrope"],
    "axk1": ["axk1", "does not run as a2ats expects"],
    "bamba": ["bamba", "1 of its 2 layers are not softmax attention", "1 linear_attention"],
    "bailing_hybrid": ["bailing_hybrid", "2 of its 2 layers are not softmax attention"],
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_by_name_on_the_transformers_path(family):
    model = _model(family)
    with pytest.raises(UnsupportedModelError) as e:
        A2ATS(model, random_codebooks(model))
    for words in REFUSED[family]:
        assert words in str(e.value)


@pytest.mark.parametrize("family", ["cohere", "mistral-window", "llama-dynamic"])
def test_calibration_refuses_before_its_forward(family):
    model = _model(family)
    with pytest.raises(UnsupportedModelError):
        calibrate(model, tokenizer=None, progress=False)  # the tokenizer is never reached


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window", "llama-dynamic"])
def test_refused_by_the_runtime(family):
    with pytest.raises(UnsupportedModelError, match="sliding window|dynamic"):
        Engine(_model(family))


@pytest.mark.parametrize("family", ["phi", "olmo2", "llama-biases"])
def test_supported_families_decode_exactly_at_full_budget(family):
    """Budget 1.0 attends to every token: A²ATS's decode must give the model's own greedy tokens and logits."""
    model = _model(family)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        want = model.generate(input_ids=ids, **gen)
        with A2ATS(model, random_codebooks(model), A2ATSConfig(budget=1.0, sinks=2, window=4), path="reference"):
            got = model.generate(input_ids=ids, **gen)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_runtime_applies_every_bias_of_a_llama_with_attention_and_mlp_biases():
    """attention_bias adds an o_proj bias and mlp_bias three MLP biases: the runtime's logits are the model's."""
    model = _model("llama-biases")
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(input_ids=ids).logits[:, -1]
    out = Engine(model, decode_weights="model", prefill_dtype="model").generate(ids, max_new_tokens=1, keep_logits=True)
    torch.testing.assert_close(out.logits[0], want, rtol=1e-4, atol=1e-4)


def test_attention_experts_are_refused_by_name():
    """JetMoE's attention experts pass more KV heads than its configuration names: refused by name (at its first
    step), not run over the wrong heads."""
    import transformers as T

    small = {k: v for k, v in SMALL.items() if k not in ("head_dim", "num_attention_heads")}
    cfg = T.JetMoeConfig(**small, kv_channels=16, num_local_experts=2, num_experts_per_tok=2, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    model = T.JetMoeForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with pytest.raises(UnsupportedModelError, match="jetmoe model: its attention passes 4 KV heads where its "
                                                    "configuration has 2"):
        with torch.inference_mode(), A2ATS(model, random_codebooks(model)):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_the_layout_probe_refuses_a_family_it_does_not_know(monkeypatch):
    """The refusal comes from running the model, not from the name list: an unnamed interleaved layout is caught."""
    import a2ats.hf.patch as patch

    monkeypatch.setattr(patch, "KNOWN_LAYOUTS", {})
    model = _model("cohere")
    with pytest.raises(UnsupportedModelError, match="cohere model: its rotary embedding uses a layout other than rotate-half"):
        A2ATS(model, random_codebooks(model))
