"""The sample store ``ingest`` writes, and folders of samples.

The store holds every split's gathers and targets as uncompressed arrays with an index
(``index.csv``) and a manifest (format, rows, the index's SHA-256); :class:`StoreSamples`
checks both before reading a row.  :class:`FolderSamples` reads ``<sample_id>/*.npy`` folders.
:func:`open_samples` and :func:`open_input` pick the reader for a path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from speedstructure.data.format import (
    GATHER_DTYPES,
    GATHER_NAMES,
    GATHER_SHAPE,
    SAMPLE_ID_RE,
    SOURCES,
    VP_SHAPE,
    check_gather,
    first_line,
    read_npy_file,
)
from speedstructure.data.samples import Reader, ZipSamples
from speedstructure.errors import DataError

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
