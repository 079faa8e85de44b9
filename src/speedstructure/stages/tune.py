"""The ``tune`` stage: ensemble weights per fold, tuned with Optuna
(:mod:`speedstructure.ensemble.tuning`).

For each fold, its members are the training runs (``runs:``) of the variants in
``ensemble.variants``; their validation predictions (``val_preds.npz`` of each
run) and the fold's validation targets (from the challenge zips) give the
objective.  Each fold gets a split-half report (held-out MAPE of best single,
equal, hand and tuned weights) and weights tuned on the whole fold, stored as an
Optuna study in ``paths.optuna_db`` (a rerun resumes it), or in the database
``SPEEDSTRUCTURE_OPTUNA_STORAGE`` names (``speedstructure server`` prints it).  The fold
keeps the weighting ``tune.weights`` names (``auto``: equal weights unless another of the four
is lower held out by more than one standard error).  Subcommand::

    speedstructure tune [--n-trials N] [--mlflow/--no-mlflow]

Files written (``paths.*`` of ``params.yaml``)::

    ensemble       members, checkpoints and weights per fold
    tune_metrics   the DVC metrics: cv_mape and the held-out MAPE per strategy (mean over folds)
    tune_report    the detail: the same per fold (validation MAPE, samples) and the trials
    tune_weights   CSV: fold, variant, member ("variant @ fold K": a bar each), weight
    tune_plot      PNG: held-out MAPE per strategy and fold



"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.schema import Params, TuneConfig
from speedstructure.ensemble.calibration import calibrate_folds
from speedstructure.ensemble.runs import member_runs
from speedstructure.ensemble.tuning import (
    optuna_storage_setting,
    summarise,
    tune_fold,
)
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_json, atomic_write_text, relative_path
from speedstructure.reports.plots import plot_heldout
from speedstructure.tracking.runs import log_params, stage_run
from speedstructure.tracking.store import hide_password

DESCRIPTION = (
    "Tune the weights of the ensemble members (params.yaml ensemble.variants) on each fold's "
    "validation predictions; report split-half held-out MAPE; write paths.ensemble."
)
OUTPUTS = {  # result key -> paths key
    "ensemble": "ensemble",
    "metrics": "tune_metrics",
    "report": "tune_report",
    "weights_csv": "tune_weights",
    "heldout_png": "tune_plot",
}


# --------------------------------------------------------------------------- members and data


def tune_settings(params: Params, n_trials: int | None = None) -> TuneConfig:
    """``params.tune``, with ``n_trials`` overridden when given (``--n-trials``)."""
    if n_trials is None:
        return params.tune
    if int(n_trials) < 1:
        raise UserError(f"--n-trials must be >= 1, got {n_trials}")
    return dataclasses.replace(params.tune, n_trials=int(n_trials))


def run_tune(params: Params, *, track: bool = True, n_trials: int | None = None) -> dict:
    """Tune the ensemble weights of every fold; writes the stage's files (see module doc).

    Returns ``{"ensemble": ..., "metrics": ..., "files": {...}}`` (files by the keys
    of :data:`OUTPUTS`).  ``track`` logs to MLflow through :mod:`speedstructure.tracking`;
    ``n_trials`` overrides ``tune.n_trials``.
    """

    tags = {"stage": "tune", "dvc_stage": "tune"}
    with stage_run(track, "tune", params, tags=tags):  # opened first: crashes FAIL it
        cfg = tune_settings(params, n_trials)
        if track:
            log_params(_run_params(params, cfg))
        fold_entries = [
            _tune_fold_run(params, cfg, fold, members, track)
            for fold, members in member_runs(params).items()
        ]
        ensemble, metrics = summarise(params, cfg, fold_entries)
        ensemble["calibration"] = calibrate_folds(params, fold_entries, track)
        files = write_outputs(params, ensemble, metrics)
        if track:
            _log_mlflow(ensemble, metrics, files)
    return {"ensemble": ensemble, "metrics": metrics, "files": files}


# --------------------------------------------------------------------------- outputs


def write_outputs(params: Params, ensemble: dict, metrics: dict) -> dict[str, Path]:
    """The ensemble file, the metrics (lean: what experiments are compared on) and the
    report (all of ``metrics``), the weights CSV and the held-out figure."""
    files = {name: params.path(key) for name, key in OUTPUTS.items()}
    atomic_write_json(files["ensemble"], ensemble)
    atomic_write_json(files["metrics"], {k: metrics[k] for k in ("cv_mape", "heldout")})
    atomic_write_json(files["report"], metrics)
    rows = ["fold,variant,member,weight"] + [
        f"{f['fold']},{m['variant']},{m['variant']} @ fold {f['fold']},{m['weight']:.6f}"
        for f in ensemble["folds"]
        for m in f["members"]
    ]
    atomic_write_text(files["weights_csv"], "\n".join(rows) + "\n")
    plot_heldout(ensemble["folds"], list(metrics["heldout"]), files["heldout_png"])
    return files


def _run_params(params: Params, cfg: TuneConfig) -> dict[str, Any]:
    """The params of the MLflow run ``tune``."""
    return {
        "variants": ",".join(params.ensemble.variants),
        "n_trials": cfg.n_trials,
        "seed": cfg.seed,
        "storage": hide_password(optuna_storage_setting(params)),
        "study_prefix": cfg.study_prefix,
        "split_seed": cfg.split_seed,
        "weights": cfg.weights,
    }


def _tune_fold_run(
    params: Params, cfg: TuneConfig, fold: int, members: list[tuple[str, str]], track: bool
) -> dict:
    """:func:`tune_fold`, with ``track`` inside the nested run ``tune-fold<k>`` (opened
    first); returns the fold's entry."""

    run_params = {"members": ",".join(v for v, _ in members), "n_trials": cfg.n_trials}
    tags = {"stage": "tune", "fold": str(fold)}
    with stage_run(
        track,
        f"tune-fold{fold}",
        params,
        tags=tags,
        nested=True,
        params={**run_params, "fold": fold},
    ):
        entry, history = tune_fold(params, cfg, fold, members)
        if track:
            _log_fold(entry, history)
    return entry


def _log_mlflow(ensemble: dict, metrics: dict, files: dict[str, Path]) -> None:
    """The run ``tune``'s cv_mape, held-out MAPEs and output files."""
    import mlflow

    heldout = {f"heldout_{s}": v for s, v in metrics["heldout"].items()}
    mlflow.log_metrics({"cv_mape": ensemble["cv_mape"], **heldout})
    for key in OUTPUTS:
        mlflow.log_artifact(str(files[key]), artifact_path="tune")


def _log_fold(fold: dict, history: list) -> None:
    """Into the nested run ``tune-fold<k>``: the trial curve, weights and held-out MAPEs."""
    import mlflow
    from mlflow.entities import Metric

    run_id = mlflow.active_run().info.run_id
    trial_metrics = [Metric("trial_mape", v, ts, n) for n, v, ts in history]
    client = mlflow.MlflowClient()
    for s in range(0, len(trial_metrics), 1000):
        client.log_batch(run_id, metrics=trial_metrics[s : s + 1000])
    mlflow.log_metrics({f"weight_{m['variant']}": m["weight"] for m in fold["members"]})
    mlflow.log_metrics({f"heldout_{s}": v for s, v in fold["heldout"].items()})
    mlflow.log_metrics({"val_mape": fold["val_mape"], "n_val": fold["n_val"]})
    mlflow.set_tag("weights", fold["strategy"])


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tune", help=cli.COMMANDS["tune"][1], description=DESCRIPTION)
    p.add_argument("--n-trials", type=int, default=None, help="override tune.n_trials")
    cli.add_mlflow_option(p)
    p.set_defaults(func=_cmd)


def _held_out(strategy: str, mape: float, gain: dict[str, float]) -> str:
    """``tuned 0.05370 (+0.00014 +- 0.00031)``: a strategy's held-out MAPE and its gain over
    equal weights with that gain's standard error."""
    if strategy == "equal":
        return f"equal {mape:.5f}"
    return f"{strategy} {mape:.5f} ({gain['gain']:+.5f} +- {gain['se']:.5f})"


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    res = run_tune(params, track=args.mlflow, n_trials=args.n_trials)
    ens = res["ensemble"]
    for f in ens["folds"]:
        weights = ", ".join(f"{m['variant']}={m['weight']:.3f}" for m in f["members"])
        held = ", ".join(_held_out(s, v, f["gain_over_equal"][s]) for s, v in f["heldout"].items())
        print(
            f"fold {f['fold']} ({f['n_val']} val): {f['strategy']} weights {weights}; "
            f"held-out MAPE (gain over equal weights +- its s.e.): {held}"
        )
    wrote = ", ".join(relative_path(res["files"][k], params.root) for k in ("ensemble", "metrics"))
    print(f"cv MAPE (held-out, chosen weights): {ens['cv_mape']:.5f}; wrote {wrote}")
    return 0
