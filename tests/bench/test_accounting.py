"""What a decode step must read, counted by hand on a tiny model, and the decode bench's rows carrying it."""

import pytest

from a2ats.bench.accounting import account, host_read_gbps, step_bytes, weight_bytes
from a2ats.core.config import A2ATSConfig
from a2ats.runtime import Engine
from conftest import random_codebooks, tiny_model

LAYERS, KV_HEADS, D, C = 2, 2, 16, 16  # conftest's tiny llama, 16 centroids


def _params(model, names) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if any(x in n for x in names))


@pytest.mark.parametrize("fmt, per_weight", [("model", 4), ("bf16", 2)])
def test_weight_bytes_are_every_projection_and_the_lm_head_in_the_decode_format(fmt, per_weight):
    model = tiny_model("llama")
    lean = Engine(model, decode_weights=fmt, prefill_dtype="model").lean
    projections = _params(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    head = model.lm_head.weight.numel()
    norms = 4 * _params(model, ("input_layernorm", "post_attention_layernorm"))
    assert weight_bytes(lean) == per_weight * (projections + head) + norms


def test_int8_weights_count_their_scales():
    lean = Engine(tiny_model("llama"), decode_weights="int8", prefill_dtype="model").lean
    fp32 = Engine(tiny_model("llama"), decode_weights="model", prefill_dtype="model").lean
    assert weight_bytes(fp32) / 4 < weight_bytes(lean) < weight_bytes(fp32) / 3  # a byte a weight, + a scale a row


def test_step_bytes_dense_and_a2ats():
    model = tiny_model("llama")
    dense = Engine(model, prefill_dtype="model")
    sparse = Engine(model, random_codebooks(model, C), A2ATSConfig(), prefill_dtype="model")
    n, attended = 500, 60.5
    row = 2 * D * 4  # fp32 K and V of one token
    assert step_bytes(dense, n, n) == {"weights": weight_bytes(dense.lean), "scoring": 0,
                                       "attention": LAYERS * KV_HEADS * n * row}
    got = step_bytes(sparse, n, attended)
    assert got["scoring"] == LAYERS * KV_HEADS * (2 * n + C * D * 4)  # int16 codes + fp32 centroids
    assert got["attention"] == round(LAYERS * KV_HEADS * attended * row)
    # a batch reads the weights and the centroids once, each row's codes and K/V rows its own
    three = step_bytes(sparse, n, attended, batch=3)
    assert three["weights"] == got["weights"]
    assert three["scoring"] == LAYERS * KV_HEADS * (3 * 2 * n + C * D * 4)
    assert three["attention"] == round(3 * LAYERS * KV_HEADS * attended * row)


def test_account_against_the_bandwidth():
    acc = account({"weights": 2_000_000, "scoring": 0, "attention": 1_000_000},
                  {"weights": 1.0, "scoring": 0.5, "attention": 0.25, "rest": 0.1}, 2.0, 3.0)
    assert acc["gbps"] == {"weights": 2.0, "scoring": 0.0, "attention": 4.0}
    assert acc["floor_ms"] == 1.0 and acc["share_of_floor"] == 0.5


def test_host_read_bandwidth_is_measured():
    assert host_read_gbps(mib=8, repeats=2) > 0.1
