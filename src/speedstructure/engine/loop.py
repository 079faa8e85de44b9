"""The training engine: one model trained on one fold, validated each epoch, checkpointed.

:func:`train_model` trains a model on a training set and validates it on a validation
set, writing into an output folder (see :mod:`speedstructure.engine.checkpoint`):

* loss = MAPE (:func:`speedstructure.metrics.mape`, float32), the challenge metric, plus
  ``lateral_weight`` x :func:`speedstructure.metrics.lateral_loss` (the lateral deviations
  from each depth row's mean, which plain MAPE drowns); the reported training figure is the
  MAPE alone;
* :class:`~speedstructure.engine.optim.MuonAdamW` with the cosine-then-constant schedule,
  stepped once per optimizer step;
* gradient clipping, real gradient accumulation (``accum_steps`` micro-batches per
  step; a last, partial group at the epoch end), mixed precision (``amp: none | auto |
  bf16 | fp16``: auto is bf16 where bf16 is native, fp16 with a ``GradScaler``), EMA of
  the weights (timm ``ModelEmaV3``); the EMA model is what is validated and saved;
* the physically consistent horizontal flip as augmentation;
* with ``cache_inputs`` the model-ready images of the training set computed once, before
  the first epoch (:class:`~speedstructure.engine.data.PreparedInputs`): the same
  numbers as preparing them every epoch, without re-reading and resampling the gathers;
* validation each epoch (in the training's precision; the model's head and the loss
  are float32 under autocast), early stopping and best checkpoint on validation MAPE;
* at the end, ``val_preds.npz``: the best model's validation predictions made as the
  test is predicted (float32, flip TTA), which the ensemble weights are tuned on;
* resumable: ``last.pt`` holds a :class:`~speedstructure.engine.checkpoint.TrainState`
  (written atomically at each epoch end); running the same call again continues;
* distributed data parallel under ``torchrun`` (gloo on CPU, nccl on CUDA), on one node or
  several: the data is sharded across ranks, only global rank 0 writes files (the device is
  chosen by ``LOCAL_RANK``); every rank resumes from the same ``last.pt``.

The ``depth_trend`` baseline has no gradient-trained parameters (:func:`is_baseline`):
it is fitted instead (:func:`~speedstructure.engine.results.fit_baseline`).

Results are bit-identical to the engine before the split into modules: seeds, model
preparation, optimizer, sampler and every random draw happen in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from speedstructure.config.schema import TrainConfig, Variant
from speedstructure.engine.checkpoint import (
    BEST_NAME,
    HISTORY_NAME,
    LAST_NAME,
    VAL_PREDS_NAME,
    TrainState,
    best_checkpoint,
    save_checkpoint,
    write_history,
)
from speedstructure.engine.data import (
    PreparedInputs,
    cached_training_set,
    flip_batch,
    flip_prepared_batch,
    make_loader,
    targets,
)
from speedstructure.engine.optim import build_optimizer, build_scheduler
from speedstructure.engine.results import (
    EpochCallback,
    Run,
    StartCallback,
    TrainResult,
    finish,
    fit_baseline,
    validate,
)
from speedstructure.engine.runtime import (
    Placement,
    amp_dtype,
    autocast,
    gather_rng_states,
    log_main,
    place,
    progress_bar,
    seed_everything,
    set_rng_state,
    teardown_distributed,
    training_seed,
)
from speedstructure.errors import UserError
from speedstructure.metrics import lateral_loss, mape

# --------------------------------------------------------------------------- entry point


def train_model(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    on_epoch_end: EpochCallback | None = None,
    device: str | torch.device | None = None,
    variant: Variant | None = None,
    meta: dict | None = None,
    restart_on_change: bool = False,
    on_start: StartCallback | None = None,
    placement: Placement | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_ds``, validate on ``val_ds``; write checkpoints into ``out_dir``.

    Resumes from ``out_dir/last.pt`` when present.  A ``last.pt`` written with other
    settings or training samples is an error, or with ``restart_on_change`` is discarded
    and training starts afresh.  ``variant`` (default: ``model.variant``, set by
    :func:`~speedstructure.models.build.build_model`) is stored in ``best.pt`` so the model can
    be rebuilt; ``device`` overrides ``cfg.device``.  Under ``torchrun`` only rank 0
    writes files, and the returned ``val_pred`` is ``None`` on other ranks.  ``on_start``
    (rank 0) sees the state training starts from, before the first epoch.  ``placement``
    is where the model was built (:func:`~speedstructure.engine.runtime.place`); without it
    the ranks, device (``device``, else ``cfg.device``) and CPU threads are decided here.
    """
    if variant is None:
        variant = getattr(model, "variant", None)
    if placement is None:
        placement = place(device if device is not None else cfg.device, cfg.threads)
    ranks, dev = placement.ranks, placement.device
    log_main(ranks, "CPU threads: %d", placement.threads)
    try:
        out = Path(out_dir)
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
        baseline = is_baseline(model)
        run = Run(
            cfg=cfg,
            out_dir=out,
            ranks=ranks,
            device=dev,
            variant=variant,
            meta=dict(meta or {}),
            restart_on_change=restart_on_change,
            on_epoch_end=on_epoch_end,
            amp_dtype=None if baseline else amp_dtype(cfg.amp, dev),
            on_start=on_start,
        )
        if baseline:
            return fit_baseline(run, model, train_ds, val_ds)
        return Trainer(run, model, train_ds, val_ds).fit()
    finally:
        teardown_distributed(ranks)


def is_baseline(model: nn.Module) -> bool:
    """A model fitted in closed form (``fit(targets)``) with no trainable parameters."""
    if getattr(model, "requires_training", True) is False:
        return True
    return callable(getattr(model, "fit", None)) and not any(
        p.requires_grad for p in model.parameters()
    )


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """The epoch loop of one gradient-trained model.

    The constructor prepares everything in the order the numerics depend on: seed,
    depth-trend prior, gradient checkpointing, device, DDP wrapper, optimizer, sampler,
    loader, scheduler, scaler, EMA.  :meth:`fit` resumes or starts, then runs epochs.
    """

    def __init__(self, run: Run, model: nn.Module, train_ds: Dataset, val_ds: Dataset | None):
        from timm.utils import ModelEmaV3

        cfg, ranks = run.cfg, run.ranks
        self.run, self.model, self.train_ds, self.val_ds = run, model, train_ds, val_ds
        self.accum = max(1, int(cfg.accum_steps))
        self.clip = float(cfg.clip or 0)
        self.flip_prob = float(cfg.flip_prob or 0)
        seed_everything(training_seed(cfg.seed, ranks, weights=False))
        self._prepare_model()
        self.net = self._wrapped()
        self.optimizer = build_optimizer(model, cfg)
        self.sampler = DistributedSampler(
            train_ds, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=int(cfg.seed)
        )
        self.train_set = cached_training_set(
            train_ds, model, bool(cfg.cache_inputs), progress=run.progress
        )
        self.prepared = isinstance(self.train_set, PreparedInputs)
        if callable(getattr(model, "fit_level_reader", None)):  # before the EMA copies it
            model.fit_level_reader(self.train_set)
        self.loader = make_loader(
            self.train_set,
            cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            device=run.device,
        )
        self.n_batches = len(self.loader)
        steps_per_epoch = math.ceil(self.n_batches / self.accum)
        self.scheduler = build_scheduler(self.optimizer, cfg, steps_per_epoch, world=ranks.world)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.ema = ModelEmaV3(model, decay=float(cfg.ema_decay))
        self.state = run.new_state(train_ds)

    def _prepare_model(self) -> None:
        """Prior, gradient checkpointing and device: before the EMA copy and DDP, so every
        copy gets them."""
        model = self.model
        if getattr(model, "needs_prior", False):
            model.fit_prior(targets(self.train_ds))
        if self.run.cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise UserError(
                    "train.grad_checkpointing: this model has no transformer blocks to checkpoint"
                )
            model.set_grad_checkpointing(True)
        model.to(self.run.device)

    def _wrapped(self) -> nn.Module:
        """The model under DDP (wrapping broadcasts rank 0's weights: every rank, and its
        EMA, starts equal), or the model itself on one rank."""
        run = self.run
        if not run.ranks.active:
            return self.model
        return nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=bool(run.cfg.ddp_find_unused),
        )

    # -- the loop

    def fit(self) -> TrainResult:
        run, cfg = self.run, self.run.cfg
        done = self._resume()
        run.started(self.state)
        if done:
            return finish(run, self.ema.module, self.val_ds, self.state)
        if run.ranks.main:  # predictions of an earlier best model are stale once training goes on
            (run.out_dir / VAL_PREDS_NAME).unlink(missing_ok=True)
        for epoch in range(self.state.epoch + 1, int(cfg.epochs) + 1):
            t0 = time.time()
            train_loss = self.run_epoch(epoch)
            val = validate(self.ema.module, self.val_ds, run)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_mape": val,
                "lr": float(self.optimizer.param_groups[0]["lr"]),
                "seconds": time.time() - t0,
            }
            improved = self.state.record_epoch(
                row,
                has_val=self.val_ds is not None and len(self.val_ds) > 0,
                patience=int(cfg.patience or 0),
                epochs=int(cfg.epochs),
            )
            self.save_epoch(row, improved)
            if self.state.finished:
                if self.state.stop_reason == "early_stop":
                    log_main(
                        run.ranks, "early stop: no improvement for %d epochs", self.state.bad_epochs
                    )
                break
        if not self.state.finished:
            self.state.stop_reason = "epochs"
        return finish(run, self.ema.module, self.val_ds, self.state)

    def run_epoch(self, epoch: int) -> float:
        """One pass over this rank's shard; the mean training MAPE over all ranks."""
        run = self.run
        self.net.train()
        self.sampler.set_epoch(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=run.device)
        desc = f"epoch {epoch}/{run.cfg.epochs}"
        bar = progress_bar(self.loader, desc, enabled=run.progress, total=self.n_batches)
        for i, batch in enumerate(bar):
            loss, n = self.train_batch(batch, i, epoch)
            loss_sum[0] += loss.detach().double() * n
            loss_sum[1] += n
            if run.progress:
                bar.set_postfix(
                    loss=f"{float(loss_sum[0] / loss_sum[1]):.5f}",
                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                )
        if run.ranks.active:
            dist.all_reduce(loss_sum)
        return float(loss_sum[0] / loss_sum[1])

    def train_batch(self, batch: tuple, i: int, epoch: int) -> tuple[torch.Tensor, int]:
        """Batch ``i`` of an epoch as the epoch trains it: onto the device, flipped, forward
        and backward, and the optimizer step after the last micro-batch of its group; the
        loss and the batch's size (``speedstructure bench training`` times this)."""
        run = self.run
        x = batch[0].to(run.device, non_blocking=True)
        y = batch[1].to(run.device, non_blocking=True)
        flip = flip_prepared_batch if self.prepared else flip_batch
        x, y = flip(x, y, self.flip_prob)
        group_size, last_micro = self._group(i)
        loss = self._backward(x, y, group_size, sync=last_micro, where=(epoch, i))
        if last_micro:
            self._optimizer_step()
        return loss, x.shape[0]

    def _group(self, i: int) -> tuple[int, bool]:
        """``(micro-batches in batch i's accumulation group, whether i is its last)``; the
        epoch's last group may be partial."""
        start = (i // self.accum) * self.accum
        size = min(self.accum, self.n_batches - start)
        return size, i == start + size - 1

    def _backward(
        self, x: torch.Tensor, y: torch.Tensor, group_size: int, *, sync: bool, where: tuple
    ) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch (gradients are synchronised
        across ranks only on the last micro-batch of a group); the micro-batch's MAPE."""
        run = self.run
        no_sync = not sync and run.ranks.active
        with self.net.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(run.device, run.amp_dtype):
                pred = self.net(x, prepared=True) if self.prepared else self.net(x)
            error = mape(pred, y)
            loss = error
            if run.cfg.lateral_weight:
                loss = loss + float(run.cfg.lateral_weight) * lateral_loss(pred, y)
            if run.cfg.amp != "fp16" and not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss at epoch {where[0]}, batch {where[1]}"
                )
            self.scaler.scale(loss / group_size).backward()
        return error

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on one batch already on the device, no flip, no accumulation
        (what ``speedstructure bench gpu`` times): forward, loss, backward, step; the loss."""
        self.net.train()
        loss = self._backward(x, y, 1, sync=True, where=(self.state.epoch, self.state.opt_steps))
        self._optimizer_step()
        return loss

    def _optimizer_step(self) -> None:
        """Clip, step (through the scaler), schedule, and update the EMA."""
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.opt_steps += 1
        self.ema.update(self.model, step=self.state.opt_steps)

    # -- state

    def _resume(self) -> bool:
        """Continue from ``last.pt`` if it matches; True when there is nothing left to do."""
        run, cfg = self.run, self.run.cfg
        saved = run.saved_state(self.state.fingerprint)
        if saved is None:
            return False
        try:
            self._load_saved(saved)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{run.out_dir / LAST_NAME}: does not fit this model ({reason}); "
                "remove it to train afresh"
            ) from exc
        self.state = _bookkeeping(saved, self.state)
        st = self.state
        if st.finished and st.stop_reason == "epochs" and cfg.epochs > st.epoch:
            st.finished = False  # more epochs requested than the finished run had
        if st.finished or st.epoch >= cfg.epochs:
            st.stop_reason = st.stop_reason or "epochs"
            log_main(
                run.ranks,
                "%s: training finished (%s, %d epochs, best val MAPE %.5f at epoch %d); "
                "nothing to do",
                run.out_dir,
                st.stop_reason,
                st.epoch,
                st.best_val_mape,
                st.best_epoch,
            )
            return True
        log_main(run.ranks, "%s: resuming after epoch %d", run.out_dir, st.epoch)
        return False

    def _load_saved(self, saved: TrainState) -> None:
        """The saved weights, EMA, optimizer, schedule, scaler and this rank's RNG state."""
        self.model.load_state_dict(saved.model)
        self.ema.module.load_state_dict(saved.ema)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        if saved.scaler:
            self.scaler.load_state_dict(saved.scaler)
        if self.run.ranks.rank < len(saved.rng):
            set_rng_state(saved.rng[self.run.ranks.rank])

    def save_epoch(self, row: dict, improved: bool) -> None:
        """``best.pt`` (when improved), ``last.pt`` and the history, on rank 0."""
        run, st = self.run, self.state
        rngs = gather_rng_states(run.ranks)
        if run.ranks.main:
            if improved:
                best = best_checkpoint(
                    self.ema.module.state_dict(),
                    run.variant,
                    run.cfg,
                    row["epoch"],
                    row["val_mape"],
                    run.meta,
                )
                save_checkpoint(best, run.out_dir / BEST_NAME)
            self._snapshot(rngs).save(run.out_dir / LAST_NAME)
            write_history(run.out_dir / HISTORY_NAME, st.history)
            log_main(
                run.ranks,
                "epoch %d: train MAPE %.5f  val MAPE %.5f  lr %.3g  %.1fs%s",
                row["epoch"],
                row["train_loss"],
                row["val_mape"],
                row["lr"],
                row["seconds"],
                "  *best*" if improved else "",
            )
            run.epoch_done(row)
        run.ranks.barrier()

    def _snapshot(self, rngs: list[dict]) -> TrainState:
        return dataclasses.replace(
            self.state,
            model=self.model.state_dict(),
            ema=self.ema.module.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rngs,
        )


def _bookkeeping(saved: TrainState, fresh: TrainState) -> TrainState:
    """The saved run's progress, with this run's fingerprint and no state dicts."""
    return dataclasses.replace(
        saved,
        fingerprint=fresh.fingerprint,
        variant=fresh.variant,
        epoch=int(saved.epoch),
        opt_steps=int(saved.opt_steps),
        history=list(saved.history),
        seconds=float(saved.seconds),
        finished=bool(saved.finished),
        rng=[],
        model=None,
        ema=None,
        optimizer=None,
        scheduler=None,
        scaler=None,
    )
