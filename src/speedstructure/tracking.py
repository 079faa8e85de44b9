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

MLflow records absolute artifact locations in its store (it makes a relative one absolute
when the experiment is created).  When the store is a SQLite file inside the checkout and
records another checkout's artifact folder (the checkout was moved or copied),
:func:`setup` stops with a one-line :class:`UserError` instead of reading and writing the
other checkout's artifacts; ``speedstructure relocate-mlruns`` (:func:`relocate`) rewrites
the recorded locations to this checkout.

Every entry point takes ``project``, the :class:`~speedstructure.config.Params` of
the command (its ``root`` and ``mlflow`` section); ``None`` reads ``params.yaml`` at
the project root (the defaults where there is none).

:func:`start_run` ends a run as ``FINISHED`` on success, ``KILLED`` on
Ctrl-C or SIGTERM and ``FAILED`` on any other exception; a stage opens it before its work
(:func:`stage_run`), so a crash leaves a FAILED run.  A process killed with SIGKILL
(or by the OOM killer) cannot end its run, so every run records the process that logs it
(tags ``host``, ``pid``, ``pid_start``) and the next run of the same DVC stage ends the
runs of that stage still ``RUNNING`` whose process is gone as ``KILLED``
(:func:`end_stale_runs`): a run is never left ``RUNNING`` for good.

A training is one run even when it is interrupted and resumed (:class:`TrainingRun`):
its id is saved in the training state (``last.pt``), the resumed training continues that
run, and epochs saved but not yet logged are logged then.  Its metrics are buffered while
the tracking server is unreachable or the database is locked (a warning, then retries
after each epoch); at the end of the training they are retried for
``mlflow.retry_seconds`` before the stage gives up, and rerunning it logs them.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from speedstructure.config import PARAMS_FILE, Params, flatten, load_params, project_root
from speedstructure.errors import Terminated, UserError
from speedstructure.errors import sigterm_as_interrupt as _sigterm_as_interrupt
from speedstructure.fsutil import pid_alive

for _k, _v in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DO_NOT_TRACK", "true"),
    ("DVC_NO_ANALYTICS", "1"),
):
    os.environ.setdefault(_k, _v)

_EXPS_MARKER = ("", ".dvc", "tmp", "exps")
_exported: dict[str, str | None] = {}  # the URI setup() gave MLflow, the user's env value then
_MAX_PARAM_LEN = 6000
log = logging.getLogger(__name__)
__all__ = ["Terminated"]  # re-exported: SIGTERM inside a run (speedstructure.errors)


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
            exp_id = client.create_experiment(s["experiment"], artifact_location=s["artifact_root"])
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


def _one_line(exc: BaseException) -> str:
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
                    "MLflow run %s could not be ended %s: %s", run_id, status, _one_line(exc)
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

    ``project`` is the :class:`~speedstructure.config.Params` that give the root and the
    ``mlflow`` settings (None: see :func:`setup`).  Tags always include ``git_commit``;
    ``params`` (a nested mapping) are logged flattened.
    """
    import mlflow

    project = project_params(project)
    if not nested or mlflow.active_run() is None:
        exp_id = setup(project)
        if tags and "dvc_stage" in tags:
            end_stale_runs(mlflow.MlflowClient(), exp_id, str(tags["dvc_stage"]))
    run = mlflow.start_run(run_name=run_name, tags=_run_tags(project, tags), nested=nested)
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


def _run_tags(project: Params, tags: Mapping[str, Any] | None) -> dict[str, str]:
    all_tags = {"git_commit": git_commit(project.root), "project": "speedstructure"}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    all_tags.update(process_tags())
    return all_tags


# --------------------------------------------------------------------------- training runs


class TrainingRun:
    """The MLflow run of one training, resumable and tolerant of tracking outages.

    Use as a context manager around the training; the engine calls :meth:`attach` with the
    state it starts from (``on_start``) and :meth:`log_epoch` after each saved epoch
    (``on_epoch_end``).  :meth:`attach` ends stale runs of the stage, then continues the
    run named by ``state.run_id`` (a resumed training) or starts one, and records its id in
    the state, so ``last.pt`` carries it.  Epoch metrics (``metrics_of(row)``) are
    buffered while the server is unreachable and retried after each epoch;
    :meth:`finish` retries them, then ``log_result``, for ``mlflow.retry_seconds``.  On
    exit the run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED.
    """

    def __init__(
        self,
        run_name: str,
        project: Params | None,
        *,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        metrics_of: Callable[[dict], Mapping[str, Any]],
    ):
        self.project = project_params(project)
        self.run_name = run_name
        self.tags = {k: str(v) for k, v in tags.items()}
        self.stage = self.tags.get("dvc_stage", run_name)
        self.params = dict(params)
        self.metrics_of = metrics_of
        self.run_id: str | None = None
        self.pending: list[tuple[int, dict[str, float]]] = []  # (step, metrics) not yet logged
        self.error = ""  # the last tracking failure while metrics are pending
        self._client = None
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> TrainingRun:
        self._signals.enter_context(_sigterm_as_interrupt())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.run_id is not None:
                if exc_type is None:
                    status = "FINISHED"
                elif issubclass(exc_type, KeyboardInterrupt):
                    status = "KILLED"
                else:
                    status = "FAILED"
                end_run(self.run_id, status, wait_seconds=30.0 if exc_type is None else 0.0)
        finally:
            self._signals.close()

    # -- start or continue

    def attach(self, state) -> None:
        """Continue ``state.run_id`` or start a run; set ``state.run_id``; queue the epochs of
        ``state.history`` that the run lacks."""
        import mlflow

        exp_id = setup(self.project)
        self._client = client = mlflow.MlflowClient()
        end_stale_runs(client, exp_id, self.stage)
        run_id = self._resumable(client, exp_id, getattr(state, "run_id", ""))
        tags = {**_run_tags(self.project, self.tags)}
        if run_id:
            mlflow.start_run(run_id=run_id)
            previous = client.get_run(run_id)
            tags["resumes"] = str(int(previous.data.tags.get("resumes", "0")) + 1)
            mlflow.set_tags(tags)
            self._log_params_on_resume(previous.data.params)
            log.info("MLflow: continuing run %s of %s", run_id, self.stage)
        else:
            mlflow.start_run(run_name=self.run_name, tags=tags)
            log_params(self.params)
        self.run_id = state.run_id = mlflow.active_run().info.run_id
        self._queue_missing(state.history, logged=self._logged_steps(run_id, state.history))
        self.flush()

    def _resumable(self, client, exp_id: str, run_id: str) -> str | None:
        """``run_id`` if this training can continue it (it exists here, in this experiment,
        and no live process logs to it)."""
        if not run_id:
            return None
        try:
            r = client.get_run(run_id)
        except Exception:
            log.warning("MLflow run %s (in last.pt) is not in this store: a new run", run_id)
            return None
        if r.info.experiment_id != exp_id or r.info.lifecycle_stage != "active":
            log.warning("MLflow run %s (in last.pt) is deleted or elsewhere: a new run", run_id)
            return None
        if r.info.status == "RUNNING" and run_process_alive(r.data.tags):
            raise UserError(
                f"MLflow run {run_id} of {self.stage} is logged by process "
                f"{r.data.tags.get('pid')}, which still runs: is this training already running?"
            )
        return run_id

    def _log_params_on_resume(self, existing: Mapping[str, str]) -> None:
        """Params the run lacks are logged; a changed value (MLflow params are immutable,
        e.g. ``train.epochs`` raised to continue) becomes tag ``resumed_with.<param>``."""
        import mlflow

        flat = {k: _param_value(v) for k, v in flatten(self.params).items()}
        new = {k: v for k, v in flat.items() if k not in existing}
        if new:
            log_params(new)
        changed = {f"resumed_with.{k}": v for k, v in flat.items() if existing.get(k, v) != v}
        if changed:
            mlflow.set_tags(changed)

    def _logged_steps(self, run_id: str | None, history: list[dict]) -> dict[str, set[int]]:
        """The steps the run holds of each metric of ``history`` (none for a new run)."""
        if not run_id:
            return {}
        keys = {k for row in history for k in finite_metrics(self.metrics_of(row))}
        return {k: {m.step for m in self._client.get_metric_history(run_id, k)} for k in keys}

    def _queue_missing(self, history: list[dict], logged: dict[str, set[int]]) -> None:
        for row in history:
            step = int(row["epoch"])
            metrics = finite_metrics(self.metrics_of(row))
            missing = {k: v for k, v in metrics.items() if step not in logged.get(k, set())}
            if missing:
                self.pending.append((step, missing))

    # -- metrics

    def log_epoch(self, row: dict) -> None:
        """Queue one epoch's metrics and send what is pending (a failure is a warning)."""
        metrics = finite_metrics(self.metrics_of(row))
        if metrics:
            self.pending.append((int(row["epoch"]), metrics))
        self.flush()

    def flush(self) -> bool:
        """Send the pending metrics; False (and one warning per outage) while it fails."""
        from mlflow.entities import Metric

        while self.pending and self.run_id is not None:
            step, metrics = self.pending[0]
            ts = int(time.time() * 1000)
            try:
                batch = [Metric(k, v, ts, step) for k, v in metrics.items()]
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                if not self.error:
                    log.warning(
                        "MLflow tracking failed (%s); training goes on, %d epoch(s) of metrics "
                        "kept and retried after each epoch",
                        _one_line(exc),
                        len(self.pending),
                    )
                self.error = _one_line(exc)
                return False
            self.pending.pop(0)
        if self.error:
            log.warning("MLflow tracking works again: the buffered metrics are logged")
            self.error = ""
        return True

    def finish(self, log_result: Callable[[], None]) -> None:
        """Send the pending metrics, then ``log_result()`` (summary, artifacts), retrying for
        ``mlflow.retry_seconds``; a :class:`UserError` if the server stays out of reach."""
        if self.run_id is None:
            return
        deadline = time.monotonic() + float(self.project.mlflow.retry_seconds)
        delay, reason = 1.0, ""
        while True:
            if self.flush():
                try:
                    log_result()
                    return
                except Exception as exc:  # the summary or an artifact could not be logged
                    if not reason:
                        log.warning(
                            "MLflow: the run's results not logged (%s); retrying", _one_line(exc)
                        )
                    reason = _one_line(exc)
            else:
                reason = self.error
            if time.monotonic() >= deadline:
                raise UserError(
                    f"training finished and saved, but MLflow run {self.run_id} could not be "
                    f"completed ({reason}); rerun the same command to log it"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 30.0)
