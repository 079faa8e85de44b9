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
import math
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config import V_MAX, V_MIN, ConfigError, Params, load_params
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import atomic_write_json, atomic_write_text, relative_path
from speedstructure.metrics import (
    lateral_r2,
    laterally_constant_oracle,
    relative_error,
    water_floor_error,
)
from speedstructure.submission import VelocityArchive

DESCRIPTION = (
    "MAPE per sample, per K-Means group and per depth band, against the depth-trend baseline "
    "and the best single member; figures; MLflow."
)
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


def load_test_set(params: Params) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, targets, submission)``: the test targets and the submitted predictions, float32."""
    labels_path, sub_path = params.test_labels_path(), params.path("submission")
    for p, what in (
        (labels_path, "test targets"),
        (sub_path, "submission (run the predict stage)"),
    ):
        if not p.is_file():
            raise UserError(f"{p}: {what} not found")
    with VelocityArchive(labels_path) as lab, VelocityArchive(sub_path) as sub:
        ids = sorted(lab.files)
        missing = sorted(set(ids) - set(sub.files))
        if missing:
            raise UserError(
                f"{sub_path}: no prediction for {len(missing)} test sample(s), e.g. '{missing[0]}'"
            )
        truths = np.stack([lab[k].astype(np.float32) for k in ids])
        ens = np.stack([sub[k].astype(np.float32) for k in ids])
    return ids, truths, ens


def run_paths(params: Params) -> dict[str, dict[str, Any]]:
    """Each entry of ``runs`` with its checkpoint and training metrics paths."""
    from speedstructure.engine.checkpoint import BEST_NAME, METRICS_NAME

    out = {}
    for key, r in params.runs.items():
        d = params.run_dir(r.variant, r.fold)
        out[key] = {
            "variant": r.variant,
            "fold": int(r.fold),
            "checkpoint": d / BEST_NAME,
            "metrics": d / METRICS_NAME,
        }
    return out


def _baseline_runs(params: Params, runs: dict[str, dict[str, Any]]) -> list[str]:
    baseline = params.evaluate.baseline
    keys = [k for k, r in runs.items() if r["variant"] == baseline]
    if not keys:
        raise ConfigError(f"{params.source}: evaluate.baseline '{baseline}' has no entry in runs:")
    return keys


def predict_runs(
    runs: dict[str, dict[str, Any]],
    test_zip: Path,
    ids: list[str],
    batch_size: int,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """float32 (N, 300, 1259) test predictions (flip TTA) of each run's best checkpoint.

    One model in memory at a time, on the GPU when there is one."""
    import torch
    from tqdm import tqdm

    from speedstructure.ensemble import load_member

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds = {}
    bar = tqdm(
        total=len(ids) * len(runs), desc="evaluate runs", unit="sample", disable=not progress
    )
    with torch.no_grad():
        for key, r in runs.items():
            model = load_member(r["checkpoint"], device)
            preds[key] = predict_zip(
                lambda x, m=model: (
                    m.predict(torch.from_numpy(x).to(device), tta=True).float().cpu().numpy()
                ),
                test_zip,
                ids,
                batch_size,
                bar,
            )
            del model
    bar.close()
    return preds


def predict_zip(predict_fn, zip_path: Path, ids: list[str], batch_size: int, bar) -> np.ndarray:
    """float32 (N, 300, 1259): ``predict_fn`` (gathers (B, 5, 10001, 31) -> velocities) over
    the samples ``ids`` of a zip, batch by batch; ``bar`` (tqdm) counts them."""
    from speedstructure.dataio import VP_SHAPE, ZipSamples
    from speedstructure.ensemble import iter_batches

    out = np.empty((len(ids), *VP_SHAPE), np.float32)
    i = 0
    with ZipSamples(zip_path) as z:
        for chunk, x in iter_batches(z, ids, batch_size):
            out[i : i + len(chunk)] = predict_fn(x)
            i += len(chunk)
            bar.update(len(chunk))
    return out


# --------------------------------------------------------------------------- scores


def _per_sample(err: np.ndarray) -> np.ndarray:
    """MAPE of each sample from its per-cell relative errors (float64 (N,))."""
    return err.mean(axis=(1, 2), dtype=np.float64)


def _run_scores(runs, preds, truths) -> tuple[dict[str, float], dict[str, float]]:
    """Test MAPE of every run, and its validation MAPE (NaN when it has none)."""
    run_test = {k: float(relative_error(preds[k], truths).mean(dtype=np.float64)) for k in runs}
    run_val = {}
    for k, r in runs.items():
        try:
            run_val[k] = float(json.loads(r["metrics"].read_text())["best_val_mape"])
        except (OSError, ValueError, KeyError):
            run_val[k] = math.nan
    return run_test, run_val


def _best_member(params: Params, runs, run_val: dict[str, float]) -> str:
    """The ensemble member run with the best validation MAPE (the test set is not looked at)."""
    members = set(params.ensemble.variants)
    keys = [k for k in runs if runs[k]["variant"] in members and math.isfinite(run_val[k])]
    if not keys:
        raise UserError("no ensemble member run has a validation MAPE (run the training stages)")
    return min(keys, key=lambda k: run_val[k])


def target_groups(params: Params, truths: np.ndarray) -> np.ndarray:
    """The K-Means group (of the ``folds`` stage) of each test target."""
    from speedstructure.stages.folds import KMeansCentres, velocity_features

    km = KMeansCentres.load(params.path("kmeans"))
    return km.predict(np.stack([velocity_features(t) for t in truths]))


def _per_group(groups: np.ndarray, ens_scores: np.ndarray, base_scores: np.ndarray) -> dict:
    return {
        int(g): {
            "n": int((groups == g).sum()),
            "ensemble": float(ens_scores[groups == g].mean()),
            "baseline": float(base_scores[groups == g].mean()),
        }
        for g in sorted(set(groups))
    }


def _per_depth(edges, errors: dict[str, np.ndarray]) -> dict:
    """MAPE of each model (``errors``: name -> per-cell relative errors) per depth band (m)."""
    bands = {}
    for top, bottom in zip(edges[:-1], edges[1:], strict=True):
        band = slice(int(top), int(bottom))
        bands[f"{top}-{bottom}"] = {
            name: float(err[:, :, band].mean(dtype=np.float64)) for name, err in errors.items()
        }
    return bands


def _per_sample_r2(ens: np.ndarray, truths: np.ndarray) -> np.ndarray:
    return np.array([lateral_r2(p, t) for p, t in zip(ens, truths, strict=True)])


def structure(params: Params, truths: np.ndarray, ens: np.ndarray, oracle_err: np.ndarray) -> dict:
    """What the MAPE hides: lateral structure (R2_lat, 0 for a laterally flat model), the
    water-floor depth error (m) and the laterally constant oracle's MAPE."""
    floor_err = water_floor_error(ens, truths, params.synth.water_velocity)
    return {
        "lateral_r2": lateral_r2(ens, truths),
        "water_floor_error_m": float(floor_err.mean()),
        "oracle_mape": float(_per_sample(oracle_err).mean()),
        "per_sample": {"lateral_r2": _per_sample_r2(ens, truths), "water_floor_error_m": floor_err},
    }


def score(params: Params, truths, ens, runs, preds, base_keys) -> tuple[dict, dict]:
    """The stage's metrics and the per-sample table's columns (group, ensemble, baseline)."""
    ens_err = relative_error(ens, truths)  # (N, 300, 1259): per sample, group and depth band
    base_err = relative_error(np.mean([preds[k] for k in base_keys], axis=0), truths)
    oracle_err = relative_error(laterally_constant_oracle(truths), truths)
    ens_scores, base_scores = _per_sample(ens_err), _per_sample(base_err)
    struct = structure(params, truths, ens, oracle_err)
    run_test, run_val = _run_scores(runs, preds, truths)
    best = _best_member(params, runs, run_val)
    groups = target_groups(params, truths)
    metrics = {
        "n_test": len(truths),
        "ensemble_mape": float(ens_scores.mean()),
        "baseline_mape": float(base_scores.mean()),
        "best_single": {"run": best, "val_mape": run_val[best], "test_mape": run_test[best]},
        "best_single_mape": run_test[best],
        "ratio_to_baseline": float(ens_scores.mean() / base_scores.mean()),
        "per_group": _per_group(groups, ens_scores, base_scores),
        "per_depth": _per_depth(
            params.evaluate.depth_bands,
            {"ensemble": ens_err, "baseline": base_err, "oracle": oracle_err},
        ),
        "focus_band": list(params.evaluate.focus_band),
        "focus_band_mape": float(
            ens_err[:, :, slice(*params.evaluate.focus_band)].mean(dtype=np.float64)
        ),
        **{k: v for k, v in struct.items() if k != "per_sample"},
        "runs": {k: {"test_mape": run_test[k], "val_mape": run_val[k]} for k in runs},
    }
    columns = {
        "group": groups.astype(int),
        "ensemble_mape": ens_scores,
        "baseline_mape": base_scores,
        **struct["per_sample"],
    }
    return metrics, columns


# --------------------------------------------------------------------------- out of distribution


def load_ood_set(params: Params) -> tuple[Path, list[str], np.ndarray] | None:
    """``(zip, ids, targets)`` of the out-of-distribution test set (``data.ood_zip``,
    ``data.ood_labels``); None, with a logged note, when either file is absent."""
    from speedstructure.dataio import list_sample_ids

    zip_path, labels_path = params.ood_paths()
    absent = [str(p) for p in (zip_path, labels_path) if not p.is_file()]
    if absent:
        log.info("no out-of-distribution test set (%s absent): skipped", ", ".join(absent))
        return None
    with VelocityArchive(labels_path) as lab:
        ids = sorted(lab.files)
        truths = np.stack([lab[k].astype(np.float32) for k in ids])
    missing = sorted(set(ids) - set(list_sample_ids(zip_path)))
    if missing:
        raise DataError(f"{zip_path}: no gathers for {len(missing)} target(s), e.g. '{missing[0]}'")
    return zip_path, ids, truths


def ensemble_predictor(params: Params):
    """The ensemble's prediction function: the registered model (``paths.registered``), or
    the tuned ensemble file (``paths.ensemble``) when nothing is registered."""
    from speedstructure.stages.predict import load_predictor

    for key in ("registered", "ensemble"):
        if params.path(key).is_file():
            return load_predictor(params.path(key), params)[0]
    raise UserError(
        f"{params.path('registered')}: no registered model (nor {params.path('ensemble')}) "
        "to predict the out-of-distribution test set (run the register stage)"
    )


def evaluate_ood(params: Params, runs, base_keys, progress: bool = True) -> dict | None:
    """The OOD test set scored like the test set (:func:`score`): the ensemble's
    predictions (clipped to [V_MIN, V_MAX] like the submission), the baseline's and every
    run's; None when there is no OOD set."""
    from tqdm import tqdm

    found = load_ood_set(params)
    if found is None:
        return None
    zip_path, ids, truths = found
    batch = int(params.evaluate.batch_size)
    bar = tqdm(total=len(ids), desc="evaluate OOD", unit="sample", disable=not progress)
    with bar:
        ens = predict_zip(ensemble_predictor(params), zip_path, ids, batch, bar)
    preds = predict_runs(runs, zip_path, ids, batch, progress)
    metrics, _ = score(params, truths, np.clip(ens, V_MIN, V_MAX), runs, preds, base_keys)
    return {"zip": zip_path.name, **metrics}


def run_evaluate(params: Params, *, track: bool = True, progress: bool = True) -> dict[str, Any]:
    """Score the submission (see the module doc); writes the stage's files, returns the
    metrics.  With ``track`` all of it runs inside the stage's MLflow run, opened first (a
    failure leaves it FAILED)."""
    from speedstructure import tracking

    tags = {"stage": "evaluate", "dvc_stage": "evaluate"}
    with tracking.stage_run(track, "evaluate", params, tags=tags):
        return _evaluate(params, track=track, progress=progress)


def _evaluate(params: Params, *, track: bool, progress: bool) -> dict[str, Any]:
    """Score the submission (see the module doc); writes the stage's files, returns the metrics."""
    if not params.test_labels_path().is_file():  # real data: the challenge ships no test targets
        return evaluate_without_labels(params, track=track)
    ids, truths, ens = load_test_set(params)
    runs = run_paths(params)
    base_keys = _baseline_runs(params, runs)
    test_zip = params.zip_path("test")
    preds = predict_runs(runs, test_zip, ids, int(params.evaluate.batch_size), progress)
    metrics, columns = score(params, truths, ens, runs, preds, base_keys)
    ood = evaluate_ood(params, runs, base_keys, progress)
    if ood is not None:
        metrics["ood"] = ood
    reg_path = params.path("registered")
    if reg_path.is_file():
        metrics["registered"] = json.loads(reg_path.read_text())
    from speedstructure.uncertainty_report import evaluate_uncertainty

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


# the DVC metrics (paths.evaluate_metrics, what `make exp` compares), under MLflow's names
HEADLINE = ("test_mape", "baseline_mape", "ratio_to_baseline", "lateral_r2")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures experiments are compared on: the ensemble's test MAPE, the baseline's, their
    ratio, R2_lat, and the same on the OOD set when scored (``ood_`` prefix); without test
    targets, ``labels: none``.  The rest of ``metrics`` stays in ``paths.evaluate_report``."""
    if metrics.get("labels") == NO_LABELS:
        return {"labels": NO_LABELS, "n_test": metrics["n_test"]}
    flat = flat_metrics(metrics)
    keys = [*HEADLINE, "ood_test_mape", "ood_ratio_to_baseline"]
    return {k: flat[k] for k in keys if k in flat and math.isfinite(flat[k])}


def write_training_curves(params: Params) -> Path:
    """Every run's ``history.csv`` in one table (run, epoch, train_loss, val_mape):
    ``paths.training_curves``, the top-level DVC plot of all the training curves."""
    import csv

    from speedstructure.engine.checkpoint import HISTORY_NAME

    rows = ["run,epoch,train_loss,val_mape"]
    for key, run in run_paths(params).items():
        path = run["checkpoint"].parent / HISTORY_NAME
        if path.is_file():
            with path.open(newline="") as f:
                for r in csv.DictReader(f):
                    values = [r.get(c, "") for c in ("train_loss", "val_mape")]
                    values = [v if v and math.isfinite(float(v)) else "" for v in values]
                    rows.append(",".join([key, r["epoch"], *values]))
    return atomic_write_text(params.path("training_curves"), "\n".join(rows) + "\n")


def write_reports(params: Params, metrics: dict[str, Any]) -> list[Path]:
    """The report (all of ``metrics``), the DVC metrics (:func:`headline`), the curves table."""
    return [
        atomic_write_json(params.path("evaluate_report"), metrics),
        atomic_write_json(params.path("evaluate_metrics"), headline(metrics)),
        write_training_curves(params),
    ]


def plot_cases(ids, truths, preds, scores, path: Path) -> Path:
    """Truth, prediction and error of the best, median and worst samples (a 3 x 3 figure)."""
    from matplotlib.figure import Figure

    from speedstructure.plots import VELOCITY_CMAP, save_figure, section_row

    order = np.argsort(scores)
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    fig = Figure(figsize=(9, 10), layout="constrained")
    axes = fig.subplots(3, 3, squeeze=False)
    for row, (label, i) in enumerate(picks):
        err = np.abs(preds[i] - truths[i]) / truths[i] * 100
        v_range = (V_MIN, V_MAX)
        panels = [
            (truths[i], f"{label}: truth ({ids[i][:8]})", VELOCITY_CMAP, v_range, "km/s"),
            (preds[i], f"prediction, MAPE {scores[i]:.4f}", VELOCITY_CMAP, v_range, "km/s"),
            (err, "abs. error", "magma", (0, max(5.0, float(np.percentile(err, 99)))), "%"),
        ]
        section_row(fig, axes[row], panels)
    fig.suptitle("test samples: truth / ensemble prediction / error")
    return save_figure(fig, path)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics logged to MLflow (the OOD set's with an ``ood_`` prefix)."""
    flat = {
        "test_mape": metrics["ensemble_mape"],
        "baseline_mape": metrics["baseline_mape"],
        "best_single_mape": metrics["best_single_mape"],
        "ratio_to_baseline": metrics["ratio_to_baseline"],
        "lateral_r2": metrics["lateral_r2"],
        "water_floor_error_m": metrics["water_floor_error_m"],
        "oracle_mape": metrics["oracle_mape"],
        "focus_band_mape": metrics["focus_band_mape"],
    }
    flat.update({f"group{g}_mape": v["ensemble"] for g, v in metrics["per_group"].items()})
    flat.update({f"depth_{band}_mape": v["ensemble"] for band, v in metrics["per_depth"].items()})
    flat.update({f"run_{k}_test_mape": v["test_mape"] for k, v in metrics["runs"].items()})
    if "ood" in metrics:
        flat.update({f"ood_{k}": v for k, v in flat_metrics(metrics["ood"]).items()})
    return flat


def _log_mlflow(params: Params, metrics: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    from speedstructure import tracking

    tracking.log_metrics(flat_metrics(metrics))  # into the stage's run (run_evaluate)
    for f in files:
        mlflow.log_artifact(str(f), artifact_path="evaluate")
    reg = metrics.get("registered")
    if reg:
        client = mlflow.MlflowClient()
        client.set_model_version_tag(
            reg["name"], str(reg["version"]), "test_mape", f"{metrics['ensemble_mape']:.6f}"
        )
        if "ood" in metrics:
            mape = f"{metrics['ood']['ensemble_mape']:.6f}"
            client.set_model_version_tag(reg["name"], str(reg["version"]), "ood_test_mape", mape)
        _update_card(client, reg, metrics)


def _update_card(client, reg: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The registered version's model card (its description) with the test figures, and the
    uncertainty calibration's scalar figures when the metrics hold them (``calibration`` or
    ``uncertainty``: name -> figure, e.g. the test coverage and mean interval width)."""
    from speedstructure import modelcard

    name, version = reg["name"], str(reg["version"])
    card = client.get_model_version(name, version).description or ""
    card = modelcard.with_section(card, modelcard.TEST, modelcard.test_section(metrics))
    figures = metrics.get("calibration") or metrics.get("uncertainty")
    calibration = modelcard.calibration_section(figures)
    if calibration:
        card = modelcard.with_section(card, modelcard.CALIBRATION, calibration)
    client.update_model_version(name, version, description=card)


# --------------------------------------------------------------------------- without test labels

NO_LABELS = "none"  # metrics["labels"] when there were no test targets to score against


def evaluate_without_labels(params: Params, *, track: bool = True) -> dict[str, Any]:
    """The stage on data without test targets (the challenge's test set): the submission is
    described, not scored.  The metrics say ``labels: none``; the per-sample table holds
    each prediction's mean velocity, the figure three predictions; MLflow logs the run."""
    labels, sub_path = params.test_labels_path(), params.path("submission")
    if not sub_path.is_file():
        raise UserError(f"{sub_path}: submission (run the predict stage) not found")
    with VelocityArchive(sub_path) as sub:
        ids = sorted(sub.files)
        preds = np.stack([sub[k].astype(np.float32) for k in ids]) if ids else None
    if preds is None:
        raise DataError(f"{sub_path}: the submission holds no predictions")
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
    from speedstructure.uncertainty_report import describe_uncertainty

    describe_uncertainty(params, ids, preds, track=track)  # paths.uncertainty_*: widths only
    log.info("evaluate: %s; %d predictions described, not scored", metrics["note"], len(ids))
    if track:
        _log_unlabelled(params, metrics, files)
    return metrics


def plot_predictions(ids, preds, path: Path) -> Path:
    """The first, median and last predicted velocity models (no truth to compare with)."""
    from matplotlib.figure import Figure

    from speedstructure.plots import VELOCITY_CMAP, save_figure, section_row

    picks = sorted({0, len(ids) // 2, len(ids) - 1})
    fig = Figure(figsize=(3.2 * len(picks), 4), layout="constrained")
    panels = [
        (preds[i], f"{ids[i][:8]}: prediction", VELOCITY_CMAP, (V_MIN, V_MAX), "km/s")
        for i in picks
    ]
    section_row(fig, fig.subplots(1, len(picks), squeeze=False)[0], panels)
    fig.suptitle("test samples without labels: predictions only")
    return save_figure(fig, path)


def _log_unlabelled(params: Params, metrics: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    from speedstructure import tracking

    tags = {"stage": "evaluate", "dvc_stage": "evaluate"}
    own = mlflow.active_run() is None  # called alone, not by run_evaluate: a run of its own
    with tracking.stage_run(own, "evaluate", params, tags=tags):
        mlflow.set_tag("labels", NO_LABELS)
        tracking.log_metrics(
            {"n_test": metrics["n_test"], "mean_velocity": metrics["mean_velocity"]}
        )
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate")
    if metrics.get("registered"):
        _update_card(mlflow.MlflowClient(), metrics["registered"], metrics)


def _unlabelled_report(metrics: dict[str, Any], submission: str | None) -> str:
    head = f"No test labels: {metrics['n_test']} test predictions, not scored ({metrics['note']})"
    return "\n".join([head, *_report_footer(metrics, submission)])


def _report_footer(metrics: dict[str, Any], submission: str | None) -> list[str]:
    """The report's last lines: the submission and the registered version."""
    lines = [f"submission: {submission}"] if submission else []
    reg = metrics.get("registered")
    if reg:
        champ = "champion" if reg["champion"] else f"champion stays v{reg['champion_version']}"
        lines.append(f"registered model: {reg['model_uri']} ({champ})")
    return lines


# --------------------------------------------------------------------------- report


def format_report(metrics: dict[str, Any], submission: str | None = None) -> str:
    if metrics.get("labels") == NO_LABELS:
        return _unlabelled_report(metrics, submission)
    lines = _mape_table(metrics, f"Test MAPE on {metrics['n_test']} samples")
    ood = metrics.get("ood")
    if ood:
        title = f"Out-of-distribution test MAPE on {ood['n_test']} samples ({ood['zip']})"
        lines += _mape_table(ood, title)
    return "\n".join(lines + _report_footer(metrics, submission))


def _mape_table(metrics: dict[str, Any], title: str) -> list[str]:
    """One test set's block of the report: baseline, best single model, ensemble, ratio and
    the structure figures."""
    rows = [
        ("depth-trend baseline", metrics["baseline_mape"]),
        (f"best single model ({metrics['best_single']['run']})", metrics["best_single_mape"]),
        ("ensemble (tuned weights, flip TTA)", metrics["ensemble_mape"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [title, f"  {'model':<{width}}  MAPE", f"  {'-' * width}  -------"]
    lines += [f"  {name:<{width}}  {v:.5f}" for name, v in rows]
    lines.append(f"  ensemble / baseline = {metrics['ratio_to_baseline']:.3f}")
    if "lateral_r2" in metrics:  # evaluations before these figures existed lack them
        band = "-".join(map(str, metrics["focus_band"]))
        lines.append(
            f"  {band} m MAPE {metrics['focus_band_mape']:.4f}; laterally constant oracle "
            f"{metrics['oracle_mape']:.5f}; lateral structure R2_lat {metrics['lateral_r2']:.3f}; "
            f"water-floor depth error {metrics['water_floor_error_m']:.1f} m"
        )
    return lines


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
