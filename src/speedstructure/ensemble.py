"""The ensemble and the ``predict`` stage.

An ensemble is described by the file the ``tune`` stage writes
(``ensemble/ensemble.json``)::

    {"format": 1, "folds": [{"fold": 0, "members": [{"variant": "tiny_dual42",
      "checkpoint": "models/tiny_dual42/fold_0/best.pt", "weight": 0.6}, ...]}, ...],
     "cv_mape": 0.031}

Its prediction for a sample is, per fold, the weighted mean of the fold's
members (each with the physically consistent flip TTA), then the mean over the
folds: the 1st-place recipe with tuned instead of hand-set weights.

``speedstructure predict --input PATH --output FILE [--model URI]`` predicts
every sample of a challenge zip or of a folder in the challenge layout
(``<sample_id>/receiver_data_src_<s>.npy``) and writes the submission once,
atomically, then validates it.  ``--model`` is an MLflow model URI (default:
``models:/speedstructure-ensemble@champion``), a ``registered.json`` written by
the ``register`` stage (its ``model_uri``), or an ensemble file.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speedstructure.config import load_params, project_root, resolve_path
from speedstructure.dataio import GATHER_NAMES, SAMPLE_ID_RE, ZipSamples, check_gather, _load_npy
from speedstructure.errors import DataError, UserError

DEFAULT_MODEL_URI = "models:/speedstructure-ensemble@champion"
SPEC_FORMAT = 1


# --------------------------------------------------------------------------- members


def load_member(checkpoint: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model saved in a training checkpoint (``best.pt``), in eval mode.

    Pretrained-weight settings are ignored (the checkpoint holds all weights), so
    loading never downloads anything.
    """
    from speedstructure.model import build_model

    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (run its training stage)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise UserError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ck, dict) or "model" not in ck or "variant" not in ck:
        raise UserError(f"{path}: not a speedstructure checkpoint (no 'model'/'variant' entries)")
    cfg = dict(ck["variant"])
    if cfg.get("arch") == "eva_fusion":
        cfg["pretrained"] = "none"
    model = build_model(cfg)
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """An ensemble file, checked: folds with members, weights on the simplex."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable ensemble file ({exc})") from exc
    folds = spec.get("folds") if isinstance(spec, dict) else None
    if not folds:
        raise UserError(f"{path}: ensemble file has no folds")
    for f in folds:
        members = f.get("members") or []
        if not members:
            raise UserError(f"{path}: fold {f.get('fold')} has no members")
        w = np.array([m["weight"] for m in members], dtype=np.float64)
        if (w < 0).any() or not np.isclose(w.sum(), 1.0, atol=1e-6):
            raise UserError(f"{path}: fold {f.get('fold')} weights {w.tolist()} are not on the simplex")
    return spec


class Ensemble:
    """Per fold the weighted mean of its members (flip TTA each), then the mean over folds."""

    def __init__(self, spec: dict[str, Any], checkpoints: dict[str, str | os.PathLike] | None = None,
                 *, root: Path | None = None, device: str | torch.device | None = None, tta: bool = True):
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


class FolderSamples:
    """Samples in a folder in the challenge layout: ``<dir>/<sample_id>/receiver_data_src_<s>.npy``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: folder not found")
        self.sample_ids = sorted(p.name for p in self.path.iterdir() if p.is_dir() and SAMPLE_ID_RE.match(p.name))
        if not self.sample_ids:
            raise DataError(f"{self.path}: no sample folders (18-character ids) found")
        for sid in self.sample_ids:
            missing = [g for g in GATHER_NAMES if not (self.path / sid / g).is_file()]
            if missing:
                raise DataError(f"{self.path / sid}: lacks {', '.join(missing)}")

    def read_gathers(self, sample_id: str) -> np.ndarray:
        out = []
        for g in GATHER_NAMES:
            f = self.path / sample_id / g
            out.append(check_gather(_load_npy(f.read_bytes(), str(f)), str(f)))
        return np.stack(out)

    def close(self) -> None:
        pass


def open_input(path: str | os.PathLike):
    """A challenge zip (``ZipSamples``), a store (``StoreSamples``) or a sample folder."""
    from speedstructure.ingest import INDEX_NAME, StoreSamples

    p = Path(path)
    if p.is_dir():
        return StoreSamples(p) if (p / INDEX_NAME).is_file() else FolderSamples(p)
    if p.is_file():
        return ZipSamples(p)
    raise DataError(f"{p}: input not found (expected a challenge zip or a folder of samples)")


def iter_batches(reader, ids: Sequence[str], batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    for i in range(0, len(ids), batch_size):
        chunk = list(ids[i : i + batch_size])
        yield chunk, np.stack([reader.read_gathers(s) for s in chunk])


# --------------------------------------------------------------------------- predict


def load_predictor(model: str | os.PathLike, *, root: Path | None = None):
    """A callable ``gathers (B, 5, 10001, 31) -> (B, 300, 1259)`` and a description.

    ``model``: an MLflow model URI (``models:/...``, ``runs:/...``), a
    ``registered.json`` (its ``model_uri``) or an ensemble file.
    """
    root = Path(root or project_root())
    s = str(model)
    if "://" not in s and not s.startswith("models:/") and not s.startswith("runs:/"):
        p = resolve_path(s, root)
        if not p.is_file():
            raise UserError(f"{p}: model file not found")
        try:
            doc = json.loads(p.read_text())
        except ValueError as exc:
            raise UserError(f"{p}: not a JSON model reference or ensemble file ({exc})") from exc
        if isinstance(doc, dict) and "model_uri" in doc:
            s = doc["model_uri"]
        else:
            ens = Ensemble(read_spec(p), root=root)
            return ens.predict, f"ensemble file {p}"
    from speedstructure import tracking

    tracking.setup(root=root)
    import mlflow

    try:
        pyfunc = mlflow.pyfunc.load_model(s)
    except Exception as exc:  # MLflow raises its own types for unknown names/aliases
        raise UserError(f"cannot load model '{s}': {exc}") from exc
    return (lambda x: np.asarray(pyfunc.predict(np.asarray(x, dtype=np.float32)))), s


def predict_to_submission(predict_fn, input_path: str | os.PathLike, output: str | os.PathLike, *,
                          batch_size: int = 4, v_range: tuple[float, float] = (1.5, 4.5),
                          progress: bool = True) -> dict[str, Any]:
    """Predict every sample of ``input_path`` and write the submission once; then validate it."""
    from tqdm import tqdm

    from speedstructure.submission import SubmissionWriter, validate_submission

    reader = open_input(input_path)
    ids = list(reader.sample_ids)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(ids), desc="predict", unit="sample", disable=not progress)
    try:
        with SubmissionWriter(output) as w:
            for chunk, x in iter_batches(reader, ids, batch_size):
                pred = predict_fn(x)
                for sid, p in zip(chunk, pred):
                    w.add(sid, np.clip(p, *v_range))
                bar.update(len(chunk))
    finally:
        bar.close()
        reader.close()
    report = validate_submission(output, ids, v_min=v_range[0], v_max=v_range[1])
    report.raise_if_problems()
    return {"samples": len(ids), "output": str(output), "validation": report.summary()}


def _cmd_predict(args: argparse.Namespace) -> int:
    root = project_root()
    params = load_params()
    pcfg = params.get("predict") or {}
    model = args.model or pcfg.get("model") or DEFAULT_MODEL_URI
    predict_fn, desc = load_predictor(model, root=root)
    v_min, v_max = float(pcfg.get("v_min", 1.5)), float(pcfg.get("v_max", 4.5))
    out = predict_to_submission(predict_fn, resolve_path(args.input, root), resolve_path(args.output, root),
                                batch_size=args.batch_size or int(pcfg.get("batch_size", 4)),
                                v_range=(v_min, v_max), progress=not args.quiet)
    print(f"predict: {out['samples']} samples with {desc} -> {out['output']}\n  {out['validation']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict a zip or folder of samples into a submission .npz",
                       description="Predict every sample (challenge zip or folder layout) with the "
                                   "registered ensemble and write one validated submission .npz.")
    p.add_argument("--input", required=True, help="challenge zip, sample store or folder of sample folders")
    p.add_argument("--output", required=True, help="submission .npz to write")
    p.add_argument("--model", default=None,
                   help=f"MLflow model URI, registered.json or ensemble file (default: {DEFAULT_MODEL_URI})")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: predict.batch_size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
