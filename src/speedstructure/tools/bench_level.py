"""``speedstructure bench level``: how much of the velocity level do reflections carry?

The level is a sample's mean velocity below the water floor (``evaluate``'s ``level_corr``,
``level_error``).  Under constant density the reflections' running integral is ``ln v``
(:mod:`speedstructure.physics.level`), but the source wavelet has no energy below a few hertz,
so the smooth rise of velocity with depth is only partly in the data.  This benchmark measures
that part on the ideal case: velocity models drawn with the project's generator and priors
(``synth``), the column under the middle shot turned into its normal-incidence reflectivity in
two-way time (2 ms), once convolved with the Ricker wavelet of ``synth.sim.freq`` (what the
gathers hold at best: no noise, no multiples, no spreading, the true velocity under the floor)
and once left whole (every frequency).  The features are the level read's
(:func:`~speedstructure.physics.level.level_features`' windows of the integral from the floor,
the velocity under the floor, the floor's depth), the map the product's
(:func:`~speedstructure.physics.level.fit_ridge`), fitted on 1x, 2x, 4x and 8x ``synth.n_train``
models and scored on held-out models of the same priors and of the out-of-distribution set's
(``synth.ood``).  Deterministic: the same params give the same table.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from speedstructure.config.schema import Params, SynthConfig

log = logging.getLogger(__name__)

FACTORS = (1, 2, 4, 8)  # training models, in multiples of synth.n_train
HELD_OUT = 600  # scored models per set
SEED_OFFSET = 7  # the draws' generator: synth.seed + this (apart from the data's streams)


def ricker(freq: float, step: float) -> np.ndarray:
    """A zero-phase Ricker wavelet sampled at ``step`` s, peak 1."""
    t = np.arange(-round(1.5 / freq / step), round(1.5 / freq / step) + 1) * step
    a = (np.pi * freq * t) ** 2
    return (1.0 - 2.0 * a) * np.exp(-a)


def column_traces(v: np.ndarray, floor: int, wavelet: np.ndarray) -> tuple[np.ndarray, ...]:
    """One velocity column ``(1259,)`` (km/s, 1 m cells) -> its features from the floor down:
    band-limited (``wavelet``) and whole reflectivity, each the level read's windows of the
    running integral followed by the velocity under the floor and the floor's depth (km)."""
    from speedstructure.physics.level import SPAN_S, STEP_S, integral_windows

    v = np.asarray(v, np.float64)
    n = int(round(1.0 / STEP_S))
    twt = np.concatenate([[0.0], np.cumsum(2.0 / (v * 1000.0))])[:-1]
    r = np.zeros(n)
    idx = (twt[1:] / STEP_S).astype(int)
    ok = idx < n
    np.add.at(r, idx[ok], ((v[1:] - v[:-1]) / (v[1:] + v[:-1]))[ok])
    start, span = int(twt[floor] / STEP_S), int(round(SPAN_S / STEP_S))
    out = []
    for trace in (np.convolve(r, wavelet, mode="same"), r):
        seg = np.zeros(span)
        m = max(0, min(span, n - start))
        seg[:m] = trace[start : start + m]
        out.append(np.r_[integral_windows(seg), v[min(floor + 1, len(v) - 1)], floor / 1000.0])
    return tuple(out)


def draw(cfg: SynthConfig, n: int, rng: np.random.Generator, wavelet: np.ndarray):
    """``n`` models of ``cfg``'s priors (families in turn): band-limited and whole features
    ``(n, F)`` and the levels ``(n,)`` (the mean below the floor of the whole model)."""
    from speedstructure.data.format import NX
    from speedstructure.metrics import mean_below_floor
    from speedstructure.physics.simulate import SOURCE_X_M
    from speedstructure.synth.velocity import generate_model

    x = int(SOURCE_X_M[len(SOURCE_X_M) // 2])
    band, whole, levels = [], [], []
    for i in range(n):
        v, facts = generate_model(rng, cfg.families[i % len(cfg.families)], cfg)
        b, w = column_traces(v[min(x, NX - 1)], int(facts.floor[x]), wavelet)
        band.append(b)
        whole.append(w)
        levels.append(mean_below_floor(v[None], facts.floor[None])[0])
    return np.stack(band), np.stack(whole), np.asarray(levels)


def _score(fitted: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from speedstructure.physics.level import apply_ridge

    pred = apply_ridge(fitted, x)
    return float(np.corrcoef(pred, y)[0, 1]), float(np.mean(np.abs(pred / y - 1.0)))


def bench_level(params: Params, factors: tuple[int, ...] = FACTORS) -> dict[str, Any]:
    """The table's rows: per reflectivity (band-limited, whole) and training size, the
    correlation and mean relative error of the level on held-out models, in and out of
    distribution."""
    from speedstructure.physics.level import STEP_S, fit_ridge
    from speedstructure.synth.dataset import ood_config

    cfg = params.synth
    wavelet = ricker(float(cfg.sim.freq), STEP_S)
    rng = np.random.default_rng(int(cfg.seed) + SEED_OFFSET)
    sizes = [int(cfg.n_train) * f for f in factors]
    band, whole, y = draw(cfg, max(sizes) + HELD_OUT, rng, wavelet)
    ood_band, ood_whole, ood_y = draw(ood_config(cfg), HELD_OUT, rng, wavelet)
    rows = []
    for name, x, x_ood in (("band-limited", band, ood_band), ("whole", whole, ood_whole)):
        for n in sizes:
            fitted = fit_ridge(x[:n], y[:n])
            corr, err = _score(fitted, x[-HELD_OUT:], y[-HELD_OUT:])
            ood_corr, ood_err = _score(fitted, x_ood, ood_y)
            rows.append(
                {"reflectivity": name, "train": n, "corr": corr, "error": err}
                | {"ood_corr": ood_corr, "ood_error": ood_err}
            )
    return {"freq_hz": float(cfg.sim.freq), "held_out": HELD_OUT, "rows": rows}


def format_table(out: dict[str, Any]) -> str:
    lines = [
        f"The level from the reflections' integral (Ricker {out['freq_hz']:g} Hz; "
        f"{out['held_out']} held-out models per set)",
        f"  {'reflectivity':<13} {'train':>5}  {'corr':>5}  {'error':>6}  "
        f"{'OOD corr':>8}  {'OOD error':>9}",
    ]
    for r in out["rows"]:
        lines.append(
            f"  {r['reflectivity']:<13} {r['train']:>5}  {r['corr']:5.3f}  {r['error']:6.2%}  "
            f"{r['ood_corr']:8.3f}  {r['ood_error']:9.2%}"
        )
    return "\n".join(lines)


def run_from_args(params: Params, args) -> dict[str, Any]:
    """``speedstructure bench level``: run, print the table, return it."""
    out = bench_level(params)
    print(format_table(out))
    return out
