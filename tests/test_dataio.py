"""Reading and writing the challenge's zip layout (speedstructure.dataio)."""

import zipfile

import numpy as np
import pytest

from conftest import random_gathers, random_velocity
from speedstructure.dataio import GATHER_NAMES, ZipSamples, ZipWriter, npy_bytes
from speedstructure.errors import DataError

SID = "ABCDEFGHIJKLMNOPQR"


def _sample(seed=0):
    rng = np.random.default_rng(seed)
    return random_gathers(rng), random_velocity(rng)


def test_round_trip(tmp_path):
    x, y = _sample()
    with ZipWriter(tmp_path / "t.zip") as zw:
        zw.add(SID, x, y)
    with ZipSamples(tmp_path / "t.zip") as z:
        assert z.sample_ids == [SID] and z.has_targets
        x2, y2 = z.read(SID)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_deterministic_bytes(tmp_path):
    x, y = _sample()
    for name in ("a.zip", "b.zip"):
        with ZipWriter(tmp_path / name) as zw:
            zw.add(SID, x, y)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_failed_write_leaves_the_old_zip(tmp_path):
    x, y = _sample()
    path = tmp_path / "t.zip"
    with ZipWriter(path) as zw:
        zw.add(SID, x, y)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="duplicate sample id"), ZipWriter(path) as zw:
        zw.add(SID, x, None)
        zw.add(SID, x, None)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.zip"]  # no temporary left


def test_corrupt_zip(tmp_path):
    p = tmp_path / "bad.zip"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.zip.*not a valid zip"):
        ZipSamples(p)


def _zip_with(tmp_path, member, arr):
    """A one-sample zip whose ``member`` holds ``arr`` instead of a valid array."""
    x, y = _sample()
    members = dict(zip(GATHER_NAMES, x, strict=True))
    members["vp_model.npy"] = y
    members[member] = arr
    p = tmp_path / "m.zip"
    with zipfile.ZipFile(p, "w") as zf:
        for name, a in members.items():
            zf.writestr(f"{SID}/{name}", npy_bytes(a))
    return p


def test_wrong_shape_names_member(tmp_path):
    p = _zip_with(tmp_path, "receiver_data_src_75.npy", np.zeros((10000, 31), np.float32))
    with (
        ZipSamples(p) as z,
        pytest.raises(DataError, match=r"m.zip.*receiver_data_src_75.npy.*shape"),
    ):
        z.read(SID)


def test_nan_names_member(tmp_path):
    y = np.full((300, 1259), 2.0, np.float32)
    y[3, 4] = np.nan
    p = _zip_with(tmp_path, "vp_model.npy", y)
    with ZipSamples(p) as z, pytest.raises(DataError, match=r"vp_model.npy.*non-finite"):
        z.read(SID)


def test_missing_gather(tmp_path):
    p = tmp_path / "g.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(f"{SID}/receiver_data_src_1.npy", npy_bytes(np.zeros((10001, 31), np.float32)))
    with pytest.raises(DataError, match="lacks receiver_data_src_75.npy"):
        ZipSamples(p)
