"""A stage's MLflow run: opened before the work, ended by how the work ended.

:func:`start_run` ends a run as ``FINISHED`` on success, ``KILLED`` on
Ctrl-C or SIGTERM and ``FAILED`` on any other exception; a stage opens it before its work
(:func:`stage_run`), so a crash leaves a FAILED run.  A process killed with SIGKILL
(or by the OOM killer) cannot end its run, so every run records the process that logs it
(tags ``host``, ``pid``, ``pid_start``) and the next run of the same DVC stage ends the
runs of that stage still ``RUNNING`` whose process is gone as ``KILLED``
(:func:`end_stale_runs`): a run is never left ``RUNNING`` for good.  :func:`log_params` and
:func:`log_metrics` are the logging helpers every stage uses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speedstructure.config.schema import Params
from speedstructure.config.typed import flatten, project_root
from speedstructure.errors import sigterm_as_interrupt as _sigterm_as_interrupt
from speedstructure.fsutil import pid_alive
from speedstructure.tracking.store import project_params, setup

_MAX_PARAM_LEN = 6000
log = logging.getLogger(__name__)


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


def param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log a nested mapping, flattened to dotted keys (in batches of 100)."""
    import mlflow

    flat = {k: param_value(v) for k, v in flatten(dict(params), prefix).items()}
    items = sorted(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` as floats (the rest are not metrics)."""
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        if math.isfinite(float(v)):
            clean[k] = float(v)
    return clean


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` (others are ignored: they are not metrics)."""
    import mlflow

    clean = finite_metrics(metrics)
    if clean:
        mlflow.log_metrics(clean, step=step)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# --------------------------------------------------------------------------- stale runs


def _proc_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot; Linux), '' if unknown: with the
    pid it tells a process from a later one that reuses its id."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """The tags that name the process logging a run: ``host``, ``pid``, ``pid_start``."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "pid_start": _proc_start(pid)}


def run_process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that logs a run (its :func:`process_tags`) still runs; None when
    that cannot be told (another host, or a run without the tags)."""
    pid = str(tags.get("pid", ""))
    if tags.get("host") != socket.gethostname() or not pid.isdigit():
        return None
    if not pid_alive(int(pid)):
        return False
    start = tags.get("pid_start", "")
    return not start or _proc_start(int(pid)) == start


def end_stale_runs(client, experiment_id: str, dvc_stage: str) -> list[str]:
    """End as KILLED the runs of ``dvc_stage`` left RUNNING by a process that is gone (one of
    this host); returns their ids."""
    if "'" in dvc_stage:
        return []
    flt = f"tags.dvc_stage = '{dvc_stage}' and attributes.status = 'RUNNING'"
    ended = []
    for r in client.search_runs([experiment_id], filter_string=flt, max_results=1000):
        if run_process_alive(r.data.tags) is not False:
            continue
        why = f"process {r.data.tags.get('pid')} on {r.data.tags.get('host')} is gone"
        client.set_tag(r.info.run_id, "ended_by", f"the next run of {dvc_stage}: {why}")
        client.set_terminated(r.info.run_id, "KILLED")
        log.warning(
            "MLflow run %s of %s was left RUNNING (%s): ended KILLED", r.info.run_id, dvc_stage, why
        )
        ended.append(r.info.run_id)
    return ended


def end_run(run_id: str, status: str, wait_seconds: float = 0.0) -> bool:
    """End the active run ``run_id`` with ``status``, retrying an unreachable server for up
    to ``wait_seconds``; never raises (False: the run is left RUNNING, and the next run of
    its stage ends it)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        with contextlib.suppress(Exception):  # pops the run even when the server is down
            mlflow.end_run(status=status)
            return True
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            mlflow.MlflowClient().set_terminated(run_id, status)
            return True
        except Exception as exc:
            if time.monotonic() >= deadline:
                log.warning(
                    "MLflow run %s could not be ended %s: %s", run_id, status, one_line(exc)
                )
                return False
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


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

    ``project`` is the :class:`~speedstructure.config.schema.Params` that give the root and the
    ``mlflow`` settings (None: see :func:`setup`).  Tags always include ``git_commit``;
    ``params`` (a nested mapping) are logged flattened.
    """
    import mlflow

    project = project_params(project)
    if not nested or mlflow.active_run() is None:
        exp_id = setup(project)
        if tags and "dvc_stage" in tags:
            end_stale_runs(mlflow.MlflowClient(), exp_id, str(tags["dvc_stage"]))
    run = mlflow.start_run(run_name=run_name, tags=run_tags(project, tags), nested=nested)
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
        end_run(run.info.run_id, status)


@contextlib.contextmanager
def stage_run(track: bool, run_name: str, project: Params | None = None, **kw):
    """:func:`start_run` (the run, opened before the stage's work) when ``track``; else a
    block without a run (``None``)."""
    if not track:
        yield None
        return
    with start_run(run_name, project, **kw) as run:
        yield run


def run_tags(project: Params, tags: Mapping[str, Any] | None) -> dict[str, str]:
    all_tags = {"git_commit": git_commit(project.root), "project": "speedstructure"}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    all_tags.update(process_tags())
    return all_tags
