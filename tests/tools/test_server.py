"""``speedstructure server``: argument errors in one line (fast), and a real PostgreSQL with
``mlflow server`` that two processes log to at once, Optuna beside it, stopped by SIGTERM (slow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from server_support import (
    listening,
    pg_reachable_folder,
    pid_alive,
    postgres_usable,
    postmaster_pid,
    wait_for_exports,
)
from speedstructure.cli import main
from speedstructure.errors import UserError
from speedstructure.tools import server as S
from speedstructure.tracking.store import OPTUNA_STORAGE_ENV, hide_password, is_server


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The project root is ``tmp_path`` (nothing is written into the checkout)."""
    monkeypatch.setenv("SPEEDSTRUCTURE_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("speedstructure server: error: ")
    return err[0]


def test_a_backend_that_is_no_database_url_is_one_line_and_exit_2(in_tmp):
    proc = subprocess.run(
        [sys.executable, "-m", "speedstructure.cli", "server", "--backend-store-uri", "http://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "speedstructure server: error: --backend-store-uri 'http://x' is not a database URL: "
        "give postgresql://user@host:port/database (or mysql://, mssql://, sqlite:///file)"
    )
    assert not (in_tmp / "mlruns").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend-store-uri", "mongodb://u:secret@h/db"], "'mongodb://u:***@h/db' is not a"),
        (["--backend-store-uri", "postgresql://u@h/db", "--pgdata", "x"], "drop --pgdata"),
        (["--port", "70000"], "--port 70000: not a port"),
        (["--workers", "0"], "--workers 0: give at least 1"),
    ],
)
def test_argument_errors_name_the_problem(in_tmp, capsys, argv, message):
    assert main(["server", *argv]) == 2
    line = _error(capsys)
    assert message in line and "secret" not in line
    assert not (in_tmp / "mlruns").exists()


def test_a_port_in_use_is_named(in_tmp, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["server", "--backend-store-uri", "postgresql://u@h/db", "--port", str(port)]
        assert main(argv) == 2
    assert f"port {port} on 127.0.0.1 (mlflow server) is not free" in _error(capsys)


def test_missing_postgresql_programs_are_named(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(in_tmp))
    monkeypatch.setattr(S, "PG_BIN_GLOB", str(in_tmp / "no-postgresql-*"))
    assert main(["server", "--pgdata", str(in_tmp / "pg"), "--port", "0"]) == 2
    assert "initdb not found on the PATH" in _error(capsys)
    assert not (in_tmp / "pg").exists()


def test_urls_hide_their_password_and_servers_are_told_apart():
    assert (
        hide_password("postgresql+psycopg://u:s3cr%40t@h:5/db")
        == "postgresql+psycopg://u:***@h:5/db"
    )
    assert hide_password("postgresql://u@h/db") == "postgresql://u@h/db"
    assert is_server("http://127.0.0.1:5000") and is_server("HTTPS://mlflow.example")
    assert not is_server("sqlite:////x/mlflow.db") and not is_server("postgresql://u@h/db")
    with pytest.raises(UserError):
        S.check_backend_uri("mlruns/mlflow.db")


# --------------------------------------------------------------------------- the real thing

CLIENT = """
import os, sys
from pathlib import Path

import mlflow
import optuna

from speedstructure.config.schema import Params
from speedstructure.tracking.store import setup

i = int(sys.argv[1])
setup(Params(root=Path.cwd()))  # MLFLOW_TRACKING_URI: the server
with mlflow.start_run(run_name=f"client{i}"):
    for step in range(5):
        mlflow.log_metric("loss", 1.0 / (step + 1 + i), step=step)
    mlflow.log_text(f"client {i}", f"notes/client{i}.txt")
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(
    storage=os.environ["SPEEDSTRUCTURE_OPTUNA_STORAGE"], study_name="server-test",
    load_if_exists=True,
)
study.optimize(lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=2)
"""


@pytest.fixture
def pg_folder():
    with pg_reachable_folder() as base:
        yield base


@pytest.mark.slow
def test_server_on_postgresql_takes_two_writers_and_optuna_then_stops(tmp_path, pg_folder):
    reason = postgres_usable()
    if reason:
        pytest.skip(reason)
    port, pg_port = S.free_port(), S.free_port()
    pgdata, log = pg_folder / "data", tmp_path / "server.log"
    cmd = [sys.executable, "-m", "speedstructure.cli", "server", "--port", str(port),
           "--pgdata", str(pgdata), "--pg-port", str(pg_port), "--workers", "1",
           "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip
    env = {**os.environ, "SPEEDSTRUCTURE_ROOT": str(tmp_path)}
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        exports = wait_for_exports(server, log, timeout=45)
        postmaster = postmaster_pid(pgdata)
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
        assert exports[OPTUNA_STORAGE_ENV] == (
            f"postgresql+psycopg://speedstructure@127.0.0.1:{pg_port}/optuna"
            f"?passfile={pgdata}/pgpass"
        )
        client_env = {**env, **exports}
        clients = [
            subprocess.Popen([sys.executable, "-c", CLIENT, str(i)], cwd=tmp_path, env=client_env)
            for i in range(2)
        ]
        assert [c.wait(timeout=60) for c in clients] == [0, 0]
        _check_store(exports, tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=30)
    text = log.read_text()
    assert rc == 0, text
    assert "mlflow server stopped" in text and f"PostgreSQL of {pgdata} stopped" in text
    assert not (pgdata / "postmaster.pid").exists() and not pid_alive(postmaster)
    assert not listening(port) and not listening(pg_port)


def _api(base: str, path: str, body: dict | None = None, **query) -> dict:
    """MLflow's REST API: a GET with ``query``, a POST of ``body`` (no client to import)."""
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _check_store(exports: dict[str, str], tmp_path: Path) -> None:
    """Both runs in one experiment with their metrics and artifacts (uploaded through the
    server), and the four trials of the Optuna study in PostgreSQL (not in SQLite)."""
    import optuna

    base = exports["MLFLOW_TRACKING_URI"]
    exp = _api(base, "experiments/get-by-name", experiment_name="speedstructure")["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")
    runs = _api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert sorted(r["info"]["run_name"] for r in runs) == ["client0", "client1"]
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    for r in runs:
        history = _api(base, "metrics/get-history", run_id=r["info"]["run_id"], metric_key="loss")
        assert [m["step"] for m in history["metrics"]] == [0, 1, 2, 3, 4]
    notes = sorted(p.name for p in (tmp_path / "artifacts").rglob("client*.txt"))
    assert notes == ["client0.txt", "client1.txt"]
    study = optuna.load_study(study_name="server-test", storage=exports[OPTUNA_STORAGE_ENV])
    assert len(study.trials) == 4
    assert not (tmp_path / "mlruns").exists()
