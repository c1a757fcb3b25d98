"""The calibration's one progress bar: its remaining time is each phase's work left at that phase's own measured
rate (or its guess before a measurement), never a rate borrowed from another phase."""

from __future__ import annotations

import pytest

from a2ats.hf import progress as P


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    return now


def test_remaining_time_is_each_phase_left_at_its_own_rate(clock):
    with P.CalibrationProgress(disable=True) as bar:
        bar.plan("forward", "forward", 100, "tokens")
        bar.plan("k-means", "k-means", 10, "layers", guess=3.0)
        assert bar.estimate_left() is None  # the forward has neither a measurement nor a guess
        bar.start("forward")
        clock[0] += 20
        bar.done("forward", 40)  # 0.5 s a token measured; k-means still at its guess
        assert bar.estimate_left() == pytest.approx(60 * 0.5 + 10 * 3.0)
        clock[0] += 30
        bar.done("forward", 60)
        clock[0] += 5  # time between the phases is in neither
        bar.start("k-means")
        clock[0] += 8
        bar.done("k-means", 2)  # 4 s a layer measured replaces the guess
        assert bar.estimate_left() == pytest.approx(8 * 4.0)


def test_a_second_codebook_set_adds_its_layers_to_the_phase(clock):
    with P.CalibrationProgress(disable=True) as bar:
        bar.plan("k-means", "k-means", 30, "layers", guess=2.0)
        bar.plan("k-means", "k-means", 30, "layers", guess=2.0)
        assert bar.estimate_left() == pytest.approx(60 * 2.0)


def test_a_calibration_plans_its_forward_and_each_codebook_sets_kmeans_on_one_bar():
    from a2ats.core.codebook import CodebookSettings
    from a2ats.hf.calibrate import plan_calibration
    from conftest import tiny_model

    model = tiny_model("llama")
    with P.CalibrationProgress(disable=True) as bar:
        plan_calibration(bar, model, 5000, [CodebookSettings(n_centroids=64), CodebookSettings(n_centroids=64)])
        layers = model.config.num_hidden_layers
        assert {n: (p.units, p.guess is not None) for n, p in bar._phases.items()} == {
            "forward": (5000, False), "k-means": (2 * layers, True)}
        assert bar._phases["k-means"].guess > 0
