"""The trained members as the pipeline knows them: each ``runs:`` entry's checkpoint, and
its predictions on a test zip (one model in memory at a time, on the GPU when there is one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.schema import Params
from speedstructure.config.typed import ConfigError
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import relative_path

log = logging.getLogger(__name__)


def run_paths(params: Params) -> dict[str, dict[str, Any]]:
    """Each entry of ``runs`` with its checkpoint and training metrics paths."""
    from speedstructure.engine.checkpoint import BEST_NAME, METRICS_NAME

    out = {}
    for key, r in params.runs.items():
        d = params.run_dir(r.variant, r.fold)
        out[key] = {
            "variant": r.variant,
            "fold": int(r.fold),
            "checkpoint": d / BEST_NAME,
            "metrics": d / METRICS_NAME,
        }
    return out


def predict_runs(
    runs: dict[str, dict[str, Any]],
    test_zip: Path,
    ids: list[str],
    batch_size: int,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """float32 (N, 300, 1259) test predictions (flip TTA) of each run's best checkpoint.

    One model in memory at a time, on the GPU when there is one."""
    import torch
    from tqdm import tqdm

    from speedstructure.ensemble.members import load_member

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds = {}
    bar = tqdm(
        total=len(ids) * len(runs), desc="evaluate runs", unit="sample", disable=not progress
    )
    with torch.no_grad():
        for key, r in runs.items():
            model = load_member(r["checkpoint"], device)
            preds[key] = predict_zip(
                lambda x, m=model: (
                    m.predict(torch.from_numpy(x).to(device), tta=True).float().cpu().numpy()
                ),
                test_zip,
                ids,
                batch_size,
                bar,
            )
            del model
    bar.close()
    return preds


def predict_zip(predict_fn, zip_path: Path, ids: list[str], batch_size: int, bar) -> np.ndarray:
    """float32 (N, 300, 1259): ``predict_fn`` (gathers (B, 5, 10001, 31) -> velocities) over
    the samples ``ids`` of a zip, batch by batch; ``bar`` (tqdm) counts them."""
    from speedstructure.data.format import VP_SHAPE
    from speedstructure.data.samples import ZipSamples
    from speedstructure.ensemble.members import iter_batches

    out = np.empty((len(ids), *VP_SHAPE), np.float32)
    i = 0
    with ZipSamples(zip_path) as z:
        for chunk, x in iter_batches(z, ids, batch_size):
            out[i : i + len(chunk)] = predict_fn(x)
            i += len(chunk)
            bar.update(len(chunk))
    return out


def member_runs(params: Params) -> dict[int, list[tuple[str, str]]]:
    """``{fold: [(variant, run key), ...]}`` in ``ensemble.variants`` order."""
    variants = list(params.ensemble.variants)
    if not variants:
        raise ConfigError(f"{params.source}: ensemble.variants must name at least one variant")
    found: dict[int, dict[str, str]] = {}
    for key, run in params.runs.items():
        if run.variant in variants:
            found.setdefault(int(run.fold), {})[run.variant] = str(key)
    for v in variants:
        if not any(v in f for f in found.values()):
            raise ConfigError(
                f"{params.source}: ensemble.variants names unknown variant '{v}' "
                "(no training run in 'runs:')"
            )
    return {k: [(v, found[k][v]) for v in variants if v in found[k]] for k in sorted(found)}


def _fold_targets(params: Params, fold: int) -> tuple[list[str], np.ndarray]:
    """The validation ids of ``fold`` (fold table order) and their targets, float32."""
    from speedstructure.data.format import VP_SHAPE
    from speedstructure.data.samples import ZipSamples
    from speedstructure.engine.data import read_folds_table

    _, val_rows = read_folds_table(params.path("folds_table"), fold, params.root)
    ids = [sid for sid, _ in val_rows]
    targets = np.empty((len(ids), *VP_SHAPE), np.float32)
    by_zip: dict[str, list[int]] = {}
    for i, (_, z) in enumerate(val_rows):
        by_zip.setdefault(z, []).append(i)
    for z, rows in by_zip.items():
        with ZipSamples(z) as zs:
            for i in rows:
                targets[i] = zs.read_target(ids[i])
    return ids, targets


def _member_preds(path: Path, ids: list[str], shape: tuple, where: str, first) -> np.ndarray:
    """One member's validation predictions in the order of ``ids``, checked.

    ``where`` names the fold and its table; ``first`` is ``(path, sample ids)`` of the
    fold's first member (None for the first itself): every member holds the same samples.
    """
    from speedstructure.engine.checkpoint import load_val_preds

    try:
        got_ids, arr = load_val_preds(path)
    except Exception as exc:  # numpy raises several types for bad archives
        raise DataError(f"{path}: not a readable val_preds archive ({exc})") from exc
    got = set(got_ids)
    if first is not None and got != first[1]:
        raise DataError(
            f"{path}: holds other sample ids than {first[0]} "
            f"({len(got - first[1])} extra, {len(first[1] - got)} missing)"
        )
    if got != set(ids) or len(got_ids) != len(ids):
        missing, extra = sorted(set(ids) - got), sorted(got - set(ids))
        raise DataError(
            f"{path}: sample ids differ from the validation ids of {where} "
            f"(missing: {', '.join(missing[:3]) or '-'}; extra: {', '.join(extra[:3]) or '-'})"
        )
    if arr.shape[1:] != shape:
        raise DataError(f"{path}: predictions of shape {arr.shape[1:]}, targets {shape}")
    pos = {sid: i for i, sid in enumerate(got_ids)}
    return arr[[pos[sid] for sid in ids]]


def load_fold(params: Params, fold: int, members: list[tuple[str, str]]):
    """``(ids, preds (M, N, 300, 1259) float16, targets (N, 300, 1259) float32, checkpoints)``.

    ``members`` are ``(variant, run key)`` pairs (:func:`member_runs`); checkpoints are
    relative to the project root.
    """
    from speedstructure.engine.checkpoint import BEST_NAME, VAL_PREDS_NAME

    ids, targets = _fold_targets(params, fold)
    where = f"fold {fold} in {params.path('folds_table')}"
    preds = np.empty((len(members), *targets.shape), np.float16)
    checkpoints = []
    first = None
    for k, (variant, key) in enumerate(members):
        run_dir = params.run_dir(variant, fold)
        path, ckpt = run_dir / VAL_PREDS_NAME, run_dir / BEST_NAME
        for f in (path, ckpt):
            if not f.is_file():
                raise UserError(
                    f"{f}: not found; it is written by the training run '{key}' in params.yaml "
                    f"runs: (speedstructure train --variant {variant} --fold {fold})"
                )
        preds[k] = _member_preds(path, ids, targets.shape[1:], where, first)
        first = first or (path, set(ids))
        if not np.isfinite(preds[k]).all():
            raise DataError(f"{path}: predictions contain non-finite values")
        checkpoints.append(relative_path(ckpt, params.root))
    return ids, preds, targets, checkpoints


def baseline_runs(params: Params, runs: dict[str, dict[str, Any]]) -> list[str]:
    baseline = params.evaluate.baseline
    keys = [k for k, r in runs.items() if r["variant"] == baseline]
    if not keys:
        raise ConfigError(f"{params.source}: evaluate.baseline '{baseline}' has no entry in runs:")
    return keys
