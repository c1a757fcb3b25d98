"""Lower precision where it changes nothing that is measured: bf16 prefill (autocast) and bf16 weight reads."""

import pytest
import torch

from a2ats.hf.precision import bf16_exact, bf16_weight_reads, parse_dtype
from conftest import tiny_model


def _bf16_valued(family="qwen2"):
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_weight_reads_give_the_models_own_numbers(family):
    """A model whose fp32 weights are bf16 values decodes the same tokens with close logits (fp32 math, another
    summation order) when its decode steps read bf16 copies; prefill-sized calls keep the fp32 weights."""
    model = _bf16_valued(family)
    assert bf16_exact(model) and not bf16_exact(tiny_model(family))
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        with bf16_weight_reads(model):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        again = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # the patch is gone after the block
    assert torch.equal(ref.sequences, out.sequences) and torch.equal(ref.sequences, again.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())


def test_harness_refuses_bf16_reads_of_weights_that_are_not_bf16_values(tmp_path):
    from a2ats.eval import harness

    class _Tok:  # never reached: the check comes first
        pass

    cfg = harness.EvalConfig(tasks=("niah_multikey",), lengths=(200,), methods=("full",), budgets=(0.1,),
                             bf16_weight_reads=True)
    with pytest.raises(ValueError, match="not all bf16 values"):
        harness.run(tiny_model("llama"), _Tok(), cfg, tmp_path)


def test_dtype_names():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        parse_dtype("bf17")
