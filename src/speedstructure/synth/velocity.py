"""Synthetic velocity models that look like the challenge's targets.

A model is float32 ``(300, 1259)`` in km/s: axis 0 is x (300 cells of 1 m),
axis 1 is depth (1259 cells of 1 m).  Every model has

* a water layer (``water_velocity``) on top whose gently curved floor lies
  between ``water_depth[0]`` and ``water_depth[1]`` cells (its mean depth drawn
  uniformly within them, its relief 6-45 m);
* below it a stack of thin layers (about 10-60 m thick, dozens of them) whose
  boundaries are all offsets of one structural surface ``h(x)``: boundary k
  lies at ``z = offset_k + h(x)``.  A cell's layer is found from its
  "structural depth" ``u = z - h(x)`` (plus a fault throw or an intrusion's
  uplift where the family has one);
* layer velocities that follow a trend in structural depth,
  ``v_top + (v_bot - v_top) * t ** power`` with ``t`` from 0 under the floor
  to 1 at the bottom, where ``v_top``, ``v_bot`` and ``power`` are drawn
  uniformly from the ``v_top``, ``v_bottom`` and ``trend_power`` ranges
  (params.yaml ``synth``; power < 1: fast rise under the floor then flat,
  > 1: slow sediments deep down), with per-layer noise, a small per-layer
  lateral gradient and occasional inversions (a layer slower than the one
  above).  The floor cuts the layers (an unconformity).  Sediment is never
  slower than water + 0.05 km/s.

Families differ in ``h`` and in what is added to it:

``flat``         ``h = 0``.
``dipping``      ``h`` linear in x (dip 6-31 degrees).
``gentle_fold``  long-wavelength, low-amplitude sinusoid plus a slight tilt.
``strong_fold``  shorter wavelength, larger amplitude, with a harmonic.
``faulted``      a gentle base structure cut by one or two straight faults
                 (dip 55-85 degrees) with 15-70 m throw.
``intrusion``    a gentle base structure with a high-velocity body
                 (4.0-4.5 km/s): a salt diapir (cap + stem) that drags the
                 layers up around it, or a lens (laccolith) that lifts the
                 layers above it.

Everything is vectorised numpy; one model takes a few milliseconds.  The only
randomness is the ``numpy.random.Generator`` passed in, so the same generator
state gives the same array.  :func:`generate_model` returns, beside the array, what
was drawn for it (:class:`ModelFacts`: the family, the water floor, ``h(x)``, the
intrusion body, the trend's parameters), the facts the truth files record;
:func:`generate_velocity` is its array alone (the same draws, the same bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speedstructure.config.schema import SynthConfig
from speedstructure.data.format import NX, NZ

FAMILIES: tuple[str, ...] = SynthConfig().families  # every family (synth.families' default)

_X = np.arange(NX, dtype=np.float64)  # metres (cell index)
_XN = (_X - (NX - 1) / 2) / ((NX - 1) / 2)  # [-1, 1]
_Z = np.arange(NZ, dtype=np.float64)
_MAX_LAYERS = 256  # thicknesses drawn per model (always enough to fill the depth range)


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`generate_model` drew for one model (the truth files' contents).

    ``floor``: int (300,), the first sediment cell (m) of each column; ``h``: float (300,),
    the structural surface (m; the base structure of faulted and intrusion models, without
    the throws or the uplift); ``body``: bool (300, 1259), the intrusion body's cells below
    the floor (None for the other families); ``v_top``, ``v_bottom``, ``trend_power``: the
    depth trend ``v_top + (v_bottom - v_top) * t ** trend_power``."""

    family: str
    floor: np.ndarray
    h: np.ndarray
    body: np.ndarray | None
    v_top: float
    v_bottom: float
    trend_power: float


def sample_family(rng: np.random.Generator, families: Sequence[str]) -> str:
    """One family name drawn uniformly from ``families``."""
    if len(families) == 0:
        raise ValueError("no families to sample from")
    return str(families[int(rng.integers(len(families)))])


def _water_floor(rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    """Integer floor depth per column: a gently curved line within [lo, hi]."""
    relief = min(rng.uniform(6.0, 45.0), float(hi - lo))
    base = rng.uniform(lo + relief / 2, hi - relief / 2)
    a1, a2, a3 = rng.normal(0.0, 1.0, 3)
    freq, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
    shape = a1 * _XN + a2 * (_XN**2 - 1 / 3) + 0.5 * a3 * np.sin(np.pi * freq * _XN + phase)
    shape = shape / max(np.abs(shape).max(), 1e-9)
    floor = np.rint(base + shape * relief / 2)
    return np.clip(floor, lo, min(hi, NZ - 1)).astype(np.int64)


def _fold(
    rng: np.random.Generator, amp: tuple[float, float], wavelength: tuple[float, float]
) -> np.ndarray:
    lam = rng.uniform(*wavelength)
    a = min(rng.uniform(*amp), 0.22 * lam)  # keeps flank slopes below ~55 degrees
    phase = rng.uniform(0, 2 * np.pi)
    return a * np.sin(2 * np.pi * _X / lam + phase)


def _gentle_base(rng: np.random.Generator) -> np.ndarray:
    """Mild dip plus a low fold: the background structure of faulted/intrusion models."""
    return rng.uniform(-0.15, 0.15) * (_X - NX / 2) + _fold(rng, (0.0, 20.0), (400.0, 1200.0))


def _fault_throws(rng: np.random.Generator) -> np.ndarray:
    """Structural-depth offsets of one or two straight faults (dip 55-85 degrees)."""
    zz = _Z[None, :]
    extra = np.zeros((NX, NZ))
    for _ in range(int(rng.integers(1, 3))):
        x0 = rng.uniform(50.0, 250.0)  # fault position at mid depth
        dip = np.deg2rad(rng.uniform(55.0, 85.0))
        direction = rng.choice([-1.0, 1.0])
        throw = rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 70.0)
        x_fault = x0 + direction * (zz - NZ / 2) / np.tan(dip)  # (1, NZ)
        extra += throw * (_X[:, None] > x_fault)
    return extra


def _diapir(rng: np.random.Generator, top_min: float) -> tuple[np.ndarray, np.ndarray]:
    """``(uplift, body)`` of a salt diapir: an elliptical cap on a stem reaching the bottom."""
    zz = _Z[None, :]
    x0 = rng.uniform(60.0, 240.0)
    z_top = rng.uniform(top_min, max(top_min, 750.0))
    stem = rng.uniform(18.0, 50.0)
    cap_w = rng.uniform(stem + 10.0, 110.0)
    cap_h = rng.uniform(40.0, 120.0)
    lean = rng.uniform(-0.06, 0.06)
    xc = x0 + lean * (zz - z_top)  # (1, NZ)
    dx = _X[:, None] - xc
    cap = (dx / cap_w) ** 2 + ((zz - z_top - cap_h / 2) / (cap_h / 2)) ** 2 < 1.0
    width = stem * (1.0 + 0.4 * (zz - z_top) / NZ)
    body = cap | ((np.abs(dx) < width) & (zz > z_top + cap_h / 2))
    # Layers dragged up along the flanks, the drag decaying away from the body.
    below_cap = np.clip(zz - z_top - cap_h / 2, 0.0, None)
    half = np.maximum(width, cap_w * np.exp(-below_cap / cap_h))
    away = np.clip(np.abs(dx) - half, 0.0, None)
    extra = rng.uniform(25.0, 90.0) * np.exp(-away / rng.uniform(30.0, 90.0))
    return extra, body


def _lens(rng: np.random.Generator, top_min: float) -> tuple[np.ndarray, np.ndarray]:
    """``(uplift, body)`` of a lens (laccolith) that lifted the layers above it."""
    zz = _Z[None, :]
    xc = rng.uniform(60.0, 240.0)
    zc = rng.uniform(top_min + 50.0, max(top_min + 50.0, 850.0))
    a = rng.uniform(50.0, 140.0)
    b = rng.uniform(12.0, 45.0)
    s = np.clip(1.0 - ((_X - xc) / a) ** 2, 0.0, None)[:, None]  # (NX, 1), lens profile
    body = np.abs(zz - zc) < b * s
    extra = 2.0 * b * s * (zz < zc)
    return extra, body


def _structure(
    rng: np.random.Generator, family: str, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(u, h, body)``: structural depth of every cell, the structural surface and an
    optional intrusion mask."""
    zz = _Z[None, :]
    body = None
    if family == "flat":
        h = np.zeros(NX)
        extra = None
    elif family == "dipping":
        h = rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.6) * (_X - NX / 2)
        extra = None
    elif family == "gentle_fold":
        h = _fold(rng, (8.0, 35.0), (350.0, 1000.0)) + rng.uniform(-0.08, 0.08) * (_X - NX / 2)
        extra = None
    elif family == "strong_fold":
        lam = rng.uniform(150.0, 400.0)
        a = min(rng.uniform(35.0, 100.0), 0.22 * lam)
        phase = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / lam
        h = a * np.sin(k * _X + phase) + 0.3 * a * rng.uniform(-1, 1) * np.sin(
            2 * k * _X + 2 * phase
        )
        extra = None
    elif family == "faulted":
        h = _gentle_base(rng)
        extra = _fault_throws(rng)
    elif family == "intrusion":
        h = _gentle_base(rng)
        top_min = float(floor.max()) + 60.0
        if rng.random() < 0.65:  # salt diapir: elliptical cap on a stem reaching the bottom
            extra, body = _diapir(rng, top_min)
        else:  # lens (laccolith) that lifted the layers above it by its thickness
            extra, body = _lens(rng, top_min)
    else:
        raise ValueError(f"unknown velocity family '{family}' (known: {', '.join(FAMILIES)})")
    u = zz - h[:, None]
    if extra is not None:
        u = u + extra
    return u, h, body


def generate_velocity(rng: np.random.Generator, family: str, cfg: SynthConfig) -> np.ndarray:
    """One synthetic model, float32 ``(300, 1259)`` in km/s, clipped to [v_min, v_max]:
    :func:`generate_model`'s array."""
    return generate_model(rng, family, cfg)[0]


def generate_model(
    rng: np.random.Generator, family: str, cfg: SynthConfig
) -> tuple[np.ndarray, ModelFacts]:
    """``(velocity, facts)``: one synthetic model, float32 ``(300, 1259)`` in km/s, clipped to
    [v_min, v_max], and what was drawn for it.

    ``cfg`` is params.yaml's ``synth`` section (``v_min``, ``v_max``,
    ``water_velocity`` and the priors ``water_depth``, ``v_top``, ``v_bottom``,
    ``trend_power`` are used).  The draws come in a fixed order from ``rng``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown velocity family '{family}' (known: {', '.join(FAMILIES)})")
    v_min = float(cfg.v_min)
    v_max = float(cfg.v_max)
    v_water = float(cfg.water_velocity)
    lo, hi = (int(v) for v in cfg.water_depth)
    if not 0 <= lo <= hi < NZ:
        raise ValueError(f"synth.water_depth must satisfy 0 <= min <= max < {NZ}, got {[lo, hi]}")

    floor = _water_floor(rng, lo, hi)
    u, h, body = _structure(rng, family, floor)

    # Layers in structural depth, covering every cell below the floor.
    u_floor = u[np.arange(NX), floor]
    u_top, u_bot = float(u_floor.min()), float(u[:, -1].max())
    mean_thick = rng.uniform(15.0, 45.0)
    thick = np.clip(mean_thick * rng.lognormal(0.0, 0.45, _MAX_LAYERS), 5.0, 90.0)
    edges = u_top - rng.uniform(0.0, mean_thick) + np.cumsum(thick)  # lower boundaries
    n_layers = min(int(np.searchsorted(edges, u_bot)) + 1, _MAX_LAYERS)
    edges = edges[:n_layers]
    centres = edges - thick[:n_layers] / 2

    # Velocity trend with depth, per-layer noise, inversions, lateral gradient.
    v_top = rng.uniform(*cfg.v_top)
    v_bot = rng.uniform(*cfg.v_bottom)
    power = rng.uniform(*cfg.trend_power)
    t = np.clip((centres - u_top) / max(u_bot - u_top, 1.0), 0.0, 1.0)
    v_layer = v_top + (v_bot - v_top) * t**power
    v_layer += rng.normal(0.0, rng.uniform(0.03, 0.10), n_layers)
    inverted = rng.random(n_layers) < rng.uniform(0.04, 0.15)
    inverted[0] = False
    v_layer -= inverted * rng.uniform(0.1, 0.35, n_layers)
    gradient = rng.normal(0.0, 0.03, n_layers)

    idx = np.minimum(np.searchsorted(edges, u), n_layers - 1)
    vel = v_layer[idx] + gradient[idx] * _XN[:, None]
    if body is not None:
        # 4.0-4.5 km/s, and clearly faster than the layers it cuts where v_max allows
        v_body = rng.uniform(4.0, 4.5)
        if body.any():
            v_body = min(max(v_body, float(np.median(vel[body])) + 0.9), v_max)
        vel = np.where(body, v_body + 0.02 * _XN[:, None], vel)
    vel = np.maximum(vel, v_water + 0.05)  # sediment is never as slow as water
    water = _Z[None, :] < floor[:, None]
    vel = np.where(water, v_water, vel)
    facts = ModelFacts(
        family=family,
        floor=floor,
        h=h,
        body=None if body is None else body & ~water,
        v_top=float(v_top),
        v_bottom=float(v_bot),
        trend_power=float(power),
    )
    return np.clip(vel, v_min, v_max).astype(np.float32), facts
