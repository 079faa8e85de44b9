"""The ``train`` stage: one model variant trained on one fold (``train@<run>`` in dvc.yaml).

``speedstructure train --variant V --fold K`` builds variant ``V`` of ``params.yaml``
(:func:`speedstructure.models.build.build_model`), reads fold ``K``'s training and validation
samples from the fold table (``paths.folds_table``; from the zips it names, or with
``--store`` from the ingested sample store) and trains it with the engine
(:func:`speedstructure.engine.loop.train_model`) into ``paths.models/V/fold_K``
(``--output``).  The settings are the ``train`` section with the variant's own
``train`` overrides (:meth:`speedstructure.config.schema.Params.train_for`).

Running the same command again resumes from ``last.pt``; a ``last.pt`` written with
other settings or data is an error, or with ``--restart-on-change`` (how the DVC
stages run) is discarded.  Under ``torchrun`` every rank runs the command and rank 0
writes the files.

With MLflow (``--mlflow``, the default) the stage is one run: the variant and train
settings as params, per-epoch train loss / validation MAPE / learning rate, the history
and the training-curve plot (``curves.png``, drawn in any case); tags variant, fold, git
commit, DVC stage and ``CUDA_VISIBLE_DEVICES``.  The checkpoint is not copied into MLflow:
the run records a reference to the DVC-tracked ``best.pt`` (artifact
``model/checkpoint.json`` and tags ``checkpoint_path``, ``checkpoint_md5``: its path and
the MD5 that ``dvc.lock`` records), so each checkpoint is stored once by DVC and once in
the registered model (:mod:`speedstructure.stages.register`).  An interrupted training
that resumes continues its run (the run id is saved in ``last.pt``), and a tracking server
that is unreachable for a while does not stop it
(:class:`speedstructure.tracking.training.TrainingRun`).
The run records ``train.threads`` as the CPU thread count actually used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.config.typed import as_plain, resolve_path
from speedstructure.engine.checkpoint import CURVES_NAME, HISTORY_NAME, METRICS_NAME
from speedstructure.engine.data import SampleDataset, read_folds_table, rows_in_store
from speedstructure.engine.loop import train_model
from speedstructure.engine.results import EpochCallback, StartCallback, TrainResult
from speedstructure.engine.runtime import (
    Placement,
    is_main_process,
    place,
    seed_everything,
    training_seed,
)
from speedstructure.physics.seafloor import FloorPicker
from speedstructure.tracking.training import TrainingRun, epoch_metrics, log_training_result


def run_training(
    params: Params,
    variant: str,
    fold: int,
    *,
    folds_table: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    epochs: int | None = None,
    device: str | None = None,
    store: str | os.PathLike | None = None,
    restart_on_change: bool = False,
    progress: bool | None = None,
    on_epoch_end: EpochCallback | None = None,
    on_start: StartCallback | None = None,
    threads: int | None = None,
    placement: Placement | None = None,
) -> TrainResult:
    """Train variant ``variant`` of ``params`` on fold ``fold``.

    Samples are read from the zips named in the fold table (default:
    ``paths.folds_table``), or, with ``store``, from the ingested sample store (which
    must hold every sample of the table).  ``output`` defaults to
    :meth:`Params.run_dir`; ``epochs``, ``device``, ``progress`` and ``threads`` override
    the ``train`` settings; ``placement`` is where to train when already decided
    (:func:`~speedstructure.engine.runtime.place`).  Relative paths are relative to the
    project root.
    """
    from speedstructure.models.build import build_model

    v = params.variant(variant)
    cfg = params.train_for(v)
    overrides = {"epochs": epochs, "progress": progress, "threads": threads}
    cfg = dataclasses.replace(cfg, **{k: x for k, x in overrides.items() if x is not None})
    table = resolve_path(folds_table, params.root) if folds_table else params.path("folds_table")
    out = resolve_path(output, params.root) if output else params.run_dir(variant, fold)
    train_rows, val_rows = read_folds_table(table, int(fold), params.root)
    if store is not None:
        store_dir = resolve_path(store, params.root)
        train_rows, val_rows = rows_in_store(store_dir, table, train_rows, val_rows)
    if placement is None:
        placement = place(device if device is not None else cfg.device, cfg.threads)
    seed_everything(training_seed(cfg.seed, placement.ranks, weights=True))
    picker = FloorPicker.from_synth(params.synth)
    model = build_model(v, device=placement.device, floor_picker=picker)
    train_ds, val_ds = SampleDataset(train_rows), SampleDataset(val_rows)
    try:
        return train_model(
            model,
            train_ds,
            val_ds,
            cfg,
            out,
            on_epoch_end=on_epoch_end,
            variant=v,
            meta={"variant_name": variant, "fold": int(fold), "floor_picker": picker.record()},
            restart_on_change=restart_on_change,
            on_start=on_start,
            placement=placement,
        )
    finally:
        train_ds.close()
        val_ds.close()


def run_training_stage(
    params: Params, variant: str, fold: int, *, track: bool = True, **kw
) -> TrainResult:
    """:func:`run_training` as a pipeline stage: the training-curve plot, and on rank 0
    with ``track`` an MLflow run around it (see the module docstring).  ``train.threads``
    is resolved here (:func:`~speedstructure.engine.runtime.resolve_threads`), so the run
    records the count used."""
    from speedstructure.engine.runtime import resolve_threads
    from speedstructure.reports.plots import plot_training_curves

    title = f"{variant} fold {fold}"
    kw.setdefault("threads", resolve_threads(params.train_for(variant).threads))
    if not (track and is_main_process()):
        res = run_training(params, variant, fold, **kw)
        if is_main_process():
            plot_training_curves(res.history, res.best_path.parent / CURVES_NAME, title)
        return res
    from speedstructure.engine.runtime import precision_record

    v = params.variant(variant)
    cfg = params.train_for(v)
    placement = place(kw.pop("device", None) or cfg.device, kw["threads"])
    logged = {
        "variant": {k: x for k, x in as_plain(v).items() if k != "train"},
        "train": {**as_plain(cfg), "threads": placement.threads},
        "precision": precision_record(cfg.amp, cfg.muon_precision, placement.device),
    }
    run_name = f"{variant}-f{int(fold)}"
    tags = {
        "stage": "train",
        "variant": variant,
        "fold": int(fold),
        "dvc_stage": f"train@{run_name}",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
    }
    run = TrainingRun(run_name, params, tags=tags, params=logged, metrics_of=epoch_metrics)
    with run:  # one run per training, continued when it resumes (its id is in last.pt)
        res = run_training(
            params,
            variant,
            fold,
            on_start=run.attach,
            on_epoch_end=run.log_epoch,
            placement=placement,
            **kw,
        )
        curves = plot_training_curves(res.history, res.best_path.parent / CURVES_NAME, title)
        files = [res.best_path.parent / name for name in (METRICS_NAME, HISTORY_NAME)]
        run.finish(lambda: log_training_result(res, [*files, curves], params.root))
    return res


# --------------------------------------------------------------------------- CLI


_DESCRIPTION = (
    "Train a variant (params.yaml variants:) on fold K; resumes from OUTPUT/last.pt. "
    "Under torchrun every rank runs it and rank 0 writes the files."
)
# options passed to run_training as they are (the dest of each is run_training's keyword)
_RUN_OPTIONS = ("folds_table", "output", "epochs", "device", "store", "restart_on_change")


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser(
        "train", help="train one model variant on one fold", description=_DESCRIPTION
    )
    p.add_argument("--variant", required=True, help="variant name in params.yaml 'variants:'")
    p.add_argument("--fold", required=True, type=int, help="validation fold K")
    p.add_argument(
        "--folds",
        dest="folds_table",
        metavar="CSV",
        default=None,
        help="fold table CSV (default: paths.folds_table)",
    )
    p.add_argument(
        "--output", default=None, help="output folder (default: paths.models/VARIANT/fold_K)"
    )
    p.add_argument("--epochs", default=None, type=int, help="override train.epochs")
    p.add_argument(
        "--device", default=None, choices=["cpu", "cuda", "auto"], help="override train.device"
    )
    p.add_argument(
        "--store", default=None, help="read samples from this ingested store instead of the zips"
    )
    p.add_argument(
        "--restart-on-change",
        action="store_true",
        help="discard a last.pt written with other settings or data instead of failing",
    )
    cli.add_mlflow_option(p)
    cli.add_quiet_option(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    options = {key: getattr(args, key) for key in _RUN_OPTIONS}
    progress = False if args.quiet else None
    params = load_params()
    res = run_training_stage(
        params, args.variant, args.fold, track=args.mlflow, progress=progress, **options
    )
    if is_main_process():
        print(
            f"{args.variant} fold {args.fold}: best val MAPE {res.best_val_mape:.5f} at epoch "
            f"{res.best_epoch} ({res.epochs_run} epochs, {res.seconds:.1f} s, "
            f"{res.stop_reason}); {res.best_path}"
        )
    return 0
