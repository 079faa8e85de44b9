"""Reading and writing the challenge's zips.

Layout of every zip (train, extended, test)::

    <sample_id>/receiver_data_src_1.npy      float32 (10001, 31)
    <sample_id>/receiver_data_src_75.npy
    <sample_id>/receiver_data_src_150.npy
    <sample_id>/receiver_data_src_225.npy
    <sample_id>/receiver_data_src_300.npy
    <sample_id>/vp_model.npy                 float32 (300, 1259), km/s (not in test zips)

Members may sit below one common top folder (``train/<sample_id>/...``), as
zips made by hand often do; they are read straight from the archive, with no
unzip step.  Any other member path is refused (:meth:`ZipSamples._check_member`):
an absolute path, a ``..`` or empty part, a backslash, a symbolic link, a deeper
folder or members under more than one top folder.  Every array is read header first
and checked (:mod:`speedstructure.data.format`); anything wrong raises
:class:`~speedstructure.errors.DataError` naming the zip and the member.
:class:`ZipWriter` writes zips byte-reproducibly (fixed member dates and order).
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from speedstructure.data.format import (
    GATHER_DTYPES,
    GATHER_NAMES,
    GATHER_SHAPE,
    SAMPLE_ID_RE,
    SOURCES,
    TARGET_NAME,
    VELOCITY_DTYPES,
    VP_SHAPE,
    check_gather,
    check_velocity,
    first_line,
    gather_name,
    npy_bytes,
    open_zip,
    read_npy,
)
from speedstructure.errors import DataError
from speedstructure.fsutil import atomic_output


class Reader(abc.ABC):
    """A reader used as a context manager: ``with Reader(...) as r:`` closes it at the end."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the reader's files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ZipSamples(Reader):
    """Random access to the samples of one challenge zip.

    >>> with ZipSamples("data/train.zip") as z:
    ...     x, y = z.read("01BOBpFpr5YkZhAs32")   # (5, 10001, 31), (300, 1259)

    The archive's layout is checked on opening: every sample folder must hold
    all five gathers, and either every sample has a ``vp_model.npy`` or none has.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: zip file not found")
        self._zf = open_zip(self.path, "a valid zip archive")
        self._members: dict[str, dict[str, str]] = {}
        try:
            self._index()
        except BaseException:
            self._zf.close()
            raise

    def _check_member(self, info: zipfile.ZipInfo) -> list[str]:
        """The parts of a member's path, refused (one line naming the member) unless it is
        ``[top/]<sample_id>/<file>``-shaped: relative, no ``..``, no symbolic link."""
        name = info.filename
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise DataError(f"{self.path}: member {name!r}: control characters in the name")
        where = f"{self.path}: member '{name}'"
        if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise DataError(f"{where}: absolute or non-portable path")
        parts = name.rstrip("/").split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise DataError(f"{where}: path has an empty, '.' or '..' part")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DataError(f"{where}: symbolic link")
        return parts

    def _member_names(self) -> list[str]:
        """The archive's file members, every path checked; at most one top folder."""
        names, tops = [], set()
        for info in self._zf.infolist():
            parts = self._check_member(info)
            if parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
                continue
            if len(parts) > (2 if info.is_dir() else 3):
                raise DataError(
                    f"{self.path}: member '{info.filename}': nested too deep "
                    "(expected [top folder/]<sample_id>/<file>)"
                )
            if info.is_dir():
                if len(parts) == 2 and not SAMPLE_ID_RE.match(parts[1]):
                    raise DataError(
                        f"{self.path}: member '{info.filename}': a folder inside a sample "
                        "folder (expected [top folder/]<sample_id>/<file>)"
                    )
                continue
            if len(parts) < 2:
                raise DataError(
                    f"{self.path}: member '{info.filename}' is not inside a sample folder"
                )
            tops.add(parts[0] if len(parts) == 3 else "")
            if len(tops) > 1:
                raise DataError(
                    f"{self.path}: member '{info.filename}': members sit under more than one "
                    f"top folder ({', '.join(sorted(repr(t) for t in tops))})"
                )
            names.append(info.filename)
        return names

    def _index(self) -> None:
        names = self._member_names()
        if not names:
            raise DataError(f"{self.path}: archive holds no files")
        for name in names:
            parts = name.split("/")
            sid, fname = parts[-2], parts[-1]
            if not SAMPLE_ID_RE.match(sid):
                raise DataError(
                    f"{self.path}: member '{name}': folder '{sid}' is not an 18-character sample id"
                )
            if fname not in GATHER_NAMES and fname != TARGET_NAME:
                raise DataError(f"{self.path}: unexpected member '{name}'")
            files = self._members.setdefault(sid, {})
            if fname in files:
                raise DataError(f"{self.path}: sample '{sid}' has '{fname}' twice")
            files[fname] = name
        with_target = 0
        for sid, files in self._members.items():
            missing = [g for g in GATHER_NAMES if g not in files]
            if missing:
                raise DataError(f"{self.path}: sample '{sid}' lacks {', '.join(missing)}")
            with_target += TARGET_NAME in files
        if with_target not in (0, len(self._members)):
            raise DataError(
                f"{self.path}: {len(self._members) - with_target} of {len(self._members)} "
                f"samples lack {TARGET_NAME}"
            )
        self.has_targets = with_target > 0
        self.sample_ids: list[str] = sorted(self._members)

    def close(self) -> None:
        self._zf.close()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._members

    def _read_member(self, sample_id: str, fname: str, shape, dtypes) -> np.ndarray:
        """One member's array (:func:`read_npy`: its size checked against the central
        directory's before its data are inflated)."""
        member = self._members[sample_id][fname]
        where = f"{self.path}: member '{member}'"
        try:
            info = self._zf.getinfo(member)
            with self._zf.open(info) as fh:
                return read_npy(fh, info.file_size, where, shape, dtypes)
        except DataError:
            raise
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as exc:
            raise DataError(f"{where}: cannot be read ({first_line(exc)})") from exc

    def read_gathers(self, sample_id: str) -> np.ndarray:
        """The five gathers, stacked in source order: float32 (5, 10001, 31)."""
        if sample_id not in self._members:
            raise DataError(f"{self.path}: no sample '{sample_id}'")
        out = np.empty((len(SOURCES), *GATHER_SHAPE), dtype=np.float32)
        for i, g in enumerate(GATHER_NAMES):
            where = f"{self.path}: member '{self._members[sample_id][g]}'"
            arr = self._read_member(sample_id, g, GATHER_SHAPE, GATHER_DTYPES)
            out[i] = check_gather(arr, where)
        return out

    def read_target(self, sample_id: str) -> np.ndarray:
        """The velocity model: float32 (300, 1259) in km/s."""
        if sample_id not in self._members:
            raise DataError(f"{self.path}: no sample '{sample_id}'")
        if TARGET_NAME not in self._members[sample_id]:
            raise DataError(f"{self.path}: sample '{sample_id}' has no {TARGET_NAME}")
        where = f"{self.path}: member '{self._members[sample_id][TARGET_NAME]}'"
        arr = self._read_member(sample_id, TARGET_NAME, VP_SHAPE, VELOCITY_DTYPES)
        return check_velocity(arr, where)

    def read(self, sample_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(gathers, target)``; target is ``None`` for a zip without targets."""
        x = self.read_gathers(sample_id)
        y = self.read_target(sample_id) if self.has_targets else None
        return x, y

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        for sid in self.sample_ids:
            x, y = self.read(sid)
            yield sid, x, y


def list_sample_ids(path: str | os.PathLike) -> list[str]:
    with ZipSamples(path) as z:
        return list(z.sample_ids)


def read_sample(path: str | os.PathLike, sample_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    with ZipSamples(path) as z:
        return z.read(sample_id)


# Fixed member timestamp: the same data gives byte-identical zips.
ZIP_EPOCH = (2025, 1, 1, 0, 0, 0)


class ZipWriter:
    """Writes a challenge-layout zip atomically (:func:`speedstructure.fsutil.atomic_output`).

    Members are stored uncompressed with a fixed timestamp, so equal inputs
    give byte-identical archives.  Use as a context manager; on an exception
    the partial file is removed and ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._output = contextlib.ExitStack()
        tmp = self._output.enter_context(atomic_output(self.path))
        try:
            self._zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        except BaseException:
            self._output.close()
            raise
        self._ids: set[str] = set()

    def add(self, sample_id: str, gathers: np.ndarray, target: np.ndarray | None) -> None:
        if not SAMPLE_ID_RE.match(sample_id):
            raise ValueError(f"bad sample id {sample_id!r}")
        if sample_id in self._ids:
            raise ValueError(f"duplicate sample id {sample_id!r}")
        self._ids.add(sample_id)
        if gathers.shape != (len(SOURCES), *GATHER_SHAPE):
            raise ValueError(f"gathers shape {gathers.shape}")
        for s, g in zip(SOURCES, gathers, strict=True):
            self._write(f"{sample_id}/{gather_name(s)}", np.ascontiguousarray(g, dtype=np.float32))
        if target is not None:
            self._write(
                f"{sample_id}/{TARGET_NAME}", np.ascontiguousarray(target, dtype=np.float32)
            )

    def _write(self, name: str, arr: np.ndarray) -> None:
        info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self._zf.writestr(info, npy_bytes(arr))

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._zf.close()
        finally:  # renames the temporary onto ``path``, or removes it after an exception
            self._output.__exit__(exc_type, exc, tb)
