"""One training run's fixed setting (:class:`Run`) and what it produces.

Validation each epoch (:func:`validate`), predictions over a dataset
(:func:`predict_dataset`), the fitted baseline (:func:`fit_baseline`: ``depth_trend`` has no
gradient-trained parameters; it is fitted on the training targets, validated and saved,
without an optimizer) and the run's end (:func:`finish`): ``val_preds.npz``, the best
model's validation predictions made as the test is predicted (float32, flip TTA), which the
ensemble weights are tuned on, ``history.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from speedstructure.config.schema import TrainConfig, Variant
from speedstructure.engine.checkpoint import (
    BEST_NAME,
    HISTORY_NAME,
    LAST_NAME,
    METRICS_NAME,
    VAL_PREDS_NAME,
    TrainState,
    best_checkpoint,
    fingerprint,
    load_checkpoint,
    load_val_preds,
    resume_state,
    save_checkpoint,
    save_val_preds,
    variant_record,
    write_history,
    write_metrics,
)
from speedstructure.engine.data import (
    make_loader,
    targets,
)
from speedstructure.engine.runtime import (
    Dist,
    autocast,
    log_main,
    progress_bar,
    seed_everything,
    training_seed,
)
from speedstructure.metrics import per_sample_mape

EpochCallback = Callable[[dict], None]
StartCallback = Callable[[TrainState], None]  # sees the state training starts from (rank 0)
# how val_preds.npz is predicted (recorded in metrics.json; another mode is predicted again)
VAL_PREDS_MODE = "float32, flip TTA"


@dataclass
class TrainResult:
    history: list[dict]
    best_val_mape: float
    best_epoch: int
    epochs_run: int
    seconds: float
    best_path: Path
    last_path: Path
    val_pred: np.ndarray | None = None  # float16 (N, 300, 1259), best EMA model on val_ds
    val_ids: list[str] = field(default_factory=list)
    stop_reason: str = ""


@dataclass
class Run:
    """What stays fixed during one training run: settings, output folder, ranks, device."""

    cfg: TrainConfig
    out_dir: Path
    ranks: Dist
    device: torch.device
    variant: Variant | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    restart_on_change: bool = False
    on_epoch_end: EpochCallback | None = None
    amp_dtype: torch.dtype | None = None
    on_start: StartCallback | None = None

    @property
    def progress(self) -> bool:
        """Progress bars: on rank 0 when ``train.progress``."""
        return bool(self.cfg.progress) and self.ranks.main

    def new_state(self, train_ds: Dataset) -> TrainState:
        fp = fingerprint(self.cfg, self.variant, train_ds, self.ranks.world)
        return TrainState(fingerprint=fp, variant=variant_record(self.variant))

    def saved_state(self, fp: dict) -> TrainState | None:
        return resume_state(
            self.out_dir, fp, restart_on_change=self.restart_on_change, ranks=self.ranks
        )

    def epoch_done(self, row: dict) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(dict(row))

    def started(self, state: TrainState) -> None:
        """Rank 0 tells ``on_start`` the state training starts from (fresh or resumed); it
        may set ``state.run_id``, which ``last.pt`` then keeps."""
        if self.on_start is not None and self.ranks.main:
            self.on_start(state)


# --------------------------------------------------------------------------- the baseline


def fit_baseline(
    run: Run, model: nn.Module, train_ds: Dataset, val_ds: Dataset | None
) -> TrainResult:
    """Fit a closed-form model (``depth_trend``) on the training targets, validate, save."""
    state = run.new_state(train_ds)
    saved = run.saved_state(state.fingerprint)
    if saved is not None and saved.finished:
        log_main(
            run.ranks,
            "%s: already fitted (val MAPE %.5f); nothing to do",
            run.out_dir,
            saved.best_val_mape,
        )
        model.load_state_dict(saved.model)
        saved.stop_reason = saved.stop_reason or "fitted"
        run.started(saved)
        return finish(run, model, val_ds, saved)
    run.started(state)
    t0 = time.time()
    seed_everything(training_seed(run.cfg.seed, run.ranks, weights=True))
    fit_bar = progress_bar(targets(train_ds), "fit", enabled=run.progress, total=len(train_ds))
    model.fit(fit_bar)
    model.to(run.device)
    val = validate(model, val_ds, run)
    secs = time.time() - t0
    row = {"epoch": 1, "train_loss": float("nan"), "val_mape": val, "lr": 0.0, "seconds": secs}
    state = dataclasses.replace(
        state,
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        epoch=1,
        best_val_mape=val,
        best_epoch=1,
        history=[row],
        seconds=secs,
        finished=True,
        stop_reason="fitted",
    )
    if run.ranks.main:
        best = best_checkpoint(model.state_dict(), run.variant, run.cfg, 1, val, run.meta)
        save_checkpoint(best, run.out_dir / BEST_NAME)
        state.save(run.out_dir / LAST_NAME)
        log_main(run.ranks, "depth_trend fitted on %d targets: val MAPE %.5f", len(train_ds), val)
        run.epoch_done(row)  # after last.pt, as for trained models: a resumed run logs it
    return finish(run, model, val_ds, state)


# --------------------------------------------------------------------------- evaluation, results


def _predict(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    pred_fn = getattr(model, "predict", None)
    if callable(pred_fn):
        return pred_fn(x, tta=tta)
    return model(x)


@torch.no_grad()
def validate(model: nn.Module, val_ds: Dataset | None, run: Run) -> float:
    """Mean per-sample MAPE of ``model`` over ``val_ds`` (sharded across ranks, then reduced);
    NaN without a validation set."""
    if val_ds is None or len(val_ds) == 0:
        return float("nan")
    cfg, ranks, dev = run.cfg, run.ranks, run.device
    model.eval()
    idx = list(range(ranks.rank, len(val_ds), ranks.world))
    loader = make_loader(
        Subset(val_ds, idx), cfg.val_batch_size, num_workers=cfg.num_workers, device=dev
    )
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    for batch in progress_bar(loader, "val", enabled=run.progress, leave=False):
        x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        with autocast(dev, run.amp_dtype):
            p = _predict(model, x, bool(cfg.tta_val))
        m = per_sample_mape(p, y)
        total[0] += m.double().sum()
        total[1] += m.numel()
    if ranks.active:
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    ds: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    amp: torch.dtype | None = None,
    progress: bool = False,
    tta: bool | None = None,
) -> np.ndarray:
    """float16 ``(N, 300, 1259)`` predictions of ``model`` on every sample of ``ds``
    (``cfg``: ``val_batch_size``, ``num_workers``; ``amp``: autocast dtype; ``tta``: flip
    test-time augmentation, default ``cfg.tta_val``)."""
    model.eval()
    out = []
    loader = make_loader(ds, cfg.val_batch_size, num_workers=cfg.num_workers, device=device)
    for batch in progress_bar(loader, "predict val", enabled=progress, leave=False):
        with autocast(device, amp):
            p = _predict(model, batch[0].to(device), bool(cfg.tta_val if tta is None else tta))
        out.append(p.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out) if out else np.zeros((0, 300, 1259), np.float16)


def finish(run: Run, model: nn.Module, val_ds: Dataset | None, state: TrainState) -> TrainResult:
    """The run's result; on rank 0 also ``val_preds.npz`` (the best model's validation
    predictions, reused while they match the validation set), ``history.csv`` and
    ``metrics.json``."""
    out = run.out_dir
    res = TrainResult(
        history=state.history,
        best_val_mape=state.best_val_mape,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        seconds=state.seconds,
        best_path=out / BEST_NAME,
        last_path=out / LAST_NAME,
        stop_reason=state.stop_reason,
    )
    if not run.ranks.main:
        return res
    res.val_ids, res.val_pred = _val_predictions(run, model, val_ds)
    write_history(out / HISTORY_NAME, state.history)
    metrics = {
        "best_val_mape": state.best_val_mape,
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "stop_reason": state.stop_reason,
        "n_val": len(res.val_ids),
        "val_preds": VAL_PREDS_MODE,
    }
    write_metrics(out / METRICS_NAME, metrics)
    return res


def _saved_mode(metrics_path: Path) -> str | None:
    """The ``val_preds`` mode recorded in a run's ``metrics.json`` (None: none readable)."""
    try:
        return json.loads(metrics_path.read_text()).get("val_preds")
    except (OSError, ValueError, AttributeError):
        return None


def _val_predictions(
    run: Run, model: nn.Module, val_ds: Dataset | None
) -> tuple[list[str], np.ndarray]:
    """``val_preds.npz`` if it matches ``val_ds``, else the best model's predictions (saved)."""
    preds_path, best_path = run.out_dir / VAL_PREDS_NAME, run.out_dir / BEST_NAME
    ids = list(val_ds.sample_ids) if val_ds is not None else []
    if preds_path.is_file() and _saved_mode(run.out_dir / METRICS_NAME) == VAL_PREDS_MODE:
        pids, arr = load_val_preds(preds_path)
        if pids == ids:
            return pids, arr
    if best_path.is_file() and val_ds is not None and len(val_ds):
        model.load_state_dict(load_checkpoint(best_path)["model"])
        model.to(run.device)
        # as the test is predicted (Ensemble.predict): float32, flip TTA; whatever the
        # per-epoch validation's amp and tta_val, the tuned weights see test-like predictions
        pred = predict_dataset(model, val_ds, run.cfg, run.device, None, run.progress, tta=True)
    else:
        pred = np.zeros((0, 300, 1259), np.float16)
    save_val_preds(preds_path, ids, pred)
    return ids, pred
