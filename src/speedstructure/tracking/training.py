"""A training's MLflow run, resumable and tolerant of tracking outages (:class:`TrainingRun`).

A training is one run even when it is interrupted and resumed: its id is saved in the
training state (``last.pt``), the resumed training continues that run, and epochs saved but
not yet logged are logged then.  Its metrics are buffered while the tracking server is
unreachable or the database is locked (a warning, then retries after each epoch); at the end
of the training they are retried for ``mlflow.retry_seconds`` before the stage gives up, and
rerunning it logs them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from speedstructure.config.schema import Params
from speedstructure.config.typed import flatten
from speedstructure.errors import UserError
from speedstructure.errors import sigterm_as_interrupt as _sigterm_as_interrupt
from speedstructure.fsutil import file_md5
from speedstructure.tracking.runs import (
    end_run,
    end_stale_runs,
    finite_metrics,
    log_metrics,
    log_params,
    one_line,
    param_value,
    run_process_alive,
    run_tags,
)
from speedstructure.tracking.store import project_params, setup

log = logging.getLogger(__name__)

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
        tags = {**run_tags(self.project, self.tags)}
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

        flat = {k: param_value(v) for k, v in flatten(self.params).items()}
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
                        one_line(exc),
                        len(self.pending),
                    )
                self.error = one_line(exc)
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
                            "MLflow: the run's results not logged (%s); retrying", one_line(exc)
                        )
                    reason = one_line(exc)
            else:
                reason = self.error
            if time.monotonic() >= deadline:
                raise UserError(
                    f"training finished and saved, but MLflow run {self.run_id} could not be "
                    f"completed ({reason}); rerun the same command to log it"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 30.0)


CHECKPOINT_REF_NAME = "checkpoint.json"  # the run's reference to best.pt (artifact model/...)


def epoch_metrics(row: dict) -> dict:
    """The MLflow metrics of one history row (logged at step ``row['epoch']``)."""
    return {
        "train_loss": row["train_loss"],
        "val_mape": row["val_mape"],
        "lr": row["lr"],
        "epoch_seconds": row["seconds"],
    }


def checkpoint_reference(path: Path, root: Path) -> dict:
    """What a training run logs instead of a copy of its checkpoint: the DVC-tracked file's
    path (relative to the checkout when inside it), its MD5 (the hash ``dvc.lock`` records
    for it, so ``dvc checkout`` / ``dvc pull`` restore exactly it) and its size."""
    path = Path(path).resolve()
    try:
        shown = path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        shown = str(path)
    return {"path": shown, "md5": file_md5(path), "bytes": path.stat().st_size}


def log_training_result(res: Any, files: list[Path], root: Path) -> None:
    """A finished training's summary metrics, stop reason and ``files`` (those present), and a
    reference to its checkpoint, in the active run.  ``res`` is the engine's ``TrainResult``.
    The checkpoint itself is stored once by DVC; the registered model holds the one copy the
    registry needs."""
    import mlflow

    log_metrics(
        {
            "best_val_mape": res.best_val_mape,
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "train_seconds": res.seconds,
        }
    )
    mlflow.set_tag("stop_reason", res.stop_reason)
    if res.best_path.is_file():
        ref = checkpoint_reference(res.best_path, root)
        mlflow.set_tags({"checkpoint_path": ref["path"], "checkpoint_md5": ref["md5"]})
        mlflow.log_dict(ref, f"model/{CHECKPOINT_REF_NAME}")
    for path in files:
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path="training")
