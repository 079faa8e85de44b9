"""Physics consistency of a velocity model with its gathers: re-simulation and data misfit.

A predicted velocity model is re-simulated with the project's simulator
(:class:`~speedstructure.physics.simulate.Simulator`, the challenge's acquisition) and its
five shot gathers are compared with the observed ones.  The comparison runs at the
simulator's own output interval (``synth.sim.dt``, 0.5 ms): the delivered 0.1 ms gathers
hold the simulator's samples exactly at ``1 + up * j`` (the band-limited upsampling keeps
the original samples; the recording is delayed by one sample), so the observed gathers are
decimated (:func:`observed_at_sim_rate`) instead of the simulation being upsampled.

Both gathers go through the same preprocessing (:class:`Preprocess`):

* a mute of the direct arrival, identical for every model (water around sources and
  receivers): zero until ``offset / water velocity + mute_after`` seconds, then a
  raised-cosine ramp over ``taper`` seconds;
* a zero-phase low-pass (``lowpass_hz``, raised-cosine roll-off over ``rolloff_hz``): the
  kinematics of the reflections, less of their fine interference;
* an automatic gain control (``agc_window`` s, each trace divided by its own running RMS):
  late, weak reflections (the deep model) weigh as much as the water-floor reflection.

:func:`misfit` is the normalised L2 misfit ``sum (o - s)^2 / sum o^2`` of the preprocessed
gathers (0 for the true model) and :func:`trace_correlation` the mean per-trace Pearson
correlation (1 for the true model).  :class:`TorchForward` is the same simulation
differentiable in torch (the ``refine`` stage's full-waveform inversion,
:mod:`speedstructure.physics.fwi`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from speedstructure.config.schema import Params
from speedstructure.physics.simulate import (
    HICKS_HALFWIDTH,
    RECEIVER_DEPTH_M,
    RECEIVER_X_M,
    SOURCE_DEPTH_M,
    SOURCE_X_M,
    Simulator,
)


def n_compared(sim: Simulator) -> int:
    """Samples compared per trace: the delivered record at the simulator's interval."""
    return len(range(1, sim.cfg.n_time, sim.up))


def observed_at_sim_rate(gathers: np.ndarray, sim: Simulator) -> np.ndarray:
    """Observed gathers ``(5, n_time, 31)`` as float64 ``(5, 31, n)`` at the simulator's ``dt``."""
    g = np.asarray(gathers, dtype=np.float64).transpose(0, 2, 1)
    return np.ascontiguousarray(g[..., 1 :: sim.up][..., : n_compared(sim)])


def simulate_at_sim_rate(v: np.ndarray, sim: Simulator) -> np.ndarray:
    """The model's gathers as float64 ``(5, 31, n)`` at the simulator's ``dt`` (calibrated)."""
    raw = sim.raw(v).astype(np.float64) * (-1.0 / sim.cfg.dx**2)
    return raw[..., : n_compared(sim)]


def direct_arrival_times(water_velocity: float) -> np.ndarray:
    """Seconds ``(5, 31)``: source-receiver distance / water velocity in km/s (the direct
    arrival: sources and receivers are in the water)."""
    sx = np.asarray(SOURCE_X_M)[:, None]
    rx = np.asarray(RECEIVER_X_M)[None, :]
    dist = np.hypot(sx - rx, SOURCE_DEPTH_M - RECEIVER_DEPTH_M)
    return dist / (water_velocity * 1000.0)


@dataclass(frozen=True)
class Preprocess:
    """What both gathers go through before they are compared (see the module doc)."""

    dt: float  # s, the compared sampling (the simulator's output interval)
    n: int  # samples per trace
    water_velocity: float  # km/s (``synth.water_velocity``): the direct arrival's speed
    mute_after: float = 0.1  # s after the direct arrival's onset (a 15 Hz Ricker lasts ~0.13 s)
    taper: float = 0.05  # s, raised-cosine ramp of the mute
    lowpass_hz: float | None = 12.0  # None: no low-pass
    rolloff_hz: float = 4.0
    agc_window: float | None = 0.2  # s; None: no gain control

    @classmethod
    def for_simulator(cls, sim: Simulator, **settings) -> Preprocess:
        return cls(dt=float(sim.cfg.dt), n=n_compared(sim), **settings)

    def mute(self) -> np.ndarray:
        """``(5, 31, n)`` weights: 0 before the direct arrival's end, ramping to 1."""
        t = np.arange(self.n) * self.dt
        onset = direct_arrival_times(self.water_velocity)[..., None] + self.mute_after
        ramp = np.clip((t - onset) / max(self.taper, 1e-9), 0.0, 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * ramp)

    def lowpass_response(self) -> np.ndarray | None:
        """The zero-phase low-pass on the rfft frequencies of ``2 n`` samples (None: none)."""
        if self.lowpass_hz is None:
            return None
        f = np.fft.rfftfreq(2 * self.n, self.dt)
        x = np.clip((f - self.lowpass_hz) / max(self.rolloff_hz, 1e-9), 0.0, 1.0)
        return 0.5 + 0.5 * np.cos(np.pi * x)

    def __call__(self, traces: np.ndarray) -> np.ndarray:
        """Mute, low-pass and gain ``(..., n)`` traces (float64)."""
        y = np.asarray(traces, dtype=np.float64) * self.mute()
        h = self.lowpass_response()
        if h is not None:
            y = np.fft.irfft(np.fft.rfft(y, 2 * self.n, axis=-1) * h, 2 * self.n, axis=-1)
            y = y[..., : self.n]
        if self.agc_window:
            y = agc(y, max(1, int(round(self.agc_window / self.dt))))
        return y


def running_rms(traces: np.ndarray, window: int) -> np.ndarray:
    """Each trace's running RMS over ``window`` samples, floored at 0.1 % of the trace's
    largest RMS (so dividing by it does not blow up silent stretches)."""
    from scipy.ndimage import uniform_filter1d

    rms = np.sqrt(uniform_filter1d(traces**2, window, axis=-1, mode="constant"))
    return rms + 1e-3 * rms.max(axis=-1, keepdims=True) + 1e-30


def agc(traces: np.ndarray, window: int) -> np.ndarray:
    """Each trace divided by its :func:`running_rms` over ``window`` samples."""
    return traces / running_rms(traces, window)


def misfit(observed: np.ndarray, simulated: np.ndarray) -> float:
    """Normalised L2 misfit ``sum (o - s)^2 / sum o^2`` (0: identical)."""
    o, s = np.asarray(observed), np.asarray(simulated)
    return float(((o - s) ** 2).sum() / max(float((o**2).sum()), 1e-30))


def trace_correlation(observed: np.ndarray, simulated: np.ndarray) -> float:
    """Mean Pearson correlation of each trace pair over the last axis (1: identical)."""
    o = observed - observed.mean(axis=-1, keepdims=True)
    s = simulated - simulated.mean(axis=-1, keepdims=True)
    den = np.sqrt((o**2).sum(axis=-1) * (s**2).sum(axis=-1))
    corr = np.where(den > 0, (o * s).sum(axis=-1) / np.maximum(den, 1e-30), 0.0)
    return float(corr.mean())


def compare(observed: np.ndarray, simulated: np.ndarray, prep: Preprocess) -> dict[str, float]:
    """``misfit`` and ``trace_correlation`` of the preprocessed gathers ``(5, 31, n)``."""
    o, s = prep(observed), prep(simulated)
    return {"misfit": misfit(o, s), "trace_correlation": trace_correlation(o, s)}


# --------------------------------------------------------------------------- torch


class TorchForward:
    """The simulator's forward model in torch, differentiable in the 1 m velocity model.

    ``TorchForward(sim)(v)``: ``v`` a ``(300, nz)`` tensor in km/s -> ``(5, 31, n)`` gathers
    at the simulator's ``dt``, calibrated like :func:`simulate_at_sim_rate` (the same
    slowness averaging onto the coarse grid, the same padding, sources and receivers).
    """

    def __init__(self, sim: Simulator):
        self.sim = sim
        self.n = n_compared(sim)

    def coarsen(self, v):
        """``coarsen_slowness`` in torch: slowness averaged over ``factor`` x ``factor``
        cells centred on the coarse nodes, edges replicated."""
        import torch.nn.functional as F

        f = self.sim.factor
        if f == 1:
            return F.pad(v[None, None], (0, 0, 0, 1), mode="replicate")[0, 0]
        nx, nz = v.shape
        nxn, nzn = 300 // f + 1, (nz - 1) // f + 1
        lo = f // 2
        pads = (lo, max(0, nzn * f - nz - lo), lo, nxn * f - nx - lo)  # (z lo, z hi, x lo, x hi)
        s = F.pad((1.0 / v)[None, None], pads, mode="replicate")[0, 0]
        s = s[: nxn * f, : nzn * f]
        return 1.0 / F.avg_pool2d(s[None, None], f)[0, 0]

    def __call__(self, v):
        import deepwave
        import torch.nn.functional as F

        p = HICKS_HALFWIDTH
        vc = F.pad(self.coarsen(v)[None, None], (p, p, p, p), mode="replicate")[0, 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = deepwave.scalar(
                vc.T.contiguous() * 1000.0,
                self.sim.cfg.dx,
                self.sim.cfg.dt,
                **self.sim._propagator_options(),
            )
        return out[-1][..., : self.n] * (-1.0 / self.sim.cfg.dx**2)


def preprocess_settings(params: Params) -> dict[str, Any]:
    """The :class:`Preprocess` settings of ``qc:`` (the water velocity is passed beside them)."""
    own = {f.name for f in dataclasses.fields(Preprocess)}
    return {k: v for k, v in dataclasses.asdict(params.qc).items() if k in own}
