"""Synthetic velocity models: format, water layer, depth trend, families, determinism."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from speedstructure.config import ConfigError, SynthConfig, load_params
from speedstructure.synth.velocity import (
    FAMILIES,
    _structure,
    _water_floor,
    generate_velocity,
    sample_family,
)

CFG = SynthConfig(v_min=1.5, v_max=4.5, water_velocity=1.5, water_depth=(150, 400))
N_PER_FAMILY = 12


def _models(family: str, seed: int = 0, n: int = N_PER_FAMILY) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [generate_velocity(rng, family, CFG) for _ in range(n)]


@pytest.fixture(scope="module")
def models() -> dict[str, list[np.ndarray]]:
    return {f: _models(f, seed=i) for i, f in enumerate(FAMILIES)}


def _floor(v: np.ndarray) -> np.ndarray:
    """Index of the first non-water cell in every column."""
    return np.argmax(v != CFG.water_velocity, axis=1)


def _lateral_std(v: np.ndarray) -> float:
    """Mean over depth of the std along x, below the deepest floor point."""
    return float(v[:, _floor(v).max() + 1 :].std(axis=0).mean())


def test_params_families_are_known():
    synth = load_params(Path(__file__).resolve().parents[1] / "params.yaml").synth
    assert set(synth.families) <= set(FAMILIES)
    assert set(SynthConfig().families) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_dtype_range(models, family):
    for v in models[family]:
        assert v.shape == (300, 1259)
        assert v.dtype == np.float32
        assert np.isfinite(v).all()
        assert v.min() >= CFG.v_min and v.max() <= CFG.v_max


@pytest.mark.parametrize("family", FAMILIES)
def test_water_layer_on_top(models, family):
    lo, hi = CFG.water_depth
    for v in models[family]:
        assert (v[:, 0] == CFG.water_velocity).all()
        floor = _floor(v)
        assert floor.min() >= lo and floor.max() <= hi
        z = np.arange(v.shape[1])[None, :]
        water = v == CFG.water_velocity
        # water exactly above the floor, none below it
        assert (water == (z < floor[:, None])).all()
        # gently curved floor: no steps between neighbouring columns
        assert np.abs(np.diff(floor)).max() <= 3


def test_floor_depth_varies_between_models(models):
    floors = np.array([_floor(v).mean() for fam in models.values() for v in fam])
    assert floors.max() - floors.min() > 100


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_increases_with_depth(models, family):
    for v in models[family]:
        floor = _floor(v)
        top = np.mean([v[i, f : f + 200].mean() for i, f in enumerate(floor)])
        bottom = v[:, -200:].mean()
        assert bottom > top + 0.8
        assert 1.55 <= v[np.arange(300), floor].mean() <= 2.6  # slow sediment under the floor


def test_mean_velocity_about_2_8(models):
    means = [float(v.mean()) for fam in models.values() for v in fam]
    assert 2.6 < np.mean(means) < 3.0


def test_layers_are_thin_and_many():
    counts = []
    for v in _models("flat", seed=11):
        col = v[150, _floor(v)[150] :]
        counts.append(int((np.abs(np.diff(col)) > 1e-4).sum()) + 1)
    assert 15 <= np.median(counts) <= 70


def test_occasional_velocity_inversions():
    # drops of more than 0.15 km/s from one layer to the next: rare from noise alone
    drops = 0
    for v in _models("flat", seed=5, n=20):
        col = v[150, _floor(v)[150] :]
        drops += int((np.diff(col) < -0.15).sum())
    assert drops >= 15


def test_same_seed_same_model_different_seed_different():
    for family in FAMILIES:
        a = generate_velocity(np.random.default_rng(42), family, CFG)
        b = generate_velocity(np.random.default_rng(42), family, CFG)
        c = generate_velocity(np.random.default_rng(43), family, CFG)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_families_differ_in_lateral_structure(models):
    lat = {f: np.mean([_lateral_std(v) for v in models[f]]) for f in FAMILIES}
    assert lat["flat"] < 0.03
    for f in ("dipping", "gentle_fold", "strong_fold", "faulted", "intrusion"):
        assert lat[f] > 1.5 * lat["flat"], (f, lat)
    assert lat["strong_fold"] > lat["gentle_fold"]


def test_flat_layers_are_laterally_uniform(models):
    for v in models["flat"]:
        below = v[:, _floor(v).max() + 1 :]
        assert (below.max(axis=0) - below.min(axis=0)).max() < 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_only_faults_offset_layers(family):
    # Structural depth u = z - h(x) (+ throw / uplift): a fault makes it jump by its
    # throw (>= 15 m) between neighbouring columns; folds and dips change it smoothly.
    rng = np.random.default_rng(21)
    for _ in range(10):
        u, body = _structure(rng, family, _water_floor(rng, 150, 400))
        assert u.shape == (300, 1259)
        jump = np.abs(np.diff(u, axis=0)).max()
        assert jump >= 15.0 if family == "faulted" else jump < 3.0
        assert (body is not None and body.any()) == (family == "intrusion")


def test_intrusion_has_high_velocity_body(models):
    def contrast(v: np.ndarray) -> float:
        below = v[:, _floor(v).max() + 1 :]
        return float((below.max(axis=0) - np.median(below, axis=0)).max())

    assert all(contrast(v) > 0.8 for v in models["intrusion"])
    assert all(contrast(v) < 0.3 for v in models["flat"])
    assert all(v.max() >= 4.0 for v in models["intrusion"])


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="volcano"):
        generate_velocity(np.random.default_rng(0), "volcano", CFG)


def test_bad_water_depth_raises(tiny_params, tmp_path):
    for depth in ((400, 150), (150, 1259)):
        cfg = SynthConfig(water_depth=depth)
        with pytest.raises(ValueError, match="water_depth"):
            generate_velocity(np.random.default_rng(0), "flat", cfg)
    with pytest.raises(ConfigError, match="synth.water_depth"):  # a missing value: params.yaml
        tiny_params(tmp_path, synth={"water_depth": [150]})


def test_sample_family_uniform():
    rng = np.random.default_rng(0)
    draws = [sample_family(rng, FAMILIES) for _ in range(3000)]
    counts = np.array([draws.count(f) for f in FAMILIES])
    assert counts.sum() == 3000 and (np.abs(counts - 500) < 90).all()
    assert sample_family(rng, ["faulted"]) == "faulted"
    with pytest.raises(ValueError):
        sample_family(rng, [])


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_fast(family):
    rng = np.random.default_rng(0)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        generate_velocity(rng, family, CFG)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.05  # vectorised: a few ms each; min is robust to a loaded machine
