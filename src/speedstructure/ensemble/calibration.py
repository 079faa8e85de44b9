"""Calibrated per-cell uncertainty: conformal intervals from the out-of-fold errors.

The ``tune`` stage holds what calibration needs: each fold's validation predictions of its
tuned ensemble (out of fold: no member saw those samples) and their targets.  Their
per-cell scores are pooled per *band* and the ``coverage`` quantile of each band is the
interval half-width (split conformal prediction):

* bands are depths below the predicted water floor (``uncertainty.bands``, metres; the
  water floor of the *prediction*, :func:`speedstructure.metrics.water_floor_depth`, so
  the band of a cell is known at test time), plus band 0 for the water above it;
* ``scale: relative`` scores ``|truth - pred| / pred`` (the half-width is ``q * pred``,
  wider where the model is fast: the challenge's metric is relative), ``absolute`` scores
  ``|truth - pred|`` in km/s.

The spread of the ensemble (members x folds x flip TTA) is *not* used: out of fold each
sample has only its own fold's members (one, on some folds) without TTA, while a test
sample gets every fold's members with TTA, so the spread's scale differs between where it
would be calibrated and where it would be applied.

The calibration (quantile per band) goes into the ensemble file (key ``calibration``), so
the registered model carries it; ``predict`` writes ``paths.uncertainty`` (the interval
half-width per cell, float32, the submission's keys).  :func:`cross_fold_check` reports
the coverage of each fold's cells under the calibration of the other folds;
:func:`coverage_report` is what ``evaluate`` reports on the test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from speedstructure.config.schema import Params
from speedstructure.ensemble.runs import load_fold, member_runs
from speedstructure.fsutil import atomic_write_json
from speedstructure.metrics import water_floor_depth
from speedstructure.tracking.runs import log_metrics

SCALES = ("relative", "absolute")
MAX_SCORE = 4.0  # scores beyond (km/s or relative) fall in the histogram's last bin


def band_index(pred: np.ndarray, edges, water_velocity: float) -> np.ndarray:
    """Per cell of ``pred`` ``(..., 300, nz)``: 0 above its column's water floor, else
    ``1 + k`` for depth below the floor in ``[edges[k], edges[k+1])`` (the last band open)."""
    pred = np.asarray(pred)
    floor = water_floor_depth(pred, water_velocity)[..., None]
    below = np.arange(pred.shape[-1]) - floor  # cells (1 m)
    band = np.searchsorted(np.asarray(edges[1:-1], dtype=np.int64), below, side="right") + 1
    return np.where(below < 0, 0, band).astype(np.int16)


def scores(pred: np.ndarray, truth: np.ndarray, scale: str) -> np.ndarray:
    """The conformity scores: ``|truth - pred|`` (absolute) or over ``pred`` (relative)."""
    err = np.abs(np.asarray(truth, np.float32) - np.asarray(pred, np.float32))
    return err / np.maximum(np.asarray(pred, np.float32), 1e-6) if scale == "relative" else err


class Calibrator:
    """Pools score histograms per band (fine bins: memory independent of the cells seen)."""

    def __init__(self, edges, scale: str = "relative", resolution: float = 1e-4):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.edges = [int(e) for e in edges]
        self.scale = scale
        self.resolution = float(resolution)
        self.n_bins = int(np.ceil(MAX_SCORE / self.resolution)) + 1
        self.hist = np.zeros((len(self.edges), self.n_bins), np.int64)  # band 0 = water

    def add(self, pred: np.ndarray, truth: np.ndarray, water_velocity: float) -> None:
        band = band_index(pred, self.edges, water_velocity).ravel()
        s = scores(pred, truth, self.scale).ravel()
        bins = np.minimum((s / self.resolution).astype(np.int64), self.n_bins - 1)
        flat = np.bincount(band.astype(np.int64) * self.n_bins + bins, minlength=self.hist.size)
        self.hist += flat.reshape(self.hist.shape)

    def fit(self, coverage: float) -> dict[str, Any]:
        """The calibration: the ``coverage`` quantile of each band's scores (the upper edge of
        the bin holding the ``ceil((n + 1) coverage)``-th smallest score)."""
        quantiles, counts = [], []
        for h in self.hist:
            n = int(h.sum())
            counts.append(n)
            if n == 0:
                quantiles.append(None)
                continue
            rank = min(n, int(np.ceil((n + 1) * coverage)))
            k = int(np.searchsorted(np.cumsum(h), rank))
            quantiles.append((k + 1) * self.resolution)
        known = [q for q in quantiles if q is not None]
        fallback = max(known) if known else 0.0  # a band never seen: the widest known
        return {
            "coverage": float(coverage),
            "scale": self.scale,
            "bands_below_floor_m": self.edges,
            "quantiles": [fallback if q is None else float(q) for q in quantiles],
            "n_cells": counts,
        }


def half_width(pred: np.ndarray, calibration: dict[str, Any], water_velocity: float) -> np.ndarray:
    """float32 interval half-width per cell of ``pred`` (km/s) under ``calibration``."""
    q = np.asarray(calibration["quantiles"], np.float32)
    hw = q[band_index(pred, calibration["bands_below_floor_m"], water_velocity)]
    if calibration["scale"] == "relative":
        hw = hw * np.asarray(pred, np.float32)
    return hw.astype(np.float32)


def cross_fold_check(folds: dict[int, tuple[np.ndarray, np.ndarray]], cfg, water_velocity: float):
    """Coverage and mean width of each fold's cells under the calibration fitted on the
    other folds (``folds``: fold -> (ensemble predictions, targets)); None with one fold."""
    if len(folds) < 2:
        return None
    out = {}
    for k, (pred, truth) in folds.items():
        cal = Calibrator(cfg.bands, cfg.scale, cfg.resolution)
        for j, (p, t) in folds.items():
            if j != k:
                cal.add(p, t, water_velocity)
        hw = half_width(pred, cal.fit(cfg.coverage), water_velocity)
        inside = np.abs(truth - pred) <= hw
        out[f"fold{k}"] = {"coverage": float(inside.mean()), "mean_width": float(2 * hw.mean())}
    out["coverage"] = float(np.mean([v["coverage"] for v in out.values()]))
    return out


# --------------------------------------------------------------------------- test-set report


def coverage_report(pred, truth, hw, depth_bands) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metrics, per-sample columns)``: empirical coverage of ``[pred - hw, pred + hw]``
    overall and per depth band (m, absolute depth), mean interval width (km/s), and the
    Spearman / Pearson correlation over samples between the mean predicted half-width and
    the mean absolute error."""
    from scipy.stats import pearsonr, spearmanr

    err = np.abs(np.asarray(truth, np.float32) - np.asarray(pred, np.float32))
    inside = err <= hw
    per_band = {}
    for top, bottom in zip(depth_bands[:-1], depth_bands[1:], strict=True):
        band = slice(int(top), int(bottom))
        per_band[f"{top}-{bottom}"] = {
            "coverage": float(inside[..., band].mean()),
            "mean_width": float(2 * hw[..., band].mean()),
        }
    sample_hw = hw.mean(axis=(1, 2), dtype=np.float64)
    sample_err = err.mean(axis=(1, 2), dtype=np.float64)
    both = len(sample_hw) > 2 and np.ptp(sample_hw) > 0 and np.ptp(sample_err) > 0
    metrics = {
        "coverage": float(inside.mean()),
        "mean_width": float(2 * hw.mean(dtype=np.float64)),
        "spearman_uncertainty_error": float(spearmanr(sample_hw, sample_err)[0]) if both else None,
        "pearson_uncertainty_error": float(pearsonr(sample_hw, sample_err)[0]) if both else None,
        "per_depth": per_band,
    }
    columns = {
        "coverage": inside.mean(axis=(1, 2), dtype=np.float64),
        "mean_half_width": sample_hw,
        "mean_abs_error": sample_err,
    }
    return metrics, columns


def calibrate(folds: dict[int, tuple[np.ndarray, np.ndarray]], cfg, water_velocity: float):
    """``(calibration, metrics)`` from the out-of-fold ensemble predictions and targets of
    each fold (``cfg``: :class:`~speedstructure.config.schema.UncertaintyConfig`): the calibration
    goes into the ensemble file, the metrics (quantiles, cells, cross-fold coverage) into
    ``paths.calibration_metrics``."""
    cal = Calibrator(cfg.bands, cfg.scale, cfg.resolution)
    for pred, truth in folds.values():
        cal.add(pred, truth, water_velocity)
    calibration = cal.fit(cfg.coverage)
    labels = ["water"] + [f"{a}-{b}" for a, b in zip(cfg.bands[:-1], cfg.bands[1:], strict=True)]
    metrics = {
        "coverage_nominal": float(cfg.coverage),
        "scale": cfg.scale,
        "quantile_per_band": dict(zip(labels, calibration["quantiles"], strict=True)),
        "cells_per_band": dict(zip(labels, calibration["n_cells"], strict=True)),
        "n_samples": int(sum(len(p) for p, _ in folds.values())),
        "cross_fold": cross_fold_check(folds, cfg, water_velocity),
    }
    return calibration, metrics


def ensemble_calibration(predict_fn) -> dict[str, Any] | None:
    """The calibration carried by the ensemble behind ``predict_fn`` (a bound
    ``Ensemble.predict``: its spec's ``calibration``), None when it has none."""
    spec = getattr(getattr(predict_fn, "__self__", None), "spec", None)
    cal = spec.get("calibration") if isinstance(spec, dict) else None
    return cal if isinstance(cal, dict) and "quantiles" in cal else None


def calibration_headline(metrics: dict) -> dict:
    """The figures of the calibration people compare (a declared DVC metric): the nominal
    coverage and the out-of-fold coverage and width across folds."""
    cross = metrics.get("cross_fold") or {}
    widths = [f["mean_width"] for k, f in cross.items() if k.startswith("fold")]
    return {
        "coverage_nominal": metrics["coverage_nominal"],
        "oof_coverage": cross.get("coverage"),
        "oof_mean_width": float(np.mean(widths)) if widths else None,
    }


def calibrate_folds(params: Params, fold_entries: list[dict], track: bool) -> dict:
    """The calibration (:func:`calibrate`) of each fold's tuned ensemble on its validation
    samples (out of fold); its figures go to ``paths.calibration_metrics`` (and MLflow)."""
    from speedstructure.config.schema import V_MAX, V_MIN

    runs = member_runs(params)
    folds = {}
    for f in fold_entries:
        _, preds, targets, _ = load_fold(params, f["fold"], runs[f["fold"]])
        w = np.array([m["weight"] for m in f["members"]], np.float32)
        pred = np.tensordot(w, preds.astype(np.float32), axes=1)
        folds[f["fold"]] = (np.clip(pred, V_MIN, V_MAX), targets)
        del preds
    water = params.synth.water_velocity
    calibration, metrics = calibrate(folds, params.uncertainty, water)
    atomic_write_json(params.path("calibration_report"), metrics)
    atomic_write_json(params.path("calibration_metrics"), calibration_headline(metrics))
    if track:
        cross = metrics["cross_fold"] or {}
        log_metrics({"oof_cross_fold_coverage": cross.get("coverage")})
    return calibration
