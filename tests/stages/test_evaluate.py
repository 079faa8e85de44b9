"""The evaluate stage: its scoring helpers, the report table, and the stage on a tiny project
of depth-trend runs (the whole pipeline runs in test_pipeline)."""

import json
import logging

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from speedstructure.config.typed import ConfigError
from speedstructure.data.groups import KMeansCentres, velocity_features
from speedstructure.data.samples import list_sample_ids
from speedstructure.engine.checkpoint import best_checkpoint, save_checkpoint
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import atomic_write_json
from speedstructure.metrics import per_sample_mape, relative_error
from speedstructure.reports import evaluation as EV
from speedstructure.reports.evaluation import HEADLINE, NO_LABELS, flat_metrics, format_report
from speedstructure.stages.evaluate import _cmd_evaluate, _cmd_report, run_evaluate
from support import ROOT, WATER, model_from, random_velocity


def test_relative_error_is_the_challenge_metric():
    rng = np.random.default_rng(0)
    g = random_velocity(rng, 2)
    p = g * rng.uniform(0.9, 1.1, g.shape).astype(np.float32)
    err = relative_error(p, g)
    assert err.shape == g.shape and err.dtype == np.float32
    np.testing.assert_allclose(err, np.abs(g - p) / (np.abs(g) + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(
        err.mean(axis=(1, 2)),
        per_sample_mape(torch.from_numpy(p), torch.from_numpy(g)).numpy(),
        rtol=1e-5,
    )
    # the stage's per-sample scores are the metric's, and it has no MAPE of its own
    np.testing.assert_array_equal(EV._per_sample(err), per_sample_mape(p, g))
    assert not hasattr(EV, "relative_error") or EV.relative_error is relative_error


def test_report_table():
    m = {
        "n_test": 3,
        "baseline_mape": 0.08,
        "best_single_mape": 0.05,
        "ensemble_mape": 0.04,
        "best_single": {"run": "a-f0"},
        "ratio_to_baseline": 0.5,
        "registered": {"model_uri": "models:/x/2", "champion": False, "champion_version": 1},
    }
    text = format_report(m, "sub.npz")
    assert (
        "depth-trend baseline" in text and "0.08000" in text and "best single model (a-f0)" in text
    )
    assert "ensemble / baseline = 0.500" in text and "models:/x/2 (champion stays v1)" in text


# --------------------------------------------------------------------------- the stage


def _trend_run(params, variant: str, fold: int, velocity: float, val_mape: float) -> None:
    model = model_from({"arch": "depth_trend"}).fit([np.full((300, 1259), velocity, np.float32)])
    out = params.run_dir(variant, fold)
    ckpt = best_checkpoint(model.state_dict(), model.variant, {}, 1, val_mape, {})
    save_checkpoint(ckpt, out / "best.pt")
    atomic_write_json(out / "metrics.json", {"best_val_mape": val_mape})


TREND = {"arch": "depth_trend"}
RUNS = {
    "a-f0": {"variant": "tiny_a", "fold": 0},
    "b-f0": {"variant": "tiny_b", "fold": 0},
    "base-f0": {"variant": "base", "fold": 0},
    "base-f1": {"variant": "base", "fold": 1},
}
SECTIONS = {
    "variants": {"tiny_a": TREND, "tiny_b": TREND, "base": TREND},
    "runs": RUNS,
    "ensemble": {"variants": ["tiny_a", "tiny_b"], "hand_weights": {}},
    "evaluate": {"baseline": "base", "batch_size": 1, "depth_bands": [0, 100, 1259]},
}


def _tiny_project(tmp_path, tiny_zips, tiny_params):
    """``(params, truths)``: the tiny test zip with random targets, a one-group K-Means and
    four depth-trend runs (constant 2.2, 2.8; the baseline's 2.0 and 3.0); no submission."""
    params = tiny_params(tmp_path, **SECTIONS)
    params.path("data").mkdir()
    params.zip_path("test").symlink_to(tiny_zips["test"])
    ids = list_sample_ids(tiny_zips["test"])
    rng = np.random.default_rng(1)
    # up to 4.4 km/s: 1.02 x the truth (_write_submission) stays in the challenge's range
    truths = {s: rng.uniform(1.5, 4.4, (300, 1259)).astype(np.float32) for s in ids}
    np.savez(params.test_labels_path(), **truths)
    km = KMeans(n_clusters=1, n_init=1).fit(
        np.stack([velocity_features(t) for t in truths.values()])
    )
    params.path("kmeans").parent.mkdir()
    params.path("kmeans").write_bytes(KMeansCentres.from_sklearn(km).to_bytes())
    for run, (v, val) in zip(
        RUNS.values(), [(2.2, 0.05), (2.8, 0.04), (2.0, 0.2), (3.0, 0.2)], strict=True
    ):
        _trend_run(params, run["variant"], run["fold"], v, val)
    return params, truths


def _write_submission(params, truths, factor: float = 1.02) -> None:
    params.path("submission").parent.mkdir(exist_ok=True)
    np.savez(
        params.path("submission"), **{s: t.astype(np.float64) * factor for s, t in truths.items()}
    )


def test_run_evaluate_on_a_tiny_project(tmp_path, tiny_zips, tiny_params):
    params, truths = _tiny_project(tmp_path, tiny_zips, tiny_params)
    ids, runs, sections = list(truths), RUNS, SECTIONS
    with pytest.raises(UserError, match="submission.npz: submission .run the predict stage"):
        run_evaluate(params, track=False, progress=False)
    _write_submission(params, truths)

    m = run_evaluate(params, track=False, progress=False)
    g = np.stack([truths[s] for s in ids])
    ref = lambda p: float(np.mean(np.abs(g - p) / (g + 1e-8)))  # noqa: E731
    assert m["n_test"] == 2 and m["ensemble_mape"] == pytest.approx(0.02, rel=1e-4)
    assert m["baseline_mape"] == pytest.approx(ref(2.5), rel=1e-5)  # mean of the fold models
    assert m["best_single"] == {"run": "b-f0", "val_mape": 0.04, "test_mape": m["best_single_mape"]}
    assert m["best_single_mape"] == pytest.approx(ref(2.8), rel=1e-5)
    assert m["ratio_to_baseline"] == pytest.approx(m["ensemble_mape"] / m["baseline_mape"])
    assert m["per_group"] == {
        0: {"n": 2, "ensemble": m["ensemble_mape"], "baseline": m["baseline_mape"]}
    }
    assert list(m["per_depth"]) == ["0-100", "100-1259"]
    assert m["per_depth"]["0-100"]["baseline"] == pytest.approx(
        float(np.mean(np.abs(g[:, :, :100] - 2.5) / g[:, :, :100])), rel=1e-5
    )
    assert set(m["runs"]) == set(runs) and m["runs"]["a-f0"]["test_mape"] == pytest.approx(
        ref(2.2), rel=1e-5
    )
    assert "registered" not in m
    assert json.loads(params.path("evaluate_report").read_text()) == json.loads(json.dumps(m))
    # the DVC metrics: only what experiments are compared on, under MLflow's names
    lean = json.loads(params.path("evaluate_metrics").read_text())
    assert lean == {k: flat_metrics(m)[k] for k in (*HEADLINE, "level_corr", "level_error")}
    # the level (mean velocity below the targets' floor: no truth file): 2 % too fast
    assert m["level_floor"] == "targets" and m["level_corr"] == pytest.approx(1.0)
    assert m["level_error"] == pytest.approx(0.02, rel=1e-5)
    assert m["level_bias"] == pytest.approx(0.02, rel=1e-5)
    assert m["truth"] is None and "per_family" not in m and "body_iou" not in m
    curves = params.path("training_curves").read_text().splitlines()
    assert curves[0] == "run,epoch,train_loss,val_mape"  # every run's history.csv, one table
    # a prediction of 1.02 x the truth keeps 98 % of its lateral deviation: R2_lat = 1 - 0.02^2
    assert m["lateral_r2"] == pytest.approx(1 - 0.02**2, rel=1e-6)
    oracle = np.broadcast_to(g.mean(axis=1, keepdims=True), g.shape)
    assert m["oracle_mape"] == pytest.approx(ref(oracle), rel=1e-5)
    assert set(m["per_depth"]["0-100"]) == {"ensemble", "baseline", "oracle"}
    assert m["focus_band"] == [300, 900]
    assert m["focus_band_mape"] == pytest.approx(0.02, rel=1e-4)
    assert m["water_floor_error_m"] >= 0
    rows = params.path("evaluate_per_sample").read_text().splitlines()
    header = "sample_id,group,ensemble_mape,baseline_mape,lateral_r2,water_floor_error_m"
    assert rows[0] == header + ",level_pred,level_true" and len(rows) == 3
    assert "lateral structure R2_lat 1.000" in format_report(m)
    assert "no truth file: per-family R2_lat and body IoU not available" in format_report(m)
    assert params.path("evaluate_figure").read_bytes()[:4] == b"\x89PNG"
    bad = tiny_params(tmp_path, **{**sections, "evaluate": {"baseline": "tiny_c"}})
    with pytest.raises(ConfigError, match="evaluate.baseline 'tiny_c' has no entry in runs"):
        run_evaluate(bad, track=False, progress=False)


# --------------------------------------------------------------------------- out of distribution


def _write_ood_set(params, n: int = 3) -> dict[str, np.ndarray]:
    """The OOD zip (random gathers, ids unlike the test zip's) and its targets: dipping
    models drawn with the shipped OOD priors."""
    from speedstructure.config.schema import SynthConfig
    from speedstructure.data.samples import ZipWriter
    from speedstructure.synth.dataset import ood_config
    from speedstructure.synth.velocity import generate_velocity

    rng = np.random.default_rng(7)
    cfg = ood_config(SynthConfig())
    truths = {f"OD{i:016d}": generate_velocity(rng, "dipping", cfg) for i in range(n)}
    zip_path, labels_path = params.ood_paths()
    with ZipWriter(zip_path) as zw:
        for sid in truths:
            zw.add(sid, rng.normal(0.0, 1e-3, (5, 10001, 31)).astype(np.float32), None)
    np.savez(labels_path, **truths)
    return truths


def _write_ensemble(params, weights: dict[str, float]) -> None:
    """An ensemble file (what the tune stage writes) of the fold-0 runs of ``weights``."""
    members = [
        {"variant": v, "checkpoint": str(params.run_dir(v, 0) / "best.pt"), "weight": w}
        for v, w in weights.items()
    ]
    atomic_write_json(
        params.path("ensemble"), {"format": 1, "folds": [{"fold": 0, "members": members}]}
    )


def test_evaluate_scores_the_ood_set_beside_the_test_set(tmp_path, tiny_zips, tiny_params, caplog):
    from speedstructure.metrics import water_floor_depth

    params, truths = _tiny_project(tmp_path, tiny_zips, tiny_params)
    _write_submission(params, truths)
    # no OOD files (real data): skipped with a note, never an error
    with caplog.at_level(logging.INFO, logger="speedstructure"):
        m = run_evaluate(params, track=False, progress=False)
    assert "ood" not in m and "no out-of-distribution test set" in caplog.text
    assert "Out-of-distribution" not in format_report(m)
    assert not any(k.startswith("ood_") for k in flat_metrics(m))
    _write_ood_set(params)
    params.ood_paths()[1].unlink()  # the zip without its targets: skipped too
    assert "ood" not in run_evaluate(params, track=False, progress=False)
    ood = _write_ood_set(params)
    with pytest.raises(UserError, match="no registered model .* out-of-distribution test set"):
        run_evaluate(params, track=False, progress=False)
    _write_ensemble(params, {"tiny_a": 0.25, "tiny_b": 0.75})  # 2.65 km/s everywhere

    m = run_evaluate(params, track=False, progress=False)
    o = m["ood"]
    g = np.stack([ood[s] for s in sorted(ood)])
    ref = lambda p: float(np.mean(np.abs(g - p) / (g + 1e-8)))  # noqa: E731
    assert o["n_test"] == 3 and o["zip"] == "test_ood.zip"
    assert o["ensemble_mape"] == pytest.approx(ref(0.25 * 2.2 + 0.75 * 2.8), rel=1e-5)
    assert o["baseline_mape"] == pytest.approx(ref(2.5), rel=1e-5)  # fitted on the training set
    assert o["ratio_to_baseline"] == pytest.approx(o["ensemble_mape"] / o["baseline_mape"])
    assert o["best_single"]["run"] == "b-f0"  # picked on validation, scored on the OOD set
    assert o["best_single_mape"] == pytest.approx(ref(2.8), rel=1e-5)
    assert o["runs"]["a-f0"]["test_mape"] == pytest.approx(ref(2.2), rel=1e-5)
    assert list(o["per_depth"]) == ["0-100", "100-1259"]
    oracle = np.broadcast_to(g.mean(axis=1, keepdims=True), g.shape)
    assert o["per_depth"]["100-1259"]["oracle"] == pytest.approx(
        float(np.mean(np.abs(g - oracle)[:, :, 100:] / g[:, :, 100:])), rel=1e-5
    )
    assert o["oracle_mape"] == pytest.approx(ref(oracle), rel=1e-5)
    assert o["lateral_r2"] == pytest.approx(0.0, abs=1e-9)  # a laterally flat prediction
    # 2.65 km/s from the surface down: the floor error is each truth's mean floor depth
    assert o["water_floor_error_m"] == pytest.approx(float(water_floor_depth(g, WATER).mean()))
    assert m["ensemble_mape"] == pytest.approx(0.02, rel=1e-4)  # the test set's, unchanged
    assert json.loads(params.path("evaluate_report").read_text())["ood"] == json.loads(
        json.dumps(o)
    )
    lean = json.loads(params.path("evaluate_metrics").read_text())
    assert lean["ood_test_mape"] == o["ensemble_mape"] and "per_group" not in lean
    flat = flat_metrics(m)
    assert flat["ood_test_mape"] == o["ensemble_mape"] and flat["test_mape"] == m["ensemble_mape"]
    assert {"ood_baseline_mape", "ood_lateral_r2", "ood_water_floor_error_m"} <= set(flat)
    assert flat["ood_depth_0-100_mape"] == o["per_depth"]["0-100"]["ensemble"]
    text = format_report(m)
    test_block, ood_block = text.split("Out-of-distribution test MAPE on 3 samples (test_ood.zip)")
    assert f"ensemble / baseline = {m['ratio_to_baseline']:.3f}" in test_block
    assert f"{o['baseline_mape']:.5f}" in ood_block and f"{o['ensemble_mape']:.5f}" in ood_block
    assert f"ensemble / baseline = {o['ratio_to_baseline']:.3f}" in ood_block
    assert f"water-floor depth error {o['water_floor_error_m']:.1f} m" in ood_block
    # targets without gathers: a one-line data error naming the zip
    np.savez(params.ood_paths()[1], **ood, ODextra00000000000=g[0])
    with pytest.raises(DataError, match="test_ood.zip: no gathers for 1 target"):
        run_evaluate(params, track=False, progress=False)


# --------------------------------------------------------------------------- truth files


def _write_truth(zip_path, ids, families, floors, bodies) -> None:
    """A truth file beside ``zip_path`` (rows in the reverse of ``ids``' order)."""
    from speedstructure.data.truth import make_truth, pack_body, save_truth, truth_path

    n = len(ids)
    rows = {
        "family": families,
        "v_top": [2.0] * n,
        "v_bottom": [3.0] * n,
        "trend_power": [1.0] * n,
        "floor": [np.full(300, f) for f in floors],
        "h": [np.zeros(300)] * n,
        "body": [pack_body(b) for b in bodies],
    }
    rows = {k: v[::-1] for k, v in rows.items()}
    save_truth(make_truth(truth_path(zip_path), ids[::-1], rows))


def test_evaluate_with_truth_files_scores_families_bodies_and_level(
    tmp_path, tiny_zips, tiny_params, caplog
):
    params, _ = _tiny_project(tmp_path, tiny_zips, tiny_params)
    ids = sorted(list_sample_ids(tiny_zips["test"]))
    truths = {ids[0]: _layered(200, dip=0.5), ids[1]: _layered(260, dip=-0.3)}
    body = np.zeros((300, 1259), bool)
    body[100:160, 700:740] = True
    truths[ids[0]][body] = 4.3  # an intrusion sample and a flat one
    np.savez(params.test_labels_path(), **truths)
    _write_submission(params, truths, factor=1.0)  # a perfect prediction
    with caplog.at_level(logging.INFO, logger="speedstructure.data.truth"):
        m = run_evaluate(params, track=False, progress=False)
    assert "no truth file test_truth.npz" in caplog.text and m["truth"] is None
    _write_truth(params.zip_path("test"), ids, ["intrusion", "flat"], [200, 260], [body, None])

    m = run_evaluate(params, track=False, progress=False)
    assert m["truth"] == "test_truth.npz" and m["level_floor"] == "truth"
    assert m["per_family"] == {
        "flat": {"n": 1, "ensemble_mape": 0.0, "lateral_r2": 1.0},
        "intrusion": {"n": 1, "ensemble_mape": 0.0, "lateral_r2": 1.0},
    }
    assert m["body_iou"] == 1.0 and m["body_iou_n"] == 1 and m["body_threshold"] == 4.0
    assert m["level_corr"] == pytest.approx(1.0) and m["level_error"] == 0.0
    lean = json.loads(params.path("evaluate_metrics").read_text())
    assert lean["r2_lat_flat"] == lean["r2_lat_intrusion"] == lean["body_iou"] == 1.0
    assert lean["level_error"] == 0.0 and "level_bias" not in lean
    rows = params.path("evaluate_per_sample").read_text().splitlines()
    assert rows[0] == (
        "sample_id,group,family,ensemble_mape,baseline_mape,lateral_r2,water_floor_error_m,"
        "level_pred,level_true,body_iou"
    )
    assert rows[1].startswith(f"{ids[0]},0,intrusion,") and rows[1].endswith(",1.0")
    assert rows[2].startswith(f"{ids[1]},0,flat,") and rows[2].endswith(",")  # no body
    text = format_report(m)
    assert "intrusion bodies (cells above 4 km/s): IoU 1.000, mean of 1 samples" in text
    assert "  flat         1  0.00000  1.000" in text


def test_evaluate_scores_the_ood_set_with_its_truth_file(tmp_path, tiny_zips, tiny_params):
    """The OOD set's truth file (as synth writes it): dipping models predicted at 2.65 km/s;
    then a stale truth file beside the test zip."""
    from speedstructure.config.schema import SynthConfig
    from speedstructure.data.truth import load_truth, save_truth, truth_path
    from speedstructure.metrics import mean_below_floor
    from speedstructure.synth.dataset import ood_config
    from speedstructure.synth.truth import truth_of
    from speedstructure.synth.velocity import generate_model

    params, truths = _tiny_project(tmp_path, tiny_zips, tiny_params)
    _write_submission(params, truths)
    ood = _write_ood_set(params)
    _write_ensemble(params, {"tiny_a": 0.25, "tiny_b": 0.75})
    rng = np.random.default_rng(7)  # _write_ood_set's models again, with what was drawn
    drawn = [generate_model(rng, "dipping", ood_config(SynthConfig())) for _ in ood]
    assert all(v.tobytes() == ood[s].tobytes() for (v, _), s in zip(drawn, ood, strict=True))
    zip_path = params.ood_paths()[0]
    save_truth(truth_of(zip_path, list(ood), [f for _, f in drawn]))

    m = run_evaluate(params, track=False, progress=False)
    o = m["ood"]
    assert o["truth"] == "test_ood_truth.npz" and list(o["per_family"]) == ["dipping"]
    assert o["per_family"]["dipping"]["lateral_r2"] == pytest.approx(0.0, abs=1e-9)
    assert o["body_iou_n"] == 0 and "body_iou" not in o
    assert o["level_corr"] is None  # a constant prediction: no correlation
    sids = sorted(ood)
    truth = load_truth(truth_path(zip_path)).select(sids)
    level = mean_below_floor(np.stack([ood[s] for s in sids]), truth.floor)
    assert o["level_error"] == pytest.approx(float(np.mean(np.abs(2.65 - level) / level)))
    assert o["per_sample"][sids[0]]["family"] == "dipping"
    assert o["per_sample"][sids[0]]["level_true"] == pytest.approx(level[0])
    lean = json.loads(params.path("evaluate_metrics").read_text())
    assert lean["ood_r2_lat_dipping"] == o["per_family"]["dipping"]["lateral_r2"]
    assert lean["ood_level_error"] == o["level_error"] and "ood_level_corr" not in lean
    assert "r2_lat_dipping" not in lean and m["truth"] is None  # the test set has none
    # a truth file of other samples: a one-line data error naming it
    _write_truth(params.zip_path("test"), ["A" * 18, "B" * 18], ["flat"] * 2, [200] * 2, [None] * 2)
    with pytest.raises(DataError, match="test_truth.npz: no truth for 2 sample"):
        run_evaluate(params, track=False, progress=False)


# --------------------------------------------------------------------------- structure metrics


def _layered(floor: int, dip: float = 0.0) -> np.ndarray:
    """Water down to ``floor`` m, then 2.0 km/s with a dipping 3.0 km/s layer below 600 m."""
    v = np.full((300, 1259), 2.0, np.float32)
    v[:, :floor] = 1.5
    for x in range(300):
        v[x, 600 + int(dip * x) :] = 3.0
    return v


def test_lateral_r2_is_zero_for_flat_and_one_for_perfect_predictions():
    from speedstructure.metrics import lateral_r2, laterally_constant_oracle

    truth = np.stack([_layered(200, dip=0.5), _layered(300, dip=-0.3)])
    assert lateral_r2(truth, truth) == 1.0
    assert lateral_r2(laterally_constant_oracle(truth), truth) == pytest.approx(0.0, abs=1e-12)
    assert lateral_r2(np.full_like(truth, 2.5), truth) == pytest.approx(0.0, abs=1e-12)
    half = laterally_constant_oracle(truth) + 0.5 * (truth - laterally_constant_oracle(truth))
    assert lateral_r2(half, truth) == pytest.approx(0.75)  # 1 - 0.5^2
    assert np.isnan(lateral_r2(truth, laterally_constant_oracle(truth)))  # flat truth


def test_lateral_loss_is_one_minus_lateral_r2_and_differentiable():
    from speedstructure.metrics import (
        LATERAL_FLOOR,
        lateral_deviation,
        lateral_loss,
        lateral_r2,
        laterally_constant_oracle,
    )

    truth = np.stack([_layered(200, dip=0.5), _layered(300, dip=-0.3)])
    flat = laterally_constant_oracle(truth)
    half = flat + 0.5 * (truth - flat)
    size = float((lateral_deviation(truth) ** 2).mean())
    shrink = size / (size + LATERAL_FLOOR)  # the floor's share: 0.994 here
    assert 0.99 < shrink < 1.0
    for pred in (truth, flat, half, np.full_like(truth, 2.5)):
        want = (1 - lateral_r2(pred, truth)) * shrink
        assert lateral_loss(pred, truth) == pytest.approx(want, rel=1e-9, abs=1e-12)
        as_torch = lateral_loss(torch.from_numpy(pred), torch.from_numpy(truth))
        assert float(as_torch) == pytest.approx(lateral_loss(pred, truth), rel=1e-4, abs=1e-7)
    assert lateral_loss(truth, flat) > 1.0  # a flat truth: finite, against the floor
    p = torch.from_numpy(half).requires_grad_()
    lateral_loss(p, torch.from_numpy(truth)).backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_water_floor_error_is_the_floor_shift_in_metres():
    from speedstructure.metrics import water_floor_depth, water_floor_error

    truth = _layered(250)
    assert (water_floor_depth(truth, WATER) == 250).all()
    assert water_floor_error(_layered(262), truth, WATER) == pytest.approx(12.0)
    both = water_floor_error(np.stack([_layered(240), truth]), np.stack([truth, truth]), WATER)
    np.testing.assert_allclose(both, [10.0, 0.0])
    smooth = truth.copy()
    smooth[:, 250:260] = np.linspace(1.5, 2.0, 10)  # a blurred floor: first cell over 1.55
    assert water_floor_error(smooth, truth, WATER) == pytest.approx(1.0)
    assert (water_floor_depth(np.full((300, 1259), WATER), WATER) == 1259).all()  # no floor at all


def test_evaluate_without_test_labels_records_it_and_keeps_the_submission(
    tmp_path, tiny_params, capsys, monkeypatch
):
    """The challenge ships no test targets: the stage says so, writes its outputs, exits 0."""
    import argparse

    params = tiny_params(tmp_path)
    sub = params.path("submission")
    sub.parent.mkdir(parents=True)
    preds = {f"TE{i:016d}": np.full((300, 1259), 2.0 + i, np.float64) for i in range(3)}
    np.savez(sub, **preds)
    before = sub.read_bytes()
    assert not params.test_labels_path().exists()
    m = run_evaluate(params, track=False, progress=False)
    assert m["labels"] == NO_LABELS and m["n_test"] == 3
    assert "test_labels.npz not found" in m["note"] and m["mean_velocity"] == pytest.approx(3.0)
    assert json.loads(params.path("evaluate_report").read_text()) == m
    lean = json.loads(params.path("evaluate_metrics").read_text())
    assert lean == {"labels": "none", "n_test": 3}
    table = params.path("evaluate_per_sample").read_text().splitlines()
    assert table[0] == "sample_id,ensemble_mape,mean_velocity" and len(table) == 4
    assert params.path("evaluate_figure").stat().st_size > 0
    assert sub.read_bytes() == before  # the submission is left as it is
    text = format_report(m, str(sub))
    assert text.startswith("No test labels: 3 test predictions, not scored") and str(sub) in text
    # the command: exit code 0, and `report` prints the same
    monkeypatch.setenv("SPEEDSTRUCTURE_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    args = argparse.Namespace(mlflow=False, quiet=True)
    assert _cmd_evaluate(args) == 0
    assert _cmd_report(args) == 0
    assert "No test labels" in capsys.readouterr().out
