"""``speedstructure bench level``: how much of the velocity level ideal reflections carry
(the generator's models, their normal-incidence reflectivity, the level read's features and
ridge map), on a few models so that the test is quick."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from speedstructure.physics.level import WINDOWS
from speedstructure.tools import bench_level as bl
from support import WATER


def _column(floor: int, layers: list[tuple[int, float]]) -> np.ndarray:
    """Water down to ``floor``, then constant velocities from each ``(depth, velocity)`` on."""
    v = np.full(1259, WATER)
    for depth, velocity in layers:
        v[depth:] = velocity
    v[:floor] = WATER
    return v


def test_the_whole_integral_sums_the_reflection_coefficients_and_the_wavelet_loses_them():
    """From the floor down the integral of the whole reflectivity is the sum of the
    coefficients crossed (``ln v`` / 2 for small ones).  The Ricker wavelet has no zero
    frequency: once it has passed, the band-limited integral holds nothing of the deep
    interface, only the half of the floor's lobe after its peak, where the integral starts."""
    floor, deep = 200, 600  # m; the second interface at about 0.41 s below the floor's time
    column = _column(floor, [(floor, 2.0), (deep, 3.0)])
    band, whole = bl.column_traces(column, floor, bl.ricker(15.0, 0.002))
    r0, r1 = (2.0 - WATER) / (2.0 + WATER), (3.0 - 2.0) / (3.0 + 2.0)
    assert whole.shape == band.shape == (WINDOWS + 2,)
    np.testing.assert_allclose(whole[:10], r0)  # the floor's coefficient from the first window
    np.testing.assert_allclose(whole[WINDOWS - 10 : WINDOWS], r0 + r1)
    assert whole[WINDOWS] == 2.0 and whole[WINDOWS + 1] == pytest.approx(floor / 1000.0)
    np.testing.assert_allclose(band[WINDOWS - 10 : WINDOWS], r0 / 2, atol=0.02 * r1)


def test_the_table_scores_both_reflectivities_on_both_sets_deterministically(
    monkeypatch, tiny_params, tmp_path
):
    params = tiny_params(tmp_path)
    params = dataclasses.replace(params, synth=dataclasses.replace(params.synth, n_train=30))
    monkeypatch.setattr(bl, "HELD_OUT", 60)
    out = bl.bench_level(params, factors=(1, 2))
    rows = {(r["reflectivity"], r["train"]): r for r in out["rows"]}
    assert set(rows) == {(k, n) for k in ("band-limited", "whole") for n in (30, 60)}
    for r in out["rows"]:
        assert -1.0 <= r["corr"] <= 1.0 and 0.0 < r["error"] < 0.5 and -1 <= r["ood_corr"] <= 1
    # every frequency carries more of the level than the wavelet's band
    assert rows[("whole", 60)]["corr"] > rows[("band-limited", 60)]["corr"]
    assert rows[("whole", 60)]["error"] < rows[("band-limited", 60)]["error"]
    assert bl.bench_level(params, factors=(1, 2)) == out
    table = bl.format_table(out)
    assert "band-limited" in table and "OOD corr" in table and len(table.splitlines()) == 6
