"""The evaluation's figures and report: scores of the ensemble, the baseline, the best single
member and every run; the headline DVC metrics; the table ``make demo`` ends with.

Scores (:func:`score`): MAPE per sample and mean, per K-Means group (the fitted K-Means of
the ``folds`` stage applied to the test targets), per depth band, the laterally constant
oracle, R2_lat, the water-floor depth error and the velocity level (the mean velocity below
the water floor, predicted against true: :func:`level`).  With the test set's truth file
(:mod:`speedstructure.data.truth`, synthetic data only) also R2_lat per family and, on the
intrusion samples, the body IoU (:func:`known_structure`).  :func:`headline` picks the
figures experiments are compared on; :func:`format_report` writes the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.schema import V_MAX, V_MIN, Params
from speedstructure.data.truth import INTRUSION, Truth
from speedstructure.ensemble.runs import run_paths
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_text
from speedstructure.metrics import (
    high_velocity_iou,
    lateral_r2,
    laterally_constant_oracle,
    mean_below_floor,
    pearson,
    relative_error,
    water_floor_depth,
    water_floor_error,
)

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
    from speedstructure.data.groups import KMeansCentres, velocity_features

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


def _value(x: float) -> float | None:
    """``x``, or None where it is undefined (NaN: JSON and the DVC metrics have no NaN)."""
    return float(x) if math.isfinite(x) else None


def level(params: Params, truths: np.ndarray, ens: np.ndarray, truth: Truth | None) -> tuple:
    """The velocity level: ``(metrics, per-sample columns)`` of the mean velocity below the
    true water floor (the truth file's, else the targets' first cell faster than water),
    predicted against true: their Pearson correlation over the samples and the mean (absolute)
    relative error and bias of the predicted level."""
    if truth is not None:
        floor, source = truth.floor, "truth"
    else:
        floor, source = water_floor_depth(truths, params.synth.water_velocity), "targets"
    pred, true = mean_below_floor(ens, floor), mean_below_floor(truths, floor)
    ok = np.isfinite(pred) & np.isfinite(true)  # a target without a floor has no level
    rel = (pred[ok] - true[ok]) / true[ok]
    metrics = {
        "level_floor": source,
        "level_corr": _value(pearson(pred[ok], true[ok])),
        "level_error": _value(float(np.abs(rel).mean())) if ok.any() else None,
        "level_bias": _value(float(rel.mean())) if ok.any() else None,
    }
    return metrics, {"level_pred": pred, "level_true": true}


def _family_order(params: Params, family: np.ndarray) -> list[str]:
    known = [f for f in params.synth.families if f in set(family)]
    return known + sorted(set(family) - set(known))


def known_structure(params: Params, truths, ens, ens_scores, truth: Truth | None) -> tuple:
    """``(metrics, per-sample columns)`` from the truth file: R2_lat per family (pooled over
    the family's samples like the overall R2_lat) and the body IoU of the intrusion samples
    (:func:`~speedstructure.metrics.high_velocity_iou` at ``evaluate.body_threshold``);
    ``truth: None`` (no truth file) when there is none."""
    if truth is None:
        return {"truth": None}, {}
    family = np.asarray(truth.family)
    per_family = {}
    for fam in _family_order(params, family):
        sel = family == fam
        per_family[fam] = {
            "n": int(sel.sum()),
            "ensemble_mape": float(ens_scores[sel].mean()),
            "lateral_r2": _value(lateral_r2(ens[sel], truths[sel])),
        }
    threshold = float(params.evaluate.body_threshold)
    iou = np.full(len(truths), math.nan)
    for i in np.flatnonzero(family == INTRUSION):
        iou[i] = high_velocity_iou(ens[i], truths[i], threshold)
    metrics: dict[str, Any] = {"truth": truth.path.name, "per_family": per_family}
    metrics.update(body_threshold=threshold, body_iou_n=int((family == INTRUSION).sum()))
    if np.isfinite(iou).any():
        metrics["body_iou"] = float(np.nanmean(iou))
    columns = {"family": family, "body_iou": iou} if metrics["body_iou_n"] else {"family": family}
    return metrics, columns


def score(
    params: Params, truths, ens, runs, preds, base_keys, truth: Truth | None = None
) -> tuple[dict, dict]:
    """The stage's metrics and the per-sample table's columns (group, family with a truth
    file, ensemble, baseline, structure, level); ``truth``: the test set's truth file, its
    rows in the targets' order, or None."""
    ens_err = relative_error(ens, truths)  # (N, 300, 1259): per sample, group and depth band
    base_err = relative_error(np.mean([preds[k] for k in base_keys], axis=0), truths)
    oracle_err = relative_error(laterally_constant_oracle(truths), truths)
    ens_scores, base_scores = _per_sample(ens_err), _per_sample(base_err)
    struct = structure(params, truths, ens, oracle_err)
    run_test, run_val = _run_scores(runs, preds, truths)
    best = _best_member(params, runs, run_val)
    groups = target_groups(params, truths)
    lev, lev_columns = level(params, truths, ens, truth)
    known, known_columns = known_structure(params, truths, ens, ens_scores, truth)
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
        **lev,
        **known,
        "runs": {k: {"test_mape": run_test[k], "val_mape": run_val[k]} for k in runs},
    }
    columns = {
        "group": groups.astype(int),
        **{k: v for k, v in known_columns.items() if k == "family"},
        "ensemble_mape": ens_scores,
        "baseline_mape": base_scores,
        **struct["per_sample"],
        **lev_columns,
        **{k: v for k, v in known_columns.items() if k != "family"},
    }
    return metrics, columns


# the DVC metrics (paths.evaluate_metrics, what `make exp` compares), under MLflow's names
HEADLINE = ("test_mape", "baseline_mape", "ratio_to_baseline", "lateral_r2")
# and the structure and level, on both sets (ood_ prefix), with r2_lat_<family>
HEADLINE_STRUCTURE = ("level_corr", "level_error", "body_iou")
HEADLINE_OOD = ("test_mape", "ratio_to_baseline")


def _in_headline(key: str) -> bool:
    base = key.removeprefix("ood_")
    structure = base in HEADLINE_STRUCTURE or base.startswith("r2_lat_")
    return structure or (base in HEADLINE_OOD if key.startswith("ood_") else key in HEADLINE)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures experiments are compared on: the ensemble's test MAPE, the baseline's, their
    ratio, R2_lat, the level's correlation and error, and with a truth file R2_lat per family
    and the body IoU; the OOD set's test MAPE, ratio and structure figures when scored
    (``ood_`` prefix); without test targets, ``labels: none``.  The rest of ``metrics`` stays
    in ``paths.evaluate_report``."""
    if metrics.get("labels") == NO_LABELS:
        return {"labels": NO_LABELS, "n_test": metrics["n_test"]}
    flat = flat_metrics(metrics)
    return {k: v for k, v in flat.items() if _in_headline(k) and math.isfinite(v)}


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


def plot_cases(ids, truths, preds, scores, path: Path) -> Path:
    """Truth, prediction and error of the best, median and worst samples (a 3 x 3 figure)."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import VELOCITY_CMAP, save_figure, section_row

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
    for key in ("level_corr", "level_error", "level_bias", "body_iou"):
        if metrics.get(key) is not None:  # evaluations before these figures existed lack them
            flat[key] = metrics[key]
    for fam, v in (metrics.get("per_family") or {}).items():
        if v["lateral_r2"] is not None:
            flat[f"r2_lat_{fam}"] = v["lateral_r2"]
    flat.update({f"group{g}_mape": v["ensemble"] for g, v in metrics["per_group"].items()})
    flat.update({f"depth_{band}_mape": v["ensemble"] for band, v in metrics["per_depth"].items()})
    flat.update({f"run_{k}_test_mape": v["test_mape"] for k, v in metrics["runs"].items()})
    if "ood" in metrics:
        flat.update({f"ood_{k}": v for k, v in flat_metrics(metrics["ood"]).items()})
    return flat


# --------------------------------------------------------------------------- without test labels

NO_LABELS = "none"  # metrics["labels"] when there were no test targets to score against


def plot_predictions(ids, preds, path: Path) -> Path:
    """The first, median and last predicted velocity models (no truth to compare with)."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import VELOCITY_CMAP, save_figure, section_row

    picks = sorted({0, len(ids) // 2, len(ids) - 1})
    fig = Figure(figsize=(3.2 * len(picks), 4), layout="constrained")
    panels = [
        (preds[i], f"{ids[i][:8]}: prediction", VELOCITY_CMAP, (V_MIN, V_MAX), "km/s")
        for i in picks
    ]
    section_row(fig, fig.subplots(1, len(picks), squeeze=False)[0], panels)
    fig.suptitle("test samples without labels: predictions only")
    return save_figure(fig, path)


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
        ("ensemble (weights from tune, flip TTA)", metrics["ensemble_mape"]),
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
    return lines + _structure_lines(metrics)


def _structure_lines(metrics: dict[str, Any]) -> list[str]:
    """The level line, and with a truth file the body IoU and the per-family table."""
    lines = []
    if "level_corr" in metrics:
        floor = "the truth file's" if metrics["level_floor"] == "truth" else "the targets'"
        corr, err, bias = (metrics[k] for k in ("level_corr", "level_error", "level_bias"))
        lines.append(
            f"  velocity level (mean below {floor} water floor): correlation "
            f"{_fmt(corr, '.3f')}, mean relative error {_fmt(err, '.4f')}, "
            f"bias {_fmt(bias, '+.4f')}"
        )
    if "truth" in metrics and metrics["truth"] is None:
        lines.append("  no truth file: per-family R2_lat and body IoU not available")
    if "body_iou" in metrics:
        lines.append(
            f"  intrusion bodies (cells above {metrics['body_threshold']:g} km/s): IoU "
            f"{metrics['body_iou']:.3f}, mean of {metrics['body_iou_n']} samples"
        )
    fams = metrics.get("per_family") or {}
    if fams:
        width = max(len("family"), *map(len, fams))
        lines.append(f"  {'family':<{width}}  {'n':>3}  MAPE     R2_lat")
        for fam, v in fams.items():
            lines.append(
                f"  {fam:<{width}}  {v['n']:>3}  {v['ensemble_mape']:.5f}  "
                f"{_fmt(v['lateral_r2'], '.3f')}"
            )
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
