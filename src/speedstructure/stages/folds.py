"""The ``folds`` stage: K-Means groups of velocity models and stratified folds.

As in the seed, each training target is described by the min, max, mean and
standard deviation of the velocity along each axis (4 x (300 + 1259) numbers).
K-Means (``folds.k_groups`` clusters, seeded) is fitted on the original
training set only; the extended sets get the group K-Means predicts for them.
``StratifiedKFold(folds.n_folds, shuffle=True, random_state=folds.seed)`` then
splits the original training set by group.  Extended samples carry fold -1:
they join every training fold and are never validated on.

Settings: ``folds:`` in params.yaml; input ``paths.store``; outputs (``paths.*`` keys)::

    folds_table      sample_id, zip, split, group, fold
    kmeans           the fitted K-Means as plain arrays (:class:`KMeansCentres`, an ``.npz``
                     read without pickle: it travels through DVC remotes)
    folds_summary    sizes, inertia, group counts per fold (detail, versioned in git)
    group_counts     fold, group, bar, count (DVC bar plot: one bar per fold and group)
    folds_plots      group_counts.png, groups.png: the seed's exploratory figures

"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.config.typed import as_plain
from speedstructure.data.groups import TRAIN_SPLIT, group_counts, make_folds, summarise
from speedstructure.data.store import StoreSamples
from speedstructure.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from speedstructure.tracking.runs import log_metrics, stage_run

log = logging.getLogger(__name__)

COMMAND_HELP = (
    "Fit K-Means on the original training targets and split them into stratified folds "
    "(extended samples: fold -1, always trained on)."
)


def plot_group_counts(table: pd.DataFrame, path: Path) -> Path:
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import save_figure

    counts = group_counts(table).pivot(index="fold", columns="group", values="count").fillna(0)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(counts))
    for g in counts.columns:
        ax.bar(counts.index, counts[g].to_numpy(), bottom=bottom, label=f"group {g}")
        bottom += counts[g].to_numpy()
    ax.set_ylabel("samples")
    ax.set_title("K-Means groups per validation fold (extended: always trained on)")
    ax.legend(fontsize="small", ncols=3)
    return save_figure(fig, path)


def plot_group_examples(table: pd.DataFrame, store_path: Path, path: Path, per_group: int) -> Path:
    from speedstructure.reports.plots import plot_velocity_grid

    store = StoreSamples(store_path)
    models, titles = [], []
    rng = np.random.default_rng(0)
    groups = sorted(table["group"].unique())
    for g in groups:
        ids = table.loc[
            (table["group"] == g) & (table["split"] == TRAIN_SPLIT), "sample_id"
        ].to_numpy()
        if len(ids) == 0:
            ids = table.loc[table["group"] == g, "sample_id"].to_numpy()
        for sid in rng.permutation(ids)[:per_group]:
            models.append(store.read_target(sid))
            titles.append(f"group {g}")
    ncols = max(1, min(per_group, max(len(titles), 1)))
    return plot_velocity_grid(
        models,
        titles,
        path,
        ncols=ncols * 2 if len(groups) > 3 else ncols,
        suptitle="example velocity models per K-Means group",
    )


def write_outputs(params: Params, table: pd.DataFrame, km, summary: dict[str, Any]) -> list[Path]:
    """The fold table, K-Means, summary, group counts and the two figures; returns their paths."""
    atomic_write_bytes(params.path("kmeans"), km.to_bytes())
    written = [
        atomic_write_text(params.path("folds_table"), table.to_csv(index=False)),
        atomic_write_json(params.path("folds_summary"), summary),
        atomic_write_text(params.path("group_counts"), group_counts(table).to_csv(index=False)),
    ]
    plots = params.path("folds_plots")
    per_group = int(params.folds.examples_per_group)
    return [
        *written,
        plot_group_counts(table, plots / "group_counts.png"),
        plot_group_examples(table, params.path("store"), plots / "groups.png", per_group),
    ]


def _log_mlflow(summary: dict[str, Any], artifacts: list[Path]) -> None:
    """The summary figures and the outputs, into the active run."""
    import mlflow

    log_metrics({k: summary[k] for k in ("inertia", "n_train", "n_extended")})
    for f in artifacts:
        mlflow.log_artifact(str(f), artifact_path="folds")


def run_folds(params: Params, *, track: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run the stage: write the fold table, K-Means, summary, counts and plots; with
    ``track`` inside an MLflow run opened first (a failure leaves it FAILED)."""

    tags = {"stage": "folds", "dvc_stage": "folds"}
    run_params = {"folds": as_plain(params.folds)}
    with stage_run(track, "folds", params, tags=tags, params=run_params):
        table, km, _ = make_folds(params.path("store"), params.folds, progress=progress)
        summary = summarise(table, km)
        artifacts = write_outputs(params, table, km, summary)
        if track:
            _log_mlflow(summary, artifacts)
    return summary


def _cmd(args: argparse.Namespace) -> int:
    s = run_folds(load_params(), track=args.mlflow, progress=not args.quiet)
    print(
        f"folds: {s['n_train']} training samples in {s['n_folds']} stratified folds over "
        f"{s['k_groups']} K-Means groups (sizes {s['group_sizes']}); "
        f"{s['n_extended']} extended samples in every training fold"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from speedstructure.cli import add_mlflow_option, add_quiet_option

    p = subparsers.add_parser("folds", description=COMMAND_HELP)
    add_mlflow_option(p)
    add_quiet_option(p)
    p.set_defaults(func=_cmd)
