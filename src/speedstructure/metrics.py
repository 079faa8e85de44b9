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


# --------------------------------------------------------------------------- structure


WATER_TOLERANCE = 0.05  # km/s: a cell is "faster than water" above water velocity + this


def lateral_deviation(v: np.ndarray) -> np.ndarray:
    """``v`` minus its mean over x at each depth: velocity models ``(..., 300, 1259)``."""
    v = np.asarray(v, dtype=np.float64)
    return v - v.mean(axis=-2, keepdims=True)


def lateral_r2(pred: np.ndarray, truth: np.ndarray) -> float:
    """The lateral-structure score ``1 - sum (d(pred) - d(truth))^2 / sum d(truth)^2`` over all
    samples given, with ``d`` = :func:`lateral_deviation`: 0 for a laterally flat prediction,
    1 for a perfect one (NaN when the truth itself is laterally flat)."""
    dt = lateral_deviation(truth)
    denom = float((dt**2).sum())
    if denom == 0.0:
        return float("nan")
    return 1.0 - float(((lateral_deviation(pred) - dt) ** 2).sum()) / denom


LATERAL_FLOOR = 1e-4  # (km/s)^2: keeps lateral_loss finite on laterally flat truths


def lateral_loss(pred: Any, truth: Any) -> Any:
    """The lateral-structure training term: ``mean (d(pred) - d(truth))^2`` over the batch
    divided by ``mean d(truth)^2 + LATERAL_FLOOR``, with ``d`` the deviation from each depth
    row's mean over x.  For numpy inputs and a truth with lateral structure it is
    ``1 - lateral_r2`` (up to the floor); for torch inputs a float32 0-d tensor to add to
    MAPE (``train.lateral_weight``): plain MAPE drowns the lateral part, which carries a few
    percent of the velocity."""
    if isinstance(pred, np.ndarray) or isinstance(truth, np.ndarray):
        dp, dt = lateral_deviation(pred), lateral_deviation(truth)
        return float(((dp - dt) ** 2).mean() / ((dt**2).mean() + LATERAL_FLOOR))
    pred, truth = pred.float(), truth.float()
    dp = pred - pred.mean(dim=-2, keepdim=True)
    dt = truth - truth.mean(dim=-2, keepdim=True)
    return ((dp - dt) ** 2).mean() / ((dt**2).mean() + LATERAL_FLOOR)


def laterally_constant_oracle(truth: np.ndarray) -> np.ndarray:
    """Each depth row of the truth replaced by its mean over x: the best laterally flat model."""
    truth = np.asarray(truth)
    return np.broadcast_to(truth.mean(axis=-2, keepdims=True), truth.shape).astype(truth.dtype)


def water_floor_depth(v: np.ndarray, water_velocity: float) -> np.ndarray:
    """Per column, the depth (cells = m) of the first cell faster than water
    (``> water_velocity + WATER_TOLERANCE``); the model's depth (1259) where there is none."""
    faster = np.asarray(v) > water_velocity + WATER_TOLERANCE
    depth = np.argmax(faster, axis=-1)
    return np.where(faster.any(axis=-1), depth, faster.shape[-1])


def water_floor_error(pred: np.ndarray, truth: np.ndarray, water_velocity: float) -> Any:
    """Mean absolute water-floor depth error in metres, per sample ``(N,)`` for batches
    ``(N, 300, 1259)`` (a float for one model)."""
    err = np.abs(water_floor_depth(pred, water_velocity) - water_floor_depth(truth, water_velocity))
    return err.mean(axis=-1)


def mean_below_floor(v: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """The velocity level: the mean of the cells at or below the water floor, per sample
    ``(N,)`` for models ``(N, 300, 1259)`` and floors ``(N, 300)`` (the first sediment cell
    of each column); NaN for a sample without such cells."""
    v = np.asarray(v)
    z = np.arange(v.shape[-1])
    out = np.full(len(v), np.nan)
    for i, (model, fl) in enumerate(zip(v, np.asarray(floor), strict=True)):
        below = z[None, :] >= fl[:, None]
        if below.any():
            out[i] = float(model[below].mean(dtype=np.float64))
    return out


def high_velocity_iou(pred: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Intersection over union of the cells faster than ``threshold`` (km/s) in one predicted
    and one true model: 1 when they coincide, 0 when they do not overlap; NaN when neither
    has such a cell."""
    p = np.asarray(pred) > threshold
    t = np.asarray(truth) > threshold
    union = int((p | t).sum())
    return float((p & t).sum()) / union if union else float("nan")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two series; NaN for fewer than two values or a constant one."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0.0 or b.std() == 0.0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
