"""The ``evaluate`` stage and the ``report`` command.

With the test targets at hand (``data/test_labels.npz``, as for the synthetic
set), the submission is scored: MAPE per sample and mean, per K-Means group
(the fitted K-Means of the ``folds`` stage applied to the test targets), per
depth band (``evaluate.depth_bands``), and,
for comparison on the same samples, the depth-trend baseline (mean over its
fold models) and the best single ensemble member (the member with the best
validation MAPE, chosen without looking at the test set).  Every trained
(variant, fold) run is scored too.  A figure shows truth, prediction and
error for the best, median and worst samples.  Everything is written as DVC
metrics and plots and logged to MLflow; the registered model version gets a
``test_mape`` tag.

``speedstructure report`` prints the table that ``make demo`` ends with.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config import ConfigError, load_params, project_root, resolve_path
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_bytes

DEFAULTS: dict[str, Any] = {
    "baseline": "baseline_depth_trend",
    "metrics": "metrics/evaluate.json",
    "per_sample": "plots/evaluate/per_sample.csv",
    "figure": "plots/evaluate/best_median_worst.png",
    "batch_size": 4,
    "depth_bands": [0, 150, 300, 450, 600, 800, 1000, 1259],  # m (cells): MAPE per depth band
}


def evaluate_config(params: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **(params.get("evaluate") or {})}


def relative_error(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per cell ``|g - p| / (|g| + 1e-8)``, the challenge metric before averaging (float32)."""
    return np.abs(truth - pred) / (np.abs(truth) + np.float32(1e-8))


def submission_path(params: dict[str, Any], root: Path) -> Path:
    """The submission the ``predict`` stage writes (``predict.output``)."""
    return resolve_path((params.get("predict") or {}).get("output", "submission/submission.npz"), root)


def _run_paths(params: dict[str, Any], root: Path) -> dict[str, dict[str, Any]]:
    """Each entry of ``runs`` with its checkpoint and training metrics paths."""
    from speedstructure.train import BEST_NAME, METRICS_NAME

    models_dir = (params.get("train") or {}).get("models_dir", "models")
    out = {}
    for key, r in (params.get("runs") or {}).items():
        d = resolve_path(Path(models_dir) / r["variant"] / f"fold_{int(r['fold'])}", root)
        out[key] = {"variant": r["variant"], "fold": int(r["fold"]), "checkpoint": d / BEST_NAME,
                    "metrics": d / METRICS_NAME}
    return out


def predict_runs(runs: dict[str, dict[str, Any]], test_zip: Path, ids: list[str], batch_size: int,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """float32 (N, 300, 1259) test predictions (flip TTA) of each run's best checkpoint.

    One model in memory at a time, on the GPU when there is one."""
    import torch
    from tqdm import tqdm

    from speedstructure.dataio import ZipSamples
    from speedstructure.ensemble import iter_batches, load_member

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds = {}
    bar = tqdm(total=len(ids) * len(runs), desc="evaluate runs", unit="sample", disable=not progress)
    with ZipSamples(test_zip) as z, torch.no_grad():
        for key, r in runs.items():
            model = load_member(r["checkpoint"], device)
            out = preds[key] = np.empty((len(ids), 300, 1259), np.float32)
            i = 0
            for chunk, x in iter_batches(z, ids, batch_size):
                out[i : i + len(chunk)] = model.predict(torch.from_numpy(x).to(device), tta=True).float().cpu().numpy()
                i += len(chunk)
                bar.update(len(chunk))
            del model
    bar.close()
    return preds


def plot_cases(ids, truths, preds, scores, path: Path) -> Path:
    from matplotlib.figure import Figure

    from speedstructure.plots import VELOCITY_CMAP, V_RANGE, save_figure

    order = np.argsort(scores)
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    fig = Figure(figsize=(9, 10), layout="constrained")
    axes = fig.subplots(3, 3, squeeze=False)
    for row, (label, i) in enumerate(picks):
        err = np.abs(preds[i] - truths[i]) / truths[i] * 100
        for col, (img, title, cmap, lim) in enumerate([
            (truths[i], f"{label}: truth ({ids[i][:8]})", VELOCITY_CMAP, V_RANGE),
            (preds[i], f"prediction, MAPE {scores[i]:.4f}", VELOCITY_CMAP, V_RANGE),
            (err, "abs. error (%)", "magma", (0, max(5.0, float(np.percentile(err, 99))))),
        ]):
            ax = axes[row, col]
            im = ax.imshow(img.T, cmap=cmap, vmin=lim[0], vmax=lim[1], aspect="auto",
                           extent=(0, img.shape[0], img.shape[1], 0), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("x (m)")
            ax.set_ylabel("depth (m)" if col == 0 else "")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("test samples: truth / ensemble prediction / error")
    return save_figure(fig, path)


def run_evaluate(params: dict[str, Any], root: Path | None = None, *, track: bool = True,
                 progress: bool = True) -> dict[str, Any]:
    import joblib
    import pandas as pd

    from speedstructure.folds import folds_config, velocity_features
    from speedstructure.ingest import data_config, zip_paths

    root = Path(root or project_root())
    cfg = evaluate_config(params)
    dcfg = data_config(params)
    labels_path = resolve_path(Path(dcfg["dir"]) / dcfg["test_labels"], root)
    sub_path = submission_path(params, root)
    for p, what in ((labels_path, "test targets"), (sub_path, "submission (run the predict stage)")):
        if not p.is_file():
            raise UserError(f"{p}: {what} not found")
    with np.load(labels_path) as lab, np.load(sub_path) as sub:
        ids = sorted(lab.files)
        missing = sorted(set(ids) - set(sub.files))
        if missing:
            raise UserError(f"{sub_path}: no prediction for {len(missing)} test sample(s), e.g. '{missing[0]}'")
        truths = np.stack([lab[k].astype(np.float32) for k in ids])
        ens = np.stack([sub[k].astype(np.float32) for k in ids])
    runs = _run_paths(params, root)
    baseline = cfg["baseline"]
    base_runs = {k: r for k, r in runs.items() if r["variant"] == baseline}
    if not base_runs:
        raise ConfigError(f"params.yaml: evaluate.baseline '{baseline}' has no entry in runs:")
    members = set((params.get("ensemble") or {}).get("variants") or [])
    preds = predict_runs(runs, zip_paths(params, root)["test"], ids, int(cfg["batch_size"]), progress)

    ens_err = relative_error(ens, truths)  # (N, 300, 1259): scores per sample, group and depth band
    base_err = relative_error(np.mean([preds[k] for k in base_runs], axis=0), truths)
    ens_scores, base_scores = ens_err.mean(axis=(1, 2), dtype=np.float64), base_err.mean(axis=(1, 2), dtype=np.float64)
    run_test = {k: float(relative_error(preds[k], truths).mean(dtype=np.float64)) for k in runs}
    run_val = {}
    for k, r in runs.items():
        try:
            run_val[k] = float(json.loads(r["metrics"].read_text())["best_val_mape"])
        except (OSError, ValueError, KeyError):
            run_val[k] = math.nan
    member_keys = [k for k in runs if runs[k]["variant"] in members and math.isfinite(run_val[k])]
    if not member_keys:
        raise UserError("no ensemble member run has a validation MAPE (run the training stages)")
    best_member = min(member_keys, key=lambda k: run_val[k])

    km = joblib.load(resolve_path(folds_config(params)["kmeans"], root))
    groups = km.predict(np.stack([velocity_features(t) for t in truths]))
    per_group = {int(g): {"n": int((groups == g).sum()), "ensemble": float(ens_scores[groups == g].mean()),
                          "baseline": float(base_scores[groups == g].mean())} for g in sorted(set(groups))}
    depth_bands = {}
    edges = list(cfg["depth_bands"])
    for top, bottom in zip(edges[:-1], edges[1:]):
        band = slice(int(top), int(bottom))
        depth_bands[f"{top}-{bottom}"] = {"ensemble": float(ens_err[:, :, band].mean(dtype=np.float64)),
                                          "baseline": float(base_err[:, :, band].mean(dtype=np.float64))}
    metrics = {
        "n_test": len(ids),
        "ensemble_mape": float(ens_scores.mean()),
        "baseline_mape": float(base_scores.mean()),
        "best_single": {"run": best_member, "val_mape": run_val[best_member], "test_mape": run_test[best_member]},
        "best_single_mape": run_test[best_member],
        "ratio_to_baseline": float(ens_scores.mean() / base_scores.mean()),
        "per_group": per_group,
        "per_depth": depth_bands,
        "runs": {k: {"test_mape": run_test[k], "val_mape": run_val[k]} for k in runs},
    }
    reg_path = resolve_path(registry_output(params), root)
    if reg_path.is_file():
        metrics["registered"] = json.loads(reg_path.read_text())
    out_metrics = resolve_path(cfg["metrics"], root)
    out_metrics.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_metrics, (json.dumps(metrics, indent=2) + "\n").encode())
    table = pd.DataFrame({"sample_id": ids, "group": groups.astype(int), "ensemble_mape": ens_scores,
                          "baseline_mape": base_scores})
    out_csv = resolve_path(cfg["per_sample"], root)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_csv, table.to_csv(index=False).encode())
    fig = plot_cases(ids, truths, ens, ens_scores, resolve_path(cfg["figure"], root))
    if track:
        _log_mlflow(params, root, metrics, [out_metrics, out_csv, fig])
    return metrics


def registry_output(params: dict[str, Any]) -> str:
    from speedstructure.registry import registry_config

    return registry_config(params)["output"]


def _log_mlflow(params, root, metrics, files) -> None:
    import mlflow

    from speedstructure import tracking

    flat = {"test_mape": metrics["ensemble_mape"], "baseline_mape": metrics["baseline_mape"],
            "best_single_mape": metrics["best_single_mape"], "ratio_to_baseline": metrics["ratio_to_baseline"]}
    flat.update({f"group{g}_mape": v["ensemble"] for g, v in metrics["per_group"].items()})
    flat.update({f"depth_{band}_mape": v["ensemble"] for band, v in metrics["per_depth"].items()})
    flat.update({f"run_{k}_test_mape": v["test_mape"] for k, v in metrics["runs"].items()})
    with tracking.start_run("evaluate", tags={"stage": "evaluate", "dvc_stage": "evaluate"},
                            project_params=params, root=root):
        tracking.log_metrics(flat)
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate")
    reg = metrics.get("registered")
    if reg:
        mlflow.MlflowClient().set_model_version_tag(reg["name"], str(reg["version"]), "test_mape",
                                                    f"{metrics['ensemble_mape']:.6f}")


def format_report(metrics: dict[str, Any], submission: str | None = None) -> str:
    rows = [
        ("depth-trend baseline", metrics["baseline_mape"]),
        (f"best single model ({metrics['best_single']['run']})", metrics["best_single_mape"]),
        ("ensemble (tuned weights, flip TTA)", metrics["ensemble_mape"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"Test MAPE on {metrics['n_test']} samples", f"  {'model':<{width}}  MAPE",
             f"  {'-' * width}  -------"]
    lines += [f"  {name:<{width}}  {v:.5f}" for name, v in rows]
    lines.append(f"  ensemble / baseline = {metrics['ratio_to_baseline']:.3f}")
    if submission:
        lines.append(f"submission: {submission}")
    reg = metrics.get("registered")
    if reg:
        champ = "champion" if reg["champion"] else f"champion stays v{reg['champion_version']}"
        lines.append(f"registered model: {reg['model_uri']} ({champ})")
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    params = load_params()
    m = run_evaluate(params, track=not args.no_mlflow, progress=not args.quiet)
    print(format_report(m))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:  # noqa: ARG001
    params = load_params()
    root = project_root()
    path = resolve_path(evaluate_config(params)["metrics"], root)
    if not path.is_file():
        raise UserError(f"{path}: no evaluation yet (run `dvc repro` or `make demo`)")
    sub = submission_path(params, root)
    print(format_report(json.loads(path.read_text()), str(sub)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score the submission against the test targets",
                       description="MAPE per sample, per K-Means group, against the depth-trend baseline "
                                   "and the best single member; figures; MLflow.")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)
    r = sub.add_parser("report", help="print the test MAPE table of the last evaluation")
    r.set_defaults(func=_cmd_report)

