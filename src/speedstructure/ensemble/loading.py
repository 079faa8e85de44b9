"""An ensemble ready to predict, from wherever it is kept.

:func:`load_predictor` takes an MLflow model URI (``models:/...``, ``runs:/...``), a
``registered.json`` (its ``model_uri``), an ensemble file or an MLflow model folder, and
returns a callable ``gathers (B, 5, 10001, 31) -> (B, 300, 1259)``.  A registered model is
downloaded and read as data (its ensemble file and checkpoints); its code is never run.
"""

from __future__ import annotations

import json
import logging
import os

from speedstructure.config.schema import Params
from speedstructure.config.typed import resolve_path
from speedstructure.errors import UserError
from speedstructure.tracking.store import setup

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


def default_model_uri(params: Params) -> str:
    """The registered model's ``champion`` version: ``models:/<name>@champion``."""
    from speedstructure.ensemble.members import CHAMPION

    return f"models:/{params.mlflow.registered_model}@{CHAMPION}"


def _is_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def load_predictor(model: str | os.PathLike, params: Params):
    """A callable ``gathers (B, 5, 10001, 31) -> (B, 300, 1259)`` and a description.

    ``model``: an MLflow model URI (``models:/...``, ``runs:/...``), a
    ``registered.json`` (its ``model_uri``), an ensemble file or an MLflow model folder;
    files are relative to the project root.
    """
    from speedstructure.ensemble.members import Ensemble, load_mlflow_model, read_spec

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

    from speedstructure.ensemble.members import load_mlflow_model

    setup(project=params)
    with tempfile.TemporaryDirectory(prefix="speedstructure-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as exc:  # MLflow raises its own types for unknown names/aliases
            reason = " ".join(str(exc).split())
            raise UserError(f"cannot load model '{uri}': {reason}") from exc
        ensemble = load_mlflow_model(local)  # checkpoints are in memory: the folder can go
    return ensemble.predict


def ensemble_predictor(params: Params):
    """The ensemble's prediction function: the registered model (``paths.registered``), or
    the tuned ensemble file (``paths.ensemble``) when nothing is registered."""
    from speedstructure.ensemble.loading import load_predictor

    for key in ("registered", "ensemble"):
        if params.path(key).is_file():
            return load_predictor(params.path(key), params)[0]
    raise UserError(
        f"{params.path('registered')}: no registered model (nor {params.path('ensemble')}) "
        "to predict the out-of-distribution test set (run the register stage)"
    )
