"""Full-waveform inversion of one velocity model, started from the ensemble's prediction.

The simulator's forward model in torch (:class:`~speedstructure.physics.misfit.TorchForward`,
deepwave) gives the gradient of the data misfit with respect to the model.  The
safeguards FWI needs:

* the water layer is fixed: cells above the predicted water floor (per column, the first
  cell faster than water, :func:`speedstructure.metrics.water_floor_depth`) stay at the
  water velocity;
* velocities stay within ``[V_MIN, V_MAX]``;
* the update lives on a coarse grid (``grid_m`` metres), bilinearly interpolated to the
  1 m model: smooth, with far fewer unknowns than cells;
* step control: steepest descent with the step (the largest velocity change of an
  iteration, km/s) tried, halved while the misfit rises (``max_halvings``), and grown
  after an accepted step; an iterate is kept only if its misfit is lower than the current
  one's, so the misfit never rises, and the inversion stops when no step lowers it.

The misfit is the L2 norm of the muted, low-passed residual (the ``qc`` preprocessing
without its gain control, :meth:`Inversion._filter`), each sample
weighted by the inverse running RMS of the observed trace (a fixed gain: late, weak
reflections weigh like early ones), normalised by the weighted observed energy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from speedstructure.config.schema import V_MAX, V_MIN, Params
from speedstructure.metrics import water_floor_depth
from speedstructure.physics.misfit import Preprocess, TorchForward, running_rms


@dataclass(frozen=True)
class FwiSettings:
    """One inversion's settings (``refine:`` of params.yaml, see the module doc)."""

    water_velocity: float  # km/s (``synth.water_velocity``): the water layer is kept at it
    iterations: int = 5
    grid_m: int = 20
    step: float = 0.05  # km/s: the first trial's largest velocity change
    max_halvings: int = 3
    prep: dict = field(default_factory=dict)  # Preprocess settings (mute, low-pass, AGC window)


@dataclass
class FwiResult:
    model: np.ndarray  # float32 (300, nz), the refined model
    misfits: list[float]  # the misfit of each kept iterate, the start's first
    seconds: float
    evaluations: int  # forward simulations (gradients count one)


class Inversion:
    """The misfit of one sample's observed gathers as a function of a coarse model update."""

    def __init__(self, sim, observed: np.ndarray, start: np.ndarray, cfg: FwiSettings):
        import torch

        self.cfg = cfg
        self.forward = TorchForward(sim)
        prep = Preprocess.for_simulator(sim, water_velocity=cfg.water_velocity, **cfg.prep)
        self.prep = prep
        o = self._filter(torch.as_tensor(observed, dtype=torch.float64)).numpy()
        window = max(1, int(round((prep.agc_window or 0.2) / prep.dt)))
        weights = 1.0 / running_rms(o, window)
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.observed = torch.as_tensor(o, dtype=torch.float32) * self.weights
        self.norm = float((self.observed**2).sum())
        self.start = torch.as_tensor(np.asarray(start, dtype=np.float32))
        floor = water_floor_depth(np.asarray(start), cfg.water_velocity)
        depth = torch.arange(self.start.shape[1])[None, :]
        self.water = depth < torch.as_tensor(floor)[:, None]
        nx, nz = self.start.shape
        self.shape = (-(-nx // cfg.grid_m) + 1, -(-nz // cfg.grid_m) + 1)
        self.evaluations = 0

    def _filter(self, traces):
        import torch

        mute = torch.as_tensor(self.prep.mute(), dtype=traces.dtype)
        y = traces * mute
        h = self.prep.lowpass_response()
        if h is not None:
            n = self.prep.n
            spec = torch.fft.rfft(y, 2 * n, dim=-1) * torch.as_tensor(h, dtype=y.dtype)
            y = torch.fft.irfft(spec, 2 * n, dim=-1)[..., :n]
        return y

    def model(self, delta):
        """The 1 m model for a coarse update ``delta`` (bounds and water layer applied)."""
        import torch
        import torch.nn.functional as F

        up = F.interpolate(
            delta[None, None], size=tuple(self.start.shape), mode="bilinear", align_corners=True
        )[0, 0]
        v = torch.clamp(self.start + up, V_MIN, V_MAX)
        return torch.where(self.water, torch.full_like(v, self.cfg.water_velocity), v)

    def loss(self, delta):
        self.evaluations += 1
        sim = self._filter(self.forward(self.model(delta))) * self.weights
        return ((sim - self.observed) ** 2).sum() / self.norm

    def value(self, delta) -> float:
        import torch

        with torch.no_grad():
            return float(self.loss(delta))

    def gradient(self, delta):
        """``(misfit, gradient)`` at ``delta``."""
        d = delta.detach().clone().requires_grad_(True)
        loss = self.loss(d)
        loss.backward()
        return float(loss.detach()), d.grad.detach()


def invert(sim, observed: np.ndarray, start: np.ndarray, cfg: FwiSettings) -> FwiResult:
    """Refine ``start`` (300, nz) toward ``observed`` (5, 31, n) at the simulator's ``dt``."""
    import torch

    t0 = time.perf_counter()
    inv = Inversion(sim, observed, start, cfg)
    delta = torch.zeros(inv.shape, dtype=torch.float32)
    step = float(cfg.step)
    current, grad = inv.gradient(delta)
    misfits = [current]
    for it in range(cfg.iterations):
        if it > 0:
            current, grad = inv.gradient(delta)
        scale = float(grad.abs().max())
        if scale == 0.0:
            break
        direction = -grad / scale
        accepted = None
        for _ in range(cfg.max_halvings + 1):
            trial = delta + step * direction
            value = inv.value(trial)
            if value < current:
                accepted = (trial, value)
                break
            step /= 2
        if accepted is None:
            break
        delta, current = accepted
        misfits.append(current)
        step *= 1.5
    with torch.no_grad():
        refined = inv.model(delta).numpy().astype(np.float32)
    return FwiResult(refined, misfits, time.perf_counter() - t0, inv.evaluations)


def fwi_settings(params: Params, iterations: int | None = None):
    from speedstructure.physics.fwi import FwiSettings
    from speedstructure.physics.misfit import preprocess_settings

    r = params.refine
    return FwiSettings(
        iterations=int(iterations if iterations is not None else r.iterations),
        grid_m=r.grid_m,
        step=r.step,
        max_halvings=r.max_halvings,
        water_velocity=params.synth.water_velocity,
        prep=preprocess_settings(params),
    )
