"""The ``tune`` stage: ensemble weights per fold, tuned with Optuna (:mod:`speedstructure.weights`).

For each fold, its members are the training runs (``runs:``) of the variants in
``ensemble.variants``; their validation predictions (``val_preds.npz`` of each
run) and the fold's validation targets (from the challenge zips) give the
objective.  Each fold gets a split-half report (held-out MAPE of best single,
equal, hand and tuned weights) and weights tuned on the whole fold, stored as an
Optuna study in ``paths.optuna_db`` (a rerun resumes it).  Subcommand::

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

import numpy as np

from speedstructure import cli
from speedstructure.config import ConfigError, Params, TuneConfig, load_params
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import atomic_write_json, atomic_write_text, relative_path
from speedstructure.weights import (
    STRATEGIES,
    Scorer,
    TuneError,
    complete_trials,
    fit_weights,
    split_half_report,
)

FORMAT = 1
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


def member_runs(params: Params) -> dict[int, list[tuple[str, str]]]:
    """``{fold: [(variant, run key), ...]}`` in ``ensemble.variants`` order."""
    variants = list(params.ensemble.variants)
    if not variants:
        raise ConfigError(f"{params.source}: ensemble.variants must name at least one variant")
    found: dict[int, dict[str, str]] = {}
    for key, run in params.runs.items():
        if run.variant in variants:
            found.setdefault(int(run.fold), {})[run.variant] = str(key)
    for v in variants:
        if not any(v in f for f in found.values()):
            raise ConfigError(
                f"{params.source}: ensemble.variants names unknown variant '{v}' "
                "(no training run in 'runs:')"
            )
    return {k: [(v, found[k][v]) for v in variants if v in found[k]] for k in sorted(found)}


def optuna_storage(params: Params) -> str | Path:
    """``paths.optuna_db``: a SQLite file under the root, or a database URL as given."""
    db = params.paths.optuna_db
    return db if "://" in db else params.path("optuna_db")


def _fold_targets(params: Params, fold: int) -> tuple[list[str], np.ndarray]:
    """The validation ids of ``fold`` (fold table order) and their targets, float32."""
    from speedstructure.dataio import VP_SHAPE, ZipSamples
    from speedstructure.engine.data import read_folds_table

    _, val_rows = read_folds_table(params.path("folds_table"), fold, params.root)
    ids = [sid for sid, _ in val_rows]
    targets = np.empty((len(ids), *VP_SHAPE), np.float32)
    by_zip: dict[str, list[int]] = {}
    for i, (_, z) in enumerate(val_rows):
        by_zip.setdefault(z, []).append(i)
    for z, rows in by_zip.items():
        with ZipSamples(z) as zs:
            for i in rows:
                targets[i] = zs.read_target(ids[i])
    return ids, targets


def _member_preds(path: Path, ids: list[str], shape: tuple, where: str, first) -> np.ndarray:
    """One member's validation predictions in the order of ``ids``, checked.

    ``where`` names the fold and its table; ``first`` is ``(path, sample ids)`` of the
    fold's first member (None for the first itself): every member holds the same samples.
    """
    from speedstructure.engine.checkpoint import load_val_preds

    try:
        got_ids, arr = load_val_preds(path)
    except Exception as exc:  # numpy raises several types for bad archives
        raise DataError(f"{path}: not a readable val_preds archive ({exc})") from exc
    got = set(got_ids)
    if first is not None and got != first[1]:
        raise DataError(
            f"{path}: holds other sample ids than {first[0]} "
            f"({len(got - first[1])} extra, {len(first[1] - got)} missing)"
        )
    if got != set(ids) or len(got_ids) != len(ids):
        missing, extra = sorted(set(ids) - got), sorted(got - set(ids))
        raise DataError(
            f"{path}: sample ids differ from the validation ids of {where} "
            f"(missing: {', '.join(missing[:3]) or '-'}; extra: {', '.join(extra[:3]) or '-'})"
        )
    if arr.shape[1:] != shape:
        raise DataError(f"{path}: predictions of shape {arr.shape[1:]}, targets {shape}")
    pos = {sid: i for i, sid in enumerate(got_ids)}
    return arr[[pos[sid] for sid in ids]]


def load_fold(params: Params, fold: int, members: list[tuple[str, str]]):
    """``(ids, preds (M, N, 300, 1259) float16, targets (N, 300, 1259) float32, checkpoints)``.

    ``members`` are ``(variant, run key)`` pairs (:func:`member_runs`); checkpoints are
    relative to the project root.
    """
    from speedstructure.engine.checkpoint import BEST_NAME, VAL_PREDS_NAME

    ids, targets = _fold_targets(params, fold)
    where = f"fold {fold} in {params.path('folds_table')}"
    preds = np.empty((len(members), *targets.shape), np.float16)
    checkpoints = []
    first = None
    for k, (variant, key) in enumerate(members):
        run_dir = params.run_dir(variant, fold)
        path, ckpt = run_dir / VAL_PREDS_NAME, run_dir / BEST_NAME
        for f in (path, ckpt):
            if not f.is_file():
                raise UserError(
                    f"{f}: not found; it is written by the training run '{key}' in params.yaml "
                    f"runs: (speedstructure train --variant {variant} --fold {fold})"
                )
        preds[k] = _member_preds(path, ids, targets.shape[1:], where, first)
        first = first or (path, set(ids))
        if not np.isfinite(preds[k]).all():
            raise DataError(f"{path}: predictions contain non-finite values")
        checkpoints.append(relative_path(ckpt, params.root))
    return ids, preds, targets, checkpoints


# --------------------------------------------------------------------------- tuning


def _trial_history(study) -> list[tuple[int, float, int]]:
    """``[(trial number, value, completion time in ms)]`` of the completed trials."""
    out = []
    for t in complete_trials(study):
        ts = int(t.datetime_complete.timestamp() * 1000) if t.datetime_complete else 0
        out.append((t.number, float(t.value), ts))
    return out


def tune_fold(params: Params, cfg: TuneConfig, fold: int, members: list[tuple[str, str]]):
    """Split-half report and whole-fold weights of one fold: ``(fold entry, trial history)``."""
    names = [v for v, _ in members]
    ids, preds, targets, checkpoints = load_fold(params, fold, members)
    scorer = Scorer(preds, targets)
    del preds, targets
    if scorer.n_samples < 2:
        raise TuneError(
            f"fold {fold} of {params.path('folds_table')} has {scorer.n_samples} "
            "validation sample(s); tuning needs >= 2"
        )
    hand = dict(params.ensemble.hand_weights)
    report = split_half_report(
        scorer,
        None,
        names,
        hand,
        n_trials=cfg.n_trials,
        seed=cfg.seed,
        split_seed=cfg.split_seed,
    )
    weights, study = fit_weights(
        scorer,
        n_trials=cfg.n_trials,
        seed=cfg.seed,
        storage=optuna_storage(params),
        study_name=f"{cfg.study_prefix}-fold{fold}",
        names=names,
        restart_stale=True,
    )
    member_mape = scorer.member_mapes()
    entry = {
        "fold": fold,
        "members": [
            {"variant": v, "checkpoint": c, "weight": float(w), "val_mape": float(mm)}
            for v, c, w, mm in zip(names, checkpoints, weights, member_mape, strict=True)
        ],
        "val_mape": scorer(weights),
        "heldout": report["heldout"],
        "n_val": scorer.n_samples,
        "split_half": [_half_summary(h) for h in report["halves"]],
    }
    return entry, _trial_history(study)


def _half_summary(half: dict[str, Any]) -> dict[str, Any]:
    return {
        "tuned_on": len(half["tune_idx"]),
        "scored_on": len(half["heldout_idx"]),
        "best_single": half["best_single"],
        "tuned_weights": half["tuned_weights"],
    }


def summarise(params: Params, cfg: TuneConfig, fold_entries: list[dict]) -> tuple[dict, dict]:
    """The ensemble file's content and the stage's metrics."""
    cv_mape = float(np.mean([f["heldout"]["tuned"] for f in fold_entries]))
    ensemble = {
        "format": FORMAT,
        "folds": fold_entries,
        "cv_mape": cv_mape,
        "variants": list(params.ensemble.variants),
    }
    strategies = [s for s in STRATEGIES if all(s in f["heldout"] for f in fold_entries)]
    metrics = {
        "cv_mape": cv_mape,
        "heldout": {s: float(np.mean([f["heldout"][s] for f in fold_entries])) for s in strategies},
        "folds": {
            f"fold{f['fold']}": {**f["heldout"], "val_mape": f["val_mape"], "n_val": f["n_val"]}
            for f in fold_entries
        },
        "n_trials": cfg.n_trials,
    }
    return ensemble, metrics


def run_tune(params: Params, *, track: bool = True, n_trials: int | None = None) -> dict:
    """Tune the ensemble weights of every fold; writes the stage's files (see module doc).

    Returns ``{"ensemble": ..., "metrics": ..., "files": {...}}`` (files by the keys
    of :data:`OUTPUTS`).  ``track`` logs to MLflow through :mod:`speedstructure.tracking`;
    ``n_trials`` overrides ``tune.n_trials``.
    """
    from speedstructure import tracking

    tags = {"stage": "tune", "dvc_stage": "tune"}
    with tracking.stage_run(track, "tune", params, tags=tags):  # opened first: crashes FAIL it
        cfg = tune_settings(params, n_trials)
        if track:
            tracking.log_params(_run_params(params, cfg))
        fold_entries = [
            _tune_fold_run(params, cfg, fold, members, track)
            for fold, members in member_runs(params).items()
        ]
        ensemble, metrics = summarise(params, cfg, fold_entries)
        ensemble["calibration"] = _calibrate(params, fold_entries, track)
        files = write_outputs(params, ensemble, metrics)
        if track:
            _log_results(ensemble, metrics, files)
    return {"ensemble": ensemble, "metrics": metrics, "files": files}


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


def _calibrate(params: Params, fold_entries: list[dict], track: bool) -> dict:
    """The uncertainty calibration (:mod:`speedstructure.uncertainty`) from each fold's tuned
    ensemble on its validation samples (out of fold); its figures go to
    ``paths.calibration_metrics`` (and MLflow)."""
    from speedstructure import tracking, uncertainty
    from speedstructure.config import V_MAX, V_MIN

    runs = member_runs(params)
    folds = {}
    for f in fold_entries:
        _, preds, targets, _ = load_fold(params, f["fold"], runs[f["fold"]])
        w = np.array([m["weight"] for m in f["members"]], np.float32)
        pred = np.tensordot(w, preds.astype(np.float32), axes=1)
        folds[f["fold"]] = (np.clip(pred, V_MIN, V_MAX), targets)
        del preds
    water = params.synth.water_velocity
    calibration, metrics = uncertainty.calibrate(folds, params.uncertainty, water)
    atomic_write_json(params.path("calibration_report"), metrics)
    atomic_write_json(params.path("calibration_metrics"), calibration_headline(metrics))
    if track:
        cross = metrics["cross_fold"] or {}
        tracking.log_metrics({"oof_cross_fold_coverage": cross.get("coverage")})
    return calibration


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
    _plot_heldout(ensemble["folds"], list(metrics["heldout"]), files["heldout_png"])
    return files


def _plot_heldout(fold_entries: list[dict], strategies: list[str], path: Path) -> None:
    """Grouped bars: held-out MAPE of each strategy, per fold and the mean over folds."""
    from matplotlib.figure import Figure

    from speedstructure.plots import save_figure

    groups = [f"fold {f['fold']}" for f in fold_entries] + ["mean"]
    values = {s: [f["heldout"][s] for f in fold_entries] for s in strategies}
    for s in strategies:
        values[s].append(float(np.mean(values[s])))
    fig = Figure(figsize=(1.6 + 1.4 * len(groups), 4.2), layout="tight")
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(strategies))
    for i, s in enumerate(strategies):
        bars = ax.bar(x + (i - (len(strategies) - 1) / 2) * width, values[s], width, label=s)
        ax.bar_label(bars, fmt="%.4f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, groups)
    ax.set_ylabel("held-out MAPE (split-half)")
    ax.set_title("Ensemble weighting strategies")
    top = max(max(v) for v in values.values())
    ax.set_ylim(0, 1.35 * top if top > 0 else 1)
    ax.legend(fontsize=8, loc="upper center", ncols=len(strategies), frameon=False)
    save_figure(fig, path)


def _run_params(params: Params, cfg: TuneConfig) -> dict[str, Any]:
    """The params of the MLflow run ``tune``."""
    return {
        "variants": ",".join(params.ensemble.variants),
        "n_trials": cfg.n_trials,
        "seed": cfg.seed,
        "storage": params.paths.optuna_db,
        "study_prefix": cfg.study_prefix,
        "split_seed": cfg.split_seed,
    }


def _tune_fold_run(
    params: Params, cfg: TuneConfig, fold: int, members: list[tuple[str, str]], track: bool
) -> dict:
    """:func:`tune_fold`, with ``track`` inside the nested run ``tune-fold<k>`` (opened
    first); returns the fold's entry."""
    from speedstructure import tracking

    run_params = {"members": ",".join(v for v, _ in members), "n_trials": cfg.n_trials}
    tags = {"stage": "tune", "fold": str(fold)}
    with tracking.stage_run(
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


def _log_results(ensemble: dict, metrics: dict, files: dict[str, Path]) -> None:
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


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tune", help=cli.COMMANDS["tune"][1], description=DESCRIPTION)
    p.add_argument("--n-trials", type=int, default=None, help="override tune.n_trials")
    cli.add_mlflow_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    res = run_tune(params, track=args.mlflow, n_trials=args.n_trials)
    ens = res["ensemble"]
    for f in ens["folds"]:
        weights = ", ".join(f"{m['variant']}={m['weight']:.3f}" for m in f["members"])
        held = ", ".join(f"{s} {v:.5f}" for s, v in f["heldout"].items())
        print(f"fold {f['fold']} ({f['n_val']} val): {weights}; held-out MAPE: {held}")
    wrote = ", ".join(relative_path(res["files"][k], params.root) for k in ("ensemble", "metrics"))
    print(f"cv MAPE (held-out, tuned): {ens['cv_mape']:.5f}; wrote {wrote}")
    return 0
