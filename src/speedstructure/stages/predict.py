"""The ``predict`` stage: every sample of a zip, store or sample folder into one submission.

``speedstructure predict [--input PATH] [--output FILE] [--model URI]`` predicts
every sample of a challenge zip (default: the test zip), a sample store, or a
folder in the challenge layout (``<sample_id>/receiver_data_src_<s>.npy``), clips
the velocities to ``[V_MIN, V_MAX]`` of :mod:`speedstructure.config` and writes
the submission once, atomically (:class:`~speedstructure.submission.SubmissionWriter`,
default: ``paths.submission``), then validates it.  ``--model`` is an MLflow model
URI (default: the ``champion`` alias of ``mlflow.registered_model``), a
``registered.json`` written by the ``register`` stage (its ``model_uri``; what the
DVC stage uses, so it predicts exactly what was registered), an ensemble file or a
downloaded MLflow model folder.  A registered model is read by this package's code
(:func:`speedstructure.ensemble.load_mlflow_model`), never by ``mlflow.pyfunc.load_model``,
which would execute the Python code stored with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config import V_MAX, V_MIN, Params, load_params, resolve_path
from speedstructure.errors import UserError

log = logging.getLogger(__name__)


def default_model_uri(params: Params) -> str:
    """The registered model's ``champion`` version: ``models:/<name>@champion``."""
    from speedstructure.ensemble import CHAMPION

    return f"models:/{params.mlflow.registered_model}@{CHAMPION}"


def _is_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def load_predictor(model: str | os.PathLike, params: Params):
    """A callable ``gathers (B, 5, 10001, 31) -> (B, 300, 1259)`` and a description.

    ``model``: an MLflow model URI (``models:/...``, ``runs:/...``), a
    ``registered.json`` (its ``model_uri``), an ensemble file or an MLflow model folder;
    files are relative to the project root.
    """
    from speedstructure.ensemble import Ensemble, load_mlflow_model, read_spec

    s = str(model)
    if not _is_uri(s):
        p = resolve_path(s, params.root)
        if p.is_dir():
            if (p / "MLmodel").is_file():
                return load_mlflow_model(p).predict, f"MLflow model folder {p}"
            raise UserError(
                f"{p}: is a directory, not a model (give the register stage's JSON, an "
                "ensemble .json, an MLflow model folder or a models:/ URI)"
            )
        if not p.is_file():
            raise UserError(f"{p}: model file not found")
        try:
            doc = json.loads(p.read_text())
        except ValueError as exc:
            raise UserError(f"{p}: not a JSON model reference or ensemble file ({exc})") from exc
        if not (isinstance(doc, dict) and "model_uri" in doc):
            ens = Ensemble(read_spec(p), root=params.root)
            return ens.predict, f"ensemble file {p}"
        s = doc["model_uri"]
    return _load_registered(s, params), s


def _load_registered(uri: str, params: Params):
    """The ensemble of a registered model, downloaded and read without running its code."""
    import tempfile

    import mlflow

    from speedstructure import tracking
    from speedstructure.ensemble import load_mlflow_model

    tracking.setup(project=params)
    with tempfile.TemporaryDirectory(prefix="speedstructure-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as exc:  # MLflow raises its own types for unknown names/aliases
            reason = " ".join(str(exc).split())
            raise UserError(f"cannot load model '{uri}': {reason}") from exc
        ensemble = load_mlflow_model(local)  # checkpoints are in memory: the folder can go
    return ensemble.predict


def predict_to_submission(
    predict_fn,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 4,
    v_range: tuple[float, float] = (V_MIN, V_MAX),
    progress: bool = True,
    uncertainty: Path | None = None,
    water_velocity: float = 1.5,
) -> dict[str, Any]:
    """Predict every sample of ``input_path`` and write the submission once; then validate it.

    With ``uncertainty`` (a path) and a calibrated ensemble behind ``predict_fn``
    (:func:`speedstructure.uncertainty.ensemble_calibration`), the interval half-width of
    every cell is written there too (float32, the submission's keys)."""
    import contextlib

    from tqdm import tqdm

    from speedstructure.dataio import open_input
    from speedstructure.ensemble import iter_batches
    from speedstructure.submission import SubmissionWriter, validate_submission
    from speedstructure.uncertainty import ensemble_calibration, half_width

    reader = open_input(input_path)
    ids = list(reader.sample_ids)
    output = Path(output)
    bar = tqdm(total=len(ids), desc="predict", unit="sample", disable=not progress)
    try:
        calibration = ensemble_calibration(predict_fn) if uncertainty else None
        with contextlib.ExitStack() as stack:
            w = stack.enter_context(SubmissionWriter(output))
            u = None
            if calibration:  # the half-widths: the submission's keys and checks, float32
                u = stack.enter_context(SubmissionWriter(uncertainty, dtype=np.float32))
            for chunk, x in iter_batches(reader, ids, batch_size):
                check_inputs(reader, input_path, chunk, x)
                pred = predict_fn(x)
                for sid, p in zip(chunk, pred, strict=True):
                    w.add(sid, np.clip(p, *v_range))
                    if u is not None:
                        u.add(sid, half_width(np.clip(p, *v_range), calibration, water_velocity))
                bar.update(len(chunk))
    finally:
        bar.close()
        reader.close()
    report = validate_submission(output, ids, v_min=v_range[0], v_max=v_range[1])
    report.raise_if_problems()
    return {
        "samples": len(ids),
        "output": str(output),
        "validation": report.summary(),
        "uncertainty": str(uncertainty) if calibration else None,
    }


def check_inputs(reader, input_path, ids: list[str], gathers: np.ndarray) -> None:
    """What predict checks beyond the readers' own checks: a warning for gathers whose scale
    is orders of magnitude from the challenge's, and the targets of a labelled input (their
    range and unit: a zip in m/s is refused, as ingest refuses it)."""
    from speedstructure.dataio import gather_scale_note

    for sid, x in zip(ids, gathers, strict=True):
        note = gather_scale_note(x, f"{input_path}: sample '{sid}'")
        if note:
            log.warning(note)
        if getattr(reader, "has_targets", False):
            reader.read_target(sid)


# --------------------------------------------------------------------------- CLI


DESCRIPTION = (
    "Predict every sample (challenge zip, sample store or folder layout) with the registered "
    "ensemble and write one validated submission .npz."
)
OPTIONS = {  # option -> help (each defaults to None: the params.yaml value named)
    "--input": "challenge zip, sample store or folder of sample folders (default: the test zip)",
    "--output": "submission .npz (default: paths.submission)",
    "--model": "MLflow model URI, registered.json or ensemble file "
    "(default: models:/<mlflow.registered_model>@champion)",
}


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("predict", help=cli.COMMANDS["predict"][1], description=DESCRIPTION)
    for option, help_ in OPTIONS.items():
        p.add_argument(option, default=None, help=help_)
    p.add_argument("--batch-size", type=int, default=None, help="default: predict.batch_size")
    p.add_argument(
        "--uncertainty",
        default=None,
        help="interval half-widths .npz (default: paths.uncertainty, or beside --output)",
    )
    cli.add_quiet_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    predict_fn, desc = load_predictor(args.model or default_model_uri(params), params)
    output = resolve_path(args.output, params.root) if args.output else params.path("submission")
    if args.uncertainty:
        unc = resolve_path(args.uncertainty, params.root)
    elif output == params.path("submission"):
        unc = params.path("uncertainty")
    else:  # another submission: its half-widths beside it
        unc = output.with_name(f"{output.stem}_uncertainty.npz")
    out = predict_to_submission(
        predict_fn,
        resolve_path(args.input, params.root) if args.input else params.zip_path("test"),
        output,
        batch_size=args.batch_size or params.predict.batch_size,
        progress=not args.quiet,
        uncertainty=unc,
        water_velocity=params.synth.water_velocity,
    )
    print(
        f"predict: {out['samples']} samples with {desc} -> {out['output']}\n  {out['validation']}"
    )
    if out["uncertainty"]:
        print(f"  interval half-widths (calibrated) -> {out['uncertainty']}")
    else:
        print("  no uncertainty written: the ensemble carries no calibration (rerun tune)")
    return 0
