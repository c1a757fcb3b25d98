"""An engine's settings (:class:`a2ats.runtime.EngineSettings`): frozen, each checked on construction with the
setting named, given whole or by name to the engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from a2ats.runtime import Engine, EngineSettings
from conftest import tiny_model

BAD = [("slots", 0), ("max_context", -1), ("overlap", 0), ("prefill_chunk", 0), ("prefill_budget", 0),
       ("prefill_budget", 2.5), ("prefill_stall", -1.0), ("prefill_stall", "2"), ("prefill_stall", True),
       ("prefill_step_seconds", -0.5), ("prefill_step_seconds", float("inf")),
       ("prefix_cache", -1), ("host_free", True), ("placement", "gpu"),
       ("kv_dtype", torch.int16), ("path", "gpu"), ("dense_below", -5)]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_setting_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        EngineSettings(**{name: value})


def test_settings_are_frozen_and_reach_the_engine_whole_or_by_name():
    s = EngineSettings(prefill_budget=None, overlap=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.overlap = 2
    model = tiny_model("llama")
    eng = Engine(model, settings=s, decode_weights="model", prefill_dtype="model", prefill_chunk=64)
    assert eng.settings == dataclasses.replace(s, decode_weights="model", prefill_dtype="model", prefill_chunk=64)
    assert eng.scheduler.budget is None and eng.scheduler.chunk == 64
    with pytest.raises(ValueError, match=r"unknown engine setting\(s\) \['prefil_budget'\]"):
        Engine(model, prefil_budget=3)
