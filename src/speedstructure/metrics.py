"""The challenge metric, MAPE, in one place: used by training, tuning and evaluation.

Per cell the relative error is ``|truth - pred| / (|truth| + EPS)``; a sample's MAPE
is its mean over the (300, 1259) cells and a set's MAPE the mean over samples.  The
functions take numpy arrays or torch tensors alike (no torch import here).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-8  # the metric's denominator guard


def relative_error(pred: Any, truth: Any) -> Any:
    """Per cell ``|truth - pred| / (|truth| + EPS)``, in the inputs' dtype."""
    return abs(truth - pred) / (abs(truth) + EPS)


def per_sample_mape(pred: Any, truth: Any) -> Any:
    """MAPE of each sample of a batch ``(B, ...)``: a tensor ``(B,)`` in float32 for torch
    inputs, a float64 array ``(B,)`` for numpy inputs."""
    if isinstance(pred, np.ndarray) or isinstance(truth, np.ndarray):
        err = relative_error(np.asarray(pred), np.asarray(truth))
        return err.reshape(err.shape[0], -1).mean(axis=1, dtype=np.float64)
    return relative_error(pred.float(), truth.float()).flatten(1).mean(1)


def mape(pred: Any, truth: Any) -> Any:
    """Mean per-sample MAPE of a batch (a 0-d tensor for torch inputs, a float for numpy)."""
    m = per_sample_mape(pred, truth)
    return float(m.mean()) if isinstance(m, np.ndarray) else m.mean()
