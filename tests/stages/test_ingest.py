"""The ingest stage (speedstructure.stages.ingest): real zips, a real store, tiny counts."""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from speedstructure import cli
from speedstructure.config.schema import SPLITS
from speedstructure.data.format import GATHER_NAMES, TARGET_NAME, npy_bytes
from speedstructure.data.samples import ZipSamples, ZipWriter
from speedstructure.data.store import INDEX_NAME, MANIFEST_NAME, StoreSamples, open_samples
from speedstructure.errors import DataError
from speedstructure.stages.ingest import INDEX_COLUMNS, build_store
from support import COUNTS, GSHAPE, ROOT, VSHAPE, random_gathers, random_velocity, sample_id


@pytest.fixture
def zips(tiny_zips) -> dict[str, Path]:
    return tiny_zips


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def _snapshot(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- the store


def test_store_reads_back_exactly_what_the_zips_hold(zips, tmp_path):
    out = tmp_path / "store"
    manifest = build_store(zips, out, root=tmp_path, progress=False)
    assert manifest["samples"] == sum(COUNTS.values())
    with StoreSamples(out) as store:
        assert len(store) == sum(COUNTS.values())
        for split, path in zips.items():
            with ZipSamples(path) as z:
                for sid in z.sample_ids:
                    assert sid in store and store.split_of(sid) == split
                    xz, yz = z.read(sid)
                    xs, ys = store.read(sid)
                    assert xs.dtype == np.float32 and xs.shape == GSHAPE
                    np.testing.assert_array_equal(xs, xz)
                    if split == "test":
                        assert yz is None and ys is None
                        with pytest.raises(DataError, match="has no target"):
                            store.read_target(sid)
                    else:
                        assert ys.dtype == np.float32 and ys.shape == VSHAPE
                        np.testing.assert_array_equal(ys, yz)
        # reads are owned copies: writing to one does not change the store
        sid = sample_id("train", 0)
        x = store.read_gathers(sid)
        x[:] = 7.0
        assert not (store.read_gathers(sid) == 7.0).any()
        with pytest.raises(DataError, match="no sample 'NOPE'"):
            store.read("NOPE")
    assert not (out / "test" / "targets.npy").exists()
    g = np.load(out / "train" / "gathers.npy", mmap_mode="r")
    assert g.shape == (COUNTS["train"], *GSHAPE) and g.dtype == np.float32
    assert _leftovers(tmp_path) == []


def test_index_and_manifest(zips, tmp_path):
    out = tmp_path / "store"
    build_store(zips, out, root=zips["train"].parent.parent, progress=False)
    with open(out / INDEX_NAME, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == INDEX_COLUMNS
        rows = list(reader)
    assert len(rows) == sum(COUNTS.values())
    for split in SPLITS:
        mine = [r for r in rows if r["split"] == split]
        assert sorted(r["sample_id"] for r in mine) == [
            sample_id(split, i) for i in range(COUNTS[split])
        ]
        assert sorted(int(r["row"]) for r in mine) == list(range(COUNTS[split]))
        assert {r["zip"] for r in mine} == {f"data/{split}.zip"}  # relative to the root
        assert {r["has_target"] for r in mine} == {"0" if split == "test" else "1"}
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["splits"]) == set(SPLITS)
    for split, info in manifest["splits"].items():
        assert info["md5"] == hashlib.md5(zips[split].read_bytes()).hexdigest()
        assert info["samples"] == COUNTS[split]
        assert info["has_targets"] == (split != "test")
        assert info["zip"] == f"data/{split}.zip"
    assert manifest["samples"] == sum(COUNTS.values())


def test_store_split_filter_open_samples_and_pickle(zips, tmp_path):
    out = tmp_path / "store"
    build_store(zips, out, root=tmp_path, progress=False)
    test_only = StoreSamples(out, split="test")
    assert test_only.sample_ids == [sample_id("test", i) for i in range(COUNTS["test"])]
    assert not test_only.has_targets
    train_only = StoreSamples(out, split="train")
    assert train_only.has_targets and len(train_only) == COUNTS["train"]
    assert sample_id("test", 0) not in train_only

    s = open_samples(out)
    assert isinstance(s, StoreSamples) and len(s) == sum(COUNTS.values())
    s.read_gathers(sample_id("train", 1))  # maps an array; pickling must not carry it
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(
        s2.read_gathers(sample_id("train", 1)), s.read_gathers(sample_id("train", 1))
    )
    z = open_samples(zips["train_extended_1"])
    try:
        assert isinstance(z, ZipSamples) and len(z) == COUNTS["train_extended_1"]
    finally:
        z.close()
    with pytest.raises(DataError, match="not a sample store"):
        StoreSamples(tmp_path)


# --------------------------------------------------------------------------- failures


def _nan_zip(path: Path, sid: str, bad_member: str) -> None:
    rng = np.random.default_rng(5)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for g in GATHER_NAMES:
            arr = rng.normal(0, 1e-3, GSHAPE[1:]).astype(np.float32)
            if g == bad_member:
                arr[123, 4] = np.nan
            zf.writestr(f"{sid}/{g}", npy_bytes(arr))
        zf.writestr(f"{sid}/{TARGET_NAME}", npy_bytes(random_velocity(rng)))


def test_nan_member_is_named_and_nothing_is_left_behind(zips, tmp_path):
    bad = tmp_path / "bad_extended_2.zip"
    sid = "NANNANNANNANNAN123"
    _nan_zip(bad, sid, GATHER_NAMES[2])
    broken = {**zips, "train_extended_2": bad}
    stores = tmp_path / "out"
    stores.mkdir()

    # no store yet: none is created
    out = stores / "store"
    with pytest.raises(DataError) as ei:
        build_store(broken, out, root=tmp_path, progress=False)
    msg = str(ei.value)
    assert str(bad) in msg and f"{sid}/{GATHER_NAMES[2]}" in msg and "non-finite" in msg
    assert not out.exists()
    assert list(stores.iterdir()) == []

    # an older store survives a failed rebuild untouched
    build_store(zips, out, root=tmp_path, progress=False)
    before = _snapshot(out)
    with pytest.raises(DataError, match="NANNANNANNANNAN123"):
        build_store(broken, out, root=tmp_path, progress=False)
    assert _snapshot(out) == before
    assert [p.name for p in stores.iterdir()] == ["store"]
    assert len(StoreSamples(out)) == sum(COUNTS.values())


def test_duplicate_sample_across_zips_names_both(zips, tmp_path):
    rng = np.random.default_rng(9)
    dup = tmp_path / "dup_extended_1.zip"
    with ZipWriter(dup) as zw:
        zw.add("EA0000000000000077", random_gathers(rng), random_velocity(rng))
        zw.add(
            sample_id("train", 1), random_gathers(rng), random_velocity(rng)
        )  # also in train.zip
    out = tmp_path / "store"
    with pytest.raises(DataError) as ei:
        build_store({**zips, "train_extended_1": dup}, out, root=tmp_path, progress=False)
    msg = str(ei.value)
    assert sample_id("train", 1) in msg and str(dup) in msg and str(zips["train"]) in msg
    assert not out.exists() and _leftovers(tmp_path) == []


def test_targets_must_match_the_split(zips, tmp_path):
    out = tmp_path / "store"
    # a test zip with targets
    with pytest.raises(DataError, match="test zip has vp_model.npy") as ei:
        build_store({**zips, "test": zips["train_extended_1"]}, out, root=tmp_path, progress=False)
    assert str(zips["train_extended_1"]) in str(ei.value)
    # a training zip without targets
    with pytest.raises(DataError, match="train zip lacks vp_model.npy") as ei:
        build_store({**zips, "train": zips["test"]}, out, root=tmp_path, progress=False)
    assert str(zips["test"]) in str(ei.value)
    assert not out.exists()


# --------------------------------------------------------------------------- command line


def test_cli_ingest(tmp_path, monkeypatch, capsys, write_zips):
    proj = tmp_path / "proj"
    write_zips(
        proj / "data",
        seed=3,
        counts={"train": 2, "train_extended_1": 1, "train_extended_2": 1, "test": 1},
    )
    shutil.copyfile(ROOT / "params.yaml", proj / "params.yaml")  # paths.data: data, store: store
    sub = proj / "somewhere" / "deeper"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)  # the project root is found upward from cwd
    assert cli.main(["ingest", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 samples from 4 zips" in out
    store = StoreSamples(proj / "store")
    assert len(store) == 5 and store.split_of(sample_id("test", 0)) == "test"
    with ZipSamples(proj / "data" / "train.zip") as z:
        np.testing.assert_array_equal(
            store.read_target(sample_id("train", 1)), z.read_target(sample_id("train", 1))
        )
    assert not (sub / "store").exists()

    # a missing zip: a one-line error naming it, exit code 2
    (proj / "data" / "train_extended_2.zip").unlink()
    assert cli.main(["ingest", "--quiet", "--output", "other"]) == 2
    err = capsys.readouterr().err
    assert "train_extended_2.zip" in err and "not found" in err
    assert not (proj / "other").exists()


# --------------------------------------------------------------------------- hostile values, sizes


def _zip_with(path: Path, sid: str, *, gathers=None, target=None, extra: int = 0) -> Path:
    """A one-sample zip; ``extra`` zero bytes appended (deflated) after the array of the third
    gather, whose ``.npy`` header still declares (10001, 31) float32."""
    rng = np.random.default_rng(11)
    x = random_gathers(rng) if gathers is None else gathers
    y = random_velocity(rng) if target is None else target
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i, g in enumerate(GATHER_NAMES):
            with zf.open(f"{sid}/{g}", "w", force_zip64=True) as fh:
                fh.write(npy_bytes(x[i]))
                for _ in range(extra // (1 << 24) if i == 2 else 0):
                    fh.write(bytes(1 << 24))
        zf.writestr(f"{sid}/{TARGET_NAME}", npy_bytes(y))
    return path


def test_a_model_in_m_per_s_is_refused_naming_zip_member_and_unit(zips, tmp_path):
    rng = np.random.default_rng(3)
    sid = "MPERSMPERSMPERS001"
    bad = _zip_with(tmp_path / "ms.zip", sid, target=random_velocity(rng) * 1000)
    with pytest.raises(DataError) as ei:
        build_store(
            {**zips, "train_extended_1": bad}, tmp_path / "store", root=tmp_path, progress=False
        )
    msg = str(ei.value)
    assert str(bad) in msg and f"{sid}/{TARGET_NAME}" in msg and "look like m/s" in msg
    assert "\n" not in msg and not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("low", "high", "accepted"),
    [(1.5, 4.5, True), (1.46, 4.54, True), (1.44, 4.5, False), (1.5, 4.56, False), (0.0, 3, False)],
)
def test_velocities_are_checked_against_the_challenge_range(tmp_path, low, high, accepted):
    y = np.linspace(low, high, 300 * 1259, dtype=np.float32).reshape(VSHAPE)
    path = _zip_with(tmp_path / "v.zip", "RANGERANGERANGE001", target=y)
    with ZipSamples(path) as z:
        if accepted:
            np.testing.assert_array_equal(z.read_target("RANGERANGERANGE001"), y)
        else:
            with pytest.raises(DataError, match=r"outside the challenge's \[1.5, 4.5\]"):
                z.read_target("RANGERANGERANGE001")


@pytest.mark.parametrize("extra", [1 << 24, pytest.param(2 << 30, marks=pytest.mark.slow)])
def test_a_member_longer_than_its_array_is_refused_before_it_is_inflated(zips, tmp_path, extra):
    """The issue's case: a gather whose header declares 1.24 MB followed by 2 GiB of zeros
    (2 MB deflated): the central directory's size differs from the header's, refused before
    a byte of data is inflated (the slow tier builds the 2 GiB member)."""
    sid = "LONGLONGLONGLONG01"
    bad = _zip_with(tmp_path / "long.zip", sid, extra=extra)
    with pytest.raises(DataError) as ei:
        build_store(
            {**zips, "train_extended_2": bad}, tmp_path / "store", root=tmp_path, progress=False
        )
    msg = str(ei.value)
    assert str(bad) in msg and f"{sid}/{GATHER_NAMES[2]}" in msg and "\n" not in msg
    assert f"{1240252 + extra} bytes stored" in msg and "declares (10001, 31) float32" in msg
    assert not (tmp_path / "store").exists()


def test_gathers_on_another_scale_are_a_warning_naming_the_sample(zips, tmp_path, caplog):
    rng = np.random.default_rng(4)
    sid = "SCALESCALESCALE001"
    loud = _zip_with(tmp_path / "loud.zip", sid, gathers=random_gathers(rng) * 1e5)
    with caplog.at_level("WARNING"):
        build_store(
            {**zips, "train_extended_2": loud}, tmp_path / "store", root=tmp_path, progress=False
        )
    notes = [r.getMessage() for r in caplog.records if "standard deviation" in r.getMessage()]
    assert len(notes) == 1 and sid in notes[0] and str(loud) in notes[0]
    assert len(StoreSamples(tmp_path / "store")) == sum(COUNTS.values()) - 2 + 1
