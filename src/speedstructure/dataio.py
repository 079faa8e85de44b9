"""Reading and writing samples: the challenge's zips, the ingested store, sample folders.

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
folder or members under more than one top folder.  Every array is checked (shape,
dtype, finiteness, positive velocities) and anything wrong raises
:class:`DataError` naming the zip and the member.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from speedstructure.errors import DataError
from speedstructure.fsutil import atomic_output

SOURCES: tuple[int, ...] = (1, 75, 150, 225, 300)
N_TIME = 10001
N_RECEIVERS = 31
GATHER_SHAPE = (N_TIME, N_RECEIVERS)
NX, NZ = 300, 1259
VP_SHAPE = (NX, NZ)
TARGET_NAME = "vp_model.npy"
SAMPLE_ID_RE = re.compile(r"^[A-Za-z0-9]{18}$")


def gather_name(source: int) -> str:
    return f"receiver_data_src_{source}.npy"


GATHER_NAMES: tuple[str, ...] = tuple(gather_name(s) for s in SOURCES)


def _load_npy(raw: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # numpy raises several types for bad headers
        raise DataError(f"{where}: not a readable .npy array ({exc})") from exc


def check_gather(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate one shot gather; returns it as float32."""
    if arr.shape != GATHER_SHAPE:
        raise DataError(f"{where}: shape {arr.shape}, expected {GATHER_SHAPE}")
    if arr.dtype != np.float32:
        raise DataError(f"{where}: dtype {arr.dtype}, expected float32")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def check_velocity(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate one velocity model; returns it as float32."""
    if arr.shape != VP_SHAPE:
        raise DataError(f"{where}: shape {arr.shape}, expected {VP_SHAPE}")
    if arr.dtype not in (np.float32, np.float64):
        raise DataError(f"{where}: dtype {arr.dtype}, expected float32")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains {int((~np.isfinite(arr)).sum())} non-finite values")
    if (arr <= 0).any():
        raise DataError(f"{where}: velocities must be positive (min {float(arr.min()):.4g})")
    return arr.astype(np.float32, copy=False)


class ZipSamples:
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
        try:
            self._zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a valid zip archive ({exc})") from exc
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

    def __enter__(self) -> ZipSamples:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._members

    def _read_member(self, sample_id: str, fname: str) -> np.ndarray:
        member = self._members[sample_id][fname]
        where = f"{self.path}: member '{member}'"
        try:
            raw = self._zf.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise DataError(f"{where}: cannot be read ({exc})") from exc
        return _load_npy(raw, where)

    def read_gathers(self, sample_id: str) -> np.ndarray:
        """The five gathers, stacked in source order: float32 (5, 10001, 31)."""
        if sample_id not in self._members:
            raise DataError(f"{self.path}: no sample '{sample_id}'")
        out = np.empty((len(SOURCES), *GATHER_SHAPE), dtype=np.float32)
        for i, g in enumerate(GATHER_NAMES):
            where = f"{self.path}: member '{self._members[sample_id][g]}'"
            out[i] = check_gather(self._read_member(sample_id, g), where)
        return out

    def read_target(self, sample_id: str) -> np.ndarray:
        """The velocity model: float32 (300, 1259) in km/s."""
        if sample_id not in self._members:
            raise DataError(f"{self.path}: no sample '{sample_id}'")
        if TARGET_NAME not in self._members[sample_id]:
            raise DataError(f"{self.path}: sample '{sample_id}' has no {TARGET_NAME}")
        where = f"{self.path}: member '{self._members[sample_id][TARGET_NAME]}'"
        return check_velocity(self._read_member(sample_id, TARGET_NAME), where)

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


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


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


# --------------------------------------------------------------------- the store and folders

INDEX_NAME = "index.csv"
MANIFEST_NAME = "manifest.json"


class StoreSamples:
    """Read access to the store the ``ingest`` stage writes, with ``ZipSamples``' interface.

    ``store = StoreSamples("store"); x, y = store.read(sample_id)``.  Arrays are
    memory-mapped; every read returns an owned copy.  ``split`` limits the
    samples to one split.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if not index.is_file():
            raise DataError(
                f"{self.path}: not a sample store (no {INDEX_NAME}; run the ingest stage)"
            )
        self._where: dict[str, tuple[str, int, bool]] = {}
        with open(index, newline="") as fh:
            for r in csv.DictReader(fh):
                if split is None or r["split"] == split:
                    self._where[r["sample_id"]] = (
                        r["split"],
                        int(r["row"]),
                        r["has_target"] == "1",
                    )
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self.sample_ids = sorted(self._where)
        self.has_targets = bool(self._where) and all(t for _, _, t in self._where.values())

    def _array(self, split: str, name: str) -> np.ndarray:
        key = (split, name)
        if key not in self._arrays:
            p = self.path / split / name
            try:
                self._arrays[key] = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"{p}: cannot be read ({exc}); rebuild the store (dvc repro ingest)"
                ) from exc
        return self._arrays[key]

    def _locate(self, sample_id: str) -> tuple[str, int, bool]:
        try:
            return self._where[sample_id]
        except KeyError:
            raise DataError(f"{self.path}: no sample '{sample_id}'") from None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._where

    def split_of(self, sample_id: str) -> str:
        return self._locate(sample_id)[0]

    def read_gathers(self, sample_id: str) -> np.ndarray:
        split, row, _ = self._locate(sample_id)
        return np.array(self._array(split, "gathers.npy")[row])

    def read_target(self, sample_id: str) -> np.ndarray:
        split, row, has = self._locate(sample_id)
        if not has:
            raise DataError(f"{self.path}: sample '{sample_id}' ({split}) has no target")
        return np.array(self._array(split, "targets.npy")[row])

    def read(self, sample_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        has = self._locate(sample_id)[2]
        return self.read_gathers(sample_id), (self.read_target(sample_id) if has else None)

    def close(self) -> None:
        self._arrays.clear()

    def __enter__(self) -> StoreSamples:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


def open_samples(path: str | os.PathLike):
    """A reader for ``path``: a store folder (``StoreSamples``) or a zip (``ZipSamples``)."""
    p = Path(path)
    return StoreSamples(p) if p.is_dir() else ZipSamples(p)


class FolderSamples:
    """Samples in a folder in the challenge layout (gathers only):
    ``<dir>/<sample_id>/receiver_data_src_<s>.npy``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: folder not found")
        self.sample_ids = sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and SAMPLE_ID_RE.match(p.name)
        )
        if not self.sample_ids:
            raise DataError(f"{self.path}: no sample folders (18-character ids) found")
        for sid in self.sample_ids:
            missing = [g for g in GATHER_NAMES if not (self.path / sid / g).is_file()]
            if missing:
                raise DataError(f"{self.path / sid}: lacks {', '.join(missing)}")

    def read_gathers(self, sample_id: str) -> np.ndarray:
        out = []
        for g in GATHER_NAMES:
            f = self.path / sample_id / g
            out.append(check_gather(_load_npy(f.read_bytes(), str(f)), str(f)))
        return np.stack(out)

    def close(self) -> None:
        pass


def open_input(path: str | os.PathLike):
    """A challenge zip (``ZipSamples``), a store (``StoreSamples``) or a sample folder."""
    p = Path(path)
    if p.is_dir():
        return StoreSamples(p) if (p / INDEX_NAME).is_file() else FolderSamples(p)
    if p.is_file():
        return ZipSamples(p)
    raise DataError(f"{p}: input not found (expected a challenge zip or a folder of samples)")
