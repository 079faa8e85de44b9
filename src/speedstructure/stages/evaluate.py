"""The ``evaluate`` stage and the ``report`` command.

With the test targets at hand (``data.test_labels`` in ``paths.data``, as for the
synthetic set), the submission (``paths.submission``) is scored with the
challenge metric (:mod:`speedstructure.metrics`): MAPE per sample and mean, per
K-Means group (the fitted K-Means of the ``folds`` stage, ``paths.kmeans``,
applied to the test targets), per depth band (``evaluate.depth_bands``), and,
for comparison on the same samples, the depth-trend baseline (mean over its
fold models) and the best single ensemble member (the member with the best
validation MAPE, chosen without looking at the test set).  Every trained
(variant, fold) run is scored too.  A figure shows truth, prediction and
error for the best, median and worst samples.  Everything measured goes to
``paths.evaluate_report``; the few figures experiments are compared on (test MAPE,
ratio to the baseline, R2_lat, the OOD test MAPE: :func:`headline`) to the DVC metrics
``paths.evaluate_metrics``; the per-sample table and the figure are DVC plots
(``paths.evaluate_per_sample``, ``paths.evaluate_figure``), and every run's
``history.csv`` is gathered into ``paths.training_curves`` (one chart of all the
training curves).  All of it is logged to MLflow; the registered model version
(``paths.registered``) gets a ``test_mape`` tag.

Structure and level: the velocity level (the mean velocity below the true water floor,
predicted against true: correlation and mean relative error) is scored whenever there are
targets.  When the synthetic generator's truth file sits beside the zip
(``<zip stem>_truth.npz``, :mod:`speedstructure.data.truth`) the family of every sample is
known: R2_lat per family, a ``family`` column in the per-sample table, and on the intrusion
samples the body IoU (cells above ``evaluate.body_threshold``).  Real data has no truth
file: one logged line, and those figures are left out.

The out-of-distribution test set (``data.ood_zip`` and ``data.ood_labels`` in
``paths.data``, written by the generator with shifted priors, ``synth.ood``) is
scored beside it the same way: predicted by the registered ensemble (the tuned
ensemble file when nothing is registered) and by every run, its scores go under
``ood`` in the metrics (MLflow: ``ood_`` prefix) and into the report as a second
block.  Without those files (real data) it is skipped with a logged note.

Without test targets (the challenge's real test set ships none) the stage does not fail:
it records ``labels: none`` in the metrics (:func:`evaluate_without_labels`), writes the
per-sample table (each prediction's mean velocity) and a figure of three predictions,
leaves the submission as it is and exits 0; ``report`` says so.

``speedstructure report`` prints the table that ``make demo`` ends with.


"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.schema import V_MAX, V_MIN, Params
from speedstructure.data.test_sets import load_ood_set, load_predictions, load_test_set
from speedstructure.data.truth import Truth, load_truth, truth_path
from speedstructure.ensemble.card import tag_registered_version, update_card
from speedstructure.ensemble.loading import ensemble_predictor
from speedstructure.ensemble.runs import baseline_runs, predict_runs, predict_zip, run_paths
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_json, atomic_write_text, relative_path
from speedstructure.reports.evaluation import (
    NO_LABELS,
    flat_metrics,
    format_report,
    headline,
    plot_cases,
    plot_predictions,
    score,
    write_training_curves,
)
from speedstructure.tracking.runs import log_metrics, stage_run

log = logging.getLogger(__name__)

DESCRIPTION = (
    "MAPE per sample, per K-Means group and per depth band, against the depth-trend baseline "
    "and the best single member; structure and velocity level; figures; MLflow."
)
TRUTH_FIGURES = "per-family R2_lat and body IoU"  # what a missing truth file leaves out


def load_set_truth(zip_path: Path, ids: list[str]) -> Truth | None:
    """The truth file beside ``zip_path``, its rows in ``ids``' order; None (logged) without."""
    truth = load_truth(truth_path(zip_path), TRUTH_FIGURES)
    return None if truth is None else truth.select(ids)


def _records(ids: list[str], columns: dict[str, np.ndarray]) -> dict[str, dict]:
    """The per-sample columns as ``{sample_id: {column: value}}`` (non-finite values left out)."""
    out = {}
    for i, sid in enumerate(ids):
        row = {k: np.asarray(v)[i].item() for k, v in columns.items()}
        out[sid] = {k: v for k, v in row.items() if not isinstance(v, float) or np.isfinite(v)}
    return out


def evaluate_ood(params: Params, runs, base_keys, progress: bool = True) -> dict | None:
    """The OOD test set scored like the test set (:func:`score`): the ensemble's
    predictions (clipped to [V_MIN, V_MAX] like the submission), the baseline's and every
    run's; None when there is no OOD set."""
    from tqdm import tqdm

    found = load_ood_set(params)
    if found is None:
        return None
    zip_path, ids, truths = found
    truth = load_set_truth(zip_path, ids)  # before predicting: a stale one fails at once
    batch = int(params.evaluate.batch_size)
    bar = tqdm(total=len(ids), desc="evaluate OOD", unit="sample", disable=not progress)
    with bar:
        ens = predict_zip(ensemble_predictor(params), zip_path, ids, batch, bar)
    preds = predict_runs(runs, zip_path, ids, batch, progress)
    ens = np.clip(ens, V_MIN, V_MAX)
    metrics, columns = score(params, truths, ens, runs, preds, base_keys, truth)
    return {"zip": zip_path.name, **metrics, "per_sample": _records(ids, columns)}


def run_evaluate(params: Params, *, track: bool = True, progress: bool = True) -> dict[str, Any]:
    """Score the submission (see the module doc); writes the stage's files, returns the
    metrics.  With ``track`` all of it runs inside the stage's MLflow run, opened first (a
    failure leaves it FAILED)."""

    tags = {"stage": "evaluate", "dvc_stage": "evaluate"}
    with stage_run(track, "evaluate", params, tags=tags):
        return _evaluate(params, track=track, progress=progress)


def _evaluate(params: Params, *, track: bool, progress: bool) -> dict[str, Any]:
    """Score the submission (see the module doc); writes the stage's files, returns the metrics."""
    if not params.test_labels_path().is_file():  # real data: the challenge ships no test targets
        return evaluate_without_labels(params, track=track)
    ids, truths, ens = load_test_set(params)
    runs = run_paths(params)
    base_keys = baseline_runs(params, runs)
    test_zip = params.zip_path("test")
    truth = load_set_truth(test_zip, ids)
    preds = predict_runs(runs, test_zip, ids, int(params.evaluate.batch_size), progress)
    metrics, columns = score(params, truths, ens, runs, preds, base_keys, truth)
    ood = evaluate_ood(params, runs, base_keys, progress)
    if ood is not None:
        metrics["ood"] = ood
    reg_path = params.path("registered")
    if reg_path.is_file():
        metrics["registered"] = json.loads(reg_path.read_text())
    from speedstructure.reports.uncertainty import evaluate_uncertainty

    unc = evaluate_uncertainty(params, ids, truths, ens, track=track)  # paths.uncertainty_*
    if unc is not None:
        metrics["uncertainty"] = unc
    files = write_outputs(params, metrics, ids, columns, truths, ens)
    if track:
        _log_mlflow(params, metrics, files)
    return metrics


# --------------------------------------------------------------------------- outputs


def write_outputs(params: Params, metrics, ids, columns, truths, ens) -> list[Path]:
    """The metrics JSON, the per-sample CSV and the best/median/worst figure."""
    import pandas as pd

    written = write_reports(params, metrics)
    table = pd.DataFrame({"sample_id": ids, **columns})
    out_csv = atomic_write_text(params.path("evaluate_per_sample"), table.to_csv(index=False))
    scores = columns["ensemble_mape"]
    fig = plot_cases(ids, truths, ens, scores, params.path("evaluate_figure"))
    return [*written, out_csv, fig]


def write_reports(params: Params, metrics: dict[str, Any]) -> list[Path]:
    """The report (all of ``metrics``), the DVC metrics (:func:`headline`), the curves table."""
    return [
        atomic_write_json(params.path("evaluate_report"), metrics),
        atomic_write_json(params.path("evaluate_metrics"), headline(metrics)),
        write_training_curves(params),
    ]


def _log_mlflow(params: Params, metrics: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    log_metrics(flat_metrics(metrics))  # into the stage's run (run_evaluate)
    for f in files:
        mlflow.log_artifact(str(f), artifact_path="evaluate")
    if metrics.get("registered"):
        tag_registered_version(mlflow.MlflowClient(), metrics["registered"], metrics)


def evaluate_without_labels(params: Params, *, track: bool = True) -> dict[str, Any]:
    """The stage on data without test targets (the challenge's test set): the submission is
    described, not scored.  The metrics say ``labels: none``; the per-sample table holds
    each prediction's mean velocity, the figure three predictions; MLflow logs the run."""
    labels, sub_path = params.test_labels_path(), params.path("submission")
    ids, preds = load_predictions(sub_path)
    means = preds.mean(axis=(1, 2), dtype=np.float64)
    metrics: dict[str, Any] = {
        "labels": NO_LABELS,
        "n_test": len(ids),
        "note": f"{relative_path(labels, params.root)} not found: the submission is not scored",
        "submission": relative_path(sub_path, params.root),
        "mean_velocity": float(means.mean()),
    }
    reg_path = params.path("registered")
    if reg_path.is_file():
        metrics["registered"] = json.loads(reg_path.read_text())
    rows = ["sample_id,ensemble_mape,mean_velocity"]
    rows += [f"{sid},,{m:.6f}" for sid, m in zip(ids, means, strict=True)]
    files = [
        *write_reports(params, metrics),
        atomic_write_text(params.path("evaluate_per_sample"), "\n".join(rows) + "\n"),
        plot_predictions(ids, preds, params.path("evaluate_figure")),
    ]
    from speedstructure.reports.uncertainty import describe_uncertainty

    describe_uncertainty(params, ids, preds, track=track)  # paths.uncertainty_*: widths only
    log.info("evaluate: %s; %d predictions described, not scored", metrics["note"], len(ids))
    if track:
        _log_mlflow_unlabelled(params, metrics, files)
    return metrics


def _log_mlflow_unlabelled(params: Params, metrics: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    tags = {"stage": "evaluate", "dvc_stage": "evaluate"}
    own = mlflow.active_run() is None  # called alone, not by run_evaluate: a run of its own
    with stage_run(own, "evaluate", params, tags=tags):
        mlflow.set_tag("labels", NO_LABELS)
        log_metrics({"n_test": metrics["n_test"], "mean_velocity": metrics["mean_velocity"]})
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate")
    if metrics.get("registered"):
        update_card(mlflow.MlflowClient(), metrics["registered"], metrics)


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help=cli.COMMANDS["evaluate"][1], description=DESCRIPTION)
    cli.add_mlflow_option(p)
    cli.add_quiet_option(p)
    p.set_defaults(func=_cmd_evaluate)
    r = subparsers.add_parser("report", help=cli.COMMANDS["report"][1])
    r.set_defaults(func=_cmd_report)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    m = run_evaluate(load_params(), track=args.mlflow, progress=not args.quiet)
    print(format_report(m))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    params = load_params()
    path = params.path("evaluate_report")
    if not path.is_file():
        raise UserError(f"{path}: no evaluation yet (run `dvc repro` or `make demo`)")
    print(format_report(json.loads(path.read_text()), str(params.path("submission"))))
    return 0
