"""The test-set report of the calibrated uncertainty (part of the ``evaluate`` stage).

Reads the interval half-widths that ``predict`` wrote (``paths.uncertainty``), scores them
against the test targets (:func:`speedstructure.ensemble.calibration.coverage_report`: coverage of
the nominal interval overall and per depth band, mean width, Spearman / Pearson
correlation over samples between predicted uncertainty and actual error) and writes
``paths.uncertainty_metrics`` and ``paths.uncertainty_figure`` (truth, prediction, error,
uncertainty of the best, median and worst samples); logged to the active MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.schema import V_MAX, V_MIN, Params
from speedstructure.ensemble.calibration import coverage_report
from speedstructure.fsutil import atomic_write_json
from speedstructure.tracking.runs import log_metrics

log = logging.getLogger(__name__)


def load_half_widths(path: Path, ids: list[str]) -> np.ndarray | None:
    """float32 (N, 300, 1259) half-widths of ``ids``; None (logged) when the file is absent
    or lacks a sample."""
    if not path.is_file():
        log.info("%s not found: no uncertainty to evaluate (an uncalibrated ensemble)", path)
        return None
    with np.load(path) as z:
        missing = [s for s in ids if s not in z.files]
        if missing:
            log.warning("%s: no half-width for %d sample(s): not evaluated", path, len(missing))
            return None
        return np.stack([z[s].astype(np.float32) for s in ids])


def evaluate_uncertainty(
    params: Params, ids: list[str], truths: np.ndarray, preds: np.ndarray, *, track: bool = True
) -> dict[str, Any] | None:
    """Score ``paths.uncertainty`` on the test set; its headline (coverage, mean width,
    correlations) or None when there is no uncertainty file."""
    hw = load_half_widths(params.path("uncertainty"), ids)
    if hw is None:
        return None
    metrics, columns = coverage_report(preds, truths, hw, params.evaluate.depth_bands)
    metrics = {"coverage_nominal": params.uncertainty.coverage, "n_test": len(ids), **metrics}
    metrics["per_sample"] = {
        sid: {k: float(v[i]) for k, v in columns.items()} for i, sid in enumerate(ids)
    }
    keys = ("coverage", "mean_width", "spearman_uncertainty_error", "pearson_uncertainty_error")
    headline = {k: metrics[k] for k in keys}
    report = atomic_write_json(params.path("uncertainty_report"), metrics)
    atomic_write_json(params.path("uncertainty_metrics"), headline)
    mape = (np.abs(preds - truths) / truths).mean(axis=(1, 2))
    fig = plot_uncertainty(ids, truths, preds, hw, mape, params.path("uncertainty_figure"))
    if track:
        _log_mlflow(metrics, [report, fig])
    return headline


def _log_mlflow(metrics: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    flat = {
        "interval_coverage": metrics["coverage"],
        "interval_mean_width": metrics["mean_width"],
        "uncertainty_error_spearman": metrics["spearman_uncertainty_error"],
        "uncertainty_error_pearson": metrics["pearson_uncertainty_error"],
    }
    flat.update({f"coverage_{b}": v["coverage"] for b, v in metrics["per_depth"].items()})
    log_metrics(flat)
    for f in files:
        mlflow.log_artifact(str(f), artifact_path="evaluate/uncertainty")


def plot_uncertainty(ids, truths, preds, hw, scores, path: Path) -> Path:
    """Truth, prediction, absolute error and interval half-width (km/s) of the best, median
    and worst samples (by MAPE), error and half-width on one colour scale."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import VELOCITY_CMAP, save_figure, section_row

    order = np.argsort(scores)
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    fig = Figure(figsize=(12, 10), layout="constrained")
    axes = fig.subplots(3, 4, squeeze=False)
    for row, (label, i) in enumerate(picks):
        err = np.abs(preds[i] - truths[i])
        top = max(0.1, float(np.percentile(np.concatenate([err.ravel(), hw[i].ravel()]), 99)))
        inside = float((err <= hw[i]).mean())
        v_range = (V_MIN, V_MAX)
        panels = [
            (truths[i], f"{label}: truth ({ids[i][:8]})", VELOCITY_CMAP, v_range, "km/s"),
            (preds[i], f"prediction, MAPE {scores[i]:.4f}", VELOCITY_CMAP, v_range, "km/s"),
            (err, "|error|", "magma", (0, top), "km/s"),
            (
                hw[i],
                f"interval half-width, {100 * inside:.0f} % covered",
                "magma",
                (0, top),
                "km/s",
            ),
        ]
        section_row(fig, axes[row], panels)
    fig.suptitle("test samples: truth / prediction / error / calibrated uncertainty")
    return save_figure(fig, path)


def describe_uncertainty(
    params: Params, ids: list[str], preds: np.ndarray, *, track: bool = True
) -> dict[str, Any] | None:
    """Without test targets (real data): the half-widths described, not scored
    (``labels: none``, mean interval width overall and per depth band, a figure of three
    predictions with their half-widths); None when there is no uncertainty file."""
    hw = load_half_widths(params.path("uncertainty"), ids)
    if hw is None:
        return None
    edges = params.evaluate.depth_bands
    metrics = {
        "labels": "none",
        "coverage_nominal": params.uncertainty.coverage,
        "n_test": len(ids),
        "mean_width": float(2 * hw.mean(dtype=np.float64)),
        "per_depth": {
            f"{a}-{b}": {"mean_width": float(2 * hw[..., int(a) : int(b)].mean())}
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        },
    }
    lean = {k: metrics[k] for k in ("labels", "n_test", "mean_width")}
    atomic_write_json(params.path("uncertainty_metrics"), lean)
    files = [
        atomic_write_json(params.path("uncertainty_report"), metrics),
        plot_half_widths(ids, preds, hw, params.path("uncertainty_figure")),
    ]
    if track:
        import mlflow

        log_metrics({"interval_mean_width": metrics["mean_width"]})
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate/uncertainty")
    return metrics


def plot_half_widths(ids, preds, hw, path: Path) -> Path:
    """The first, median and last predictions beside their interval half-widths."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import VELOCITY_CMAP, save_figure, section_row

    picks = sorted({0, len(ids) // 2, len(ids) - 1})
    fig = Figure(figsize=(7, 3.4 * len(picks)), layout="constrained")
    axes = fig.subplots(len(picks), 2, squeeze=False)
    top = max(0.1, float(np.percentile(hw, 99)))
    for row, i in enumerate(picks):
        panels = [
            (preds[i], f"{ids[i][:8]}: prediction", VELOCITY_CMAP, (V_MIN, V_MAX), "km/s"),
            (hw[i], "interval half-width", "magma", (0, top), "km/s"),
        ]
        section_row(fig, axes[row], panels)
    fig.suptitle("test predictions without labels: calibrated uncertainty")
    return save_figure(fig, path)
