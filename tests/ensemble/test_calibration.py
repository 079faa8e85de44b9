"""Calibrated uncertainty: band assignment, conformal quantiles, coverage, the predict file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from speedstructure.ensemble.calibration import (
    Calibrator,
    band_index,
    calibrate,
    coverage_report,
    ensemble_calibration,
    half_width,
)
from support import WATER

SHAPE = (300, 1259)


def _model(floor: int = 100, v: float = 2.5) -> np.ndarray:
    m = np.full(SHAPE, v, np.float32)
    m[:, :floor] = 1.5
    return m


def test_band_index_puts_water_in_band_zero_and_counts_depth_below_the_floor():
    band = band_index(_model(floor=100), [0, 50, 150, 1259], WATER)
    assert (band[:, :100] == 0).all()
    assert (band[:, 100:150] == 1).all() and (band[:, 150:250] == 2).all()
    assert (band[:, 250:] == 3).all()


def test_coverage_is_computed_exactly_on_a_constructed_case():
    truth = np.full((2, *SHAPE), 2.0, np.float32)
    pred = truth.copy()
    # sample 0: every cell off by 0.05 (inside a 0.1 half-width); sample 1: the deepest
    # 259 m off by 0.5 (outside), the rest exact
    pred[0] += 0.05
    pred[1, :, 1000:] += 0.5
    hw = np.full_like(pred, 0.1)
    metrics, columns = coverage_report(pred, truth, hw, [0, 1000, 1259])
    outside = 300 * 259 / (2 * 300 * 1259)
    assert metrics["coverage"] == pytest.approx(1 - outside)
    assert metrics["per_depth"]["0-1000"]["coverage"] == 1.0
    assert metrics["per_depth"]["1000-1259"]["coverage"] == pytest.approx(0.5)
    assert metrics["mean_width"] == pytest.approx(0.2)
    assert columns["coverage"] == pytest.approx([1.0, 1 - 259 / 1259])
    assert columns["mean_abs_error"][1] > columns["mean_abs_error"][0]


def test_the_conformal_quantile_covers_the_nominal_share_of_new_cells():
    rng = np.random.default_rng(0)
    cal = Calibrator([0, 300, 1259], scale="absolute", resolution=1e-4)
    truth = _model(floor=50)[None].repeat(4, 0)

    def noisy(scale_deep: float) -> np.ndarray:
        noise = rng.normal(0, 0.05, truth.shape).astype(np.float32)
        noise[..., 350:] *= scale_deep
        noise[..., :50] = 0  # water: exact
        return truth + noise

    for _ in range(2):
        cal.add(noisy(4.0), truth, WATER)
    c = cal.fit(0.9)
    assert c["quantiles"][0] == pytest.approx(1e-4)  # water: exact, one bin
    assert c["quantiles"][2] > 3 * c["quantiles"][1]  # the deep band is wider
    fresh = noisy(4.0)
    hw = half_width(fresh, c, WATER)
    inside = np.abs(fresh - truth) <= hw
    assert inside[..., 50:].mean() == pytest.approx(0.9, abs=0.01)


def test_relative_scale_scales_with_the_predicted_velocity():
    cal = {"quantiles": [0.0, 0.1], "bands_below_floor_m": [0, 1259], "scale": "relative"}
    m = _model(floor=10, v=3.0)
    hw = half_width(m, cal, WATER)
    assert hw.dtype == np.float32
    assert hw[0, 0] == 0.0 and hw[0, 500] == pytest.approx(0.3)


def test_calibrate_reports_cross_fold_coverage():
    rng = np.random.default_rng(1)
    truth = _model()[None].repeat(2, 0)
    folds = {
        k: (truth + rng.normal(0, 0.05, truth.shape).astype(np.float32), truth) for k in (0, 1)
    }
    cfg = SimpleNamespace(coverage=0.9, bands=(0, 300, 1259), scale="absolute", resolution=1e-4)
    calibration, metrics = calibrate(folds, cfg, WATER)
    assert metrics["cross_fold"]["coverage"] == pytest.approx(0.9, abs=0.02)
    assert set(metrics["quantile_per_band"]) == {"water", "0-300", "300-1259"}
    assert json.loads(json.dumps(calibration)) == calibration  # fits in the ensemble file


def test_float32_half_widths_file_and_the_calibration_carried_by_an_ensemble(tmp_path):
    from speedstructure.data.submission import SubmissionWriter

    sid = "a" * 18
    for name in ("u.npz", "u2.npz"):
        with SubmissionWriter(tmp_path / name, dtype=np.float32) as w:
            w.add(sid, np.ones((300, 1259)))
    with np.load(tmp_path / "u.npz") as z:
        assert z[sid].dtype == np.float32 and z.files == [sid]
    assert (tmp_path / "u.npz").read_bytes() == (tmp_path / "u2.npz").read_bytes()

    class FakeEnsemble:
        spec = {"calibration": {"quantiles": [0.1]}}

        def predict(self, x):
            return x

    assert ensemble_calibration(FakeEnsemble().predict) == {"quantiles": [0.1]}
    assert ensemble_calibration(lambda x: x) is None


def test_predict_writes_the_half_widths_beside_the_submission(tiny_zips, tmp_path):
    from speedstructure.stages.predict import predict_to_submission

    cal = {"quantiles": [0.0, 0.05], "bands_below_floor_m": [0, 1259], "scale": "relative"}

    class FakeEnsemble:
        spec = {"calibration": cal}

        def predict(self, x):
            return np.stack([_model(floor=120, v=2.0)] * len(x))

    out = predict_to_submission(
        FakeEnsemble().predict,
        tiny_zips["test"],
        tmp_path / "sub.npz",
        progress=False,
        uncertainty=tmp_path / "unc.npz",
        water_velocity=WATER,
    )
    assert out["uncertainty"] == str(tmp_path / "unc.npz")
    with np.load(tmp_path / "sub.npz") as sub, np.load(tmp_path / "unc.npz") as unc:
        assert sorted(sub.files) == sorted(unc.files)
        u = unc[sub.files[0]]
        assert u.dtype == np.float32 and u.shape == SHAPE
        assert u[0, 0] == 0.0 and u[0, 500] == pytest.approx(0.1)
