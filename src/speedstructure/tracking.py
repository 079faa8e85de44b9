"""MLflow tracking for every stage: one experiment, one run per stage invocation.

Configuration (``params.yaml`` ``mlflow:``, read as
:class:`~speedstructure.config.MlflowConfig` with its defaults; the environment wins,
so a remote server is configuration, not code)::

    mlflow:
      tracking_uri: sqlite:///mlruns/mlflow.db   # MLFLOW_TRACKING_URI overrides
      artifact_root: mlruns/artifacts            # used when the experiment is created
      experiment: speedstructure                 # MLFLOW_EXPERIMENT_NAME overrides
      registered_model: speedstructure-ensemble

Relative paths are resolved against the *home* checkout, not the working
directory: ``dvc exp run --queue`` runs stages in a temporary copy under
``<repo>/.dvc/tmp/exps/``, and those runs must land in the same store as
ordinary ones.  Telemetry is switched off before MLflow is imported.

Every entry point takes ``project``, the :class:`~speedstructure.config.Params` of
the command (its ``root`` and ``mlflow`` section); ``None`` reads ``params.yaml`` at
the project root (the defaults where there is none).

:func:`start_run` ends a run as ``FINISHED`` on success, ``KILLED`` on
Ctrl-C or SIGTERM and ``FAILED`` on any other exception: a run is never left
``RUNNING``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from speedstructure.config import PARAMS_FILE, Params, flatten, load_params, project_root

for _k, _v in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DO_NOT_TRACK", "true"),
    ("DVC_NO_ANALYTICS", "1"),
):
    os.environ.setdefault(_k, _v)

_EXPS_MARKER = ("", ".dvc", "tmp", "exps")
_MAX_PARAM_LEN = 6000


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so that runs end as KILLED."""


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


def settings(project: Params | None = None, root: Path | None = None) -> dict[str, str]:
    """The resolved MLflow settings of ``project`` (see :func:`project_params`): absolute
    tracking URI and artifact root, experiment and registered model name."""
    project = project_params(project, root)
    cfg = project.mlflow
    home = home_root(project.root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
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
    (default: the project root), or the defaults if it has no ``params.yaml``.
    """
    import mlflow

    s = settings(project, root)
    mlflow.set_tracking_uri(s["tracking_uri"])
    mlflow.set_registry_uri(s["tracking_uri"])
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(s["experiment"])
    if exp is None:
        try:
            exp_id = client.create_experiment(s["experiment"], artifact_location=s["artifact_root"])
        except Exception:  # created concurrently by a parallel stage
            exp = client.get_experiment_by_name(s["experiment"])
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit (``DVC_EXP_BASELINE_REV`` inside a DVC experiment), or ''."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or project_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log a nested mapping, flattened to dotted keys (in batches of 100)."""
    import mlflow

    flat = {k: _param_value(v) for k, v in flatten(dict(params), prefix).items()}
    items = sorted(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` (others are ignored: they are not metrics)."""
    import mlflow

    clean = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        if math.isfinite(float(v)):
            clean[k] = float(v)
    if clean:
        mlflow.log_metrics(clean, step=step)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def start_run(
    run_name: str,
    project: Params | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
):
    """An active MLflow run in the project's experiment, ended FINISHED / KILLED / FAILED.

    ``project`` is the :class:`~speedstructure.config.Params` that give the root and the
    ``mlflow`` settings (None: see :func:`setup`).  Tags always include ``git_commit``;
    ``params`` (a nested mapping) are logged flattened.
    """
    import mlflow

    project = project_params(project)
    if not nested or mlflow.active_run() is None:
        setup(project)
    all_tags = {"git_commit": git_commit(project.root), "project": "speedstructure"}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = mlflow.start_run(run_name=run_name, tags=all_tags, nested=nested)
    status = "FAILED"
    try:
        with _sigterm_as_interrupt():
            if params:
                log_params(params)
            yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
