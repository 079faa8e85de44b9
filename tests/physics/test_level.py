"""The velocity level read from the gathers (speedstructure.physics.level): the calibrated
near-offset reflections integrated from the sea-floor reflection, and the ridge map."""

from __future__ import annotations

import numpy as np
import pytest

from speedstructure.config.schema import SimParams
from speedstructure.physics.level import WINDOWS, apply_ridge, fit_ridge, level_features
from speedstructure.physics.seafloor import (
    oriented_direct_wave,
    read_seafloor_picks,
    water_response,
)
from support import WATER, model_with_floor


def _features(gathers: np.ndarray) -> np.ndarray:
    sim = SimParams()
    g = np.asarray(gathers, np.float64)
    direct = oriented_direct_wave(g, water_response(sim, WATER)[0], sim.record_dt)
    _, _, times, delay = read_seafloor_picks(g, sim, WATER)
    return level_features(g, direct, delay, times, sim, WATER)


@pytest.fixture(scope="module")
def two_sediments():
    """A flat floor at 200 m over 1.8 and 3.0 km/s sediments: ``{velocity: gathers}``."""
    from speedstructure.physics.simulate import Simulator

    simulate = Simulator(SimParams())
    return {v: simulate(model_with_floor(np.full(300, 200), v)) for v in (1.8, 3.0)}


def test_the_integral_starts_at_the_floor_and_is_larger_over_faster_sediments(two_sediments):
    """From the sea-floor reflection's peak on, the integral of the stronger reflection (3.0
    against 1.8 km/s under the floor) is larger, by about the ratio of the two coefficients."""
    slow, fast = (_features(two_sediments[v]) for v in (1.8, 3.0))
    assert slow.shape == fast.shape == (WINDOWS,)
    r_slow, r_fast = ((v - WATER) / (v + WATER) for v in (1.8, 3.0))
    ratio = fast[0] / slow[0]
    assert slow[0] > 0 and ratio == pytest.approx(r_fast / r_slow, rel=0.1)  # 3.73 vs 3.67


def test_the_read_is_linear_in_the_reflections(curved_floor):
    """Calibrated by the direct wave, not normalised: twice the reflections, twice the read."""
    sim = SimParams()
    gathers = np.asarray(curved_floor[2], np.float64)
    direct = oriented_direct_wave(gathers, water_response(sim, WATER)[0], sim.record_dt)
    _, _, times, delay = read_seafloor_picks(gathers, sim, WATER)
    once = level_features(gathers, direct, delay, times, sim, WATER)
    doubled = direct + 2.0 * (gathers - direct)
    twice = level_features(doubled, direct, delay, times, sim, WATER)
    np.testing.assert_allclose(twice, 2.0 * once, rtol=1e-9, atol=1e-12)


def test_a_record_without_a_floor_pick_reads_nothing():
    sim = SimParams()
    direct, delay = water_response(sim, WATER)
    times = np.full((5, 31), np.nan)
    np.testing.assert_array_equal(
        level_features(direct, direct, delay, times, sim, WATER), np.zeros(WINDOWS)
    )


def test_the_ridge_map_recovers_a_linear_level():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)) * [1.0, 10.0, 0.1, 1.0, 1.0, 0.0]  # one constant feature
    y = 2.5 + x @ [0.2, 0.01, 1.0, 0.0, -0.1, 0.0]
    fitted = fit_ridge(x, y)
    assert set(fitted) == {"mean", "scale", "coef", "intercept"}
    np.testing.assert_allclose(apply_ridge(fitted, x), y, atol=0.01)
