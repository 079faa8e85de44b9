"""The ensemble: members loaded from their checkpoints, weighted per fold, averaged over folds.

An ensemble is described by the file the ``tune`` stage writes (``paths.ensemble``)::

    {"format": 1, "folds": [{"fold": 0, "members": [{"variant": "tiny_dual42",
      "checkpoint": "models/tiny_dual42/fold_0/best.pt", "weight": 0.6}, ...]}, ...],
     "cv_mape": 0.031}

Its prediction for a sample is, per fold, the weighted mean of the fold's
members (each with the physically consistent flip TTA), then the mean over the
folds: the 1st-place recipe, with each fold's weights chosen by the ``tune`` stage (tuned,
equal, hand-set or its best member alone: the lowest split-half held-out MAPE).

A library (no command): :func:`read_spec`, :class:`Ensemble`, :func:`load_member`,
:func:`member_key`, :func:`iter_batches` and the registry alias :data:`CHAMPION`
serve the ``register``, ``predict`` and ``evaluate`` stages and the registered
pyfunc model (:mod:`speedstructure.ensemble.pyfunc`).  :func:`load_mlflow_model` reads a
registered model's folder with this package's code: nothing from the registry is
executed or unpickled.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speedstructure.config.load import parse_variant
from speedstructure.config.schema import EvaFusionVariant, Variant
from speedstructure.config.typed import project_root, resolve_path
from speedstructure.errors import UserError
from speedstructure.physics.seafloor import FloorPicker

CHAMPION = "champion"  # the registry alias of the best registered version
SPEC_FORMAT = 1
ENSEMBLE_ARTIFACT = "ensemble"  # the ensemble file's key among a registered model's artifacts


# --------------------------------------------------------------------------- members


def load_member(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    default_floor_picker: FloorPicker | None = None,
):
    """The model saved in a training checkpoint (``best.pt``), in eval mode.

    The checkpoint's variant record is parsed here, once.  Pretrained-weight settings are
    ignored (the checkpoint holds all weights), so loading never downloads anything.  A
    ``floor: picked`` model gets the floor picker its training recorded (``meta``), else
    ``default_floor_picker`` (benchmarks of older checkpoints), else it is an error.
    """
    from speedstructure.engine.checkpoint import load_checkpoint
    from speedstructure.models.build import build_model

    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (run its training stage)")
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "model" not in ck or "variant" not in ck:
        raise UserError(f"{path}: not a speedstructure checkpoint (no 'model'/'variant' entries)")
    record = dict(ck["variant"])
    if "pretrained" in record and record["pretrained"] is None:  # earlier records: null = none
        record["pretrained"] = "none"
    variant = parse_variant(record, f"{path}: variant")
    if isinstance(variant, EvaFusionVariant):
        variant = dataclasses.replace(variant, pretrained="none")
    picker = _floor_picker(ck, variant, path, default_floor_picker)
    model = build_model(variant, floor_picker=picker)
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


def _floor_picker(
    ck: dict, variant: Variant, path: Path, default: FloorPicker | None = None
) -> FloorPicker | None:
    """The floor picker a checkpoint's training recorded; ``default`` or an error for a
    ``floor: picked`` (or ``relative``) checkpoint that records none (trained before
    checkpoints recorded it)."""
    rec = (ck.get("meta") or {}).get("floor_picker")
    if rec is not None:
        return FloorPicker.from_record(rec, str(path))
    if variant.floor in ("picked", "relative") and default is not None:
        return default
    if variant.floor in ("picked", "relative"):
        raise UserError(
            f"{path}: a floor: {variant.floor} model that records no floor picker: retrain it "
            "(dvc repro) with this version"
        )
    return None


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """An ensemble file, checked (:func:`spec_problem`): folds with members, weights on the
    simplex, a well-formed calibration when there is one."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable ensemble file ({exc})") from exc
    problem = spec_problem(spec)
    if problem:
        raise UserError(f"{path}: {problem}")
    return spec


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def spec_problem(spec: Any) -> str | None:
    """What is wrong with an ensemble file's content (None: nothing): every fold an integer
    ``fold`` and members, every member a ``variant``, a ``checkpoint`` and a finite
    ``weight``, each fold's weights on the simplex; the calibration (when present)
    consistent."""
    folds = spec.get("folds") if isinstance(spec, dict) else None
    if not isinstance(folds, list) or not folds:
        return "ensemble file has no folds"
    for f in folds:
        if not isinstance(f, dict) or not _integer(f.get("fold")):
            return f"a fold entry has no integer 'fold' ({str(f)[:60]})"
        members = f.get("members")
        if not isinstance(members, list) or not members:
            return f"fold {f['fold']} has no members"
        for m in members:
            ok = isinstance(m, dict) and _number(m.get("weight"))
            if not ok or not all(isinstance(m.get(k), str) for k in ("variant", "checkpoint")):
                return f"fold {f['fold']}: a member lacks a variant, checkpoint or weight"
        w = np.array([m["weight"] for m in members], dtype=np.float64)
        if (w < 0).any() or not np.isclose(w.sum(), 1.0, atol=1e-6):
            return f"fold {f['fold']} weights {w.tolist()} are not on the simplex"
    return _calibration_problem(spec.get("calibration"))


def _calibration_problem(cal: Any) -> str | None:
    """The calibration :func:`speedstructure.ensemble.calibration.half_width` reads: a scale, band
    edges (non-decreasing integers) and one finite non-negative quantile per band."""
    if cal is None:
        return None
    if not isinstance(cal, dict) or cal.get("scale") not in ("relative", "absolute"):
        return "calibration: no scale (relative or absolute)"
    edges, q = cal.get("bands_below_floor_m"), cal.get("quantiles")
    if not isinstance(edges, list) or not edges or not all(map(_integer, edges)):
        return "calibration: bands_below_floor_m must be a list of integers"
    if any(b < a for a, b in itertools.pairwise(edges)):
        return "calibration: bands_below_floor_m must not decrease"
    if not isinstance(q, list) or len(q) != len(edges):
        return f"calibration: {len(edges)} quantiles expected, one per band"
    if not all(_number(v) and v >= 0 for v in q):
        return "calibration: quantiles must be finite and non-negative"
    return None


class Ensemble:
    """Per fold the weighted mean of its members (flip TTA each), then the mean over folds."""

    def __init__(
        self,
        spec: dict[str, Any],
        checkpoints: dict[str, str | os.PathLike] | None = None,
        *,
        root: Path | None = None,
        device: str | torch.device | None = None,
        tta: bool = True,
    ):
        """``checkpoints`` maps a member key (:func:`member_key`) to its file; by default
        each member's ``checkpoint`` path, relative to ``root``."""
        self.spec = spec
        self.tta = tta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        root = Path(root or project_root())
        self.folds: list[tuple[int, list[tuple[torch.nn.Module, float]]]] = []
        for f in spec["folds"]:
            members = []
            for m in f["members"]:
                key = member_key(f["fold"], m["variant"])
                path = (checkpoints or {}).get(key) or resolve_path(m["checkpoint"], root)
                members.append((load_member(path, self.device), float(m["weight"])))
            self.folds.append((int(f["fold"]), members))

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """float32 ``(B, 300, 1259)`` velocities for gathers ``(B, 5, 10001, 31)``."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(self.device)
        total = None
        for _, members in self.folds:
            fold_pred = None
            for model, w in members:
                p = model.predict(xt, tta=self.tta).float() * w
                fold_pred = p if fold_pred is None else fold_pred + p
            total = fold_pred if total is None else total + fold_pred
        return (total / len(self.folds)).cpu().numpy()


def member_key(fold: int, variant: str) -> str:
    """The artifact key of a member's checkpoint: ``fold<k>-<variant>``."""
    return f"fold{int(fold)}-{variant}"


# --------------------------------------------------------------------------- inputs


def iter_batches(
    reader, ids: Sequence[str], batch_size: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, gathers (B, 5, 10001, 31))`` batches of ``reader`` (any sample reader of dataio)."""
    for i in range(0, len(ids), batch_size):
        chunk = list(ids[i : i + batch_size])
        yield chunk, np.stack([reader.read_gathers(s) for s in chunk])


# --------------------------------------------------------------------------- registered models


def load_mlflow_model(model_dir: str | os.PathLike, device: str | torch.device | None = None):
    """The ensemble of a registered model's folder (an MLflow pyfunc model from ``register``).

    Loaded by this package's own code, not by ``mlflow.pyfunc.load_model``: ``MLmodel`` is
    read as YAML, the ensemble file as JSON and the checkpoints with
    ``torch.load(weights_only=True)``; the folder's Python code is never imported and
    nothing is unpickled, so a tampered registry cannot run code here.
    """
    import yaml

    folder = Path(model_dir).resolve()
    mlmodel = folder / "MLmodel"
    try:
        doc = yaml.safe_load(mlmodel.read_text())
        artifacts = doc["flavors"]["python_function"]["artifacts"]
        files = {key: str(a["path"]) for key, a in artifacts.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{folder}: not a registered ensemble model (no readable MLmodel with pyfunc "
            f"artifacts: {type(exc).__name__})"
        ) from exc
    paths = {}
    for key, rel in files.items():
        path = (folder / rel).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise UserError(f"{mlmodel}: artifact '{key}' ({rel}) is not a file inside the model")
        paths[key] = path
    if ENSEMBLE_ARTIFACT not in paths:
        raise UserError(f"{mlmodel}: no '{ENSEMBLE_ARTIFACT}' artifact (not an ensemble model)")
    spec = read_spec(paths.pop(ENSEMBLE_ARTIFACT))
    for f in spec["folds"]:
        for m in f["members"]:
            if member_key(f["fold"], m["variant"]) not in paths:  # never a local fallback
                key = member_key(f["fold"], m["variant"])
                raise UserError(f"{mlmodel}: no checkpoint artifact '{key}' for a member")
    return Ensemble(spec, paths, device=device)
