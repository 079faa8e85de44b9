"""K-Means groups of velocity models and the stratified folds built on them.

As in the seed, each training target is described by the min, max, mean and standard
deviation of the velocity along each axis (4 x (300 + 1259) numbers, :func:`velocity_features`).
K-Means (``folds.k_groups`` clusters, seeded) is fitted on the original training set only;
the extended sets get the group K-Means predicts for them.
``StratifiedKFold(folds.n_folds, shuffle=True, random_state=folds.seed)`` then splits the
original training set by group.  Extended samples carry fold -1: they join every training
fold and are never validated on.  The fitted K-Means travels as plain arrays
(:class:`KMeansCentres`, an ``.npz`` read without pickle), and ``evaluate`` applies it to the
test targets.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speedstructure.config.schema import FoldsConfig
from speedstructure.data.store import INDEX_NAME, StoreSamples
from speedstructure.errors import DataError, UserError

log = logging.getLogger(__name__)


TRAIN_SPLIT = "train"


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

        from speedstructure.data.format import npy_bytes
        from speedstructure.data.samples import ZIP_EPOCH

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


def summarise(table: pd.DataFrame, km) -> dict[str, Any]:
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
