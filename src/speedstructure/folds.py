"""The ``folds`` stage: K-Means groups of velocity models and stratified folds.

As in the seed, each training target is described by the min, max, mean and
standard deviation of the velocity along each axis (4 x (300 + 1259) numbers).
K-Means (``folds.k_groups`` clusters, seeded) is fitted on the original
training set only; the extended sets get the group K-Means predicts for them.
``StratifiedKFold(folds.n_folds, shuffle=True, random_state=folds.seed)`` then
splits the original training set by group.  Extended samples carry fold -1:
they join every training fold and are never validated on.

Outputs (``folds:`` in params.yaml)::

    folds/folds.csv            sample_id, zip, split, group, fold
    folds/kmeans.joblib        the fitted K-Means (scikit-learn)
    folds/summary.json         sizes, inertia, group counts per fold (DVC metrics)
    folds/group_counts.csv     fold, group, count (DVC bar plot)
    plots/folds/group_counts.png, plots/folds/groups.png   the seed's exploratory figures
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speedstructure.config import load_params, project_root, resolve_path
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_bytes

DEFAULTS: dict[str, Any] = {
    "k_groups": 6,
    "n_folds": 5,
    "seed": 42,
    "kmeans_seed": 42,
    "table": "folds/folds.csv",
    "kmeans": "folds/kmeans.joblib",
    "summary": "folds/summary.json",
    "counts": "folds/group_counts.csv",
    "plots_dir": "plots/folds",
    "examples_per_group": 4,
}
TRAIN_SPLIT = "train"


def folds_config(params: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **(params.get("folds") or {})}


def velocity_features(v: np.ndarray) -> np.ndarray:
    """min, max, mean, std of a (300, 1259) model along each axis: a 4 x (300 + 1259) vector."""
    v = np.asarray(v, dtype=np.float32)
    feats = []
    for axis in (0, 1):
        feats += [v.min(axis), v.max(axis), v.mean(axis), v.std(axis)]
    return np.concatenate(feats)


def assign_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified fold index (0..n_folds-1) of each sample, stratified by ``groups``."""
    from sklearn.model_selection import StratifiedKFold

    if len(groups) < n_folds:
        raise UserError(f"folds.n_folds = {n_folds} but the training set has only {len(groups)} samples")
    fold = np.full(len(groups), -1, dtype=np.int64)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(groups)), groups)):
        fold[val_idx] = k
    return fold


def make_folds(store_path: Path, cfg: dict[str, Any], progress: bool = False):
    """The fold table (DataFrame), the fitted K-Means and the features of the training set."""
    import warnings

    from sklearn.cluster import KMeans
    from tqdm import tqdm

    from speedstructure.ingest import INDEX_NAME, StoreSamples

    index = pd.read_csv(store_path / INDEX_NAME, dtype={"sample_id": str})
    index = index[index["has_target"] == 1].sort_values(["split", "sample_id"]).reset_index(drop=True)
    if not (index["split"] == TRAIN_SPLIT).any():
        raise UserError(f"{store_path}: no samples of the '{TRAIN_SPLIT}' split to fit K-Means on")
    store = StoreSamples(store_path)
    feats = np.stack([velocity_features(store.read_target(sid))
                      for sid in tqdm(index["sample_id"], desc="features", disable=not progress)])
    is_train = (index["split"] == TRAIN_SPLIT).to_numpy()
    k = int(cfg["k_groups"])
    if is_train.sum() < k:
        raise UserError(f"folds.k_groups = {k} but the training set has only {int(is_train.sum())} samples")
    km = KMeans(n_clusters=k, n_init=10, random_state=int(cfg["kmeans_seed"]))
    km.fit(feats[is_train])
    groups = km.predict(feats)
    fold = np.full(len(index), -1, dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fold[is_train] = assign_folds(groups[is_train], int(cfg["n_folds"]), int(cfg["seed"]))
    for w in caught:  # e.g. a group smaller than n_folds: say so, do not hide it
        print(f"folds: warning: {w.message}")
    table = pd.DataFrame({
        "sample_id": index["sample_id"], "zip": index["zip"], "split": index["split"],
        "group": groups.astype(int), "fold": fold,
    })
    return table, km, feats


def group_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Rows (fold, group, count) over the validation folds (extended samples as fold 'extended')."""
    t = table.copy()
    t["fold"] = t["fold"].map(lambda f: "extended" if f < 0 else f"fold {f}")
    return t.groupby(["fold", "group"]).size().rename("count").reset_index()


def summarize(table: pd.DataFrame, km) -> dict[str, Any]:
    val = table[table["fold"] >= 0]
    per_fold = {int(f): {int(g): int(c) for g, c in d["group"].value_counts().sort_index().items()}
                for f, d in val.groupby("fold")}
    return {
        "n_train": int(len(val)),
        "n_extended": int((table["fold"] < 0).sum()),
        "n_folds": int(val["fold"].nunique()),
        "k_groups": int(km.n_clusters),
        "inertia": float(km.inertia_),
        "group_sizes": {int(g): int(c) for g, c in table["group"].value_counts().sort_index().items()},
        "val_group_counts": per_fold,
    }


def plot_group_counts(table: pd.DataFrame, path: Path) -> Path:
    from matplotlib.figure import Figure

    from speedstructure.plots import save_figure

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
    from speedstructure.ingest import StoreSamples
    from speedstructure.plots import plot_velocity_grid

    store = StoreSamples(store_path)
    models, titles = [], []
    rng = np.random.default_rng(0)
    groups = sorted(table["group"].unique())
    for g in groups:
        ids = table.loc[(table["group"] == g) & (table["split"] == TRAIN_SPLIT), "sample_id"].to_numpy()
        if len(ids) == 0:
            ids = table.loc[table["group"] == g, "sample_id"].to_numpy()
        for sid in rng.permutation(ids)[:per_group]:
            models.append(store.read_target(sid))
            titles.append(f"group {g}")
    ncols = max(1, min(per_group, max(len(titles), 1)))
    return plot_velocity_grid(models, titles, path, ncols=ncols * 2 if len(groups) > 3 else ncols,
                              suptitle="example velocity models per K-Means group")


def run_folds(params: dict[str, Any], root: Path | None = None, *, track: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Run the stage: write the fold table, K-Means, summary, counts and plots."""
    import joblib

    from speedstructure.ingest import data_config

    root = Path(root or project_root())
    cfg = folds_config(params)
    store_path = resolve_path(data_config(params)["store"], root)
    table, km, _ = make_folds(store_path, cfg, progress=progress)
    out_table = resolve_path(cfg["table"], root)
    out_table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_table, table.to_csv(index=False).encode())
    buf = io.BytesIO()
    joblib.dump(km, buf)
    km_path = resolve_path(cfg["kmeans"], root)
    km_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(km_path, buf.getvalue())
    summary = summarize(table, km)
    sum_path = resolve_path(cfg["summary"], root)
    atomic_write_bytes(sum_path, (json.dumps(summary, indent=2) + "\n").encode())
    counts_path = resolve_path(cfg["counts"], root)
    atomic_write_bytes(counts_path, group_counts(table).to_csv(index=False).encode())
    plots = resolve_path(cfg["plots_dir"], root)
    figs = [plot_group_counts(table, plots / "group_counts.png"),
            plot_group_examples(table, store_path, plots / "groups.png", int(cfg["examples_per_group"]))]
    if track:
        from speedstructure import tracking

        with tracking.start_run("folds", tags={"stage": "folds", "dvc_stage": "folds"},
                                params={"folds": cfg}, project_params=params, root=root):
            import mlflow

            tracking.log_metrics({"inertia": summary["inertia"], "n_train": summary["n_train"],
                                  "n_extended": summary["n_extended"]})
            for f in [out_table, sum_path, counts_path, *figs]:
                mlflow.log_artifact(str(f), artifact_path="folds")
    return summary


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    s = run_folds(params, track=not args.no_mlflow, progress=not args.quiet)
    print(f"folds: {s['n_train']} training samples in {s['n_folds']} stratified folds over "
          f"{s['k_groups']} K-Means groups (sizes {s['group_sizes']}); "
          f"{s['n_extended']} extended samples in every training fold")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("folds", help="K-Means groups of the velocity models and stratified folds",
                       description="Fit K-Means on the original training targets and split them into "
                                   "stratified folds (extended samples: fold -1, always trained on).")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
