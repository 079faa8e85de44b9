"""Synthetic velocity models: format, water layer, depth trend, families, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from speedstructure.config.load import load_params
from speedstructure.config.schema import SynthConfig
from speedstructure.config.typed import ConfigError
from speedstructure.synth.velocity import (
    FAMILIES,
    _structure,
    _water_floor,
    generate_velocity,
    sample_family,
)
from support import ROOT

CFG = SynthConfig(
    v_min=1.5, v_max=4.5, water_velocity=1.5, water_depth=(150, 400)
)  # priors: defaults
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
    synth = load_params(ROOT / "params.yaml").synth
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
        assert bottom > top + 0.3
        # slow sediment under the floor (a curved floor cuts a little into the trend)
        assert 1.55 <= v[np.arange(300), floor].mean() <= CFG.v_top[1] + 0.6


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
        u, _h, body = _structure(rng, family, _water_floor(rng, 150, 400))
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


# --------------------------------------------------------------------------- priors


def _prior_stats(cfg: SynthConfig, n: int, seed: int) -> dict[str, np.ndarray]:
    """Per ``flat`` model: the velocity just under the floor where it is shallowest (the top
    of the trend), at the bottom (median over x) and the floor depths (min, max)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"top": [], "bottom": [], "floor_min": [], "floor_max": []}
    for _ in range(n):
        v = generate_velocity(rng, "flat", cfg)
        floor = _floor(v)
        x = int(np.argmin(floor))
        out["top"].append(v[x, floor[x]])
        out["bottom"].append(np.median(v[:, -1]))
        out["floor_min"].append(floor.min())
        out["floor_max"].append(floor.max())
    return {k: np.array(a, dtype=np.float64) for k, a in out.items()}


@pytest.mark.parametrize(
    ("v_top", "v_bottom", "water_depth"),
    [((1.65, 1.75), (3.55, 3.65), (110, 170)), ((2.45, 2.55), (4.35, 4.45), (380, 440))],
)
def test_priors_are_honoured(v_top, v_bottom, water_depth):
    # a linear trend, so that the top layer sits at v_top and the deepest at v_bottom,
    # up to the per-layer noise (sd <= 0.1 km/s) and the occasional inverted layer
    cfg = dataclasses.replace(
        CFG, v_top=v_top, v_bottom=v_bottom, trend_power=(1.0, 1.0), water_depth=water_depth
    )
    s = _prior_stats(cfg, 24, seed=3)
    assert s["floor_min"].min() >= water_depth[0] and s["floor_max"].max() <= water_depth[1]
    assert v_top[0] - 0.1 <= np.median(s["top"]) <= v_top[1] + 0.1
    assert v_bottom[0] - 0.1 <= np.median(s["bottom"]) <= v_bottom[1] + 0.1
    assert np.quantile(s["top"], 0.9) < v_top[1] + 0.3
    assert np.quantile(s["bottom"], 0.1) > v_bottom[0] - 0.3


def test_default_priors_are_broad():
    # the ranges: sediment under the floor over 1.6-2.6 km/s, bottoms over most of
    # [3.5, 4.5], water floors over the challenge's whole range (about 200-350 m) and beyond
    cfg = SynthConfig()
    assert cfg.v_top == (1.6, 2.6) and cfg.v_bottom == (3.5, 4.5)
    assert cfg.water_depth[0] <= 150 and cfg.water_depth[1] >= 400
    assert cfg.trend_power[0] < 1.0 < cfg.trend_power[1]
    s = _prior_stats(dataclasses.replace(cfg, trend_power=(1.0, 1.0)), 60, seed=4)
    assert np.quantile(s["top"], 0.1) < 1.8 and np.quantile(s["top"], 0.9) > 2.4
    assert np.quantile(s["bottom"], 0.1) < 3.7 and np.quantile(s["bottom"], 0.9) > 4.3
    assert s["floor_min"].min() < 150 and s["floor_max"].max() > 400
    assert (s["floor_min"] >= cfg.water_depth[0]).all()
    assert (s["floor_max"] <= cfg.water_depth[1]).all()


def test_trend_power_shapes_the_trend():
    # power < 1: fast rise under the floor; power > 1: slow sediment down to great depth
    def mid_depth_velocity(power: float) -> float:
        cfg = dataclasses.replace(
            CFG, v_top=(2.0, 2.0), v_bottom=(4.0, 4.0), trend_power=(power, power)
        )
        rng = np.random.default_rng(8)
        vs = [generate_velocity(rng, "flat", cfg) for _ in range(8)]
        return float(np.median([v[:, (_floor(v).max() + v.shape[1]) // 2].mean() for v in vs]))

    steep, linear, slow = (mid_depth_velocity(p) for p in (0.5, 1.0, 2.0))
    assert steep > linear + 0.3 and linear > slow + 0.3
    assert 2.8 < linear < 3.2  # halfway down: about the mean of 2 and 4 km/s


def test_prior_ranges_are_checked(tiny_params, tmp_path):
    with pytest.raises(ConfigError, match=r"synth\.v_top must be \[low, high\] with low <= high"):
        tiny_params(tmp_path, synth={"v_top": [2.6, 1.6]})
    with pytest.raises(ConfigError, match=r"synth\.trend_power must be positive"):
        tiny_params(tmp_path, synth={"trend_power": [0.0, 1.0]})
    with pytest.raises(ConfigError, match=r"synth\.ood\.water_depth must be \[low, high\]"):
        tiny_params(tmp_path, synth={"ood": {"water_depth": [480, 200]}})
    with pytest.raises(ConfigError, match=r"synth\.ood\.n_test must be >= 0"):
        tiny_params(tmp_path, synth={"ood": {"n_test": -1}})
