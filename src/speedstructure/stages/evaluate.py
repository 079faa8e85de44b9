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
error for the best, median and worst samples.  Everything is written as DVC
metrics and plots (``paths.evaluate_metrics``, ``paths.evaluate_per_sample``,
``paths.evaluate_figure``) and logged to MLflow; the registered model version
(``paths.registered``) gets a ``test_mape`` tag.

``speedstructure report`` prints the table that ``make demo`` ends with.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config import V_MAX, V_MIN, ConfigError, Params, load_params
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_json, atomic_write_text
from speedstructure.metrics import (
    lateral_r2,
    laterally_constant_oracle,
    relative_error,
    water_floor_error,
)

DESCRIPTION = (
    "MAPE per sample, per K-Means group and per depth band, against the depth-trend baseline "
    "and the best single member; figures; MLflow."
)
_IMSHOW = {"aspect": "auto", "interpolation": "nearest"}


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
    with np.load(labels_path) as lab, np.load(sub_path) as sub:
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

    from speedstructure.dataio import VP_SHAPE, ZipSamples
    from speedstructure.ensemble import iter_batches, load_member

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds = {}
    bar = tqdm(
        total=len(ids) * len(runs), desc="evaluate runs", unit="sample", disable=not progress
    )
    with ZipSamples(test_zip) as z, torch.no_grad():
        for key, r in runs.items():
            model = load_member(r["checkpoint"], device)
            out = preds[key] = np.empty((len(ids), *VP_SHAPE), np.float32)
            i = 0
            for chunk, x in iter_batches(z, ids, batch_size):
                out[i : i + len(chunk)] = (
                    model.predict(torch.from_numpy(x).to(device), tta=True).float().cpu().numpy()
                )
                i += len(chunk)
                bar.update(len(chunk))
            del model
    bar.close()
    return preds


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
    import joblib

    from speedstructure.stages.folds import velocity_features

    km = joblib.load(params.path("kmeans"))
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


def run_evaluate(params: Params, *, track: bool = True, progress: bool = True) -> dict[str, Any]:
    """Score the submission (see the module doc); writes the stage's files, returns the metrics."""
    ids, truths, ens = load_test_set(params)
    runs = run_paths(params)
    base_keys = _baseline_runs(params, runs)
    test_zip = params.zip_path("test")
    preds = predict_runs(runs, test_zip, ids, int(params.evaluate.batch_size), progress)
    metrics, columns = score(params, truths, ens, runs, preds, base_keys)
    reg_path = params.path("registered")
    if reg_path.is_file():
        metrics["registered"] = json.loads(reg_path.read_text())
    files = write_outputs(params, metrics, ids, columns, truths, ens)
    if track:
        _log_mlflow(params, metrics, files)
    return metrics


# --------------------------------------------------------------------------- outputs


def write_outputs(params: Params, metrics, ids, columns, truths, ens) -> list[Path]:
    """The metrics JSON, the per-sample CSV and the best/median/worst figure."""
    import pandas as pd

    out_metrics = atomic_write_json(params.path("evaluate_metrics"), metrics)
    table = pd.DataFrame({"sample_id": ids, **columns})
    out_csv = atomic_write_text(params.path("evaluate_per_sample"), table.to_csv(index=False))
    scores = columns["ensemble_mape"]
    fig = plot_cases(ids, truths, ens, scores, params.path("evaluate_figure"))
    return [out_metrics, out_csv, fig]


def plot_cases(ids, truths, preds, scores, path: Path) -> Path:
    """Truth, prediction and error of the best, median and worst samples (a 3 x 3 figure)."""
    from matplotlib.figure import Figure

    from speedstructure.plots import VELOCITY_CMAP, save_figure

    order = np.argsort(scores)
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    fig = Figure(figsize=(9, 10), layout="constrained")
    axes = fig.subplots(3, 3, squeeze=False)
    for row, (label, i) in enumerate(picks):
        err = np.abs(preds[i] - truths[i]) / truths[i] * 100
        panels = [
            (truths[i], f"{label}: truth ({ids[i][:8]})", VELOCITY_CMAP, (V_MIN, V_MAX)),
            (preds[i], f"prediction, MAPE {scores[i]:.4f}", VELOCITY_CMAP, (V_MIN, V_MAX)),
            (err, "abs. error (%)", "magma", (0, max(5.0, float(np.percentile(err, 99))))),
        ]
        for col, (img, title, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[row, col]
            extent = (0, img.shape[0], img.shape[1], 0)
            im = ax.imshow(img.T, cmap=cmap, vmin=lo, vmax=hi, extent=extent, **_IMSHOW)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("x (m)")
            ax.set_ylabel("depth (m)" if col == 0 else "")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("test samples: truth / ensemble prediction / error")
    return save_figure(fig, path)


def _log_mlflow(params: Params, metrics: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    from speedstructure import tracking

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
    tags = {"stage": "evaluate", "dvc_stage": "evaluate"}
    with tracking.start_run("evaluate", project=params, tags=tags):
        tracking.log_metrics(flat)
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate")
    reg = metrics.get("registered")
    if reg:
        mlflow.MlflowClient().set_model_version_tag(
            reg["name"], str(reg["version"]), "test_mape", f"{metrics['ensemble_mape']:.6f}"
        )


# --------------------------------------------------------------------------- report


def format_report(metrics: dict[str, Any], submission: str | None = None) -> str:
    rows = [
        ("depth-trend baseline", metrics["baseline_mape"]),
        (f"best single model ({metrics['best_single']['run']})", metrics["best_single_mape"]),
        ("ensemble (tuned weights, flip TTA)", metrics["ensemble_mape"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"Test MAPE on {metrics['n_test']} samples",
        f"  {'model':<{width}}  MAPE",
        f"  {'-' * width}  -------",
    ]
    lines += [f"  {name:<{width}}  {v:.5f}" for name, v in rows]
    lines.append(f"  ensemble / baseline = {metrics['ratio_to_baseline']:.3f}")
    if "lateral_r2" in metrics:  # evaluations before these figures existed lack them
        band = "-".join(map(str, metrics["focus_band"]))
        lines.append(
            f"  {band} m MAPE {metrics['focus_band_mape']:.4f}; laterally constant oracle "
            f"{metrics['oracle_mape']:.5f}; lateral structure R2_lat {metrics['lateral_r2']:.3f}; "
            f"water-floor depth error {metrics['water_floor_error_m']:.1f} m"
        )
    if submission:
        lines.append(f"submission: {submission}")
    reg = metrics.get("registered")
    if reg:
        champ = "champion" if reg["champion"] else f"champion stays v{reg['champion_version']}"
        lines.append(f"registered model: {reg['model_uri']} ({champ})")
    return "\n".join(lines)


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
    path = params.path("evaluate_metrics")
    if not path.is_file():
        raise UserError(f"{path}: no evaluation yet (run `dvc repro` or `make demo`)")
    print(format_report(json.loads(path.read_text()), str(params.path("submission"))))
    return 0
