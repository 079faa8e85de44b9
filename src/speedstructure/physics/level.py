"""The velocity level read from the gathers: the near-offset reflections integrated from the floor.

Under constant density each reflection's coefficient is ``R = (v2 - v1) / (v2 + v1)``, so
``ln v`` at a time below the floor is ``ln v_floor + 2 * sum(R)`` of the reflections above it:
the running integral of a calibrated zero-offset trace carries the velocity's rise with depth.
The source wavelet has no energy below a few hertz, so the smooth part of the rise is only
partly there; a linear map fitted on the training set (:func:`fit_ridge`, a ridge regression;
:meth:`~speedstructure.models.column.ColumnNet.fit_level_reader`) turns what is there into the
mean velocity below the floor.  Unlike a network's own level it extrapolates with the physics:
on the demo's out-of-distribution set, whose sediments are faster than the training set's, it
follows the true level to a correlation of 0.64 where the ensemble's own level reached 0.29
(docs/models-and-training.md).

:func:`level_features` makes the read from one sample's gathers: on each shot's nearest
trace, the reflections left after the water-only wavefield is subtracted, divided by the
direct wave's peak and multiplied by ``sqrt(path / direct path)`` (2-D spreading, as
:func:`~speedstructure.physics.seafloor.seafloor_velocity` calibrates the floor's reflection),
taken from the sea-floor reflection's peak on for ``SPAN_S``, averaged to ``STEP_S``, summed
up, and averaged into ``WINDOWS`` windows; the five shots' integrals averaged.
"""

from __future__ import annotations

import numpy as np

from speedstructure.config.schema import SimParams

SPAN_S = 0.8  # s of record after the sea-floor reflection's peak
STEP_S = 0.002  # the trace is averaged to this step before it is integrated
WINDOWS = 100  # the integral's means over this many windows (8 ms each)
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))  # standardised features


def level_features(
    gathers: np.ndarray,
    direct: np.ndarray,
    delay: float,
    times: np.ndarray,
    sim: SimParams,
    water_velocity: float,
) -> np.ndarray:
    """``(WINDOWS,)`` float64: the calibrated near-offset reflections of ``gathers`` ``(5, T,
    31)`` (float64, as recorded) integrated from the sea-floor reflection down, the shots'
    mean; zeros where no shot's nearest trace has a floor pick.

    ``direct``: the water-only wavefield in the gathers' orientation (subtracted here);
    ``delay``: its wavelet delay (s); ``times``: the sea-floor reflection's arrival times per
    trace ``(5, 31)`` in s without the delay, NaN where none
    (:func:`~speedstructure.physics.seafloor.read_seafloor_picks`)."""
    from speedstructure.physics.seafloor import trace_geometry
    from speedstructure.physics.simulate import RECEIVER_DEPTH_M, SOURCE_DEPTH_M

    _, offset, _ = trace_geometry()
    dt = float(sim.record_dt)
    step = max(1, int(round(STEP_S / dt)))
    n = int(round(SPAN_S / STEP_S)) * step
    path = water_velocity * 1000.0 * np.maximum(np.arange(gathers.shape[1]) * dt - delay, dt)
    integrals = []
    for s in range(gathers.shape[0]):
        r = int(np.argmin(offset[s]))
        if not np.isfinite(times[s, r]):
            continue
        trace = gathers[s, :, r] - direct[s, :, r]
        direct_path = np.hypot(offset[s, r], SOURCE_DEPTH_M - RECEIVER_DEPTH_M)
        calibrated = trace / np.abs(direct[s, :, r]).max() * np.sqrt(path / direct_path)
        start = int(round((times[s, r] + delay) / dt))
        seg = np.zeros(n)
        m = max(0, min(n, len(calibrated) - start))
        seg[:m] = calibrated[start : start + m]
        integrals.append(integral_windows(seg.reshape(-1, step).mean(axis=1)))
    return np.mean(integrals, axis=0) if integrals else np.zeros(WINDOWS)


def integral_windows(trace: np.ndarray) -> np.ndarray:
    """``(WINDOWS,)``: a trace from the sea-floor reflection's peak on, ``SPAN_S`` at
    ``STEP_S``, summed up and averaged into :data:`WINDOWS` windows (the level read's features,
    and ``bench level``'s)."""
    return np.cumsum(trace).reshape(WINDOWS, -1).mean(axis=1)


def fit_ridge(features: np.ndarray, levels: np.ndarray) -> dict[str, np.ndarray]:
    """The ridge map from ``features`` ``(N, F)`` to ``levels`` ``(N,)`` (km/s), its penalty
    chosen by leave-one-out over :data:`RIDGE_ALPHAS` on standardised features: ``mean``,
    ``scale``, ``coef`` ``(F,)`` and ``intercept`` ``()``, float64."""
    from sklearn.linear_model import RidgeCV

    x, y = np.asarray(features, np.float64), np.asarray(levels, np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit((x - mean) / scale, y)
    return {
        "mean": mean,
        "scale": scale,
        "coef": np.asarray(ridge.coef_, np.float64),
        "intercept": np.asarray(ridge.intercept_, np.float64),
    }


def apply_ridge(fitted: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """The levels :func:`fit_ridge`'s map ``fitted`` gives ``features`` ``(N, F)``."""
    z = (np.asarray(features, np.float64) - fitted["mean"]) / fitted["scale"]
    return z @ fitted["coef"] + fitted["intercept"]
