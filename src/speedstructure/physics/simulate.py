"""Acoustic finite-difference simulation of the challenge's acquisition with deepwave.

Acquisition (the challenge's conventions, see the reference page):

* five sources at x = 0, 74, 149, 224, 299 m and 20 m depth, a 15 Hz Ricker
  whose positive central lobe peaks at t = 1/f0;
* 31 receivers at x = 0, 10, ..., 300 m and 10 m depth;
* absorbing (PML) boundaries on all four sides, no free surface;
* 1.0 s delivered as (10001, 31) float32 samples of 0.1 ms.

The 1 m velocity model is averaged in slowness onto a coarser grid (``dx``,
5 m by default) whose nodes sit at x = 0, dx, 2dx, ... (the model is extended
by edge replication so the receiver at x = 300 m lies inside).  Sources and
receivers off the coarse nodes are injected/recorded with deepwave's Hicks
(windowed-sinc) interpolation.  deepwave runs with an output interval ``dt``
(0.5 ms by default, internally sub-stepped as its CFL condition requires), and
the traces are resampled to 0.1 ms by band-limited polyphase interpolation.

Calibration to the organisers' simulator: deepwave's scalar propagator records
``-dx**2`` times the organisers' amplitude for a unit-peak Ricker, so the traces
are multiplied by ``-1 / dx**2`` (polarity and scale), and shifted by one
sample (last sample dropped, a zero prepended) as in the public reconstruction.
``tests/physics/test_simulate.py`` checks the resulting timing, polarity and scale.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
from scipy.signal import resample_poly

from speedstructure.config.schema import SimParams
from speedstructure.config.typed import ConfigError
from speedstructure.data.format import N_RECEIVERS, NX, SOURCES

SOURCE_X_M = tuple(float(s - 1) for s in SOURCES)  # 0, 74, 149, 224, 299 m
SOURCE_DEPTH_M = 20.0
RECEIVER_X_M = tuple(10.0 * i for i in range(N_RECEIVERS))  # 0, 10, ..., 300 m
RECEIVER_DEPTH_M = 10.0
MODEL_DX_M = 1.0  # the challenge's velocity models are on a 1 m grid
HICKS_HALFWIDTH = 4  # deepwave's default window for off-node sources/receivers


def check_sim(sim: SimParams) -> SimParams:
    """``sim`` (``synth.sim``) checked (``dt`` a whole multiple of ``record_dt``, ``dx`` in
    (0, 10] metres), with its float settings as floats (``dx: 5`` in YAML is an int)."""
    ratio = sim.dt / sim.record_dt
    if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
        raise ConfigError(
            f"synth.sim.dt ({sim.dt}) must be an integer multiple of record_dt ({sim.record_dt})"
        )
    if sim.dx <= 0 or sim.dx > 10:
        raise ConfigError(f"synth.sim.dx ({sim.dx}) must be in (0, 10] metres")
    floats = ("dx", "dt", "freq", "record_dt")
    return dataclasses.replace(sim, **{k: float(getattr(sim, k)) for k in floats})


def coarsen_slowness(v: np.ndarray, factor: int) -> np.ndarray:
    """Average a 1 m model in slowness onto nodes at 0, f, 2f, ... metres (both axes).

    Node ``i`` averages the cells within +-f/2 of ``i*f``; the model is extended
    by edge replication so that the last node covers x = 300 m.
    """
    if factor == 1:
        return np.pad(v, ((0, 1), (0, 0)), mode="edge").astype(np.float32)
    nxn = NX // factor + 1  # nodes up to and including x = 300 m
    nzn = (v.shape[1] - 1) // factor + 1
    lo = factor // 2
    s = 1.0 / v.astype(np.float64)
    s = np.pad(
        s,
        ((lo, nxn * factor - v.shape[0] - lo), (lo, max(0, nzn * factor - v.shape[1] - lo))),
        mode="edge",
    )
    s = s[: nxn * factor, : nzn * factor]
    s = s.reshape(nxn, factor, nzn, factor).mean(axis=(1, 3))
    return (1.0 / s).astype(np.float32)


def ricker(freq: float, nt: int, dt: float) -> torch.Tensor:
    """Unit-peak Ricker wavelet with its positive central lobe at t = 1/freq."""
    import deepwave

    return deepwave.wavelets.ricker(freq, nt, dt, 1.0 / freq).to(torch.float32)


def _band_limited_upsample(traces: np.ndarray, up: int) -> np.ndarray:
    """Resample (..., nt) traces by an integer factor along the last axis."""
    if up == 1:
        return traces
    return resample_poly(traces, up, 1, axis=-1, window=("kaiser", 8.0))


class Simulator:
    """Forward-models the five shot gathers of one velocity model.

    ``Simulator(sim)(v)`` returns float32 (5, 10001, 31) for a (300, 1259)
    model in km/s, in the challenge's amplitude scale and polarity; ``sim`` is
    ``synth.sim`` (:class:`~speedstructure.config.schema.SimParams`).
    """

    def __init__(self, cfg: SimParams, device: str | torch.device = "cpu"):
        self.cfg = check_sim(cfg)
        self.device = torch.device(device)
        c = self.cfg
        self.factor = c.dx / MODEL_DX_M
        if abs(self.factor - round(self.factor)) > 1e-9:
            raise ValueError(f"synth.sim.dx ({c.dx}) must be a whole number of metres")
        self.factor = int(round(self.factor))
        self.up = int(round(c.dt / c.record_dt))
        # Run a little beyond the record so the resampling filter has no edge effect.
        self.nt_sim = int(math.ceil((c.n_time - 1) / self.up)) + 1 + 16
        # Off-node points are spread over a Hicks window of HICKS_HALFWIDTH nodes:
        # pad the model by that much (edge-replicated, as the PML itself extends
        # the model) so windows near the edges stay inside it.
        p = HICKS_HALFWIDTH
        src = [[[SOURCE_DEPTH_M / c.dx + p, x / c.dx + p]] for x in SOURCE_X_M]
        rec = [[RECEIVER_DEPTH_M / c.dx + p, x / c.dx + p] for x in RECEIVER_X_M]
        self.source_locations = torch.tensor(src, dtype=torch.float32, device=self.device)
        self.receiver_locations = torch.tensor(
            [rec] * len(SOURCES), dtype=torch.float32, device=self.device
        )
        wavelet = ricker(c.freq, self.nt_sim, c.dt)
        self.source_amplitudes = (
            wavelet.reshape(1, 1, -1).repeat(len(SOURCES), 1, 1).to(self.device)
        )

    def _propagator_options(self) -> dict[str, object]:
        """deepwave.scalar's settings besides the model: acquisition, stencil, boundaries."""
        c = self.cfg
        return {
            "source_amplitudes": self.source_amplitudes,
            "source_locations": self.source_locations,
            "receiver_locations": self.receiver_locations,
            "accuracy": c.accuracy,
            "pml_width": c.pml_width,
            "pml_freq": c.freq,
            "location_interpolation_halfwidth": HICKS_HALFWIDTH,
        }

    def raw(self, v: np.ndarray) -> np.ndarray:
        """deepwave's receiver data, (5, 31, nt_sim) at ``dt``, uncalibrated."""
        import deepwave

        c = self.cfg
        vc = coarsen_slowness(np.asarray(v, dtype=np.float32), self.factor)
        p = HICKS_HALFWIDTH
        vc = np.pad(vc, ((p, p), (p, p)), mode="edge")
        # deepwave wants [slow axis, fast axis]; use (depth, x) so locations are (z, x).
        vel = torch.from_numpy(np.ascontiguousarray(vc.T * 1000.0)).to(self.device)  # m/s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = deepwave.scalar(vel, c.dx, c.dt, **self._propagator_options())
        return out[-1].detach().cpu().numpy()

    def __call__(self, v: np.ndarray) -> np.ndarray:
        c = self.cfg
        rec = self.raw(v).astype(np.float64) * (-1.0 / c.dx**2)
        rec = _band_limited_upsample(rec, self.up)[..., : c.n_time]
        # One-sample delay of the organisers' recording: drop the last, prepend a zero.
        rec = np.concatenate([np.zeros_like(rec[..., :1]), rec[..., :-1]], axis=-1)
        return np.ascontiguousarray(rec.transpose(0, 2, 1), dtype=np.float32)  # (5, 10001, 31)
