"""The physics check's summary, table and figure (``qc`` and ``refine``).

:func:`summarise` gives the misfit and trace-correlation statistics and the worst samples;
:func:`lean_summary` is what goes to the DVC metrics (no sample list, no timings);
:func:`plot_worst` draws the observed and re-simulated middle shot of the worst samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.fsutil import atomic_write_text

SHOT = 2  # the middle shot (x = 149 m) is drawn in the figure


def summarise(rows: list[dict], mape: np.ndarray | None, worst: int) -> dict[str, Any]:
    from scipy.stats import spearmanr

    misfit = np.array([r["misfit"] for r in rows])
    corr = np.array([r["trace_correlation"] for r in rows])
    order = np.argsort(-misfit)
    summary: dict[str, Any] = {
        "n_samples": len(rows),
        "misfit_mean": float(misfit.mean()),
        "misfit_median": float(np.median(misfit)),
        "trace_correlation_mean": float(corr.mean()),
        "seconds_per_sample": float(np.mean([r["seconds"] for r in rows])),
        "worst": [rows[i]["sample_id"] for i in order[:worst]],
        "labels": mape is not None,
    }
    if mape is not None and len(rows) > 2:
        summary["spearman_misfit_mape"] = float(spearmanr(misfit, mape)[0])
        summary["spearman_decorrelation_mape"] = float(spearmanr(-corr, mape)[0])
    return summary


def lean_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A qc or refine summary as a declared DVC metric: no list of the worst samples (the qc
    table ranks them) and no time per sample (MLflow and the console only: versioned files
    hold no timings)."""
    return {k: v for k, v in summary.items() if k not in ("worst", "seconds_per_sample")}


def write_table(path: Path, rows: list[dict], mape: np.ndarray | None) -> Path:
    import pandas as pd

    table = pd.DataFrame(rows).drop(columns="seconds")  # timings stay out of versioned files
    table["rank"] = table["misfit"].rank(ascending=False, method="first").astype(int)
    if mape is not None:
        table["mape"] = mape
    return atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))


def plot_worst(shots: dict, worst: list[str], dt: float, path: Path) -> Path:
    """Observed, simulated and residual gathers (shot :data:`SHOT`, as compared: muted,
    low-passed, gain-controlled) of the worst samples, one row each."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import save_figure

    fig = Figure(figsize=(10, 3.2 * max(1, len(worst))), layout="constrained")
    axes = fig.subplots(max(1, len(worst)), 3, squeeze=False)
    for row, sid in enumerate(worst):
        obs, syn = shots[sid]
        extent = (0, 300, obs.shape[-1] * dt, 0)
        clip = float(np.percentile(np.abs(obs), 98)) or 1.0
        panels = ((obs, f"{sid[:8]}: observed"), (syn, "simulated"), (obs - syn, "residual"))
        for col, (img, title) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img.T, cmap="gray", vmin=-clip, vmax=clip, aspect="auto", extent=extent)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("receiver x (m)")
            ax.set_ylabel("time (s)" if col == 0 else "")
    fig.suptitle(f"worst physics misfit: shot {SHOT + 1} after the direct arrival (AGC)")
    return save_figure(fig, path)


def refine_summary(results: dict, scores, seconds: float, cfg) -> dict[str, Any]:
    n = max(1, len(results))
    summary: dict[str, Any] = {
        "enabled": True,
        "n_refined": len(results),
        "iterations": cfg.iterations,
        "grid_m": cfg.grid_m,
        "seconds_per_sample": seconds / n,
        "misfit_before": float(np.mean([r.misfits[0] for r in results.values()] or [0])),
        "misfit_after": float(np.mean([r.misfits[-1] for r in results.values()] or [0])),
        "simulations_per_sample": float(np.mean([r.evaluations for r in results.values()] or [0])),
    }
    if scores:
        for when in ("before", "after"):
            s = {k: v for k, v in scores[when].items() if k != "per_sample_mape"}
            summary[when] = s
    return summary
