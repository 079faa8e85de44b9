"""Reading and writing the challenge's zip layout (speedstructure.data.samples)."""

import zipfile

import numpy as np
import pytest

from speedstructure.data.format import GATHER_NAMES, npy_bytes
from speedstructure.data.samples import ZipSamples, ZipWriter
from speedstructure.errors import DataError
from support import random_gathers, random_velocity

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


# --------------------------------------------------------------------------- hostile member paths

OTHER = "ZYXWVUTSRQPONMLKJI"


def _names_zip(path, names, symlink=None):
    """A zip whose members are ``names`` (content irrelevant: the layout is checked on
    opening); ``symlink`` is added as a symbolic-link member."""
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(n, b"x")
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK: what `zip -y` stores
            zf.writestr(info, "../../etc/passwd")
    return path


def _sample_members(prefix=""):
    return [f"{prefix}{SID}/{g}" for g in GATHER_NAMES]


@pytest.mark.parametrize(
    ("hostile", "why"),
    [
        (f"../../outside/{SID}/receiver_data_src_1.npy", "'..' part"),
        (f"{SID}/../{SID}/receiver_data_src_1.npy", "'..' part"),
        (f"/abs/{SID}/receiver_data_src_1.npy", "absolute"),
        (f"C:/abs/{SID}/receiver_data_src_1.npy", "absolute"),
        (f"top\\{SID}\\receiver_data_src_1.npy", "absolute or non-portable"),
        (f"a/b/{SID}/receiver_data_src_1.npy", "nested too deep"),
        (f"{SID}//receiver_data_src_1.npy", "empty"),
        (f"other/{OTHER}/receiver_data_src_1.npy", "more than one top folder"),
        (f"{SID}/receiver\ndata.npy", "control characters"),
    ],
)
def test_hostile_member_paths_are_refused_naming_archive_and_member(tmp_path, hostile, why):
    p = _names_zip(tmp_path / "h.zip", [*_sample_members(), hostile])
    with pytest.raises(DataError) as ei:
        ZipSamples(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: member ") and why in msg and "\n" not in msg, msg
    assert repr(hostile)[1:-1] in msg or hostile in msg, msg


def test_symlink_member_is_refused(tmp_path):
    p = _names_zip(tmp_path / "s.zip", _sample_members(), symlink=f"{SID}/vp_model.npy")
    with pytest.raises(DataError, match=rf"s.zip: member '{SID}/vp_model.npy': symbolic link"):
        ZipSamples(p)


def test_one_top_folder_and_macos_litter_are_accepted(tmp_path):
    names = [*_sample_members("train/"), f"__MACOSX/train/{SID}/._receiver_data_src_1.npy"]
    names.append("train/.DS_Store")
    with ZipSamples(_names_zip(tmp_path / "ok.zip", names)) as z:
        assert z.sample_ids == [SID] and not z.has_targets
    # without a top folder, but a second folder beside it is a second top folder
    mixed = [*_sample_members(), *[f"top/{OTHER}/{g}" for g in GATHER_NAMES]]
    with pytest.raises(DataError, match="more than one top folder"):
        ZipSamples(_names_zip(tmp_path / "mixed.zip", mixed))
