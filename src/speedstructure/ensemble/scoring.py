"""MAPE of weighted ensembles, fast enough for hundreds of Optuna trials (:class:`Scorer`).

The members' predictions of one fold are held once; a trial's weights are scored chunk by
chunk (``CHUNK_CELLS`` cells per working buffer) without forming the weighted ensemble in
full.  :func:`weighted_mape` is the one-call form.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from speedstructure.errors import UserError
from speedstructure.metrics import EPS

log = logging.getLogger(__name__)


class TuneError(UserError, ValueError):
    """Bad input to the tuning core (shapes, weights, too few samples, stale study)."""


CHUNK_CELLS = 4_000_000  # cells per working buffer (float32: 16 MB)


# --------------------------------------------------------------------------- scoring


class Scorer:
    """MAPE of weighted ensembles of fixed predictions, cheap to evaluate repeatedly.

    ``preds`` (M, N, *S) of any float dtype, ``targets`` (N, *S).  The signed
    relative errors ``d_m = (p_m - g) / (|g| + EPS)`` are computed once in
    float32 (chunk by chunk, no float64 copies); for weights summing to 1,
    ``|g - sum_m w_m p_m| / (|g| + EPS) = |sum_m w_m d_m|`` (the metric of
    :mod:`speedstructure.metrics`), so a trial costs M multiply-adds per cell.
    """

    def __init__(self, preds: np.ndarray, targets: np.ndarray, *, chunk_cells: int = CHUNK_CELLS):
        preds, targets = np.asarray(preds), np.asarray(targets)
        if preds.ndim < 2 or preds.shape[1:] != targets.shape:
            raise TuneError(
                f"predictions {preds.shape} do not match targets {targets.shape}: "
                "expected (M, *targets.shape)"
            )
        m, n = preds.shape[:2]
        if m < 1 or n < 1:
            raise TuneError(
                f"need at least one member and one sample, got predictions {preds.shape}"
            )
        cells = int(np.prod(targets.shape[1:], dtype=np.int64))
        if cells < 1:
            raise TuneError(f"targets {targets.shape} have no cells")
        self.n_members, self.n_samples, self.n_cells = m, n, cells
        self._chunk = max(1, int(chunk_cells) // cells)
        self._rel = np.empty((m, n, cells), np.float32)
        self._fingerprints: dict[bytes, str] = {}
        self._fill(preds.reshape(m, n, cells), targets.reshape(n, cells))

    def _fill(self, p: np.ndarray, g: np.ndarray) -> None:
        """The signed relative errors, chunk by chunk."""
        m, n = self.n_members, self.n_samples
        for s in range(0, n, self._chunk):
            e = min(n, s + self._chunk)
            t = g[s:e].astype(np.float32, copy=False)
            inv = np.abs(t)
            inv += np.float32(EPS)
            np.reciprocal(inv, out=inv)
            for k in range(m):
                out = self._rel[k, s:e]
                np.subtract(p[k, s:e], t, out=out, dtype=np.float32, casting="same_kind")
                out *= inv
                if not np.isfinite(out).all():
                    raise TuneError(
                        f"member {k}: predictions or targets of samples {s}..{e - 1} are not finite"
                    )

    # -- helpers
    def rows(self, idx: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``idx`` as a checked 1-D index array (all samples when ``None``)."""
        if idx is None:
            return np.arange(self.n_samples, dtype=np.intp)
        rows = np.asarray(idx, dtype=np.intp).reshape(-1)
        if rows.size == 0:
            raise TuneError("empty sample selection")
        if rows.min() < 0 or rows.max() >= self.n_samples:
            raise TuneError(f"sample index out of range 0..{self.n_samples - 1}")
        return rows

    def check_weights(self, weights) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != (self.n_members,):
            raise TuneError(f"{w.size} weights for {self.n_members} members")
        if not np.isfinite(w).all() or (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
            raise TuneError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
        return w

    # -- metric
    def per_sample(self, weights, idx=None) -> np.ndarray:
        """MAPE of the weighted ensemble for each selected sample (float64 (n,))."""
        w = self.check_weights(weights)
        rows = self.rows(idx)
        active = [(k, np.float32(w[k])) for k in range(self.n_members) if w[k] > 0]
        out = np.empty(rows.size, np.float64)
        ch = min(self._chunk, rows.size)
        buf = np.empty((ch, self.n_cells), np.float32)
        tmp = np.empty_like(buf) if len(active) > 1 else None
        for s in range(0, rows.size, ch):
            sel = rows[s : s + ch]
            b = buf[: sel.size]
            contiguous = _is_range(sel)
            for j, (k, wk) in enumerate(active):
                dst = b if j == 0 else tmp[: sel.size]
                if contiguous:
                    np.multiply(self._rel[k, sel[0] : sel[0] + sel.size], wk, out=dst)
                else:
                    np.take(self._rel[k], sel, axis=0, out=dst)
                    dst *= wk
                if j:
                    b += dst
            np.abs(b, out=b)
            out[s : s + sel.size] = b.sum(axis=1, dtype=np.float64) / self.n_cells
        return out

    def __call__(self, weights, idx=None) -> float:
        """Mean per-sample MAPE of the weighted ensemble over the selected samples."""
        return float(self.per_sample(weights, idx).mean())

    def member_mapes(self, idx=None) -> np.ndarray:
        """MAPE of each member alone, float64 (M,)."""
        eye = np.eye(self.n_members)
        return np.array([self(eye[k], idx) for k in range(self.n_members)])

    def fingerprint(self, idx=None, names: Sequence[str] = ()) -> str:
        """Hash of the objective (relative errors of the selected samples, member names)."""
        rows = self.rows(idx)
        key = rows.tobytes() + "\0".join(names).encode()
        if key not in self._fingerprints:
            h = hashlib.blake2b(digest_size=16)
            h.update(key)
            for k in range(self.n_members):
                for s in range(0, rows.size, self._chunk):
                    h.update(np.ascontiguousarray(self._rel[k, rows[s : s + self._chunk]]).data)
            self._fingerprints[key] = h.hexdigest()
        return self._fingerprints[key]


def _is_range(rows: np.ndarray) -> bool:
    return (
        rows.size > 0
        and int(rows[-1]) - int(rows[0]) == rows.size - 1
        and bool((np.diff(rows) == 1).all())
    )


def as_scorer(preds, targets) -> Scorer:
    if isinstance(preds, Scorer):
        if targets is not None:
            raise TuneError("pass targets=None together with a prepared Scorer")
        return preds
    if targets is None:
        raise TuneError("targets are required")
    return Scorer(preds, targets)


def weighted_mape(preds: np.ndarray, targets: np.ndarray, weights) -> float:
    """Mean per-sample MAPE of ``sum_m weights[m] * preds[m]`` against ``targets``.

    ``preds`` (M, N, *S), ``targets`` (N, *S), ``weights`` (M,) on the simplex.
    For repeated evaluation on the same data build a :class:`Scorer` once.
    """
    return as_scorer(preds, targets)(weights)
