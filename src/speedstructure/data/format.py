"""The challenge's sample format, and reading one array of it safely.

The geometry (five sources, 31 receivers, 10001 time samples; velocity models of 300 x 1259
cells in km/s), the member names, and :func:`read_npy`: an ``.npy`` member read header first
(the size its header declares must match the member's size before any data are inflated),
never unpickled, then checked (shape, dtype, finiteness, velocities within the challenge's
range).  Anything wrong raises :class:`~speedstructure.errors.DataError` naming the file.
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from speedstructure.config.schema import V_MAX, V_MIN
from speedstructure.errors import DataError

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


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
