"""Tests of MLflow tracking (speedstructure.tracking.store and .runs): real MLflow on a
temporary SQLite store."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import mlflow
import pytest
import yaml

from speedstructure.config.load import parse_params
from speedstructure.errors import Terminated
from speedstructure.tracking.runs import log_metrics, start_run
from speedstructure.tracking.store import home_root, project_params, settings
from support import ROOT


@pytest.fixture(autouse=True)
def _isolated_mlflow(isolated_mlflow):
    """start_run points MLflow's process-wide state at the test store: restored afterwards."""
    yield


# --------------------------------------------------------------------------- paths


def test_home_root(tmp_path):
    repo = tmp_path / "repo"
    assert home_root(repo / ".dvc" / "tmp" / "exps" / "tmpabc" / "sub") == repo.resolve()
    assert home_root(repo / ".dvc" / "tmp" / "exps" / "tmpabc") == repo.resolve()
    # ordinary paths (and look-alikes) are left alone
    for p in (
        repo,
        repo / "sub",
        repo / ".dvc" / "tmp" / "other" / "x",
        repo / "dvc" / "tmp" / "exps" / "x",
        repo / ".dvc" / "tmp",
    ):
        assert home_root(p) == p.resolve()


def test_settings_resolve_relative_paths_under_the_home_root(tmp_path, tiny_params):
    repo = tmp_path / "repo"
    mlflow_cfg = {
        "tracking_uri": "sqlite:///mlruns/m.db",
        "artifact_root": "mlruns/art",
        "experiment": "e1",
    }
    want_uri = f"sqlite:///{(repo / 'mlruns' / 'm.db').resolve()}"
    want_art = (repo / "mlruns" / "art").resolve().as_uri()
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpq1w2" / "x"
    for root in (repo, copy):
        s = settings(tiny_params(root, mlflow=mlflow_cfg))
        assert s["tracking_uri"] == want_uri and s["tracking_uri"].startswith("sqlite:////")
        assert s["artifact_root"] == want_art
        assert s["experiment"] == "e1"
        assert s["registered_model"] == "speedstructure-ensemble"  # default filled in
    assert (repo / "mlruns").is_dir()  # the database's folder exists for SQLite
    assert not (copy / "mlruns").exists()

    # without params: read from the root's params.yaml (the copy's own file)
    copy.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped["mlflow"] = {"tracking_uri": "sqlite:///db/x.db", "artifact_root": "arts"}
    (copy / "params.yaml").write_text(yaml.safe_dump(shipped))
    s = settings(None, copy)
    assert settings(root=copy) == s
    assert s["tracking_uri"] == f"sqlite:///{(repo / 'db' / 'x.db').resolve()}"
    assert s["artifact_root"] == (repo / "arts").resolve().as_uri()
    assert s["experiment"] == "speedstructure"

    # absolute paths pass through
    abs_cfg = {
        "tracking_uri": f"sqlite:///{tmp_path}/abs/a.db",
        "artifact_root": str(tmp_path / "A"),
    }
    s = settings(tiny_params(copy, mlflow=abs_cfg))
    assert s["tracking_uri"] == f"sqlite:///{tmp_path}/abs/a.db"
    assert s["artifact_root"] == (tmp_path / "A").as_uri()


def test_settings_default_without_a_params_file(tmp_path):
    s = settings(root=tmp_path)
    assert s["tracking_uri"] == f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"
    assert s["artifact_root"] == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
    assert s["experiment"] == "speedstructure"
    assert s["registered_model"] == "speedstructure-ensemble"
    assert project_params(root=tmp_path).root == tmp_path


def test_environment_wins(tmp_path, monkeypatch, tiny_params):
    cfg = {"tracking_uri": "sqlite:///mlruns/m.db", "experiment": "from-params"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    s = settings(tiny_params(tmp_path, mlflow=cfg))
    assert s["tracking_uri"] == "http://mlflow.example:5000"
    assert s["experiment"] == "from-env"
    # a relative SQLite URI from the environment is under the home root too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env/e.db")
    s = settings(tiny_params(tmp_path / ".dvc" / "tmp" / "exps" / "t", mlflow=cfg))
    assert s["tracking_uri"] == f"sqlite:///{(tmp_path / 'env' / 'e.db').resolve()}"


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for this module's runs; every test names its own runs."""
    base = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{base}/m.db"
    cfg = {"tracking_uri": uri, "artifact_root": str(base / "art"), "experiment": "t"}
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    return uri, parse_params({**shipped, "mlflow": cfg}, root=ROOT), base


def _run(uri: str, run_id: str):
    return mlflow.MlflowClient(uri).get_run(run_id)


def _runs_named(uri: str, name: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")


def test_finished_run_logs_flat_params_and_git_commit(store):
    uri, project, base = store
    with start_run(
        "ok",
        project,
        tags={"stage": "unit", "fold": 3},
        params={"train": {"lr": 0.001, "betas": [0.9, 0.95]}, "seed": 7},
    ) as run:
        assert mlflow.active_run().info.run_id == run.info.run_id
        log_metrics({"loss": 0.5})
    assert mlflow.active_run() is None
    runs = _runs_named(uri, "ok")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params == {"train.lr": "0.001", "train.betas": "[0.9, 0.95]", "seed": "7"}
    assert r.data.tags["stage"] == "unit" and r.data.tags["fold"] == "3"
    assert r.data.tags["project"] == "speedstructure"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert r.data.tags["git_commit"] == head.stdout.strip()
    else:
        assert "git_commit" in r.data.tags
    assert r.data.metrics == {"loss": 0.5}
    exp = mlflow.MlflowClient(uri).get_experiment_by_name("t")
    assert exp.artifact_location == (base / "art").resolve().as_uri()


def test_git_commit_from_dvc_experiment(store, monkeypatch):
    uri, project, _ = store
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    with start_run("dvcexp", project) as run:
        pass
    assert _run(uri, run.info.run_id).data.tags["git_commit"] == "0123456789abcdef"


def test_exception_ends_failed_and_propagates(store):
    uri, project, _ = store
    with pytest.raises(ValueError, match="boom"):
        with start_run("fails", project) as run:
            raise ValueError("boom")
    assert mlflow.active_run() is None
    assert _run(uri, run.info.run_id).info.status == "FAILED"


def test_keyboard_interrupt_ends_killed(store):
    uri, project, _ = store
    with pytest.raises(KeyboardInterrupt):
        with start_run("ctrl-c", project) as run:
            raise KeyboardInterrupt
    assert mlflow.active_run() is None
    assert _run(uri, run.info.run_id).info.status == "KILLED"


def test_sigterm_ends_killed_and_restores_the_handler(store):
    uri, project, _ = store
    before = signal.getsignal(signal.SIGTERM)
    reached = False
    with pytest.raises(Terminated):
        with start_run("sigterm", project) as run:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
            reached = True
    assert not reached
    assert isinstance(Terminated("x"), KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    assert mlflow.active_run() is None
    assert _run(uri, run.info.run_id).info.status == "KILLED"


def test_no_run_is_left_running(store):
    uri, project, _ = store
    with start_run("left-ok", project):
        pass
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            with start_run(f"left-{exc.__name__}", project):
                raise exc
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    assert {"left-ok", "left-ValueError", "left-KeyboardInterrupt"} <= {
        r.info.run_name for r in runs
    }
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_log_metrics_ignores_nan_and_non_numbers(store):
    uri, project, _ = store
    with start_run("metrics", project) as run:
        log_metrics(
            {
                "a": 1.5,
                "b": float("nan"),
                "c": "text",
                "d": True,
                "e": 3,
                "f": math.inf,
                "g": None,
                "h": [1.0],
            },
            step=2,
        )
        log_metrics({"only_nan": float("nan")})  # nothing left: no call at all
    r = _run(uri, run.info.run_id)
    assert r.data.metrics == {"a": 1.5, "e": 3.0}
    hist = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "a")
    assert [m.step for m in hist] == [2]
    assert r.info.status == "FINISHED"
