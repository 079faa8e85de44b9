"""Reading and checking a submission (the ``validate-submission`` command).

:class:`VelocityArchive` reads an ``.npz`` of velocity models (a submission, or the test
targets) member by member, header first.  :func:`validate_submission` checks a finished
file against the test zip's sample ids, one array at a time, and lists every problem it
finds:

    >>> validate_submission("submission.npz", "data/test.zip").raise_if_problems()
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speedstructure.data.format import (
    SAMPLE_ID_RE,
    VELOCITY_DTYPES,
    VP_SHAPE,
    check_velocity,
    first_line,
    open_zip,
    read_npy,
)
from speedstructure.data.samples import Reader, list_sample_ids
from speedstructure.data.submission import (
    NPY_SUFFIX,
    SUBMISSION_DTYPE,
    V_MAX_DEFAULT,
    V_MIN_DEFAULT,
)
from speedstructure.errors import DataError, UserError

# --------------------------------------------------------------------------- validation

PROBLEM_KINDS = (
    "unreadable_file",  # the submission is missing or not a zip
    "missing_keys",  # test samples with no array
    "extra_keys",  # arrays that are not test samples
    "duplicate_key",  # one key stored in several members
    "unreadable_array",  # a member that is not a readable .npy array
    "dtype",
    "shape",
    "non_finite",
    "out_of_range",
)

N_NAMED = 5  # ids named in a missing/extra key message


@dataclass(frozen=True)
class Problem:
    kind: str
    message: str
    sample_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.message


@dataclass
class SubmissionReport:
    """What :func:`validate_submission` found; ``ok`` when ``problems`` is empty."""

    path: Path
    n_expected: int
    n_arrays: int = 0
    v_min: float = V_MIN_DEFAULT
    v_max: float = V_MAX_DEFAULT
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    @property
    def readable(self) -> bool:
        return "unreadable_file" not in self.kinds

    def messages(self) -> list[str]:
        return [p.message for p in self.problems]

    def summary(self) -> str:
        if self.ok:
            return (
                f"OK: {self.n_arrays} arrays, {SUBMISSION_DTYPE} {VP_SHAPE}, "
                f"within [{self.v_min:g}, {self.v_max:g}]"
            )
        return (
            f"{self.path}: {len(self.problems)} problem(s) in a submission of "
            f"{self.n_arrays} arrays for {self.n_expected} test samples"
        )

    def raise_if_problems(self) -> None:
        """Raises :class:`DataError` listing every problem, one per line."""
        if self.problems:
            raise DataError("\n".join([self.summary(), *self.messages()]))


def _name_some(ids: list[str]) -> str:
    named = ", ".join(f"'{s}'" for s in ids[:N_NAMED])
    return named + (f", ... (+{len(ids) - N_NAMED} more)" if len(ids) > N_NAMED else "")


class VelocityArchive(Reader):
    """Read access to an ``.npz`` of velocity models keyed by sample id: a submission or the
    test targets (``test_labels.npz``), as ``np.load`` gives it (``files``, ``[sample_id]``)
    but checked: every member is ``<sample_id>.npy`` (once), every array is read by
    :func:`speedstructure.data.format.read_npy` (its size against the central directory's before
    its data are inflated, no pickles) and is a finite (300, 1259) model in km/s
    (:func:`speedstructure.data.format.check_velocity`).  Arrays keep their stored dtype.
    ``what`` names the file in the not-found message."""

    def __init__(self, path: str | os.PathLike, what: str = "velocity archive"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: {what} not found")
        self._zf = open_zip(self.path, "a readable .npz archive")
        try:
            self._infos = self._index()
        except BaseException:
            self._zf.close()
            raise
        self.files = sorted(self._infos)

    def _index(self) -> dict[str, zipfile.ZipInfo]:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in self._zf.infolist():
            sid = info.filename.removesuffix(NPY_SUFFIX)
            if not info.filename.endswith(NPY_SUFFIX) or not SAMPLE_ID_RE.match(sid):
                raise DataError(
                    f"{self.path}: member {info.filename!r} is not <18-character id>.npy"
                )
            if sid in infos:
                raise DataError(f"{self.path}: array '{sid}' appears twice")
            infos[sid] = info
        return infos

    def __getitem__(self, sample_id: str) -> np.ndarray:
        info = self._infos.get(sample_id)
        if info is None:
            raise DataError(f"{self.path}: no array '{sample_id}'")
        where = f"{self.path}: array '{sample_id}'"
        try:
            with self._zf.open(info) as fh:
                arr = read_npy(fh, info.file_size, where, VP_SHAPE, VELOCITY_DTYPES)
        except DataError:
            raise
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as exc:
            raise DataError(f"{where}: cannot be read ({first_line(exc)})") from exc
        check_velocity(arr, where)
        return arr

    def close(self) -> None:
        self._zf.close()


def _expected_ids(test_zip_or_ids) -> list[str]:
    if isinstance(test_zip_or_ids, (str, os.PathLike)):
        return list_sample_ids(test_zip_or_ids)
    ids = list(test_zip_or_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("expected sample ids contain duplicates")
    return ids


def _read_header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo
) -> tuple[tuple[int, ...], np.dtype, int]:
    """A member's shape, dtype and header length (no data read)."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:  # (2, 0) and (3, 0) share the layout; 3.0 only allows utf-8 field names
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(shape), np.dtype(dtype), f.tell()


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _check_array(zf, info, sid: str, report: SubmissionReport) -> None:
    where = f"{report.path}: array '{sid}'"
    add = report.problems.append
    try:
        shape, dtype, header = _read_header(zf, info)
    except Exception as exc:  # bad magic, bad header, CRC error, truncated member
        add(
            Problem(
                "unreadable_array",
                f"{where}: member '{info.filename}' is not a readable .npy array "
                f"({first_line(exc)})",
                (sid,),
            )
        )
        return
    declared = header + math.prod(shape) * dtype.itemsize
    if declared != info.file_size:  # before any data are inflated (a member far too long)
        msg = f"{where}: {info.file_size} bytes stored, its .npy header declares {declared}"
        add(Problem("size", msg, (sid,)))
        return
    if dtype != SUBMISSION_DTYPE:
        add(Problem("dtype", f"{where}: dtype {dtype}, expected float64", (sid,)))
    if shape != VP_SHAPE:
        add(Problem("shape", f"{where}: shape {shape}, expected {VP_SHAPE}", (sid,)))
    # Values are checked whenever they are numbers and the array is not absurdly large.
    n_values = int(np.prod(shape, dtype=np.int64))
    if dtype.kind not in "fiu" or dtype.hasobject or n_values > 16 * VP_SHAPE[0] * VP_SHAPE[1]:
        return
    try:
        arr = _read_array(zf, info)
    except Exception as exc:
        add(
            Problem(
                "unreadable_array",
                f"{where}: member '{info.filename}' data cannot be read ({first_line(exc)})",
                (sid,),
            )
        )
        return
    if arr.size == 0:
        return
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad:
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        add(
            Problem(
                "non_finite",
                f"{where}: {n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} inf) "
                f"of {arr.size}",
                (sid,),
            )
        )
        if n_bad == arr.size:
            return
        vals = arr[finite]
    else:
        vals = arr
    lo, hi = float(vals.min()), float(vals.max())
    if lo < report.v_min or hi > report.v_max:
        n_out = int(np.count_nonzero((vals < report.v_min) | (vals > report.v_max)))
        add(
            Problem(
                "out_of_range",
                f"{where}: {n_out} values outside [{report.v_min:g}, {report.v_max:g}] km/s "
                f"(min {lo:.6g}, max {hi:.6g})",
                (sid,),
            )
        )


def validate_submission(
    submission_path: str | os.PathLike,
    test_zip_or_ids: str | os.PathLike | Iterable[str],
    *,
    v_min: float = V_MIN_DEFAULT,
    v_max: float = V_MAX_DEFAULT,
    raise_on_error: bool = False,
) -> SubmissionReport:
    """Checks a submission ``.npz`` against the test samples; lists every problem.

    ``test_zip_or_ids`` is the test zip (its sample ids are the expected keys)
    or the ids themselves.  Checks: the file exists and is a zip; its keys are
    exactly the expected ids (missing and extra keys reported separately);
    each expected array is float64, shape (300, 1259), finite and within
    ``[v_min, v_max]``.  Arrays are read one at a time.  With
    ``raise_on_error`` a :class:`DataError` listing all problems is raised
    instead of returning a report with problems.
    """
    if not float(v_min) < float(v_max):
        raise UserError(f"velocity range [{v_min}, {v_max}] is empty: v_min must be below v_max")
    path = Path(submission_path)
    expected = _expected_ids(test_zip_or_ids)
    report = SubmissionReport(
        path=path, n_expected=len(expected), v_min=float(v_min), v_max=float(v_max)
    )
    add = report.problems.append
    if not path.is_file():
        add(Problem("unreadable_file", f"{path}: submission file not found"))
    else:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            add(
                Problem(
                    "unreadable_file", f"{path}: not a readable .npz archive ({first_line(exc)})"
                )
            )
        else:
            with zf:
                _validate_members(zf, expected, report)
    if raise_on_error:
        report.raise_if_problems()
    return report


def _validate_members(zf: zipfile.ZipFile, expected: list[str], report: SubmissionReport) -> None:
    path, add = report.path, report.problems.append
    members: dict[str, list[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        key = (
            info.filename[: -len(NPY_SUFFIX)]
            if info.filename.endswith(NPY_SUFFIX)
            else info.filename
        )
        members.setdefault(key, []).append(info)
    report.n_arrays = len(members)
    expected_set = set(expected)
    missing = [s for s in expected if s not in members]
    extra = sorted(k for k in members if k not in expected_set)
    if missing:
        add(
            Problem(
                "missing_keys",
                f"{path}: missing keys: {len(missing)} of {len(expected)} test samples "
                f"have no array: {_name_some(missing)}",
                tuple(missing),
            )
        )
    if extra:
        add(
            Problem(
                "extra_keys",
                f"{path}: extra keys: {len(extra)} arrays are not test samples: "
                f"{_name_some(extra)}",
                tuple(extra),
            )
        )
    for key in sorted(k for k, infos in members.items() if len(infos) > 1):
        add(
            Problem(
                "duplicate_key",
                f"{path}: array '{key}': key stored {len(members[key])} times",
                (key,),
            )
        )
    # In archive order, so the file is read front to back.
    for key, infos in members.items():
        if key in expected_set:
            _check_array(zf, infos[-1], key, report)  # np.load reads the last of duplicates


def load_submission(path: Path, limit: int | None = None) -> tuple[list[str], dict]:
    """The submission's ids (sorted, the first ``limit``) and its open, checked reader
    (:class:`speedstructure.data.submission_check.VelocityArchive`)."""
    from speedstructure.data.submission_check import VelocityArchive

    sub = VelocityArchive(path, "submission (run the predict stage)")
    ids = sub.files[: limit or None]
    return ids, sub


# --------------------------------------------------------------------------- command line


def _cmd(args: argparse.Namespace) -> int:
    report = validate_submission(args.submission, args.test_zip, v_min=args.v_min, v_max=args.v_max)
    if not report.readable:
        raise DataError("\n".join(report.messages()))
    if report.ok:
        print(report.summary())
        return 0
    print(report.summary(), file=sys.stderr)
    for msg in report.messages():
        print(f"  {msg}", file=sys.stderr)
    return 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "validate-submission",
        help="check a submission .npz against the test zip (keys, dtype, shape, finiteness, range)",
        description=(
            "Check that a submission .npz holds exactly one float64 (300, 1259) array per test "
            "sample, all finite and within [v-min, v-max] km/s.  Exit code 0: valid; 1: problems "
            "(all listed); 2: unreadable input."
        ),
    )
    p.add_argument("--submission", required=True, metavar="FILE", help="submission .npz")
    p.add_argument(
        "--test-zip",
        required=True,
        metavar="ZIP",
        help="challenge test zip (gives the expected ids)",
    )
    p.add_argument(
        "--v-min",
        type=float,
        default=V_MIN_DEFAULT,
        help=f"lowest allowed velocity, km/s (default {V_MIN_DEFAULT:g})",
    )
    p.add_argument(
        "--v-max",
        type=float,
        default=V_MAX_DEFAULT,
        help=f"highest allowed velocity, km/s (default {V_MAX_DEFAULT:g})",
    )
    p.set_defaults(func=_cmd)
