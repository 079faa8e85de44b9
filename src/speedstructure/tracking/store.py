"""Where MLflow writes: the tracking store of the project, and moved checkouts.

Configuration (``params.yaml`` ``mlflow:``, read as
:class:`~speedstructure.config.schema.MlflowConfig` with its defaults; the environment wins,
so a remote server is configuration, not code)::

    mlflow:
      tracking_uri: sqlite:///mlruns/mlflow.db   # MLFLOW_TRACKING_URI overrides
      artifact_root: mlruns/artifacts            # used when the experiment is created
      experiment: speedstructure                 # MLFLOW_EXPERIMENT_NAME overrides
      registered_model: speedstructure-ensemble

Relative paths are resolved against the *home* checkout, not the working
directory: ``dvc exp run --queue`` runs stages in a temporary copy under
``<repo>/.dvc/tmp/exps/``, and those runs must land in the same store as
ordinary ones.

MLflow records absolute artifact locations in its store (it makes a relative one absolute
when the experiment is created).  When the store is a SQLite file inside the checkout and
records another checkout's artifact folder (the checkout was moved or copied),
:func:`setup` stops with a one-line :class:`UserError` instead of reading and writing the
other checkout's artifacts; ``speedstructure relocate-mlruns`` (:func:`relocate`) rewrites
the recorded locations to this checkout.

Against a tracking *server* (``MLFLOW_TRACKING_URI=http://...``, ``speedstructure server``)
the experiment is created without an artifact location: the server's own (its
``--artifacts-destination``, uploads through the server) holds the artifacts of every client.
:data:`OPTUNA_STORAGE_ENV` names the Optuna storage that goes with such a server (read by
:func:`speedstructure.ensemble.tuning.optuna_storage`).

Every entry point takes ``project``, the :class:`~speedstructure.config.schema.Params` of
the command (its ``root`` and ``mlflow`` section); ``None`` reads ``params.yaml`` at
the project root (the defaults where there is none).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.config.typed import PARAMS_FILE, project_root
from speedstructure.errors import UserError

# A database URL for Optuna's studies (the one `speedstructure server` prints); it wins over
# params.yaml paths.optuna_db, as MLFLOW_TRACKING_URI wins over mlflow.tracking_uri
OPTUNA_STORAGE_ENV = "SPEEDSTRUCTURE_OPTUNA_STORAGE"
_EXPS_MARKER = ("", ".dvc", "tmp", "exps")
_exported: dict[str, str | None] = {}  # the URI setup() gave MLflow, the user's env value then


def home_root(root: Path | None = None) -> Path:
    """The checkout that owns ``mlruns/``: ``root`` itself, or for a DVC queue's
    temporary copy (``<repo>/.dvc/tmp/exps/...``) the repository above it."""
    root = Path(root or project_root()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i + 1 : i + 4] == _EXPS_MARKER[1:]:
            return Path(*parts[: i + 1])
    return root


def project_params(project: Params | None = None, root: Path | None = None) -> Params:
    """``project`` itself, or the params of ``root`` (default: the project root); the
    defaults when that folder has no ``params.yaml``."""
    if project is not None:
        return project
    root = Path(root or project_root())
    if not (root / PARAMS_FILE).is_file():
        return Params(root=root)
    return load_params(root / PARAMS_FILE)


def _user_tracking_uri() -> str | None:
    """``MLFLOW_TRACKING_URI`` as the user set it: not the value MLflow exported when
    :func:`setup` gave it another project's store (one process may serve several)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env == _exported.get("uri"):
        return _exported.get("user")
    return env


def hide_password(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` part replaced by ``***``."""
    return re.sub(r"^([^:/]+://[^:/@]*):[^@/]*@", r"\1:***@", uri)


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server's (http, https), which places the artifacts."""
    return uri.split("://", 1)[0].lower() in ("http", "https")


def settings(project: Params | None = None, root: Path | None = None) -> dict[str, str]:
    """The resolved MLflow settings of ``project`` (see :func:`project_params`): absolute
    tracking URI and artifact root, experiment and registered model name."""
    project = project_params(project, root)
    cfg = project.mlflow
    home = home_root(project.root)
    uri = _user_tracking_uri() or cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///") :])
        uri = f"sqlite:///{(home / db).resolve()}"
    if uri.startswith("sqlite:////"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    art = Path(cfg.artifact_root)
    art = art if art.is_absolute() else home / art
    return {
        "tracking_uri": uri,
        "artifact_root": art.resolve().as_uri(),
        "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.experiment,
        "registered_model": cfg.registered_model,
    }


def setup(project: Params | None = None, root: Path | None = None) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id.

    ``project`` gives the root and the ``mlflow`` settings; None: the params of ``root``
    (default: the project root), or the defaults if it has no ``params.yaml``.  A
    :class:`UserError` if the store records another checkout's artifacts (:func:`moved_from`).
    """
    import mlflow

    project = project_params(project, root)
    s = settings(project)
    _exported.update(user=_user_tracking_uri(), uri=s["tracking_uri"])
    mlflow.set_tracking_uri(s["tracking_uri"])  # MLflow exports it as MLFLOW_TRACKING_URI
    mlflow.set_registry_uri(s["tracking_uri"])
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(s["experiment"])
    if exp is None:
        try:
            location = None if is_server(s["tracking_uri"]) else s["artifact_root"]
            exp_id = client.create_experiment(s["experiment"], artifact_location=location)
        except Exception:  # created concurrently by a parallel stage
            exp = client.get_experiment_by_name(s["experiment"])
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        _check_not_moved(project, exp)
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# --------------------------------------------------------------------------- moved checkouts

# The columns of MLflow's SQL store that hold artifact locations (file: URIs or paths).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)


def _sqlite_file(uri: str) -> Path | None:
    """The file of an absolute ``sqlite:///`` tracking URI, None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:////") else None


def _local_path(location: str) -> Path | None:
    """The folder of a local artifact location (``file:`` URI or path), None for a remote one."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(location) if parsed.scheme == "" and location.startswith("/") else None


def moved_from(project: Params, experiment) -> Path | None:
    """The checkout whose artifact folder ``experiment`` records, when the store is a SQLite
    file inside this checkout and that folder is the same folder of another checkout (the
    checkout, ``mlruns/`` included, was moved or copied); None otherwise."""
    s, home = settings(project), home_root(project.root)
    db, expected = _sqlite_file(s["tracking_uri"]), _local_path(s["artifact_root"])
    actual = _local_path(experiment.artifact_location or "")
    if db is None or actual is None or expected is None or actual == expected:
        return None
    if not (db.resolve().is_relative_to(home) and expected.is_relative_to(home)):
        return None
    rel = expected.relative_to(home).parts
    if not rel or actual.parts[-len(rel) :] != rel:
        return None
    old = Path(*actual.parts[: -len(rel)])
    return old if old != home else None


def _check_not_moved(project: Params, experiment) -> None:
    old = moved_from(project, experiment)
    if old is not None:
        db = _sqlite_file(settings(project)["tracking_uri"])
        raise UserError(
            f"{db}: this MLflow store records its artifacts in {old}, not in this checkout "
            f"{home_root(project.root)} (it was moved or copied): run `speedstructure "
            "relocate-mlruns` to point it here"
        )


def relocate(project: Params | None = None) -> dict[str, Any]:
    """Rewrite the artifact locations a moved or copied store records (:func:`moved_from`)
    to this checkout: ``{"from": old checkout or None, "to": this one, "rows": n}``."""
    import sqlite3

    import mlflow

    project = project_params(project)
    s, home = settings(project), home_root(project.root)
    db = _sqlite_file(s["tracking_uri"])
    if db is None or not db.is_file():
        raise UserError(f"{s['tracking_uri']}: no MLflow store in this checkout to relocate")
    exp = mlflow.MlflowClient(s["tracking_uri"]).get_experiment_by_name(s["experiment"])
    old = moved_from(project, exp) if exp is not None else None
    if old is None:
        return {"from": None, "to": str(home), "rows": 0}
    art = _local_path(s["artifact_root"])
    if not art.is_dir():
        raise UserError(f"{art}: not found; copy mlruns/ with its artifacts, then relocate")
    prefixes = [(old.as_uri() + "/", home.as_uri() + "/"), (f"{old}/", f"{home}/")]
    rows = 0
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        for table, col in LOCATION_COLUMNS:
            if col not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                continue
            for a, b in prefixes:
                sql = f"UPDATE {table} SET {col} = ? || substr({col}, ?) "
                sql += f"WHERE substr({col}, 1, ?) = ?"
                rows += con.execute(sql, (b, len(a) + 1, len(a), a)).rowcount
    return {"from": str(old), "to": str(home), "rows": rows}


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser(
        "relocate-mlruns",
        help=cli.COMMANDS["relocate-mlruns"][1],
        description="Point a moved or copied checkout's MLflow store (mlruns/) at its own "
        "artifacts: MLflow records absolute artifact locations.",
    )
    p.set_defaults(func=_cmd_relocate)


def _cmd_relocate(args) -> int:
    r = relocate()
    if r["from"] is None:
        print(f"relocate-mlruns: the MLflow store already records this checkout ({r['to']})")
    else:
        print(
            f"relocate-mlruns: {r['rows']} artifact locations moved from {r['from']} to {r['to']}"
        )
    return 0
