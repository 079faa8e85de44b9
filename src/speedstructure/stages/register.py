"""The ``register`` stage: the tuned ensemble into the MLflow model registry.

The whole ensemble (ensemble file, every member checkpoint, the package code)
is logged as one pyfunc model from code (:mod:`speedstructure.ensemble.pyfunc`)
with a tensor signature, gathers ``(-1, 5, 10001, 31)`` float32 in and
velocities ``(-1, 300, 1259)`` float32 out, and registered as a new version of
``mlflow.registered_model`` (``speedstructure-ensemble``).  Every version
stays; the alias ``champion`` moves to the new version only if its
cross-validated MAPE (the ``tune`` stage's held-out MAPE of the chosen weights, tag
``cv_mape``) is lower than the current champion's.

The stage's MLflow run (opened before anything is read, so a failure leaves a FAILED
run) logs the members and weights per fold (params ``members``, ``fold<k>.members``;
metrics ``fold<k>/weight_<member>``), the CV figures of the ensemble file (``cv_mape``,
``heldout_<strategy>``, ``fold<k>/val_mape``), the ensemble file and the model card
(``register/``).  The version's description is its model card and the registered model's
a summary (:mod:`speedstructure.ensemble.card`); the ``evaluate`` stage adds the test MAPE.

``speedstructure register [--output FILE]`` reads ``paths.ensemble`` and writes
``paths.registered`` (the new version, its URI, whether it became champion),
which the ``predict`` stage reads so that what it predicts is exactly what was
registered.

"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.config.typed import resolve_path
from speedstructure.ensemble.members import CHAMPION, read_spec
from speedstructure.ensemble.registry import artifacts_of, log_ensemble, log_model
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_json
from speedstructure.tracking.runs import start_run

DESCRIPTION = (
    "Log the ensemble as one pyfunc model, register a new version and move the 'champion' "
    "alias if its cross-validated MAPE is better."
)
CV_TAG = "cv_mape"


def champion_version(client, name: str):
    """The version holding the ``champion`` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _cv(version) -> float:
    try:
        return float((version.tags or {}).get(CV_TAG, "nan"))
    except (TypeError, ValueError):
        return math.nan


def _promote(client, name: str, version, cv: float) -> dict[str, Any]:
    """Move ``champion`` to ``version`` if its cv MAPE beats the current champion's."""
    current = champion_version(client, name)
    best_before = _cv(current) if current is not None else math.inf
    promoted = current is None or not math.isfinite(best_before) or cv < best_before
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "champion": promoted,
        "champion_version": int(version.version) if promoted else int(current.version),
        "champion_cv_mape": cv if promoted else best_before,
    }


def _describe(client, params: Params, name: str, version: str, spec, champion) -> str:
    """The model cards: the version's and the registered model's descriptions."""
    import mlflow

    from speedstructure.ensemble import card as modelcard

    card = modelcard.version_card(params, name, version, spec, modelcard.data_summary(params))
    client.update_model_version(name, version, description=card)
    client.update_registered_model(name, modelcard.model_description(params, name, champion))
    mlflow.log_text(card, "register/model_card.md")
    mlflow.set_tag("mlflow.note.content", card)  # the run's description in the UI
    return card


def register_ensemble(
    spec_path: Path, params: Params, *, run_name: str = "register"
) -> dict[str, Any]:
    """Log the ensemble as a pyfunc model, register a version, move ``champion`` if better,
    describe both with the model card."""
    import mlflow

    name = params.mlflow.registered_model
    tags = {"stage": "register", "dvc_stage": "register"}
    with start_run(run_name, project=params, tags=tags) as run:
        spec = read_spec(spec_path)
        cv = float(spec.get("cv_mape", math.nan))
        if not math.isfinite(cv):
            raise UserError(f"{spec_path}: no finite cv_mape (the tune stage writes it)")
        artifacts = artifacts_of(spec_path, spec, params.root)
        log_ensemble(spec_path, spec, name)
        info = log_model(artifacts)
        mv = mlflow.register_model(info.model_uri, name, tags={CV_TAG: repr(cv)})
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, mv.version, "source_run", run.info.run_id)
        champion = _promote(client, name, mv, cv)
        _describe(client, params, name, mv.version, spec, champion)
        mlflow.set_tags({"registered_version": mv.version, "promoted": str(champion["champion"])})
    return {
        "name": name,
        "version": int(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "cv_mape": cv,
        **champion,
        "run_id": run.info.run_id,
    }


def run_register(params: Params, output: Path | None = None) -> dict[str, Any]:
    """Register ``paths.ensemble``; the result is written to ``output`` (``paths.registered``)."""
    result = register_ensemble(params.path("ensemble"), params)
    atomic_write_json(output or params.path("registered"), result)
    return result


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("register", help=cli.COMMANDS["register"][1], description=DESCRIPTION)
    p.add_argument("--output", default=None, help="result JSON (default: paths.registered)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    output = resolve_path(args.output, params.root) if args.output else None
    r = run_register(params, output)
    verdict = (
        "is the new champion"
        if r["champion"]
        else f"did not beat champion v{r['champion_version']} (cv MAPE {r['champion_cv_mape']:.5f})"
    )
    print(f"register: {r['name']} version {r['version']} (cv MAPE {r['cv_mape']:.5f}) {verdict}")
    return 0
