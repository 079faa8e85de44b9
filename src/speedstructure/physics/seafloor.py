"""The water floor read from the gathers: the sea-floor reflection's two-way time, in metres.

Above the water floor every velocity model is water, so until the sea-floor reflection
arrives every sample records the same wavefield: the direct wave of a water-only model.
:func:`pick_floor` keeps that direct wave out of the pick in one of two ways (``method``,
:data:`METHODS`):

* ``record`` (the default): each trace is muted until ``GUARD_S`` after its direct wave's
  peak, timed on the record itself (:func:`record_delay`: the peak on the three traces within
  ``NEAR_M`` of their source, minus the straight-ray time), and a pick must reach
  ``MIN_REFLECTION`` of the trace's direct peak.  Nothing is simulated, so the pick does not
  depend on the data having been made by this project's simulator;
* ``simulated``: the water-only wavefield simulated once with the project's simulator
  (:mod:`speedstructure.physics.simulate`, ``sim``) is subtracted, and the wavelet delay is
  measured on it.  Any difference between that simulation and the data's (another grid,
  calibration or time convention) stays in the residual, where it can outweigh the reflection.

Then, on each near-offset trace (source-receiver offset <= ``MAX_OFFSET_M``), the first positive
lobe of what remains (the reflection off a faster floor has the source wavelet's polarity) is
converted to a depth at the source-receiver midpoint (straight rays in water over a locally
flat floor), and each column takes the median of the picks whose midpoints lie within
``HALF_WINDOW_M``.  Nothing is fitted on labels.  :func:`impose_floor` moves each column of a
predicted model vertically so that its water floor lies at the picked depth and sets water
above it.  A :class:`FloorPicker` holds the simulator's settings, the water velocity of
``params.yaml``'s ``synth:`` section and the method, and applies both steps to a batch.

On the embedded synthetic set the picks are within about 2 m of the truth on average with
either method; on gathers simulated on a 1 m grid with a 0.1 ms step (``speedstructure bench
simulator``) only ``record`` stays there (README, "Models and training").  The variants opt in
with ``floor: picked``.  Limits: the first arrival comes from the nearest point of the floor,
so a strongly curved syncline (tens of metres of relief over a few hundred metres) is picked
too shallow at its bottom; ``record`` needs the floor deeper than about 75 m (its reflection
``GUARD_S`` after the direct wave on the near offsets); the data must carry the challenge's
acquisition and a wavelet whose direct wave has passed ``GUARD_S`` after its peak.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from speedstructure.config.schema import SimParams, SynthConfig
from speedstructure.config.typed import as_plain, build
from speedstructure.data.format import NX, NZ
from speedstructure.errors import UserError

log = logging.getLogger(__name__)

THRESHOLD = 0.2  # a trace's first sample above this fraction of its positive maximum ...
WINDOW_S = 0.03  # ... starts the window in which the lobe's peak is taken
MAX_OFFSET_M = 150.0  # near offsets only: the flat-floor approximation holds best there
HALF_WINDOW_M = 20.0  # picks whose midpoint lies this close to a column vote for it
MIN_PICKS = 3  # a column with fewer votes keeps the predicted floor
EARLY_S = 0.1  # s: before the earliest sea-floor reflection (floor >= 75 m), only the direct wave
GUARD_S = 0.04  # record: the pick starts this long after the direct wave's peak (floor >= ~75 m)
MIN_REFLECTION = 0.002  # record: a pick's lobe reaches this fraction of its trace's direct peak
NEAR_M = 1.0  # record: the delay is timed on the traces this close to their source (3 of them)
VELOCITY_OFFSET_M = 60.0  # seafloor_velocity: the traces this close to their source
MAX_COEFFICIENT = 0.5  # seafloor_velocity: R at most this (3x the water velocity)
METHODS = ("record", "simulated")  # how the direct wave is kept out of the pick
DEFAULT_METHOD = "record"


@dataclass(frozen=True)
class FloorPicker:
    """The physics a floor pick rests on: the simulator's settings (``synth.sim``) and the
    water velocity in km/s (``synth.water_velocity``) the gathers were made with.

    A model with ``floor: picked`` holds one (:func:`speedstructure.models.build.build_model`)
    and its checkpoint records it (:meth:`record`), so a registered model picks floors as it
    was trained to, wherever it runs."""

    sim: SimParams
    water_velocity: float
    method: str = DEFAULT_METHOD  # how :func:`pick_floor` keeps the direct wave out

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"floor picking method {self.method!r}: expected one of {METHODS}")

    @classmethod
    def from_synth(cls, synth: SynthConfig) -> FloorPicker:
        return cls(synth.sim, float(synth.water_velocity))

    def record(self) -> dict[str, Any]:
        return {
            "sim": as_plain(self.sim),
            "water_velocity": self.water_velocity,
            "method": self.method,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], where: str) -> FloorPicker:
        """The picker a checkpoint recorded (one recorded before ``method`` existed picks
        with :data:`DEFAULT_METHOD`)."""
        sim = build(SimParams, rec.get("sim", {}), f"{where}: floor_picker.sim")
        method = str(rec.get("method", DEFAULT_METHOD))
        if method not in METHODS:
            raise UserError(f"{where}: floor_picker.method {method!r}: expected one of {METHODS}")
        return cls(sim, float(rec["water_velocity"]), method)

    def __call__(self, preds: np.ndarray, gathers: np.ndarray) -> np.ndarray:
        """A batch of predictions ``(B, 300, 1259)`` with the water floor picked from each
        sample's gathers ``(B, 5, 10001, 31)`` imposed."""
        out = np.empty_like(preds)
        for i, (p, g) in enumerate(zip(preds, gathers, strict=True)):
            floor = pick_floor(g, self.sim, self.water_velocity, self.method)
            if not np.isfinite(floor).any():
                log.warning("no sea-floor reflection picked in sample %d of the batch: kept", i)
            out[i] = impose_floor(p, floor, self.water_velocity)
        return out


@functools.lru_cache(maxsize=4)
def water_response(sim: SimParams, water_velocity: float) -> tuple[np.ndarray, float]:
    """The five gathers of a water-only model ``(5, 10001, 31)`` float64 and the wavelet delay
    in seconds (direct-wave peak time minus the straight-ray time at the nearest receiver)."""
    from speedstructure.physics.simulate import RECEIVER_DEPTH_M, SOURCE_DEPTH_M, Simulator

    simulator = Simulator(sim)
    direct = simulator(np.full((NX, NZ), water_velocity, np.float32)).astype(np.float64)
    peak = int(np.argmax(direct[0, :, 0]))  # source at x = 0 m, receiver at x = 0 m
    distance = SOURCE_DEPTH_M - RECEIVER_DEPTH_M
    delay = peak * simulator.cfg.record_dt - distance / (water_velocity * 1000.0)
    return direct, delay


def trace_geometry() -> tuple[np.ndarray, np.ndarray, float]:
    """Source-receiver midpoints and offsets ``(5, 31)`` in metres, and the depth sum
    ``z_source + z_receiver``."""
    from speedstructure.physics.simulate import (
        RECEIVER_DEPTH_M,
        RECEIVER_X_M,
        SOURCE_DEPTH_M,
        SOURCE_X_M,
    )

    xs = np.asarray(SOURCE_X_M)[:, None]
    xr = np.asarray(RECEIVER_X_M)[None, :]
    return (xs + xr) / 2.0, np.abs(xr - xs), SOURCE_DEPTH_M + RECEIVER_DEPTH_M


def _lobes(residual: np.ndarray, record_dt: float, level: Any = 0.0):
    """Per trace ``(5, 31)``, the time (s) of the first positive lobe's peak of
    ``residual (5, T, 31)`` and that peak's value; NaN where a trace has no sample above
    ``level`` (per trace)."""
    tr = np.moveaxis(residual, 1, -1)  # (5, 31, T)
    top = tr.max(axis=-1, keepdims=True)
    start = np.argmax(tr > THRESHOLD * top, axis=-1)  # (5, 31)
    width = max(1, int(round(WINDOW_S / record_dt)))
    idx = np.minimum(start[..., None] + np.arange(width), tr.shape[-1] - 1)
    peak = start + np.argmax(np.take_along_axis(tr, idx, axis=-1), axis=-1)
    found = top[..., 0] > level
    value = np.take_along_axis(tr, peak[..., None], axis=-1)[..., 0]
    return np.where(found, peak * record_dt, np.nan), np.where(found, value, np.nan)


def oriented_direct_wave(gathers: np.ndarray, direct: np.ndarray, record_dt: float) -> np.ndarray:
    """The water-only wavefield of ``gathers``' orientation: ``direct`` as simulated, or its
    mirror image (receivers and source order reversed, the consistent flip) for gathers that
    were flipped so; whichever leaves less energy before ``EARLY_S``, where only the direct
    wave has arrived.  (The mirrored sources sit 1 m from the simulated ones, enough to leave
    a residual far larger than the sea-floor reflection.)"""
    early = max(1, int(round(EARLY_S / record_dt)))
    mirrored = direct[::-1, :, ::-1]
    plain_left = np.square(gathers[:, :early] - direct[:, :early]).sum()
    mirrored_left = np.square(gathers[:, :early] - mirrored[:, :early]).sum()
    return mirrored if mirrored_left < plain_left else direct


def _straight_ray_times(water_velocity: float) -> np.ndarray:
    """Per trace ``(5, 31)``, the direct wave's straight-ray travel time in seconds."""
    from speedstructure.physics.simulate import RECEIVER_DEPTH_M, SOURCE_DEPTH_M

    _, offset, _ = trace_geometry()
    distance = np.hypot(offset, SOURCE_DEPTH_M - RECEIVER_DEPTH_M)
    return distance / (water_velocity * 1000.0)


def record_delay(gathers: np.ndarray, record_dt: float, water_velocity: float) -> float:
    """The wavelet delay in seconds measured on the record itself: on the traces within
    ``NEAR_M`` of their source, the direct wave's peak time (the largest sample in the first
    ``EARLY_S`` after the straight-ray time) minus the straight-ray time; their median."""
    _, offset, _ = trace_geometry()
    ray = _straight_ray_times(water_velocity)
    near = np.flatnonzero((offset <= NEAR_M).ravel())
    tr = np.moveaxis(np.asarray(gathers), 1, -1).reshape(-1, np.shape(gathers)[1])[near]
    early = max(1, int(round(EARLY_S / record_dt)))
    delays = []
    for trace, t0 in zip(tr, ray.ravel()[near], strict=True):
        start = int(round(t0 / record_dt))
        delays.append((start + int(np.argmax(trace[start : start + early]))) * record_dt - t0)
    return float(np.median(delays))


def _muted(gathers: np.ndarray, delay: float, record_dt: float, water_velocity: float):
    """``gathers`` with each trace zeroed until ``GUARD_S`` after its direct wave's peak."""
    ray = _straight_ray_times(water_velocity)
    end = np.round((ray + delay + GUARD_S) / record_dt).astype(int)  # (5, 31)
    t = np.arange(gathers.shape[1])[None, :, None]
    return np.where(t < end[:, None, :], 0.0, gathers)


def _reflection(g: np.ndarray, sim: SimParams, water_velocity: float, method: str):
    """``(times, peaks, delay)``: per trace ``(5, 31)`` of gathers ``g`` (float64), the
    sea-floor reflection's arrival time (s, the wavelet delay removed) and its peak value, NaN
    where there is none, and that delay (s); the direct wave is kept out as
    :func:`pick_floor` describes."""
    if method == "record":
        delay = record_delay(g, sim.record_dt, water_velocity)
        residual = _muted(g, delay, sim.record_dt, water_velocity)
        level = MIN_REFLECTION * np.abs(g).max(axis=1)  # (5, 31): of each trace's direct wave
    elif method == "simulated":
        direct, delay = water_response(sim, water_velocity)
        residual = g - oriented_direct_wave(g, direct, sim.record_dt)
        level = 0.0
    else:
        raise ValueError(f"floor picking method {method!r}: expected one of {METHODS}")
    times, peaks = _lobes(residual, sim.record_dt, level)
    return times - delay, peaks, delay


def pick_floor(
    gathers: np.ndarray, sim: SimParams, water_velocity: float, method: str = DEFAULT_METHOD
) -> np.ndarray:
    """Water-floor depth per column ``(300,)`` in metres (NaN where fewer than
    ``MIN_PICKS`` near-offset picks vote) for one sample's gathers ``(5, 10001, 31)``, as
    recorded or mirrored by the consistent flip (the pick is then the mirrored floor).

    ``method`` (:data:`METHODS`): ``record`` mutes each trace until ``GUARD_S`` after its
    direct wave's peak, timed on the record (:func:`record_delay`); ``simulated`` subtracts
    the water-only wavefield simulated with ``sim`` (:func:`water_response`)."""
    times, _, _ = _reflection(np.asarray(gathers, np.float64), sim, water_velocity, method)
    return _floor_from_times(times, water_velocity)


def seafloor_velocity(
    gathers: np.ndarray, sim: SimParams, water_velocity: float, method: str = DEFAULT_METHOD
) -> float:
    """The velocity just under the water floor (km/s) read from the sea-floor reflection's
    strength; NaN where no trace within ``VELOCITY_OFFSET_M`` of its source has a pick.

    On each such trace the reflection's peak (the lobe :func:`pick_floor` times) over the
    direct wave's peak, times ``sqrt(reflected path / direct path)`` (2-D spreading), is the
    normal-incidence reflection coefficient ``R``; their median gives ``v = v_water (1 + R) /
    (1 - R)``, with ``R`` clipped to [0, ``MAX_COEFFICIENT``].  It assumes constant density, as
    the acoustic simulation does: where density rises with velocity ``R`` is larger and so is
    ``v``.  On the embedded set it follows the mean velocity of the first 30 m under the floor
    to a correlation of about 0.93 in distribution and 0.69 out of it
    (docs/models-and-training.md)."""
    g = np.asarray(gathers, np.float64)
    times, peaks, _ = _reflection(g, sim, water_velocity, method)
    return _velocity(g, times, peaks, water_velocity)


def read_seafloor(
    gathers: np.ndarray, sim: SimParams, water_velocity: float, method: str = DEFAULT_METHOD
) -> tuple[np.ndarray, float]:
    """:func:`pick_floor`'s floor and :func:`seafloor_velocity`'s velocity, from one pass."""
    return read_seafloor_picks(gathers, sim, water_velocity, method)[:2]


def read_seafloor_picks(
    gathers: np.ndarray, sim: SimParams, water_velocity: float, method: str = DEFAULT_METHOD
) -> tuple[np.ndarray, float, np.ndarray, float]:
    """:func:`read_seafloor`'s floor and velocity, and the picks they rest on: the
    reflection's time per trace ``(5, 31)`` (s, NaN where none) and the wavelet delay (s)
    taken off them (the peaks lie ``delay`` later in the record)."""
    g = np.asarray(gathers, np.float64)
    times, peaks, delay = _reflection(g, sim, water_velocity, method)
    floor = _floor_from_times(times, water_velocity)
    return floor, _velocity(g, times, peaks, water_velocity), times, delay


def _velocity(g: np.ndarray, times: np.ndarray, peaks: np.ndarray, water_velocity: float) -> float:
    """:func:`seafloor_velocity` from the gathers and their reflections' times and peaks."""
    from speedstructure.physics.simulate import RECEIVER_DEPTH_M, SOURCE_DEPTH_M

    _, offset, _ = trace_geometry()
    near = (offset <= VELOCITY_OFFSET_M) & np.isfinite(times)
    if not near.any():
        return float("nan")
    reflected_path = water_velocity * 1000.0 * times[near]
    direct_path = np.hypot(offset[near], SOURCE_DEPTH_M - RECEIVER_DEPTH_M)
    direct_peak = np.abs(g).max(axis=1)[near]
    r = peaks[near] / direct_peak * np.sqrt(reflected_path / direct_path)
    coefficient = float(np.clip(np.median(r), 0.0, MAX_COEFFICIENT))
    return water_velocity * (1.0 + coefficient) / (1.0 - coefficient)


def _floor_from_times(times: np.ndarray, water_velocity: float) -> np.ndarray:
    """Per column, the median depth of the reflection times ``(5, 31)`` (s) whose
    source-receiver midpoints lie within ``HALF_WINDOW_M`` (straight rays, flat floor)."""
    mid, offset, depth_sum = trace_geometry()
    path2 = (water_velocity * 1000.0 * times) ** 2 - offset**2
    ok = np.isfinite(path2) & (path2 > 0) & (offset <= MAX_OFFSET_M)
    depth = (np.sqrt(np.where(ok, path2, 0.0)) + depth_sum) / 2.0
    mid, depth = mid[ok], depth[ok]
    near = np.abs(mid[None, :] - np.arange(NX, dtype=np.float64)[:, None]) <= HALF_WINDOW_M
    votes = np.where(near, depth[None, :], np.nan)  # (300, picks)
    enough = near.sum(axis=1) >= MIN_PICKS
    floor = np.full(NX, np.nan)
    if enough.any():
        floor[enough] = np.nanmedian(votes[enough], axis=1)
    return floor


def impose_floor(pred: np.ndarray, floor: np.ndarray, water: float) -> np.ndarray:
    """``pred (300, 1259)`` with each column shifted vertically so its water floor (first cell
    faster than water, :func:`speedstructure.metrics.water_floor_depth`) lies at ``floor``
    (metres; NaN keeps the column), water above, the column's last cell repeated below."""
    from speedstructure.metrics import water_floor_depth

    out = np.array(pred, copy=True)
    predicted = water_floor_depth(out, water)
    z = np.arange(out.shape[-1])
    for x in np.flatnonzero(np.isfinite(floor)):
        target = int(np.clip(round(float(floor[x])), 0, out.shape[-1]))
        src = np.clip(z - (target - int(predicted[x])), 0, out.shape[-1] - 1)
        column = pred[x, src]
        column[:target] = water
        out[x] = column
    return out
