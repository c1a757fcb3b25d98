"""Method names: every name the grammar accepts builds its method, over the codebook its variant names."""

import dataclasses

import pytest

from a2ats.methods import (
    A2ATSMethod,
    FullMethod,
    HybridMethod,
    OracleMethod,
    PQCacheMethod,
    QuestMethod,
    RerankMethod,
    StreamingMethod,
)
from a2ats.methods.registry import build_method, codebook_variant, parse_method
from conftest import random_codebooks, tiny_model

CASES = [("full", FullMethod, None), ("oracle", OracleMethod, None), ("streaming", StreamingMethod, None),
         ("quest", QuestMethod, None), ("pqcache", PQCacheMethod, None), ("a2ats", A2ATSMethod, None),
         ("a2ats-euclid", A2ATSMethod, None), ("a2ats-postrope", A2ATSMethod, None), ("a2ats-banded", A2ATSMethod, 2.0),
         ("a2ats-hybrid0.25", HybridMethod, None), ("a2ats-banded-rerank4", RerankMethod, 2.0)]


@pytest.mark.parametrize("name, cls, bands", CASES)
def test_every_name_builds_its_method(name, cls, bands):
    model = tiny_model("llama")
    variant = codebook_variant(name)
    cb = None
    if variant is not None:
        cb = random_codebooks(model)
        cb.settings = dataclasses.replace(cb.settings, **variant)
        assert cb.settings.wrope_band_ratio == bands
    method = build_method(name, model, cb)
    assert type(method) is cls
    if cls is A2ATSMethod:  # the codebook decides the variant: its name says which
        assert method.name == {"a2ats": "a2ats", "a2ats-euclid": "a2ats-euclid", "a2ats-postrope": "a2ats-postrope",
                               "a2ats-banded": "a2ats-banded"}[name]
    if cls is RerankMethod:
        assert method.factor == 4.0 and type(method.inner) is A2ATSMethod and method.inner.wrope.banded
    if cls is HybridMethod:
        assert method.share == 0.25


def test_names_parse_with_their_reduction_and_unknown_ones_are_refused():
    assert parse_method("a2ats-banded+max") == ("a2ats-banded", "max")
    assert parse_method("quest") == ("quest", "union")
    for bad in ("a2ats-warp", "a2ats+min", "a2ats-rerank0.5", "a2ats-hybrid2"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)
    with pytest.raises(ValueError, match="scores over a codebook"):
        build_method("a2ats", tiny_model("llama"))
