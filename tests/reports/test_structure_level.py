"""The evaluation's structure and level figures on constructed models: the velocity level
(mean below the water floor), R2_lat per family and the body IoU of intrusion samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speedstructure.config.load import load_params
from speedstructure.data.truth import make_truth, pack_body
from speedstructure.metrics import high_velocity_iou, mean_below_floor, pearson
from speedstructure.reports import evaluation as EV
from support import ROOT, WATER

PARAMS = load_params(ROOT / "params.yaml")
BODY = (slice(100, 160), slice(700, 740))  # 60 columns x 40 m, 4.3 km/s


def model(floor: int, base: float, body: bool = False) -> np.ndarray:
    """Water down to ``floor``, ``base`` km/s below it, a layer 0.5 km/s faster dipping from
    600 m, and with ``body`` a 4.3 km/s block."""
    v = np.full((300, 1259), base, np.float32)
    v[:, :floor] = WATER
    for x in range(300):
        v[x, 600 + x // 3 :] = base + 0.5
    if body:
        v[BODY] = 4.3
    return v


def truth_of(floors, families) -> object:
    bodies = []
    for fam in families:
        b = np.zeros((300, 1259), bool)
        if fam == "intrusion":
            b[BODY] = True
        bodies.append(pack_body(b if b.any() else None))
    n = len(floors)
    rows = {
        "family": families,
        "v_top": [2.0] * n,
        "v_bottom": [4.0] * n,
        "trend_power": [1.0] * n,
        "floor": [np.full(300, f) for f in floors],
        "h": [np.zeros(300)] * n,
        "body": bodies,
    }
    return make_truth(Path("test_truth.npz"), [f"S{i}" for i in range(n)], rows)


FLOORS = (200, 250, 300, 150)
FAMILIES = ["intrusion", "flat", "intrusion", "flat"]
BASES = (2.2, 2.6, 2.4, 3.0)
TRUTHS = np.stack(
    [model(f, b, fam == "intrusion") for f, b, fam in zip(FLOORS, BASES, FAMILIES, strict=True)]
)


def _scores(ens: np.ndarray, truth=None):
    scores = np.abs(ens - TRUTHS).mean(axis=(1, 2))
    lev, lev_cols = EV.level(PARAMS, TRUTHS, ens, truth)
    known, known_cols = EV.known_structure(PARAMS, TRUTHS, ens, scores, truth)
    return {**lev, **known}, {**lev_cols, **known_cols}


def test_a_perfect_prediction_scores_one_and_no_error():
    truth = truth_of(FLOORS, FAMILIES)
    m, cols = _scores(TRUTHS.copy(), truth)
    assert m["body_iou"] == 1.0 and m["body_iou_n"] == 2 and m["body_threshold"] == 4.0
    assert m["level_corr"] == pytest.approx(1.0) and m["level_error"] == 0.0
    assert m["level_floor"] == "truth" and m["truth"] == "test_truth.npz"
    assert list(m["per_family"]) == ["flat", "intrusion"]  # synth.families' order
    assert m["per_family"]["flat"] == {"n": 2, "ensemble_mape": 0.0, "lateral_r2": 1.0}
    assert m["per_family"]["intrusion"]["lateral_r2"] == 1.0
    assert list(cols["family"]) == FAMILIES
    np.testing.assert_array_equal(np.isnan(cols["body_iou"]), [False, True, False, True])
    # the level: the mean of the cells below each floor
    expected = [TRUTHS[i][:, f:].mean(dtype=np.float64) for i, f in enumerate(FLOORS)]
    np.testing.assert_allclose(cols["level_true"], expected, rtol=1e-12)
    np.testing.assert_allclose(cols["level_pred"], expected, rtol=1e-12)


def test_known_shifts_give_known_errors():
    truth = truth_of(FLOORS, FAMILIES)
    m, _ = _scores(TRUTHS * np.float32(1.05), truth)  # 5 % too fast everywhere
    assert m["level_error"] == pytest.approx(0.05, rel=1e-5)
    assert m["level_bias"] == pytest.approx(0.05, rel=1e-5)
    assert m["level_corr"] == pytest.approx(1.0)
    ens = TRUTHS.copy()
    ens[0][100:160, 700:710] = 2.7  # the body's top 10 m missed, 10 m too many below it
    ens[0][100:160, 740:750] = 4.3
    m, cols = _scores(ens, truth)
    assert cols["body_iou"][0] == pytest.approx(30 / 50) and cols["body_iou"][2] == 1.0
    assert m["body_iou"] == pytest.approx((0.6 + 1.0) / 2)
    flat = np.broadcast_to(TRUTHS.mean(axis=1, keepdims=True), TRUTHS.shape)
    m, cols = _scores(flat, truth)  # laterally flat: R2_lat 0 in every family, no body
    assert all(v["lateral_r2"] == pytest.approx(0.0, abs=1e-9) for v in m["per_family"].values())
    assert m["body_iou"] == 0.0  # the averaged body is slower than 4.0 km/s


def test_without_a_truth_file_the_level_reads_the_targets_floor():
    m, cols = _scores(TRUTHS * np.float32(0.9))
    assert m["truth"] is None and "per_family" not in m and "body_iou" not in m
    assert "family" not in cols and "body_iou" not in cols
    assert m["level_floor"] == "targets"
    assert m["level_error"] == pytest.approx(0.1, rel=1e-5)
    assert m["level_bias"] == pytest.approx(-0.1, rel=1e-5)
    with_truth, _ = _scores(TRUTHS * np.float32(0.9), truth_of(FLOORS, FAMILIES))
    assert with_truth["level_error"] == pytest.approx(m["level_error"], rel=1e-12)


def test_the_figures_reach_the_headline_flat_metrics_and_report():
    truth = truth_of(FLOORS, FAMILIES)
    m, _ = _scores(TRUTHS * np.float32(1.02), truth)
    metrics = {
        "n_test": 4,
        "ensemble_mape": 0.02,
        "baseline_mape": 0.1,
        "best_single_mape": 0.03,
        "best_single": {"run": "a-f0"},
        "ratio_to_baseline": 0.2,
        "lateral_r2": 0.9,
        "water_floor_error_m": 0.0,
        "oracle_mape": 0.01,
        "focus_band": [300, 900],
        "focus_band_mape": 0.02,
        "per_group": {},
        "per_depth": {},
        "runs": {},
        **m,
    }
    metrics["ood"] = {**metrics, "zip": "test_ood.zip", "level_corr": None}
    flat = EV.flat_metrics(metrics)
    lean = EV.headline(metrics)
    for key in ("level_corr", "level_error", "body_iou", "r2_lat_flat", "r2_lat_intrusion"):
        assert lean[key] == flat[key]
    for key in ("level_error", "body_iou", "r2_lat_flat", "r2_lat_intrusion"):
        assert lean[f"ood_{key}"] == flat[f"ood_{key}"]
    assert "ood_level_corr" not in flat and "level_bias" not in lean
    text = EV.format_report(metrics)
    assert "velocity level (mean below the truth file's water floor): correlation 1.000" in text
    assert "intrusion bodies (cells above 4 km/s): IoU 1.000, mean of 2 samples" in text
    assert "  flat         2  " in text and "correlation n/a" in text  # the OOD block's
    metrics.update(truth=None)
    del metrics["per_family"], metrics["body_iou"]
    assert "no truth file: per-family R2_lat and body IoU not available" in EV.format_report(
        metrics
    )


def test_metric_helpers():
    a = np.zeros((3, 4))
    b = a.copy()
    a[0, :2], b[0, 1:3] = 5.0, 5.0
    assert high_velocity_iou(a, b, 4.0) == pytest.approx(1 / 3)
    assert np.isnan(high_velocity_iou(a * 0, b * 0, 4.0))  # nothing fast in either
    assert np.isnan(pearson([1.0, 1.0], [1.0, 2.0])) and np.isnan(pearson([1.0], [2.0]))
    v = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    got = mean_below_floor(v, np.array([[0, 2, 4], [1, 1, 1]]))
    np.testing.assert_allclose(got, [np.mean([0, 1, 2, 3, 6, 7]), np.mean(v[1][:, 1:])])
    assert np.isnan(mean_below_floor(v[:1], np.array([[4, 4, 4]]))[0])
