"""The ``predict`` stage: every sample of a zip, store or sample folder into one submission.

``speedstructure predict [--input PATH] [--output FILE] [--model URI]`` predicts
every sample of a challenge zip (default: the test zip), a sample store, or a
folder in the challenge layout (``<sample_id>/receiver_data_src_<s>.npy``), clips
the velocities to ``[V_MIN, V_MAX]`` of :mod:`speedstructure.config` and writes
the submission once, atomically (:class:`~speedstructure.data.submission.SubmissionWriter`,
default: ``paths.submission``), then validates it.  ``--model`` is an MLflow model
URI (default: the ``champion`` alias of ``mlflow.registered_model``), a
``registered.json`` written by the ``register`` stage (its ``model_uri``; what the
DVC stage uses, so it predicts exactly what was registered), an ensemble file or a
downloaded MLflow model folder.  A registered model is read by this package's code
(:func:`speedstructure.ensemble.members.load_mlflow_model`), never by ``mlflow.pyfunc.load_model``,
which would execute the Python code stored with it.

"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.schema import V_MAX, V_MIN
from speedstructure.config.typed import resolve_path
from speedstructure.ensemble.loading import default_model_uri, load_predictor

log = logging.getLogger(__name__)


def predict_to_submission(
    predict_fn,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 4,
    v_range: tuple[float, float] = (V_MIN, V_MAX),
    progress: bool = True,
    uncertainty: Path | None = None,
    water_velocity: float,
) -> dict[str, Any]:
    """Predict every sample of ``input_path`` and write the submission once; then validate it.

    With ``uncertainty`` (a path) and a calibrated ensemble behind ``predict_fn``
    (:func:`speedstructure.ensemble.calibration.ensemble_calibration`), the interval half-width of
    every cell is written there too (float32, the submission's keys)."""
    import contextlib

    from tqdm import tqdm

    from speedstructure.data.store import open_input
    from speedstructure.data.submission import SubmissionWriter
    from speedstructure.data.submission_check import validate_submission
    from speedstructure.ensemble.calibration import ensemble_calibration, half_width
    from speedstructure.ensemble.members import iter_batches

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
    from speedstructure.data.format import gather_scale_note

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
