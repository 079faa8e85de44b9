"""The folds stage (speedstructure.stages.folds): features, stratified folds, K-Means on a store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from speedstructure.config.load import parse_params
from speedstructure.config.schema import FoldsConfig, Params
from speedstructure.data.groups import KMeansCentres, _folds_of, assign_folds, velocity_features
from speedstructure.data.samples import ZipWriter
from speedstructure.data.store import StoreSamples
from speedstructure.errors import DataError, UserError
from speedstructure.stages.folds import run_folds
from speedstructure.stages.ingest import build_store
from support import ROOT, VSHAPE

SHIPPED = ROOT / "params.yaml"
FAMILIES = (2.0, 3.0, 4.0)  # km/s: three clearly different constant-velocity families
N_PER_FAMILY = 10
N_FOLDS = 3


# --------------------------------------------------------------------------- features


def test_velocity_features_shape_and_values():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 1.0, VSHAPE[0])  # varies along x (axis 0)
    b = rng.uniform(1.5, 3.0, VSHAPE[1])  # varies along depth (axis 1)
    v = (a[:, None] + b[None, :]).astype(np.float32)
    f = velocity_features(v)
    assert f.shape == (4 * (300 + 1259),)
    nz, nx = VSHAPE[1], VSHAPE[0]
    # along axis 0 (over x): one value per depth cell
    mn0, mx0, me0, sd0 = (f[i * nz : (i + 1) * nz] for i in range(4))
    np.testing.assert_allclose(mn0, a.min() + b, atol=1e-5)
    np.testing.assert_allclose(mx0, a.max() + b, atol=1e-5)
    np.testing.assert_allclose(me0, a.mean() + b, atol=1e-5)
    np.testing.assert_allclose(sd0, np.full(nz, a.std()), atol=1e-4)
    # along axis 1 (over depth): one value per x position
    rest = f[4 * nz :]
    mn1, mx1, me1, sd1 = (rest[i * nx : (i + 1) * nx] for i in range(4))
    np.testing.assert_allclose(mn1, a + b.min(), atol=1e-5)
    np.testing.assert_allclose(mx1, a + b.max(), atol=1e-5)
    np.testing.assert_allclose(me1, a + b.mean(), atol=1e-5)
    np.testing.assert_allclose(sd1, np.full(nx, b.std()), atol=1e-4)
    # float64 input gives the same features
    np.testing.assert_allclose(velocity_features(v.astype(np.float64)), f, rtol=1e-6)


# --------------------------------------------------------------------------- folds


def _check_stratified(groups: np.ndarray, fold: np.ndarray, n_folds: int) -> None:
    for g in np.unique(groups):
        n_g = (groups == g).sum()
        for k in range(n_folds):
            assert abs(((groups == g) & (fold == k)).sum() - n_g / n_folds) <= 1, (g, k)


def test_assign_folds_invariants():
    groups = np.repeat([0, 1, 2, 3], [13, 7, 21, 9])
    groups = np.random.default_rng(1).permutation(groups)
    fold = assign_folds(groups, 5, seed=7)
    assert fold.shape == groups.shape
    assert set(fold.tolist()) == set(range(5))  # every sample in exactly one fold in 0..4
    _check_stratified(groups, fold, 5)
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1 + len(np.unique(groups))  # balanced sizes
    np.testing.assert_array_equal(assign_folds(groups, 5, seed=7), fold)  # same seed, same folds
    assert not np.array_equal(assign_folds(groups, 5, seed=8), fold)  # the seed is used
    with pytest.raises(UserError, match="n_folds = 5"):
        assign_folds(np.zeros(4, int), 5, seed=0)


def test_small_groups_are_logged_not_hidden(caplog):
    groups = np.array([0] * 9 + [1])  # group 1 is smaller than n_folds
    is_train = np.array([True] * 10 + [False] * 2)
    with caplog.at_level("WARNING", logger="speedstructure.stages.folds"):
        fold = _folds_of(np.concatenate([groups, [0, 1]]), is_train, FoldsConfig(n_folds=3))
    assert (fold[-2:] == -1).all() and set(fold[:10].tolist()) == {0, 1, 2}
    assert any("least populated class" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- the stage


def _sid(prefix: str, i: int) -> str:
    return f"{prefix}{i:016d}"


def _model(rng, v: float) -> np.ndarray:
    return np.clip(v + rng.normal(0.0, 0.05, VSHAPE), 1.5, 4.5).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store: 30 train samples (10 per family), 3 + 3 extended (one per family each), 2 test.

    Returns (store path, family of each sample id with a target)."""
    base = tmp_path_factory.mktemp("folds_data")
    rng = np.random.default_rng(42)
    zeros = np.zeros((5, 10001, 31), np.float32)
    family: dict[str, float] = {}
    zips = {}
    order = rng.permutation(np.repeat(FAMILIES, N_PER_FAMILY))  # families interleaved
    with ZipWriter(base / "train.zip") as zw:
        for i, v in enumerate(order):
            family[_sid("TR", i)] = float(v)
            zw.add(_sid("TR", i), zeros, _model(rng, v))
    zips["train"] = base / "train.zip"
    for split, prefix in (("train_extended_1", "EA"), ("train_extended_2", "EB")):
        with ZipWriter(base / f"{split}.zip") as zw:
            for i, v in enumerate(FAMILIES):
                family[_sid(prefix, i)] = v
                zw.add(_sid(prefix, i), zeros, _model(rng, v))
        zips[split] = base / f"{split}.zip"
    with ZipWriter(base / "test.zip") as zw:
        for i in range(2):
            zw.add(_sid("TE", i), zeros, None)
    zips["test"] = base / "test.zip"
    out = base / "store"
    build_store(zips, out, root=base, progress=False)
    return out, family


def _params(root: Path, store_path: Path, **folds) -> Params:
    """The shipped params rooted at ``root``, reading ``store_path``, with small folds."""
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["paths"] = {"store": str(store_path)}
    raw["folds"] = {"k_groups": 3, "n_folds": N_FOLDS, "seed": 42, "examples_per_group": 2, **folds}
    return parse_params(raw, root=root)


@pytest.fixture(scope="module")
def stage(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("folds_proj")
    summary = run_folds(_params(root, store[0]), track=False, progress=False)
    return root, summary


def test_folds_cover_the_training_set_and_extended_is_never_validated(store, stage):
    _, family = store
    root, summary = stage
    table = pd.read_csv(root / "folds" / "folds.csv", dtype={"sample_id": str})
    assert list(table.columns) == ["sample_id", "zip", "split", "group", "fold"]
    assert table["sample_id"].is_unique
    assert set(table["sample_id"]) == set(family)  # test samples (no targets) are not in it
    train = table[table["split"] == "train"]
    ext = table[table["split"] != "train"]
    assert len(train) == 3 * N_PER_FAMILY and len(ext) == 6
    assert set(ext["split"]) == {"train_extended_1", "train_extended_2"}
    assert (ext["fold"] == -1).all()
    assert set(train["fold"]) == set(range(N_FOLDS))
    # the validation folds are disjoint and together exactly the original training set
    val_sets = [set(train.loc[train["fold"] == k, "sample_id"]) for k in range(N_FOLDS)]
    assert sum(len(s) for s in val_sets) == len(train)
    assert set().union(*val_sets) == {s for s in family if s.startswith("TR")}
    for i in range(N_FOLDS):
        for j in range(i + 1, N_FOLDS):
            assert not val_sets[i] & val_sets[j]
    assert set(table.loc[table["fold"] >= 0, "split"]) == {"train"}
    _check_stratified(train["group"].to_numpy(), train["fold"].to_numpy(), N_FOLDS)
    assert summary["n_train"] == 30 and summary["n_extended"] == 6
    assert summary["n_folds"] == N_FOLDS and summary["k_groups"] == 3


def test_kmeans_groups_recover_the_families(store, stage):
    _, family = store
    root, _ = stage
    table = pd.read_csv(root / "folds" / "folds.csv", dtype={"sample_id": str})
    fam = table["sample_id"].map(family)
    # each family is exactly one group and each group exactly one family (extended included)
    pairs = set(zip(fam, table["group"], strict=True))
    assert len(pairs) == 3
    assert len({f for f, _ in pairs}) == 3 and len({g for _, g in pairs}) == 3
    assert sorted(table["group"].value_counts().tolist()) == [12, 12, 12]

    km = KMeansCentres.load(root / "folds" / "kmeans.npz")
    assert km.n_clusters == 3
    # fitted on the original training set only: each centre is the mean of its training members
    st = StoreSamples(store[0])
    train = table[table["split"] == "train"]
    for g, d in train.groupby("group"):
        centre = np.mean([velocity_features(st.read_target(s)) for s in d["sample_id"]], axis=0)
        np.testing.assert_allclose(km.centres[g], centre, rtol=1e-4, atol=1e-4)
    group_of = dict(pairs)
    rng = np.random.default_rng(99)
    fresh = np.stack([velocity_features(_model(rng, v)) for v in FAMILIES])
    assert km.predict(fresh).tolist() == [group_of[v] for v in FAMILIES]


def test_stage_outputs(stage):
    root, summary = stage
    on_disk = json.loads((root / "folds" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["group_sizes"] == {str(g): 12 for g in range(3)}
    assert on_disk["inertia"] > 0
    val_counts = on_disk["val_group_counts"]
    assert set(val_counts) == {str(k) for k in range(N_FOLDS)}
    assert sum(sum(d.values()) for d in val_counts.values()) == 30
    counts = pd.read_csv(root / "folds" / "group_counts.csv")
    assert list(counts.columns) == ["fold", "group", "bar", "count"]
    assert counts["bar"].is_unique and "fold 0 / group 1" in set(counts["bar"])  # none merge
    assert counts["count"].sum() == 36
    assert counts.loc[counts["fold"] == "extended", "count"].sum() == 6
    assert set(counts["fold"]) == {"extended", *(f"fold {k}" for k in range(N_FOLDS))}
    for name in ("group_counts.png", "groups.png"):
        png = root / "plots" / "folds" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in root.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_same_seed_gives_identical_folds(store, stage, tmp_path):
    root, _ = stage
    run_folds(_params(tmp_path, store[0]), track=False, progress=False)
    assert (tmp_path / "folds" / "folds.csv").read_bytes() == (
        root / "folds" / "folds.csv"
    ).read_bytes()


def test_too_many_groups_is_an_error(store, tmp_path):
    params = _params(tmp_path, store[0], k_groups=31)
    with pytest.raises(UserError, match="k_groups = 31"):
        run_folds(params, track=False, progress=False)
    assert not (tmp_path / "folds" / "folds.csv").exists()


# --------------------------------------------------------------------------- the K-Means file


def test_kmeans_file_predicts_as_sklearn_and_is_byte_stable(store, stage, tmp_path):
    from sklearn.cluster import KMeans

    root, _ = stage
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(c, 1.0, (40, 16)) for c in (-4.0, 0.0, 5.0, 9.0)])
    km = KMeans(n_clusters=4, n_init=3, random_state=0).fit(x.astype(np.float32))
    mine = KMeansCentres.from_sklearn(km)
    probe = rng.normal(2.0, 6.0, (500, 16)).astype(np.float32)  # many near-boundary points
    assert (mine.predict(probe) == km.predict(probe)).all()
    path = tmp_path / "k.npz"
    path.write_bytes(mine.to_bytes())
    back = KMeansCentres.load(path)
    assert (back.predict(probe) == km.predict(probe)).all() and back.inertia == km.inertia_
    assert mine.to_bytes() == KMeansCentres.from_sklearn(km).to_bytes()  # no timestamps
    # the folds stage's own file: its groups are what scikit-learn predicted
    table = pd.read_csv(root / "folds" / "folds.csv", dtype={"sample_id": str})
    st = StoreSamples(store[0])
    feats = np.stack([velocity_features(st.read_target(s)) for s in table["sample_id"]])
    stage_km = KMeansCentres.load(root / "folds" / "kmeans.npz")
    assert stage_km.predict(feats).tolist() == table["group"].tolist()


def test_kmeans_file_is_never_unpickled(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    cases = {
        "pickle.npz": lambda p: np.savez(p, format=np.int64(1), centres=np.array([Boom()])),
        "plain_pickle.npz": lambda p: p.write_bytes(pickle.dumps(Boom())),
        "wrong.npz": lambda p: np.savez(p, something=np.zeros(3)),
        "text.npz": lambda p: p.write_text("centres"),
    }
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(DataError) as ei:
            KMeansCentres.load(path)
        msg = str(ei.value)
        assert msg.startswith(f"{path}: not a K-Means file") and "\n" not in msg, msg
        assert "dvc repro folds" in msg
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(DataError, match="K-Means file not found"):
        KMeansCentres.load(tmp_path / "missing.npz")
