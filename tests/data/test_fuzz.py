"""A property-based fuzzer of every reader the commands use: challenge zips, sample folders,
the sample store, submissions (and test targets) and ``ensemble.json``.

Each example mutates a valid input (byte flips, truncations, ``.npy`` header edits, size
lies in the zip's central directory, members far longer than their arrays, duplicated and
renamed members, wrong dtypes and shapes) and reads it as the commands do.  The property:
the reader either refuses it with one :class:`~speedstructure.errors.UserError` line that
names the file, or reads back arrays identical to the original's; never another exception
(a traceback), never more than 10 s (hypothesis' deadline) or 2 GB of memory.

Zips and submissions carry a CRC per member, so every byte of them is fuzzed.  A bare
``.npy`` file (a sample folder, the store's arrays) has no checksum: a flipped bit in its
data is another valid float that no reader can tell from the original, so there the flips
stay in the header; the store's arrays are checked by DVC's hash of the store instead.
``ensemble.json`` is text a user may edit: an edit that keeps it well-formed (another weight
pair on the simplex) is a valid file, so its property is "refused in one line, or accepted
with every check passing".

The fast tier runs a few hundred examples in all; the slow tier (``-m slow``) thousands.
"""

from __future__ import annotations

import ast
import io
import json
import re
import resource
import shutil
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedstructure.data.format import GATHER_NAMES, TARGET_NAME, npy_bytes
from speedstructure.data.samples import ZipSamples, ZipWriter
from speedstructure.data.store import FolderSamples, StoreSamples
from speedstructure.data.submission import SubmissionWriter
from speedstructure.data.submission_check import VelocityArchive
from speedstructure.ensemble.members import read_spec
from speedstructure.errors import UserError
from support import random_velocity

SID = "FZ0000000000000001"
SID2 = "FZ0000000000000002"
FAST, SLOW = 60, 600  # examples per reader (six readers: 360 in the fast tier, 3,600 slow)
MAX_RSS_GB = 2.0


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=10_000,  # ms: no example may take more than 10 s
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=True,  # the same examples on every run (CI)
        database=None,
    )


# --------------------------------------------------------------------------- originals


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One valid input of each kind, with the arrays it holds."""
    from speedstructure.stages.ingest import build_store

    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.0155, (5, 10001, 31)).astype(np.float32)
    y = random_velocity(rng)
    zips = {}
    for split, with_target in (("train", True), ("test", False)):
        zips[split] = d / f"{split}.zip"
        with ZipWriter(zips[split]) as zw:
            zw.add(SID if split == "train" else SID2, x, y if with_target else None)
    store = d / "store"
    build_store({s: zips[s] for s in ("train", "test")}, store, root=d, progress=False)
    folder = d / "folder" / SID
    folder.mkdir(parents=True)
    for g, arr in zip(GATHER_NAMES, x, strict=True):
        (folder / g).write_bytes(npy_bytes(arr))
    sub = d / "submission.npz"
    preds = {SID: y.astype(np.float64), SID2: np.flip(y, 0).astype(np.float64)}
    with SubmissionWriter(sub) as sw:
        for sid, arr in preds.items():
            sw.add(sid, arr)
    spec = {
        "folds": [
            {
                "fold": 0,
                "members": [
                    {"variant": "a", "checkpoint": "models/a/fold_0/best.pt", "weight": 0.25},
                    {"variant": "b", "checkpoint": "models/b/fold_0/best.pt", "weight": 0.75},
                ],
            }
        ],
        "calibration": {
            "scale": "relative",
            "bands_below_floor_m": [0, 50, 150],
            "quantiles": [0.01, 0.05, 0.08],
        },
    }
    ens = d / "ensemble.json"
    ens.write_text(json.dumps(spec, indent=2))
    return Originals(
        {
            "zip": zips["train"].read_bytes(),
            "x": x,
            "y": y,
            "store": store,
            "folder": folder.parent,
            "submission": sub.read_bytes(),
            "preds": preds,
            "ensemble": ens.read_text(),
        }
    )


class Originals(dict):
    """The valid inputs (a short repr: hypothesis prints its arguments on a failure)."""

    def __repr__(self) -> str:
        return "originals"


# --------------------------------------------------------------------------- the property


def _refused_or_identical(path: Path, read, expected) -> None:
    """``read()`` refuses ``path`` in one line naming it, or returns ``expected`` exactly."""
    try:
        got = read()
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        assert str(path) in msg, msg
        return
    finally:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        assert peak_gb < MAX_RSS_GB, f"{peak_gb:.2f} GB resident"
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key, arrays in expected.items():
        for a, b in zip(got[key], arrays, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), key


def _read_zip(path: Path) -> dict:
    with ZipSamples(path) as z:
        return {sid: z.read(sid) for sid in z.sample_ids}


def _read_folder(path: Path) -> dict:
    f = FolderSamples(path)
    return {sid: (f.read_gathers(sid),) for sid in f.sample_ids}


def _read_store(path: Path) -> dict:
    with StoreSamples(path) as s:
        return _drop_none({sid: s.read(sid) for sid in s.sample_ids})


def _read_submission(path: Path) -> dict:
    with VelocityArchive(path) as sub:
        return {sid: (sub[sid],) for sid in sub.files}


# --------------------------------------------------------------------------- mutations


NPY_HEADER = re.compile(rb"\{.*?\}", re.S)
DTYPES = ["<f8", "<f2", "<i4", "|u1", ">f4", "|O", "<c8", "|V4", "<U3"]
SHAPES = [(), (0,), (10001,), (31, 10001), (10001, 30), (10001, 31, 1), (300, 1259), (1259, 300)]


def edit_header(raw: bytes, data: st.DataObject) -> bytes:
    """``raw`` (an ``.npy``) with its header's shape, dtype or order replaced, or its header
    text damaged; the data bytes kept."""
    m = NPY_HEADER.search(raw)
    if m is None:
        return raw
    header = ast.literal_eval(m.group(0).decode("latin1"))
    # (a flipped fortran_order is not a damaged file but another valid array: the same
    # values in the other layout, as np.save writes a transposed array; not mutated here)
    kind = data.draw(st.sampled_from(["shape", "dtype", "text"]))
    if kind == "shape":
        header["shape"] = data.draw(st.sampled_from(SHAPES))
    elif kind == "dtype":
        header["descr"] = data.draw(st.sampled_from(DTYPES))
    else:
        text = bytearray(m.group(0))
        i = data.draw(st.integers(0, len(text) - 1))
        text[i] = data.draw(st.integers(0, 255))
        return raw[: m.start()] + bytes(text) + raw[m.end() :]
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    start = raw.index(b"\n", m.end()) + 1  # the data begin after the padded header
    return out.getvalue() + raw[start:]


def mutate_member(raw: bytes, data: st.DataObject) -> bytes:
    """One member's (or file's) bytes, mutated: appended bytes (far longer than its array),
    a truncation, a header edit, or another array of a wrong dtype or shape."""
    kind = data.draw(st.sampled_from(["append", "truncate", "header", "replace"]))
    if kind == "append":
        n = data.draw(st.sampled_from([1, 4, 4096, 1 << 20, 64 << 20]))
        return raw + bytes(n)
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind == "header":
        return edit_header(raw, data)
    dtype = data.draw(st.sampled_from(["<f8", "<i4", ">f4", "<f2"]))
    shape = data.draw(st.sampled_from([s for s in SHAPES if s]))
    return npy_bytes(np.zeros(shape, dtype=np.dtype(dtype)))


def _members(archive: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _archive(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": the duplicated member is the point
        for name, raw in members:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0)), raw)
    return buf.getvalue()


def rename(name: str, data: st.DataObject) -> str:
    folder, _, fname = name.rpartition("/")
    return data.draw(
        st.sampled_from(
            [
                f"{folder}/receiver_data_src_2.npy",
                f"{folder}/{fname.upper()}",
                f"{folder[:-1]}/{fname}",
                f"{folder}!/{fname}",
                f"../{name}",
                f"/{name}",
                f"top/{name}",
                f"a/b/{name}",
                f"{folder}/x/{fname}",
                name.replace("/", "\\"),
                f"{name}/",
            ]
        )
    )


def mutate_archive(archive: bytes, data: st.DataObject) -> bytes:
    """A zip (a challenge zip or a submission) mutated in one of the ways the module names."""
    kind = data.draw(
        st.sampled_from(["flip", "truncate", "member", "size_lie", "duplicate", "rename"])
    )
    if kind == "flip":
        b = bytearray(archive)
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
        return bytes(b)
    if kind == "truncate":
        return archive[: data.draw(st.integers(0, len(archive) - 1))]
    members = _members(archive)
    k = data.draw(st.integers(0, len(members) - 1))
    name, raw = members[k]
    if kind == "member":
        members[k] = (name, mutate_member(raw, data))
        return _archive(members)
    if kind == "duplicate":
        return _archive([*members, (name, raw)])
    if kind == "rename":
        members[k] = (rename(name, data), raw)
        return _archive(members)
    return lie_about_size(archive, k, data)


def lie_about_size(archive: bytes, k: int, data: st.DataObject) -> bytes:
    """Member ``k``'s uncompressed (or compressed) size in the central directory replaced."""
    b = bytearray(archive)
    starts = [m.start() for m in re.finditer(rb"PK\x01\x02", archive)]
    pos = starts[min(k, len(starts) - 1)]
    field = data.draw(st.sampled_from([20, 24]))  # compressed, uncompressed size
    value = data.draw(st.sampled_from([0, 1, 128, 1240252, 1 << 31, 0xFFFFFFFE]))
    b[pos + field : pos + field + 4] = struct.pack("<I", value)
    return bytes(b)


# --------------------------------------------------------------------------- the readers


def _zip_case(originals, tmp_path, data) -> None:
    path = tmp_path / "train.zip"
    path.write_bytes(mutate_archive(originals["zip"], data))
    expected = {SID: (originals["x"], originals["y"])}
    _refused_or_identical(path, lambda: _read_zip(path), expected)


def _submission_case(originals, tmp_path, data) -> None:
    path = tmp_path / "submission.npz"
    path.write_bytes(mutate_archive(originals["submission"], data))
    expected = {sid: (arr,) for sid, arr in originals["preds"].items()}
    _refused_or_identical(path, lambda: _read_submission(path), expected)


def _validate_case(originals, tmp_path, data) -> None:
    """``validate-submission`` lists problems instead of raising: each on one line naming
    the file; a file it finds no problem in reads back identical."""
    from speedstructure.data.submission_check import validate_submission

    path = tmp_path / "submission.npz"
    path.write_bytes(mutate_archive(originals["submission"], data))
    report = validate_submission(path, sorted(originals["preds"]))
    for msg in report.messages():
        assert "\n" not in msg and str(path) in msg, msg
    if report.ok:  # then the checked reader agrees, and reads back the original
        got = _read_submission(path)
        assert set(got) == set(originals["preds"])
        assert all(np.array_equal(got[k][0], v) for k, v in originals["preds"].items())


def _folder_case(originals, tmp_path, data) -> None:
    root = tmp_path / "folder"
    shutil.copytree(originals["folder"], root)
    files = sorted((root / SID).iterdir())
    f = files[data.draw(st.integers(0, len(files) - 1))]
    kind = data.draw(st.sampled_from(["member", "header_flip", "rename", "extra"]))
    if kind == "member":
        f.write_bytes(mutate_member(f.read_bytes(), data))
    elif kind == "header_flip":
        b = bytearray(f.read_bytes())
        b[data.draw(st.integers(0, 127))] ^= data.draw(st.integers(1, 255))
        f.write_bytes(bytes(b))
    elif kind == "rename":
        f.rename(f.with_name(data.draw(st.sampled_from(["x.npy", "receiver_data_src_2.npy"]))))
    else:
        (root / SID / data.draw(st.sampled_from(["notes.txt", TARGET_NAME]))).write_bytes(b"x")
    expected = {SID: (originals["x"],)}
    _refused_or_identical(root, lambda: _read_folder(root), expected)


def _store_case(originals, tmp_path, data) -> None:
    root = tmp_path / "store"
    shutil.copytree(originals["store"], root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    f = files[data.draw(st.integers(0, len(files) - 1))]
    if f.suffix in (".csv", ".json"):
        text = bytearray(f.read_bytes())
        kind = data.draw(st.sampled_from(["flip", "truncate"]))
        i = data.draw(st.integers(0, len(text) - 1))
        if kind == "flip":
            text[i] ^= data.draw(st.integers(1, 255))
        else:
            del text[i:]
        f.write_bytes(bytes(text))
    else:
        f.write_bytes(mutate_member(f.read_bytes(), data))
    with StoreSamples(originals["store"]) as s:
        expected = {sid: s.read(sid) for sid in s.sample_ids}
    _refused_or_identical(root, lambda: _read_store(root), _drop_none(expected))


def _drop_none(expected: dict) -> dict:
    return {k: tuple(a for a in v if a is not None) for k, v in expected.items()}


def _ensemble_case(originals, tmp_path, data) -> None:
    from speedstructure.ensemble.members import spec_problem

    path = tmp_path / "ensemble.json"
    text = originals["ensemble"]
    kind = data.draw(st.sampled_from(["flip", "truncate", "value"]))
    if kind == "flip":
        b = bytearray(text.encode())
        b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(b))
    elif kind == "truncate":
        path.write_text(text[: data.draw(st.integers(0, len(text) - 1))])
    else:
        path.write_text(json.dumps(replace_value(json.loads(text), data)))
    try:
        spec = read_spec(path)
    except UserError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        return
    assert spec_problem(spec) is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


def replace_value(doc, data: st.DataObject):
    """``doc`` with one value (at any depth) replaced by random JSON, or one key dropped."""
    if not isinstance(doc, (dict, list)) or not doc or data.draw(st.integers(0, 3)) == 0:
        return data.draw(JSON_VALUES)
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = data.draw(st.sampled_from(keys))
    if isinstance(doc, dict) and data.draw(st.booleans()):
        return {k: v for k, v in doc.items() if k != key}
    doc[key] = replace_value(doc[key], data)
    return doc


CASES = {
    "zip": _zip_case,
    "submission": _submission_case,
    "validate-submission": _validate_case,
    "folder": _folder_case,
    "store": _store_case,
    "ensemble": _ensemble_case,
}


@pytest.mark.parametrize("reader", sorted(CASES))
@_settings(FAST)
@given(data=st.data())
def test_every_reader_refuses_in_one_line_or_reads_back_the_original(reader, originals, data):
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{reader}-") as tmp:
        CASES[reader](originals, Path(tmp), data)


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(CASES))
@_settings(SLOW)
@given(data=st.data())
def test_every_reader_fuzzed_at_length(reader, originals, data):
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{reader}-") as tmp:
        CASES[reader](originals, Path(tmp), data)


# --------------------------------------------------------------------------- found by the fuzzer
# Each failure the fuzzer found, as a fixed example (fixed since; see the closing note of
# issue 22).  The derandomised search replays them too, but these name what went wrong.


def _store_copy(originals, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(originals["store"], root)
    return root


def _one_line_naming(exc_info, path: Path) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_found_an_empty_store_array_was_a_traceback(originals, tmp_path):
    root = _store_copy(originals, tmp_path)
    (root / "test" / "gathers.npy").write_bytes(b"")  # np.load: EOFError
    with pytest.raises(UserError) as ei:
        _read_store(root)
    _one_line_naming(ei, root)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"FZ0000000000000001", b"GZ0000000000000001"), (b",1\n", b",0\n")],
    ids=["another-valid-id", "has_target-flipped"],
)
def test_found_an_edited_store_index_was_read_as_another_store(originals, tmp_path, old, new):
    root = _store_copy(originals, tmp_path)
    index = root / "index.csv"
    index.write_bytes(index.read_bytes().replace(old, new, 1))
    with pytest.raises(UserError, match="SHA-256") as ei:
        _read_store(root)
    _one_line_naming(ei, root)


def test_found_a_store_index_cut_at_a_line_end_lost_samples(originals, tmp_path):
    root = _store_copy(originals, tmp_path)
    index = root / "index.csv"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]))
    manifest = json.loads((root / "manifest.json").read_text())
    import hashlib

    manifest["index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()  # even so
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="rows do not cover") as ei:
        _read_store(root)
    _one_line_naming(ei, root)


def test_found_a_fortran_order_store_array_was_read_transposed(originals, tmp_path):
    root = _store_copy(originals, tmp_path)
    f = root / "test" / "gathers.npy"
    f.write_bytes(f.read_bytes().replace(b"'fortran_order': False", b"'fortran_order': True ", 1))
    with pytest.raises(UserError, match="in C order") as ei:
        _read_store(root)
    _one_line_naming(ei, root)


def test_found_numpys_header_advice_made_a_two_line_error(originals, tmp_path):
    root = tmp_path / "folder"
    shutil.copytree(originals["folder"], root)
    f = root / SID / GATHER_NAMES[0]
    b = bytearray(f.read_bytes())
    b[9] ^= 39  # the header length's high byte: 10,102 bytes, over numpy's safe limit
    f.write_bytes(bytes(b))
    with pytest.raises(UserError) as ei:
        _read_folder(root)
    _one_line_naming(ei, root)


def test_found_a_member_renamed_into_a_folder_dropped_the_targets(originals, tmp_path):
    members = [
        (f"{name}/" if name.endswith(TARGET_NAME) else name, raw)
        for name, raw in _members(originals["zip"])
    ]
    path = tmp_path / "train.zip"
    path.write_bytes(_archive(members))
    with pytest.raises(UserError, match="a folder inside a sample folder") as ei:
        _read_zip(path)
    _one_line_naming(ei, path)


def test_validate_submission_flags_a_member_longer_than_its_array(originals, tmp_path):
    """Found by review, not by the fuzzer (its oracle for ``validate-submission`` accepted a
    refusal by the reader after a clean report; it now requires the reader to agree)."""
    from speedstructure.data.submission_check import validate_submission

    members = _members(originals["submission"])
    members[0] = (members[0][0], members[0][1] + bytes(4096))
    path = tmp_path / "submission.npz"
    path.write_bytes(_archive(members))
    report = validate_submission(path, sorted(originals["preds"]))
    assert not report.ok and "size" in report.kinds
    assert any("bytes stored, its .npy header declares" in m for m in report.messages())
