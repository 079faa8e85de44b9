"""What a training run writes into its output folder, and how it resumes.

Files (rank 0 only; each written atomically through :func:`speedstructure.fsutil.atomic_output`)::

    best.pt          best_checkpoint(): {"model": EMA state_dict, "variant": Variant.model_dict(),
                     "train": TrainConfig, "epoch", "val_mape", "meta"}; build_model(ck["variant"])
                     rebuilds the network
    last.pt          a TrainState: everything needed to continue, written at each epoch end
    val_preds.npz    float16 (300, 1259) prediction of the best model per validation sample id
    metrics.json     best_val_mape, best_epoch, epochs, stop_reason, n_val (a DVC metric)
    history.csv      one row per epoch: epoch, train_loss, val_mape, lr
                     (both versioned in git: no timings, which go to MLflow and last.pt)
    curves.png       the training curves (drawn by the train stage)

A :class:`TrainState` is saved, resumed and fingerprinted as one object.  Its
``fingerprint`` (:func:`fingerprint`) records the settings, the training samples and
the world size; a ``last.pt`` whose fingerprint differs from the current run is not
resumed (:func:`resume_state`).  The keys in :data:`RESUME_FREE_KEYS` may change
between a run and its resumption.

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`):
they hold tensors and plain values only.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speedstructure.config.load import parse_variant
from speedstructure.config.schema import TrainConfig, Variant
from speedstructure.config.typed import ConfigError, as_plain
from speedstructure.engine.runtime import Dist, log_main
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_output, atomic_write_json, atomic_write_text

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
VAL_PREDS_NAME = "val_preds.npz"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.csv"
CURVES_NAME = "curves.png"
CHECKPOINT_FORMAT = 1
HISTORY_COLUMNS = ("epoch", "train_loss", "val_mape", "lr")  # no "seconds": versioned

# train settings that may change between a run and its resumption without invalidating it
RESUME_FREE_KEYS = frozenset(
    {
        "epochs",
        "num_workers",
        "device",
        "progress",
        "val_batch_size",
        "patience",
        "tta_val",
        "grad_checkpointing",
        "threads",  # the machine's share of cores (recorded in the run; numerics may differ)
        "cache_inputs",  # the same images, prepared once or every epoch (bit-identical)
    }
)


# --------------------------------------------------------------------------- files


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's mapping (``weights_only=True``, on the CPU); any failure is a
    one-line :class:`UserError` naming the file."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise UserError(f"{path}: not a readable checkpoint ({_reason(exc)})") from exc
    if not isinstance(obj, dict):
        raise UserError(
            f"{path}: not a readable checkpoint (holds a {type(obj).__name__}, not a mapping)"
        )
    return obj


def _reason(exc: Exception) -> str:
    """The gist of a ``torch.load`` failure in one line, without torch's advice (to load
    with ``weights_only=False``: wrong for a file that failed the safe load) or ANSI codes."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    raw = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))
    if "Weights only load failed" in raw:  # what the safe unpickler refused, and why
        detail = raw.split("WeightsUnpickler error:", 1)[-1]
        paragraphs = [
            " ".join(p.split())
            for p in re.split(r"\n\s*\n", detail)
            if p.strip() and not p.strip().startswith(("Weights only", "Check the documentation"))
        ]
        first = paragraphs[0].split(". ")[0].rstrip(".") if paragraphs else ""
        return f"unsupported content: {first}" if first else "unsupported content"
    text = " ".join(raw.split())
    text = text.split(" Check the documentation")[0].split(". ")[0].rstrip(".")
    return text or type(exc).__name__


def variant_record(variant: Variant | None) -> dict[str, Any]:
    """What a checkpoint records of a variant: :meth:`Variant.model_dict` (``{}`` for none)."""
    return {} if variant is None else variant.model_dict()


def best_checkpoint(
    state_dict: dict[str, torch.Tensor],
    variant: Variant | None,
    train_cfg: TrainConfig | dict,
    epoch: int,
    val_mape: float,
    meta: dict | None = None,
) -> dict[str, Any]:
    """The ``best.pt`` mapping: weights (copied to the CPU), the variant that rebuilds
    them, the training settings, the epoch, its validation MAPE and ``meta``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "variant": variant_record(variant),
        "train": as_plain(train_cfg),
        "epoch": int(epoch),
        "val_mape": float(val_mape),
        "meta": as_plain(meta or {}),
    }


def save_val_preds(path: str | os.PathLike, ids: Sequence[str], preds: np.ndarray) -> None:
    """float16 predictions, one array per sample id, as an ``.npz`` (atomically)."""
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, **{sid: p.astype(np.float16) for sid, p in zip(ids, preds, strict=False)})


def load_val_preds(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(ids, preds (N, 300, 1259) float16)`` of :func:`save_val_preds`."""
    with np.load(path) as z:
        ids = list(z.files)
        arr = np.stack([z[k] for k in ids]) if ids else np.zeros((0, 300, 1259), np.float16)
    return ids, arr


def write_history(path: str | os.PathLike, history: Sequence[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> None:
    atomic_write_json(path, metrics)


def discard_outputs(out_dir: Path) -> None:
    """Remove a run's checkpoints and what was derived from them."""
    for name in (LAST_NAME, BEST_NAME, VAL_PREDS_NAME, METRICS_NAME, HISTORY_NAME):
        (out_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- the state


@dataclass
class TrainState:
    """Everything ``last.pt`` holds: the bookkeeping of the run and, when saved, the
    state dicts of the model, its EMA, the optimizer, the scheduler and the scaler and
    every rank's RNG state.  Saved (:meth:`save`), loaded (:meth:`load`) and compared
    (``fingerprint``) as one object."""

    fingerprint: dict = field(default_factory=dict)
    variant: dict = field(default_factory=dict)
    epoch: int = 0  # epochs completed
    opt_steps: int = 0
    best_val_mape: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False
    stop_reason: str = ""
    run_id: str = ""  # the tracking (MLflow) run this training logs to: resuming continues it
    rng: list[dict] = field(default_factory=list)
    model: dict | None = None
    ema: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        save_checkpoint(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainState:
        """The state in ``path``; a file that is not one is a one-line :class:`UserError`."""
        d = load_checkpoint(path)
        bad = _state_problem(d)
        if bad:
            raise UserError(f"{path}: not a training state ({bad})")
        return cls.from_dict(d)

    def record_epoch(self, row: dict, *, has_val: bool, patience: int, epochs: int) -> bool:
        """Add one epoch's history row; update the best epoch, early stopping and the stop
        reason.  True when this epoch's weights are the new best."""
        epoch, val = int(row["epoch"]), float(row["val_mape"])
        self.epoch = epoch
        self.seconds += row["seconds"]
        self.history.append(row)
        improved = math.isfinite(val) and val < self.best_val_mape
        if improved:
            self.best_val_mape, self.best_epoch, self.bad_epochs = val, epoch, 0
        elif math.isfinite(val):
            self.bad_epochs += 1
        if not math.isfinite(val) and not has_val:
            # no validation set: the latest EMA weights are the best we have
            self.best_epoch = epoch
            improved = True
        if patience > 0 and self.bad_epochs >= patience:
            self.finished, self.stop_reason = True, "early_stop"
        elif epoch >= epochs:
            self.finished, self.stop_reason = True, "epochs"
        return improved


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "fingerprint": (dict,),
    "variant": (dict,),
    "epoch": (int,),
    "opt_steps": (int,),
    "best_val_mape": (float, int),
    "best_epoch": (int,),
    "bad_epochs": (int,),
    "history": (list,),
    "seconds": (float, int),
    "finished": (bool,),
    "stop_reason": (str,),
    "run_id": (str,),
    "rng": (list,),
    **{k: (dict, type(None)) for k in ("model", "ema", "optimizer", "scheduler", "scaler")},
}


def _state_problem(d: dict) -> str:
    """What makes mapping ``d`` unusable as a :class:`TrainState` ('' if nothing)."""
    if "fingerprint" not in d:
        return "no 'fingerprint' entry"
    for key, types in _STATE_TYPES.items():
        if key in d and not isinstance(d[key], types):
            return f"'{key}' holds a {type(d[key]).__name__}"
    if not all(isinstance(row, dict) for row in d.get("history", [])):
        return "'history' rows are not mappings"
    return ""


# --------------------------------------------------------------------------- fingerprint, resume


def fingerprint(
    cfg: TrainConfig, variant: Variant | None, train_ds: Any, world: int
) -> dict[str, Any]:
    """What a saved state must match to be resumed: settings, training samples, world size."""
    import hashlib

    ids = getattr(train_ds, "sample_ids", None)
    digest = (
        hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16] if ids is not None else ""
    )
    return {
        "train": {k: v for k, v in as_plain(cfg).items() if k not in RESUME_FREE_KEYS},
        "variant": variant_record(variant),
        "n_train": len(train_ds),
        "train_ids": digest,
        "world_size": int(world),
    }


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """The keys (dotted) in which two fingerprints differ."""
    saved = {**saved, "variant": _normalized_variant(saved.get("variant"))}
    return _diff_keys(saved, current)


def _normalized_variant(record: Any) -> Any:
    """Earlier ``last.pt`` files recorded the variant as written in ``params.yaml``."""
    if isinstance(record, dict) and "arch" in record:
        try:
            return parse_variant(record).model_dict()
        except ConfigError:
            return record
    return record


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb and not (
            isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)
        ):
            out.append(f"{prefix}{k}")
    return out


def resume_state(
    out_dir: Path, fp: dict, *, restart_on_change: bool, ranks: Dist
) -> TrainState | None:
    """The state saved in ``out_dir/last.pt`` if its fingerprint matches ``fp``; None if
    there is none.

    A state written with other settings or data is an error, or, with
    ``restart_on_change`` (how the DVC stages run), is discarded with the outputs
    derived from it, and training starts afresh.  Every rank reads ``last.pt`` itself, so
    under ``torchrun`` every rank must find the same one (across nodes: an output folder on a
    filesystem they share); when they do not, every rank stops with a :class:`UserError`.
    """
    last_path = out_dir / LAST_NAME
    state = _load_state(last_path) if last_path.is_file() else None
    diff = [] if state is None else fingerprint_diff(state.fingerprint, fp)
    _same_on_every_rank(ranks, last_path, None if state is None else (state.epoch, bool(diff)))
    if state is None:
        return None
    if not diff:
        return state
    if not restart_on_change:
        raise UserError(
            f"{last_path}: written with different settings ({', '.join(diff[:8])}); "
            f"remove {out_dir} or choose another output directory"
        )
    log_main(
        ranks, "%s: settings or data changed (%s); starting afresh", last_path, ", ".join(diff[:8])
    )
    if ranks.main:
        discard_outputs(out_dir)
    ranks.barrier()
    return None


def _load_state(last_path: Path) -> TrainState:
    try:
        return TrainState.load(last_path)
    except UserError as exc:
        raise UserError(f"{exc}; remove it to train afresh") from exc


def _same_on_every_rank(ranks: Dist, last_path: Path, seen: tuple | None) -> None:
    """Stop every rank when they did not find the same ``last.pt`` (``seen``: its epoch and
    whether it differs from this run, or None): under ``torchrun`` across nodes the output
    folder must be one folder that every node sees.  A collective call: every rank has read
    ``last.pt`` when it returns, before rank 0 may discard it."""
    views = ranks.gather(seen)
    if all(view == views[0] for view in views):
        return
    found = [f"rank {r}: {'none' if v is None else f'epoch {v[0]}'}" for r, v in enumerate(views)]
    raise UserError(
        f"{last_path}: the ranks do not find the same training state ({', '.join(found[:4])}); "
        "under torchrun across nodes the output folder must be on a filesystem every node shares"
    )
