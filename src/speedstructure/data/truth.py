"""The truth files: what the synthetic generator knows about each model, beside its zip.

For every zip it writes, ``speedstructure synth`` writes ``<zip stem>_truth.npz`` in the same
folder (``data/train_truth.npz``, ``data/test_truth.npz``, ``data/test_ood_truth.npz``, ...):
plain arrays, readable with ``np.load(path, allow_pickle=False)``, one row per sample:

==============  =====================  ===================================================
``ids``         unicode ``(n,)``        sample ids, in the zip's order
``family``      unicode ``(n,)``        flat, dipping, gentle_fold, strong_fold, faulted,
                                        intrusion
``v_top``       float32 ``(n,)``        the depth trend under the floor (km/s)
``v_bottom``    float32 ``(n,)``        the depth trend at the bottom (km/s)
``trend_power`` float32 ``(n,)``        its shape, ``v_top + (v_bottom - v_top) * t ** p``
``floor``       int16 ``(n, 300)``      the first sediment cell (m) of each column
``h``           float32 ``(n, 300)``    the structural surface ``h(x)`` (m)
``body``        uint8 ``(n, 300, 158)`` the intrusion body's cells, bool ``(n, 300, 1259)``
                                        packed with ``np.packbits(axis=-1)``; all zero for
                                        the families without one
==============  =====================  ===================================================

``np.unpackbits(body, axis=-1, count=1259).astype(bool)`` restores the mask
(:meth:`Truth.bodies`).  Real data has no truth file: :func:`load_truth` then returns None
with one logged line, and every consumer goes on without these facts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speedstructure.data.format import NX, NZ
from speedstructure.errors import DataError
from speedstructure.fsutil import atomic_output

log = logging.getLogger(__name__)

TRUTH_SUFFIX = "_truth.npz"
INTRUSION = "intrusion"  # the family with a body
_PACKED = (NZ + 7) // 8  # bytes of one column's packed body mask


def truth_path(zip_path: str | Path) -> Path:
    """The truth file of a zip: ``<zip stem>_truth.npz`` beside it."""
    zip_path = Path(zip_path)
    return zip_path.with_name(zip_path.stem + TRUTH_SUFFIX)


def pack_body(body: np.ndarray | None) -> np.ndarray:
    """One model's body mask (bool ``(300, 1259)``; None: no body), packed uint8 ``(300, 158)``."""
    if body is None:
        return np.zeros((NX, _PACKED), np.uint8)
    return np.packbits(np.asarray(body, dtype=bool), axis=-1)


@dataclass(frozen=True)
class Truth:
    """One truth file's rows (see the module doc); ``path`` is where it was read or written."""

    path: Path
    ids: list[str]
    family: np.ndarray
    v_top: np.ndarray
    v_bottom: np.ndarray
    trend_power: np.ndarray
    floor: np.ndarray
    h: np.ndarray
    body: np.ndarray  # packed, uint8 (n, 300, 158)

    def __len__(self) -> int:
        return len(self.ids)

    def bodies(self) -> np.ndarray:
        """The body masks, bool ``(n, 300, 1259)``."""
        return np.unpackbits(self.body, axis=-1, count=NZ).astype(bool)

    def select(self, ids: list[str]) -> Truth:
        """The rows of ``ids``, in that order; a data error naming the file when one is absent."""
        row = {sid: i for i, sid in enumerate(self.ids)}
        missing = [sid for sid in ids if sid not in row]
        if missing:
            raise DataError(
                f"{self.path}: no truth for {len(missing)} sample(s), e.g. '{missing[0]}'"
            )
        idx = np.array([row[sid] for sid in ids], dtype=np.int64)
        arrays = {k: getattr(self, k)[idx] for k in _ARRAYS}
        return Truth(path=self.path, ids=list(ids), **arrays)


_ARRAYS = ("family", "v_top", "v_bottom", "trend_power", "floor", "h", "body")
_DTYPES = {
    "v_top": np.float32,
    "v_bottom": np.float32,
    "trend_power": np.float32,
    "floor": np.int16,
    "h": np.float32,
    "body": np.uint8,
}
_SHAPES = {"floor": (NX,), "h": (NX,), "body": (NX, _PACKED)}  # per row, after n


def make_truth(path: Path, ids: list[str], rows: dict[str, list]) -> Truth:
    """A :class:`Truth` from per-sample values (``rows``: array name -> one value per id)."""
    arrays = {"family": np.array([str(f) for f in rows["family"]], dtype=str)}
    for key, dtype in _DTYPES.items():
        arrays[key] = np.asarray(rows[key], dtype=dtype).reshape(len(ids), *_SHAPES.get(key, ()))
    return Truth(path=Path(path), ids=list(ids), **arrays)


def save_truth(truth: Truth, path: Path | None = None) -> Path:
    """Write ``truth`` (to ``path``, default ``truth.path``) atomically, compressed."""
    path = Path(path or truth.path)
    arrays = {k: getattr(truth, k) for k in _ARRAYS}
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, ids=np.array(truth.ids, dtype=str), **arrays)
    return path


def load_truth(path: str | Path, what: str = "structure figures") -> Truth | None:
    """The truth file at ``path``; None, with one logged line, when there is none (real data).
    A file that is not a truth file is a data error naming it."""
    path = Path(path)
    if not path.is_file():
        log.info("no truth file %s (real data?): %s not available", path.name, what)
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("ids", *_ARRAYS)}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable truth file ({exc})") from exc
    n = len(arrays["ids"])
    for key, shape in _SHAPES.items():
        if arrays[key].shape != (n, *shape):
            raise DataError(f"{path}: '{key}' has shape {arrays[key].shape}, want {(n, *shape)}")
    if any(len(arrays[k]) != n for k in _ARRAYS):
        raise DataError(f"{path}: arrays of different lengths")
    ids = [str(s) for s in arrays.pop("ids")]
    return Truth(path=path, ids=ids, **arrays)
