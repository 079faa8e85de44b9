"""The submission writer and ``validate-submission`` (speedstructure.data.submission and
.submission_check)."""

import os
import zipfile

import numpy as np
import pytest

from speedstructure import cli
from speedstructure.config.schema import V_MAX, V_MIN
from speedstructure.data import submission
from speedstructure.data.samples import ZipWriter
from speedstructure.data.submission import SubmissionWriter, write_submission
from speedstructure.data.submission_check import validate_submission
from speedstructure.errors import DataError
from support import random_velocity

IDS = ["AAAAAAAAAAAAAAAAA1", "BBBBBBBBBBBBBBBBB2", "CCCCCCCCCCCCCCCCC3"]
SHAPE = (300, 1259)


def _vp(seed, dtype=np.float64):
    return random_velocity(np.random.default_rng(seed)).astype(dtype)


def _ids(n):
    return [f"S{i:017d}" for i in range(n)]


@pytest.fixture(scope="module")
def test_zip(tmp_path_factory):
    """A tiny test zip (gathers only, no targets) holding the samples IDS."""
    p = tmp_path_factory.mktemp("data") / "test.zip"
    zeros = np.zeros((5, 10001, 31), np.float32)
    with ZipWriter(p) as zw:
        for sid in IDS:
            zw.add(sid, zeros, None)
    return p


def _valid_arrays():
    return {sid: _vp(i) for i, sid in enumerate(IDS)}


# ----------------------------------------------------------------------------- writer


def test_round_trip_and_valid(tmp_path, test_zip):
    arrays = _valid_arrays()
    arrays[IDS[1]] = arrays[IDS[1]].astype(np.float32)  # converted to float64 on the way in
    arrays[IDS[2]] = np.asfortranarray(arrays[IDS[2]])
    out = write_submission(tmp_path / "sub.npz", arrays.items())
    assert out == tmp_path / "sub.npz"
    with np.load(out) as z:
        assert sorted(z.files) == sorted(IDS)
        for sid in IDS:
            assert z[sid].dtype == np.float64 and z[sid].shape == SHAPE
            np.testing.assert_array_equal(z[sid], np.asarray(arrays[sid], np.float64))
    report = validate_submission(out, test_zip)
    assert report.ok, report.messages()
    assert report.n_arrays == 3 and report.n_expected == 3
    assert report.summary() == "OK: 3 arrays, float64 (300, 1259), within [1.5, 4.5]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.npz"]  # no temp file left


def test_deflated_round_trip_and_deterministic(tmp_path):
    arrays = {sid: np.full(SHAPE, 2.0 + i) for i, sid in enumerate(IDS)}
    a = write_submission(tmp_path / "a.npz", arrays.items(), compression="deflated")
    b = write_submission(tmp_path / "b.npz", arrays.items(), compression="deflated")
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size < 100_000  # constant arrays compress well
    with zipfile.ZipFile(a) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(a) as z:
        assert all(np.array_equal(z[sid], arrays[sid]) for sid in IDS)
    assert validate_submission(a, IDS).ok


class _CountingFile:
    """Wraps the writer's temp file and records every write (offset, size)."""

    def __init__(self, fh):
        self._fh = fh
        self.writes = []

    def write(self, data):
        self.writes.append((self._fh.tell(), len(data)))
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _write_counted(tmp_path, monkeypatch, n):
    files, temps = [], []
    real_open_temp = submission._open_temp

    def counting_open_temp(path):
        temps.append(path)
        files.append(_CountingFile(real_open_temp(path)))
        return files[-1]

    opened = []
    real_zip_open = zipfile.ZipFile.open

    def counting_zip_open(self, name, mode="r", *args, **kwargs):
        if mode == "w":
            opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real_zip_open(self, name, mode, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("whole-member writes are not used")

    monkeypatch.setattr(submission, "_open_temp", counting_open_temp)
    monkeypatch.setattr(zipfile.ZipFile, "open", counting_zip_open)
    monkeypatch.setattr(zipfile.ZipFile, "writestr", forbidden)
    ids = _ids(n)
    out = write_submission(tmp_path / f"sub{n}.npz", ((sid, np.full(SHAPE, 3.0)) for sid in ids))
    monkeypatch.undo()
    assert len(files) == 1
    # the temporary of fsutil.atomic_output, beside the target
    assert temps == [out.with_name(f".{out.name}.tmp{os.getpid()}")]
    written = sum(size for _, size in files[0].writes)
    return out, ids, written, opened


def test_writer_io_is_linear_and_writes_each_member_once(tmp_path, monkeypatch):
    array_bytes = SHAPE[0] * SHAPE[1] * 8
    sizes = {}
    for n in (4, 8):
        out, ids, written, opened = _write_counted(tmp_path, monkeypatch, n)
        final = out.stat().st_size
        assert final > n * array_bytes
        # Everything on disk was written once; only the small local headers are
        # patched afterwards (sizes and CRC), far less than one array per member.
        assert final <= written <= final + n * 200
        assert sorted(opened) == sorted(
            f"{sid}.npy" for sid in ids
        )  # each member opened for writing once
        with np.load(out) as z:
            assert sorted(z.files) == ids
        sizes[n] = written
    # A writer that rewrote the archive per sample would give (8*9/2)/(4*5/2) = 3.6.
    assert sizes[8] / sizes[4] == pytest.approx(2.0, rel=0.005)


def test_exception_midway_leaves_nothing(tmp_path):
    target = tmp_path / "sub.npz"

    def items():
        yield IDS[0], _vp(0)
        yield IDS[1], _vp(1)
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        write_submission(target, items())
    assert list(tmp_path.iterdir()) == []

    # An existing submission is left untouched when a rewrite fails.
    target.write_bytes(b"previous submission")
    with pytest.raises(
        DataError, match=r"sub.npz: sample 'BBBBBBBBBBBBBBBBB2': shape \(300, 1258\)"
    ):
        with SubmissionWriter(target) as sw:
            sw.add(IDS[0], _vp(0))
            sw.add(IDS[1], np.ones((300, 1258)))
    assert target.read_bytes() == b"previous submission"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.npz"]


def test_add_refuses_bad_input(tmp_path):
    with SubmissionWriter(tmp_path / "sub.npz", v_range=(1.5, 4.5)) as sw:
        sw.add(IDS[0], _vp(0))
        with pytest.raises(DataError, match="added twice"):
            sw.add(IDS[0], _vp(0))
        with pytest.raises(DataError, match="bad sample id 'short'"):
            sw.add("short", _vp(0))
        with pytest.raises(DataError, match=r"shape \(1259, 300\), expected \(300, 1259\)"):
            sw.add(IDS[1], _vp(1).T)
        bad = _vp(1)
        bad[0, 0], bad[1, 1], bad[2, 2] = np.nan, np.inf, -np.inf
        with pytest.raises(DataError, match="1 NaN and 2 infinite values"):
            sw.add(IDS[1], bad)
        with pytest.raises(DataError, match=r"outside \[1.5, 4.5\]"):
            sw.add(IDS[1], np.full(SHAPE, 5.0))
        sw.add(IDS[1], _vp(1))  # refused arrays leave the writer usable
    with np.load(tmp_path / "sub.npz") as z:
        assert sorted(z.files) == IDS[:2]


# ----------------------------------------------------------------------------- validator


def _save(path, arrays):
    np.savez(path, **arrays)  # a plain numpy npz, as a hand-made submission would be
    return path


def _nan(a):
    a = a.copy()
    a[3, 4] = np.nan
    a[5, 6] = np.inf
    return a


def _low(a):
    a = a.copy()
    a[0, :10] = 1.2
    return a


def _changed(arrays, **changes):
    """``arrays`` with entries replaced (an array) or removed (``None``)."""
    out = dict(arrays)
    for sid, arr in changes.items():
        if arr is None:
            del out[sid]
        else:
            out[sid] = arr
    return out


CASES = {
    # name: (the changed arrays, problem kind, distinctive message, id named)
    "missing": (
        lambda d: _changed(d, **{IDS[1]: None}),
        "missing_keys",
        "missing keys: 1 of 3 test samples have no array: 'BBBBBBBBBBBBBBBBB2'",
        IDS[1],
    ),
    "extra": (
        lambda d: _changed(d, ZZZZZZZZZZZZZZZZZ9=_vp(9)),
        "extra_keys",
        "extra keys: 1 arrays are not test samples: 'ZZZZZZZZZZZZZZZZZ9'",
        "ZZZZZZZZZZZZZZZZZ9",
    ),
    "float32": (
        lambda d: _changed(d, **{IDS[0]: d[IDS[0]].astype(np.float32)}),
        "dtype",
        "dtype float32, expected float64",
        IDS[0],
    ),
    "shape": (
        lambda d: _changed(d, **{IDS[2]: d[IDS[2]][:, :1258]}),
        "shape",
        "shape (300, 1258), expected (300, 1259)",
        IDS[2],
    ),
    "nan": (
        lambda d: _changed(d, **{IDS[1]: _nan(d[IDS[1]])}),
        "non_finite",
        "2 non-finite values (1 NaN, 1 inf)",
        IDS[1],
    ),
    "range": (
        lambda d: _changed(d, **{IDS[0]: _low(d[IDS[0]])}),
        "out_of_range",
        "10 values outside [1.5, 4.5] km/s (min 1.2, max",
        IDS[0],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validator_rejects(tmp_path, test_zip, case):
    change, kind, text, sid = CASES[case]
    path = _save(tmp_path / "bad.npz", change(_valid_arrays()))
    report = validate_submission(path, test_zip)
    assert not report.ok
    assert [p.kind for p in report.problems] == [kind]
    msg = report.messages()[0]
    assert text in msg and str(path) in msg and sid in msg
    with pytest.raises(DataError) as err:
        validate_submission(path, test_zip, raise_on_error=True)
    assert text in str(err.value)


def test_messages_are_distinct_and_all_problems_listed(tmp_path, test_zip):
    arrays = _valid_arrays()
    arrays[IDS[0]] = _low(arrays[IDS[0]]).astype(np.float32)  # dtype and range
    arrays[IDS[2]] = _nan(arrays[IDS[2]])[:299]  # shape and non-finite
    del arrays[IDS[1]]
    for i in range(7):
        arrays[f"X{i:017d}"] = _vp(i)
    path = _save(tmp_path / "bad.npz", arrays)
    report = validate_submission(path, test_zip)
    assert sorted(report.kinds) == sorted(
        ["missing_keys", "extra_keys", "dtype", "out_of_range", "shape", "non_finite"]
    )
    assert len(report.problems) == 6 and len(set(report.messages())) == 6
    extra = next(p for p in report.problems if p.kind == "extra_keys")
    assert "7 arrays are not test samples" in extra.message and "(+2 more)" in extra.message
    assert len(extra.sample_ids) == 7
    with pytest.raises(DataError) as err:
        report.raise_if_problems()
    assert all(m in str(err.value) for m in report.messages())


def test_validator_unreadable_inputs(tmp_path, test_zip):
    report = validate_submission(tmp_path / "none.npz", test_zip)
    assert (
        report.kinds == {"unreadable_file"}
        and "none.npz: submission file not found" in report.messages()[0]
    )
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    assert "junk.npz: not a readable .npz archive" in validate_submission(junk, IDS).messages()[0]
    with zipfile.ZipFile(tmp_path / "txt.npz", "w") as zf:
        zf.writestr(f"{IDS[0]}.npy", b"hello")
    report = validate_submission(tmp_path / "txt.npz", IDS[:1])
    assert (
        report.kinds == {"unreadable_array"}
        and "is not a readable .npy array" in report.messages()[0]
    )


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def run_cli():
    def run(*argv):
        return cli.main(["validate-submission", *map(str, argv)])

    return run


def test_default_range_is_the_challenges():
    assert (submission.V_MIN_DEFAULT, submission.V_MAX_DEFAULT) == (V_MIN, V_MAX) == (1.5, 4.5)


def test_cli(tmp_path, test_zip, run_cli, capsys):
    good = write_submission(tmp_path / "good.npz", _valid_arrays().items())
    assert run_cli("--submission", good, "--test-zip", test_zip) == 0
    assert capsys.readouterr().out.strip() == "OK: 3 arrays, float64 (300, 1259), within [1.5, 4.5]"

    # A tighter range turns the same file into a failure.
    assert (
        run_cli("--submission", good, "--test-zip", test_zip, "--v-min", "2", "--v-max", "4") == 1
    )
    captured = capsys.readouterr()
    assert "values outside [2, 4] km/s" in captured.out + captured.err

    arrays = _valid_arrays()
    arrays[IDS[0]] = arrays[IDS[0]].astype(np.float32)
    bad = _save(tmp_path / "bad.npz", arrays)
    assert run_cli("--submission", bad, "--test-zip", test_zip) == 1
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "1 problem(s)" in out and f"array '{IDS[0]}': dtype float32, expected float64" in out

    assert run_cli("--submission", tmp_path / "missing.npz", "--test-zip", test_zip) == 2
    assert "missing.npz: submission file not found" in capsys.readouterr().err
