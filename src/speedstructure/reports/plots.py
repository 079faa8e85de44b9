"""Figures: one sample's shot gathers beside its velocity model, and grids of models.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas
(no pyplot, no global backend state) and written atomically by :func:`save_figure`
(:func:`speedstructure.fsutil.atomic_output`).  Velocity panels share the colour
range [``V_MIN``, ``V_MAX``] of :mod:`speedstructure.config`.

Subcommand::

    speedstructure plot-sample --zip data/train.zip [--sample-id ID] [--output FILE.png]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from speedstructure.config.schema import V_MAX, V_MIN
from speedstructure.data.format import SOURCES
from speedstructure.data.samples import ZipSamples
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_output

DT = 1e-4  # s per time sample
RECEIVER_SPACING = 10.0  # m
V_RANGE = (V_MIN, V_MAX)  # km/s, colour limits of velocity panels
VELOCITY_CMAP = "jet"
GATHER_CMAP = "gray"
CLIP_PERCENTILE = 97.0  # the direct wave dominates; clip it so reflections show
PLOT_SAMPLE_HELP = "Draw one sample's five shot gathers and (if any) its velocity model to a PNG."


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """``fig`` as a PNG at ``path``, written atomically; returns ``path``."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _velocity_panel(
    fig: Figure, ax, velocity: np.ndarray, title: str | None, colorbar: bool = True
):
    nx, nz = velocity.shape
    im = ax.imshow(
        velocity.T,
        cmap=VELOCITY_CMAP,
        vmin=V_RANGE[0],
        vmax=V_RANGE[1],
        aspect="auto",
        extent=(0, nx, nz, 0),
        interpolation="nearest",
    )
    ax.set_xlabel("x (m)")
    ax.set_ylabel("depth (m)")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(im, ax=ax, label="km/s")
    return im


def section_row(fig: Figure, axes: Sequence, panels: Sequence[tuple]) -> None:
    """One row of (depth, x) sections: ``panels`` are ``(image (300, 1259), title, cmap,
    (vmin, vmax), unit)``, each drawn on its axis with a colour bar labelled ``unit``."""
    for col, (img, title, cmap, (lo, hi), unit) in enumerate(panels):
        ax = axes[col]
        extent = (0, img.shape[0], img.shape[1], 0)
        im = ax.imshow(
            img.T,
            cmap=cmap,
            vmin=lo,
            vmax=hi,
            extent=extent,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("depth (m)" if col == 0 else "")
        fig.colorbar(im, ax=ax, shrink=0.8, label=unit)


def plot_sample(
    gathers: np.ndarray,
    velocity: np.ndarray | None,
    path: str | os.PathLike,
    title: str | None = None,
    clip_percentile: float = CLIP_PERCENTILE,
    cmap: str = GATHER_CMAP,
) -> Path:
    """PNG of the five shot gathers (5, 10001, 31) side by side and the velocity model (300, 1259).

    Gathers share one symmetric colour range, +-the ``clip_percentile`` of |amplitude|.
    """
    gathers = np.asarray(gathers)
    if gathers.ndim != 3 or gathers.shape[0] != len(SOURCES):
        raise ValueError(f"gathers must be (5, n_time, n_receivers), got {gathers.shape}")
    if velocity is not None and np.asarray(velocity).ndim != 2:
        raise ValueError(f"velocity must be 2-D (x, depth), got {np.asarray(velocity).shape}")
    n_time, n_rec = gathers.shape[1:]
    clip = float(np.percentile(np.abs(gathers), clip_percentile))
    clip = clip if clip > 0 else 1.0
    t_end = (n_time - 1) * DT
    x_end = (n_rec - 1) * RECEIVER_SPACING

    n_panels = len(SOURCES) + (velocity is not None)
    ratios = [1.0] * len(SOURCES) + ([1.6] if velocity is not None else [])
    fig = Figure(figsize=(3.0 * n_panels, 7.0), layout="constrained")
    axes = fig.subplots(1, n_panels, gridspec_kw={"width_ratios": ratios})
    for i, (ax, src) in enumerate(zip(axes[: len(SOURCES)], SOURCES, strict=True)):
        im = ax.imshow(
            gathers[i],
            cmap=cmap,
            vmin=-clip,
            vmax=clip,
            aspect="auto",
            extent=(0, x_end, t_end, 0),
            interpolation="antialiased",
        )
        ax.set_title(f"source x = {src - 1} m", fontsize=9)
        ax.set_xlabel("receiver x (m)")
        if i == 0:
            ax.set_ylabel("time (s)")
        else:
            ax.tick_params(labelleft=False)
    fig.colorbar(im, ax=axes[len(SOURCES) - 1], label=f"amplitude (clip p{clip_percentile:g})")
    if velocity is not None:
        _velocity_panel(fig, axes[-1], np.asarray(velocity), "velocity model")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_velocity_grid(
    models: Sequence[np.ndarray],
    titles: Sequence[str] | None,
    path: str | os.PathLike,
    ncols: int | None = None,
    suptitle: str | None = None,
) -> Path:
    """PNG of velocity models (each (300, 1259)) in a grid with one shared km/s colorbar."""
    if len(models) == 0:
        raise ValueError("no models to plot")
    if titles is not None and len(titles) != len(models):
        raise ValueError(f"{len(titles)} titles for {len(models)} models")
    n = len(models)
    ncols = ncols or min(n, 6)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.4 * ncols + 1.0, 5.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    im = None
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        im = _velocity_panel(
            fig, ax, np.asarray(models[i]), titles[i] if titles else None, colorbar=False
        )
        if i % ncols:
            ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes[:n]), label="km/s", shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def plot_training_curves(
    history: Sequence[dict], path: str | os.PathLike, title: str | None = None
) -> Path:
    """PNG of training loss and validation MAPE per epoch (left) and the learning rate (right);
    for a model fitted in closed form (no learning rate in its history) one panel with its
    validation MAPE."""
    if all(float(h["lr"]) == 0.0 for h in history):
        return _plot_fitted(history, path, title)
    epochs = [int(h["epoch"]) for h in history]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax, ax_lr = fig.subplots(1, 2)
    for key, label in (("train_loss", "train MAPE"), ("val_mape", "validation MAPE (EMA)")):
        vals = [float(h[key]) for h in history]
        if any(np.isfinite(vals)):
            ax.plot(epochs, vals, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MAPE")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(epochs, [float(h["lr"]) for h in history], marker=".")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _plot_fitted(history: Sequence[dict], path: str | os.PathLike, title: str | None) -> Path:
    """The 'curves' of a closed-form model (a baseline): its validation MAPE as one bar."""
    val = float(history[-1]["val_mape"]) if history else float("nan")
    fig = Figure(figsize=(6, 2.2), layout="constrained")
    ax = fig.subplots()
    ax.barh(["validation"], [val if np.isfinite(val) else 0.0], color="tab:orange")
    ax.set_xlabel("MAPE")
    ax.set_title(
        f"fitted in closed form, not trained: validation MAPE {val:.4f}"
        if np.isfinite(val)
        else "fitted in closed form, not trained: no validation set",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# ---------------------------------------------------------------- command line


def _cmd_plot_sample(args: argparse.Namespace) -> int:
    with ZipSamples(args.zip) as z:
        if not z.sample_ids:
            raise UserError(f"{args.zip}: no samples")
        sid = args.sample_id or z.sample_ids[0]
        if sid not in z:
            raise UserError(
                f"{args.zip}: no sample '{sid}' ({len(z)} samples, first '{z.sample_ids[0]}')"
            )
        gathers, target = z.read(sid)
    output = Path(args.output) if args.output else Path("plots") / f"sample_{sid}.png"
    out = plot_sample(gathers, target, output, title=f"{Path(args.zip).name}: {sid}")
    print(out)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot-sample", description=PLOT_SAMPLE_HELP)
    p.add_argument("--zip", required=True, help="challenge-layout zip (e.g. data/train.zip)")
    p.add_argument("--sample-id", default=None, help="sample id (default: the first in the zip)")
    p.add_argument("--output", default=None, help="PNG path (default: plots/sample_<id>.png)")
    p.set_defaults(func=_cmd_plot_sample)


def plot_heldout(fold_entries: list[dict], strategies: list[str], path: Path) -> None:
    """Grouped bars: held-out MAPE of each strategy, per fold and the mean over folds."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import save_figure

    groups = [f"fold {f['fold']}" for f in fold_entries] + ["mean"]
    values = {s: [f["heldout"][s] for f in fold_entries] for s in strategies}
    for s in strategies:
        values[s].append(float(np.mean(values[s])))
    fig = Figure(figsize=(1.6 + 1.4 * len(groups), 4.2), layout="tight")
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(strategies))
    for i, s in enumerate(strategies):
        bars = ax.bar(x + (i - (len(strategies) - 1) / 2) * width, values[s], width, label=s)
        ax.bar_label(bars, fmt="%.4f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, groups)
    ax.set_ylabel("held-out MAPE (split-half)")
    ax.set_title("Ensemble weighting strategies")
    top = max(max(v) for v in values.values())
    ax.set_ylim(0, 1.35 * top if top > 0 else 1)
    ax.legend(fontsize=8, loc="upper center", ncols=len(strategies), frameon=False)
    save_figure(fig, path)
