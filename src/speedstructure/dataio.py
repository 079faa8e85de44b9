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
folder or members under more than one top folder.  Every array is read header first
(:func:`read_npy`: the size its header declares must be the member's size in the central
directory before any data are inflated) and checked (shape, dtype, finiteness, velocities
within the challenge's range, :func:`check_velocity`); anything wrong raises
:class:`DataError` naming the zip and the member.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import hashlib
import io
import math
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from speedstructure.config import V_MAX, V_MIN
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


NPY_VERSIONS = {(1, 0), (2, 0), (3, 0)}
GATHER_DTYPES = (np.dtype(np.float32),)
VELOCITY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def read_npy(
    stream: BinaryIO,
    size: int,
    where: str,
    shape: tuple[int, ...] | None = None,
    dtypes: tuple[np.dtype, ...] | None = None,
) -> np.ndarray:
    """The ``.npy`` array in ``stream``, which stores ``size`` bytes (a zip member's
    uncompressed size from the central directory, a file's size).

    Its header is read first: the size the header declares must be ``size`` exactly, and the
    shape and dtype must be ``shape`` and one of ``dtypes`` when given, all before a byte of
    the data is read, so a member far longer than its array (or a wrong one) is refused at
    once instead of inflated.  Python objects (pickles) are refused.  A zip member is read to
    its end, so its CRC is checked.  Every problem is a :class:`DataError` naming ``where``.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version not in NPY_VERSIONS:
            raise ValueError(f"unknown .npy version {version}")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        declared, fortran, dtype = read_header(stream)
        header = stream.tell()
        dtype = np.dtype(dtype)
        declared = tuple(int(n) for n in declared)
    except DataError:
        raise
    except Exception as exc:  # numpy and zipfile raise many types for bad headers
        raise DataError(f"{where}: not a readable .npy array ({first_line(exc)})") from exc
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (a pickle), which are never loaded")
    nbytes = math.prod(declared) * dtype.itemsize
    if header + nbytes != size:
        raise DataError(
            f"{where}: {size} bytes stored, but its .npy header declares {declared} {dtype} "
            f"({header + nbytes} bytes)"
        )
    if shape is not None and declared != tuple(shape):
        raise DataError(f"{where}: shape {declared}, expected {tuple(shape)}")
    if dtypes is not None and dtype not in dtypes:
        raise DataError(f"{where}: dtype {dtype}, expected {dtypes[0]}")
    try:
        raw = stream.read(nbytes)
        stream.read(1)  # at the member's end: zipfile checks its CRC
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as exc:
        raise DataError(f"{where}: cannot be read ({first_line(exc)})") from exc
    if len(raw) != nbytes:
        raise DataError(f"{where}: truncated ({len(raw)} of {nbytes} data bytes)")
    arr = np.frombuffer(raw, dtype=dtype)
    arr = arr.reshape(declared[::-1]).T if fortran else arr.reshape(declared)
    return arr.copy()


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (numpy's header errors add advice lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_zip(path: Path, what: str) -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)``, or one line saying ``path`` is not ``what``."""
    try:
        return zipfile.ZipFile(path)
    except Exception as exc:  # a damaged central directory raises many types
        raise DataError(f"{path}: not {what} ({first_line(exc)})") from exc


def read_npy_file(path: Path, shape=None, dtypes=None) -> np.ndarray:
    """:func:`read_npy` of a file, its size from the file system."""
    try:
        with open(path, "rb") as fh:
            return read_npy(fh, os.fstat(fh.fileno()).st_size, str(path), shape, dtypes)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def check_gather(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate one shot gather; returns it as float32."""
    if arr.shape != GATHER_SHAPE:
        raise DataError(f"{where}: shape {arr.shape}, expected {GATHER_SHAPE}")
    if arr.dtype != np.float32:
        raise DataError(f"{where}: dtype {arr.dtype}, expected float32")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


# Velocities outside [V_MIN, V_MAX] by more than this are refused (km/s).  The challenge's
# models are bounded to [1.5, 4.5] and the generator clips to it exactly; 0.05 km/s admits
# what a user's own resampling of a bounded model (a smooth interpolant's overshoot at the
# water floor, float rounding) adds, and is far below any other unit's or a broken model's
# offset.  The network's sigmoid head cannot reach beyond [V_MIN, V_MAX] anyway.
VELOCITY_TOLERANCE = 0.05


def check_velocity(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate one velocity model (km/s, within [V_MIN, V_MAX] +- ``VELOCITY_TOLERANCE``;
    a model in m/s gets its own message); returns it as float32."""
    if arr.shape != VP_SHAPE:
        raise DataError(f"{where}: shape {arr.shape}, expected {VP_SHAPE}")
    if arr.dtype not in (np.float32, np.float64):
        raise DataError(f"{where}: dtype {arr.dtype}, expected float32")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains {int((~np.isfinite(arr)).sum())} non-finite values")
    lo, hi = float(arr.min()), float(arr.max())
    low, high = V_MIN - VELOCITY_TOLERANCE, V_MAX + VELOCITY_TOLERANCE
    if 1000 * low <= lo and hi <= 1000 * high:
        raise DataError(
            f"{where}: velocities {lo:.6g}-{hi:.6g} look like m/s; the challenge's are km/s "
            f"in [{V_MIN:g}, {V_MAX:g}] (divide by 1000)"
        )
    if lo < low or hi > high:
        raise DataError(
            f"{where}: velocities {lo:.6g}-{hi:.6g} km/s outside the challenge's "
            f"[{V_MIN:g}, {V_MAX:g}] (tolerance {VELOCITY_TOLERANCE:g} km/s)"
        )
    return arr.astype(np.float32, copy=False)


GATHER_STD = 0.0155  # the challenge's gathers: global standard deviation (the generator's too)
SCALE_FACTOR = 100.0  # a sample's std off by more than this factor (either way) is warned about


def gather_scale_note(gathers: np.ndarray, where: str) -> str | None:
    """A one-line note when ``gathers``' standard deviation is orders of magnitude from the
    challenge's (:data:`GATHER_STD`); None when it is within :data:`SCALE_FACTOR` of it.
    Real data may be scaled differently: this warns, it never refuses."""
    std = float(np.std(gathers, dtype=np.float64))
    if GATHER_STD / SCALE_FACTOR <= std <= GATHER_STD * SCALE_FACTOR:
        return None
    return (
        f"{where}: gathers' standard deviation {std:.3g} is {std / GATHER_STD:.3g} times the "
        f"challenge's ({GATHER_STD}); the models were trained on that scale"
    )


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


class StoreSamples(Reader):
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
        self._where = self._read_index(index, split)
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self.sample_ids = sorted(self._where)
        self.has_targets = bool(self._where) and all(t for _, _, t in self._where.values())

    def _read_index(self, index: Path, split: str | None) -> dict[str, tuple[str, int, bool]]:
        """``sample_id -> (split, row, has_target)`` of ``index.csv``, checked against the
        manifest: the SHA-256 it records (an index has no other checksum: a flipped id would
        be another valid id), each split's rows ``0 .. samples - 1`` once each, every id
        once, ``has_target`` as the split's."""
        where: dict[str, tuple[str, int, bool]] = {}
        try:
            splits, digest = self._manifest()
            raw = index.read_bytes()
            if hashlib.sha256(raw).hexdigest() != digest:
                raise ValueError("its SHA-256 is not the one its manifest records")
            for r in csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")):
                sid, row = r["sample_id"], int(r["row"])
                if not SAMPLE_ID_RE.match(sid or "") or sid in where:
                    raise ValueError(f"bad row {dict(r)}")
                where[sid] = (r["split"], row, r["has_target"] == "1")
            rows: dict[str, set[int]] = {}
            for s, row, has in where.values():
                rows.setdefault(s, set()).add(row)
                if has != splits[s][1]:
                    raise ValueError(f"split {s}: has_target differs from the manifest's")
            if {s: sorted(r) for s, r in rows.items()} != {
                s: list(range(n)) for s, (n, _) in splits.items() if n
            }:
                raise ValueError("its rows do not cover the manifest's splits")
        except DataError:
            raise
        except (OSError, KeyError, TypeError, ValueError, csv.Error) as exc:
            raise DataError(
                f"{index}: not a store index ({first_line(exc)}); "
                "rebuild the store (dvc repro ingest)"
            ) from None
        return {k: v for k, v in where.items() if split is None or v[0] == split}

    def _manifest(self) -> tuple[dict[str, tuple[int, bool]], str]:
        """``split -> (samples, has_targets)`` and the index's SHA-256, from
        ``manifest.json`` (a store written before the manifest held it is refused: rebuild)."""
        import json

        path = self.path / MANIFEST_NAME
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            splits = {
                str(s): (int(info["samples"]), bool(info["has_targets"]))
                for s, info in doc["splits"].items()
            }
            return splits, str(doc["index_sha256"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"{path}: not a store manifest ({first_line(exc)}); "
                "rebuild the store (dvc repro ingest)"
            ) from None

    def _array(self, split: str, name: str) -> np.ndarray:
        key = (split, name)
        if key not in self._arrays:
            self._arrays[key] = self._open_array(split, name)
        return self._arrays[key]

    def _open_array(self, split: str, name: str) -> np.ndarray:
        """The memory map of ``split/name``, checked: float32, the sample shape, as many
        rows as the index uses, and exactly the bytes its header declares."""
        p = self.path / split / name
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            size = p.stat().st_size
        except Exception as exc:  # numpy raises many types for a damaged file (EOFError, ...)
            raise DataError(
                f"{p}: cannot be read ({first_line(exc)}); rebuild the store (dvc repro ingest)"
            ) from exc
        sample = (len(SOURCES), *GATHER_SHAPE) if name == "gathers.npy" else VP_SHAPE
        rows = 1 + max((r for s, r, _ in self._where.values() if s == split), default=-1)
        offset = getattr(arr, "offset", 0)
        if (
            arr.dtype != np.float32
            or not arr.flags.c_contiguous  # ingest writes C order; memory maps keep it
            or arr.shape[1:] != sample
            or arr.shape[0] != rows
            or offset + arr.nbytes != size
        ):
            raise DataError(
                f"{p}: {arr.dtype} {arr.shape} in {size} bytes, expected float32 "
                f"({rows}, {', '.join(map(str, sample))}) in C order, "
                f"{offset + arr.nbytes} bytes; rebuild the store (dvc repro ingest)"
            )
        return arr

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
            out.append(check_gather(read_npy_file(f, GATHER_SHAPE, GATHER_DTYPES), str(f)))
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
