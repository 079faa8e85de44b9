"""Writing the challenge submission: one ``.npz`` of velocity models.

A submission holds exactly one array per test sample, keyed by its 18-character
sample id: float64, shape (300, 1259), finite, velocities in km/s within
``[v_min, v_max]`` (default: ``V_MIN`` to ``V_MAX`` of :mod:`speedstructure.config.schema`).

:class:`SubmissionWriter` streams the arrays into the archive in one pass: each
``<id>.npy`` member is written once, straight into the temporary file of
:func:`speedstructure.fsutil.atomic_output` beside the target, which is renamed
over the target only when everything went well.  The archive is what
:func:`numpy.savez` makes (a zip of ``.npy`` members), so ``np.load`` reads it.

    >>> with SubmissionWriter("submission.npz") as sw:
    ...     for sid, vp in predictions:
    ...         sw.add(sid, vp)
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from speedstructure.config.schema import V_MAX, V_MIN
from speedstructure.data.format import (
    SAMPLE_ID_RE,
    VP_SHAPE,
    first_line,
)
from speedstructure.data.samples import ZIP_EPOCH
from speedstructure.errors import DataError, WriteError
from speedstructure.fsutil import atomic_output

V_MIN_DEFAULT = V_MIN
V_MAX_DEFAULT = V_MAX
SUBMISSION_DTYPE = np.dtype(np.float64)
NPY_SUFFIX = ".npy"

_COMPRESSION = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED}


def _compression(value: str | int) -> int:
    if isinstance(value, str):
        try:
            return _COMPRESSION[value.lower()]
        except KeyError:
            raise ValueError(
                f"compression {value!r}: expected one of {sorted(_COMPRESSION)}"
            ) from None
    if value not in _COMPRESSION.values():
        raise ValueError(
            f"compression {value!r}: expected zipfile.ZIP_STORED or zipfile.ZIP_DEFLATED"
        )
    return int(value)


def _open_temp(path: Path):
    """Opens the temp file the archive is written into (a hook the tests wrap to count bytes)."""
    return open(path, "x+b")


class SubmissionWriter:
    """Streams velocity models into a submission ``.npz`` in a single pass.

    Each :meth:`add` converts the array to float64 (C order), checks it, and
    writes it as one ``<sample_id>.npy`` member; nothing already written is
    ever rewritten, so the I/O is linear in the number of samples.  The archive
    is built in the temporary file of :func:`~speedstructure.fsutil.atomic_output`
    and moved onto ``path`` when the ``with`` block ends without an exception
    (:meth:`commit`); on an exception (:meth:`abort`) the temporary is deleted and
    ``path`` is left as it was.

    ``compression`` is ``"stored"`` (default, like ``np.savez``) or
    ``"deflated"``.  ``dtype`` is the members' type (float64, the challenge's; the
    uncertainty file beside the submission is float32).  With ``v_range=(lo, hi)``,
    arrays with values outside it are refused too.  Members carry a fixed
    timestamp, so equal inputs give byte-identical files.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        compression: str | int = "stored",
        compresslevel: int | None = None,
        v_range: tuple[float, float] | None = None,
        dtype: np.dtype | type = SUBMISSION_DTYPE,
    ):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._compression = _compression(compression)
        self._compresslevel = compresslevel
        self.v_range = None if v_range is None else (float(v_range[0]), float(v_range[1]))
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._state = "open"  # open -> committed | aborted | failed
        self._output = contextlib.ExitStack()  # holds atomic_output until commit or abort
        self._tmp = self._output.enter_context(atomic_output(self.path))
        try:
            self._fh = _open_temp(self._tmp)
        except BaseException:
            self._discard()
            raise
        try:
            self._zf = zipfile.ZipFile(
                self._fh,
                "w",
                compression=self._compression,
                compresslevel=compresslevel,
                allowZip64=True,
            )
        except BaseException:
            self._fh.close()
            self._discard()
            raise

    def _discard(self) -> None:
        """Leave ``atomic_output`` by its failure path: the temporary is removed."""
        exc = RuntimeError(f"{self.path}: submission not committed")
        self._output.__exit__(type(exc), exc, None)

    @property
    def sample_ids(self) -> list[str]:
        """Ids written so far, in order."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __enter__(self) -> SubmissionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _prepare(self, sample_id: str, array) -> np.ndarray:
        where = f"{self.path}: sample '{sample_id}'"
        if not isinstance(sample_id, str) or not SAMPLE_ID_RE.match(sample_id):
            raise DataError(
                f"{self.path}: bad sample id {sample_id!r} (expected 18 letters or digits)"
            )
        if sample_id in self._seen:
            raise DataError(f"{where}: added twice")
        try:
            arr = np.ascontiguousarray(array, dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{where}: cannot be converted to {self.dtype} ({first_line(exc)})"
            ) from exc
        if arr.shape != VP_SHAPE:
            raise DataError(f"{where}: shape {arr.shape}, expected {VP_SHAPE}")
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum()) - n_nan
            raise DataError(f"{where}: {n_nan} NaN and {n_inf} infinite values")
        if self.v_range is not None:
            lo, hi = self.v_range
            vmin, vmax = float(arr.min()), float(arr.max())
            if vmin < lo or vmax > hi:
                raise DataError(
                    f"{where}: values span [{vmin:.6g}, {vmax:.6g}], outside [{lo:g}, {hi:g}]"
                )
        return arr

    def add(self, sample_id: str, array) -> None:
        """Checks ``array`` and writes it as member ``<sample_id>.npy``.

        Raises :class:`DataError` (a ``ValueError``) for a malformed id, a
        duplicate id, a shape other than (300, 1259), non-finite values, or
        (with ``v_range``) values out of range; nothing is written then and the
        writer stays usable.
        """
        if self._state != "open":
            raise RuntimeError(
                f"{self.path}: submission writer is {self._state}; cannot add '{sample_id}'"
            )
        arr = self._prepare(sample_id, array)
        info = zipfile.ZipInfo(sample_id + NPY_SUFFIX, date_time=ZIP_EPOCH)
        info.compress_type = self._compression
        if self._compresslevel is not None:
            info.compress_level = self._compresslevel
        info.external_attr = 0o644 << 16
        try:
            with self._zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)
        except OSError as exc:  # disk full, ...: one line naming the submission
            self._state = "failed"
            raise WriteError(self.path, exc) from exc
        except BaseException:
            self._state = "failed"  # the archive's state is unknown: only abort() is left
            raise
        self._seen.add(sample_id)
        self._ids.append(sample_id)

    def commit(self) -> Path:
        """Finishes the archive and moves it onto ``path``; returns ``path``."""
        if self._state == "committed":
            return self.path
        if self._state != "open":
            self.abort()
            raise RuntimeError(
                f"{self.path}: submission writer is {self._state}; nothing was written"
            )
        try:
            self._zf.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._output.close()  # atomic_output renames the temporary onto path
        except WriteError:
            self.abort()
            raise
        except OSError as exc:  # disk full while finishing the archive
            self.abort()
            raise WriteError(self.path, exc) from exc
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self.path

    def abort(self) -> None:
        """Drops the partial archive; ``path`` is left untouched."""
        if self._state == "committed":
            return
        if self._state == "open":
            self._state = "aborted"
        try:
            self._zf.close()
        except Exception:
            pass  # a half-written member can make close() fail; the file is deleted anyway
        finally:
            self._fh.close()
            self._discard()


def write_submission(
    path: str | os.PathLike,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    compression: str | int = "stored",
    v_range: tuple[float, float] | None = None,
) -> Path:
    """Writes ``(sample_id, velocity)`` pairs to a submission ``.npz`` in one pass.

    Returns its path.
    """
    with SubmissionWriter(path, compression=compression, v_range=v_range) as sw:
        for sample_id, array in items:
            sw.add(sample_id, array)
    return sw.path
