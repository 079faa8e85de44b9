"""``speedstructure bench learning``: does this architecture turn compute into inversion?

One variant (``--variant``, default: the ensemble's first) is trained on fold ``--fold`` of
the project's fold table at 1x, 2x and 4x the training samples (``--scale samples``: nested
random subsets of a quarter, a half and all of the fold's training samples, one seed) or the
epochs (``--scale epochs``: every sample, the variant's epochs x 1, 2, 4), in one run, and
scored on the fold's validation samples: MAPE, MAPE in the ``evaluate.focus_band``
(300-900 m), the lateral-structure score R2_lat and the water-floor error.  A GPU user reads
from it whether more data or longer training buys structure (R2_lat, the band) or only a
better prior.  It needs the ``folds`` stage's table and reads the sample store when
``paths.store`` holds it.  Besides the table it draws the four figures against the factor
(``bench/learning_<variant>_<scale>.png``, not versioned; ``--plot`` elsewhere).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.schema import Params
from speedstructure.errors import UserError
from speedstructure.metrics import lateral_r2, per_sample_mape, water_floor_error

log = logging.getLogger(__name__)

FACTORS = (1, 2, 4)
PANELS = (  # (key of a row, title) of the curve's panels
    ("val_mape", "validation MAPE"),
    ("band_mape", "300-900 m MAPE"),
    ("lateral_r2", "R2_lat"),
    ("water_floor_error_m", "water-floor error (m)"),
)


def _rows(params: Params, fold: int) -> tuple[list, list]:
    from speedstructure.engine.data import read_folds_table, rows_in_store

    table = params.path("folds_table")
    train_rows, val_rows = read_folds_table(table, fold, params.root)
    store = params.path("store")
    if (store / "manifest.json").is_file():
        train_rows, val_rows = rows_in_store(store, table, train_rows, val_rows)
    return train_rows, val_rows


def scores(pred: np.ndarray, truth: np.ndarray, params: Params) -> dict[str, float]:
    """The four figures of one trained model's validation predictions."""
    pred, truth = np.asarray(pred, np.float32), np.asarray(truth, np.float32)
    err = np.abs(pred - truth) / truth
    band = slice(*params.evaluate.focus_band)
    return {
        "val_mape": float(per_sample_mape(pred, truth).mean()),
        "band_mape": float(err[:, :, band].mean(dtype=np.float64)),
        "lateral_r2": lateral_r2(pred, truth),
        "water_floor_error_m": float(
            water_floor_error(pred, truth, params.synth.water_velocity).mean()
        ),
    }


def bench_learning(
    params: Params,
    variant: str | None = None,
    *,
    scale: str = "samples",
    fold: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``variant`` at each factor of :data:`FACTORS` and score it (see the module)."""
    from speedstructure.engine.data import SampleDataset, targets
    from speedstructure.engine.loop import train_model
    from speedstructure.engine.runtime import place, seed_everything, training_seed
    from speedstructure.models.build import build_model
    from speedstructure.physics.seafloor import FloorPicker

    name = variant or params.ensemble.variants[0]
    v = params.variant(name)
    cfg = dataclasses.replace(params.train_for(v), progress=False)
    train_rows, val_rows = _rows(params, fold)
    if len(train_rows) < 4 * len(FACTORS) or not val_rows:
        raise UserError(f"bench learning: fold {fold} has too few samples to scale")
    order = np.random.default_rng(seed).permutation(len(train_rows))
    picker = FloorPicker.from_synth(params.synth)
    val_ds = SampleDataset(val_rows)
    truth = np.stack([np.asarray(y, np.float32) for y in targets(val_ds)])
    rows_out = []
    for factor in FACTORS:
        n = len(train_rows) * factor // FACTORS[-1] if scale == "samples" else len(train_rows)
        epochs = int(cfg.epochs) * (factor if scale == "epochs" else 1)
        run_cfg = dataclasses.replace(cfg, epochs=epochs, cosine_epochs=epochs)
        placement = place(run_cfg.device, run_cfg.threads)
        seed_everything(training_seed(run_cfg.seed, placement.ranks, weights=True))
        model = build_model(v, device=placement.device, floor_picker=picker)
        subset = [train_rows[i] for i in sorted(order[:n])]
        log.info("bench learning: %s x%d (%d samples, %d epochs)", name, factor, n, epochs)
        with tempfile.TemporaryDirectory(prefix="bench-learning-") as out:
            result = train_model(
                model, SampleDataset(subset), val_ds, run_cfg, out, variant=v, placement=placement
            )
        row = {"factor": factor, "samples": n, "epochs": epochs, "best_epoch": result.best_epoch}
        rows_out.append({**row, **scores(result.val_pred, truth, params)})
    val_ds.close()
    return {
        "variant": name,
        "scale": scale,
        "fold": fold,
        "val_samples": len(val_rows),
        "rows": rows_out,
    }


def format_table(out: dict[str, Any]) -> str:
    """The table ``bench learning`` prints."""
    lines = [
        f"bench learning: {out['variant']}, fold {out['fold']} ({out['val_samples']} validation "
        f"samples), scaling the {out['scale']}",
        f"  {'factor':>6} {'samples':>7} {'epochs':>6} {'val MAPE':>9} {'300-900 m':>9} "
        f"{'R2_lat':>7} {'floor m':>7}",
    ]
    for r in out["rows"]:
        lines.append(
            f"  {r['factor']:>5}x {r['samples']:>7} {r['epochs']:>6} {r['val_mape']:>9.4f} "
            f"{r['band_mape']:>9.4f} {r['lateral_r2']:>7.3f} {r['water_floor_error_m']:>7.1f}"
        )
    return "\n".join(lines)


def plot_curve(out: dict[str, Any], path: str | Path) -> Path:
    """The curve: each of :data:`PANELS` against the factor (log2 axis), as a PNG at ``path``."""
    from matplotlib.figure import Figure

    from speedstructure.reports.plots import save_figure

    factors = [r["factor"] for r in out["rows"]]
    fig = Figure(figsize=(3.2 * len(PANELS), 3.0), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(PANELS)), PANELS, strict=True):
        ax.plot(factors, [r[key] for r in out["rows"]], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [f"{f}x" for f in factors])
        ax.set_xlabel(f"{out['scale']} (x a quarter)" if out["scale"] == "samples" else "epochs")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"bench learning: {out['variant']}, fold {out['fold']} "
        f"({out['val_samples']} validation samples)"
    )
    return save_figure(fig, path)


def run_from_args(params: Params, args) -> dict[str, Any]:
    """``speedstructure bench learning``: run, print the table, draw the curve, return both."""
    out = bench_learning(params, (args.variant or [None])[0], scale=args.scale)
    print(format_table(out))
    default = params.root / "bench" / f"learning_{out['variant']}_{out['scale']}.png"
    out["plot"] = str(plot_curve(out, args.plot or default))
    print(f"curve: {out['plot']}")
    return out
