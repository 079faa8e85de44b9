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
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speedstructure.config import FoldsConfig, Params, as_plain, load_params
from speedstructure.dataio import INDEX_NAME, StoreSamples
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
COMMAND_HELP = (
    "Fit K-Means on the original training targets and split them into stratified folds "
    "(extended samples: fold -1, always trained on)."
)


def velocity_features(v: np.ndarray) -> np.ndarray:
    """min, max, mean, std of a (300, 1259) model along each axis: a 4 x (300 + 1259) vector."""
    v = np.asarray(v, dtype=np.float32)
    feats = []
    for axis in (0, 1):
        feats += [v.min(axis), v.max(axis), v.mean(axis), v.std(axis)]
    return np.concatenate(feats)


class KMeansCentres:
    """What ``predict`` of a fitted K-Means needs, stored as plain arrays.

    ``predict`` is the nearest centre in Euclidean distance, as scikit-learn's
    ``KMeans.predict``; the file is an ``.npz`` read with ``allow_pickle=False``, so a
    crafted file cannot run code (a pickled scikit-learn model would).
    """

    FORMAT = 1

    def __init__(self, centres: np.ndarray, inertia: float = float("nan")):
        self.centres = np.asarray(centres)
        self.inertia = float(inertia)

    @classmethod
    def from_sklearn(cls, km) -> KMeansCentres:
        return cls(km.cluster_centers_, km.inertia_)

    @property
    def n_clusters(self) -> int:
        return int(self.centres.shape[0])

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """The index of the nearest centre of each row of ``feats``."""
        x = np.asarray(feats, dtype=np.float64)
        c = self.centres.astype(np.float64)
        d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
        return d2.argmin(axis=1)

    def to_bytes(self) -> bytes:
        """The ``.npz`` file: the same centres give the same bytes (fixed member timestamps)."""
        import zipfile

        from speedstructure.dataio import ZIP_EPOCH, npy_bytes

        arrays = {
            "format": np.int64(self.FORMAT),
            "centres": self.centres,
            "inertia": np.float64(self.inertia),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH), npy_bytes(arr))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> KMeansCentres:
        """The centres saved by the folds stage; anything else is a one-line error."""
        path = Path(path)
        hint = "; rerun the folds stage (dvc repro folds)"
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt, centres, inertia = int(z["format"]), z["centres"], float(z["inertia"])
        except FileNotFoundError:
            raise DataError(f"{path}: K-Means file not found{hint}") from None
        except Exception as exc:  # not an npz, pickled content, missing keys, ...
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(
                f"{path}: not a K-Means file of the folds stage ({reason}){hint}"
            ) from exc
        if fmt != cls.FORMAT or centres.ndim != 2 or centres.dtype.kind != "f":
            raise DataError(f"{path}: not a K-Means file of the folds stage{hint}")
        if not np.isfinite(centres).all():
            raise DataError(f"{path}: K-Means centres are not finite{hint}")
        return cls(centres, inertia)


def assign_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified fold index (0..n_folds-1) of each sample, stratified by ``groups``."""
    from sklearn.model_selection import StratifiedKFold

    if len(groups) < n_folds:
        raise UserError(
            f"folds.n_folds = {n_folds} but the training set has only {len(groups)} samples"
        )
    fold = np.full(len(groups), -1, dtype=np.int64)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(groups)), groups)):
        fold[val_idx] = k
    return fold


def _training_index(store_path: Path) -> pd.DataFrame:
    """The store's samples with targets, sorted by split and id."""
    index = pd.read_csv(store_path / INDEX_NAME, dtype={"sample_id": str})
    index = (
        index[index["has_target"] == 1].sort_values(["split", "sample_id"]).reset_index(drop=True)
    )
    if not (index["split"] == TRAIN_SPLIT).any():
        raise UserError(f"{store_path}: no samples of the '{TRAIN_SPLIT}' split to fit K-Means on")
    return index


def _features(store_path: Path, sample_ids: pd.Series, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    store = StoreSamples(store_path)
    return np.stack(
        [
            velocity_features(store.read_target(sid))
            for sid in tqdm(sample_ids, desc="features", disable=not progress)
        ]
    )


def _fit_kmeans(feats: np.ndarray, is_train: np.ndarray, cfg: FoldsConfig):
    """K-Means fitted on the original training set; returns it and every sample's group."""
    from sklearn.cluster import KMeans

    k = int(cfg.k_groups)
    if is_train.sum() < k:
        raise UserError(
            f"folds.k_groups = {k} but the training set has only {int(is_train.sum())} samples"
        )
    km = KMeans(n_clusters=k, n_init=10, random_state=int(cfg.kmeans_seed))
    km.fit(feats[is_train])
    return KMeansCentres.from_sklearn(km), km.predict(feats)


def _folds_of(groups: np.ndarray, is_train: np.ndarray, cfg: FoldsConfig) -> np.ndarray:
    """Stratified folds of the training samples; -1 for the extended ones."""
    fold = np.full(len(groups), -1, dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fold[is_train] = assign_folds(groups[is_train], int(cfg.n_folds), int(cfg.seed))
    for w in caught:  # e.g. a group smaller than n_folds: say so, do not hide it
        log.warning("folds: warning: %s", w.message)
    return fold


def make_folds(store_path: Path, cfg: FoldsConfig, progress: bool = False):
    """The fold table (DataFrame), the fitted K-Means and the features of the training set."""
    index = _training_index(store_path)
    feats = _features(store_path, index["sample_id"], progress)
    is_train = (index["split"] == TRAIN_SPLIT).to_numpy()
    km, groups = _fit_kmeans(feats, is_train, cfg)
    table = pd.DataFrame(
        {
            "sample_id": index["sample_id"],
            "zip": index["zip"],
            "split": index["split"],
            "group": groups.astype(int),
            "fold": _folds_of(groups, is_train, cfg),
        }
    )
    return table, km, feats


def group_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Rows (fold, group, bar, count) over the validation folds (extended samples as fold
    'extended'); ``bar`` ("fold 0 / group 3") is the DVC plot's axis: one bar per pair."""
    t = table.copy()
    t["fold"] = t["fold"].map(lambda f: "extended" if f < 0 else f"fold {f}")
    counts = t.groupby(["fold", "group"]).size().rename("count").reset_index()
    counts.insert(2, "bar", counts["fold"] + " / group " + counts["group"].astype(str))
    return counts


def summarize(table: pd.DataFrame, km) -> dict[str, Any]:
    val = table[table["fold"] >= 0]
    per_fold = {
        int(f): {int(g): int(c) for g, c in d["group"].value_counts().sort_index().items()}
        for f, d in val.groupby("fold")
    }
    return {
        "n_train": int(len(val)),
        "n_extended": int((table["fold"] < 0).sum()),
        "n_folds": int(val["fold"].nunique()),
        "k_groups": int(km.n_clusters),
        "inertia": float(km.inertia),
        "group_sizes": {
            int(g): int(c) for g, c in table["group"].value_counts().sort_index().items()
        },
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
    from speedstructure.plots import plot_velocity_grid

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


def _track(summary: dict[str, Any], artifacts: list[Path]) -> None:
    """The summary figures and the outputs, into the active run."""
    import mlflow

    from speedstructure import tracking

    tracking.log_metrics({k: summary[k] for k in ("inertia", "n_train", "n_extended")})
    for f in artifacts:
        mlflow.log_artifact(str(f), artifact_path="folds")


def run_folds(params: Params, *, track: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run the stage: write the fold table, K-Means, summary, counts and plots; with
    ``track`` inside an MLflow run opened first (a failure leaves it FAILED)."""
    from speedstructure import tracking

    tags = {"stage": "folds", "dvc_stage": "folds"}
    run_params = {"folds": as_plain(params.folds)}
    with tracking.stage_run(track, "folds", params, tags=tags, params=run_params):
        table, km, _ = make_folds(params.path("store"), params.folds, progress=progress)
        summary = summarize(table, km)
        artifacts = write_outputs(params, table, km, summary)
        if track:
            _track(summary, artifacts)
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
