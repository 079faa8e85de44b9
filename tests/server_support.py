"""Plain helpers of the tests that start a real ``speedstructure server`` (``from server_support
import ...``): tests/tools/test_server.py and tests/tools/test_ray_cluster.py.

* ``postgres_usable()``: why a real PostgreSQL cannot be started here, or None;
* ``pg_reachable_folder(prefix)``: a temporary folder the ``postgres`` account can reach (pytest's
  own are closed to it when the tests run as root), removed afterwards;
* ``listening(port)``: whether something accepts connections on ``127.0.0.1:port``;
* ``wait_for_exports(proc, log, timeout)``: the ``export NAME=VALUE`` lines the server prints once
  it answers, read from its log;
* ``postmaster_pid(pgdata)``: the pid of the PostgreSQL server of a data folder;
* ``pid_alive(pid)``: whether a process (not a zombie) has that id.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from speedstructure.errors import UserError
from speedstructure.tools import server as S
from speedstructure.tracking.store import OPTUNA_STORAGE_ENV


def postgres_usable() -> str | None:
    """Why the real server cannot run here (no PostgreSQL programs, root without a ``postgres``
    account), or None."""
    try:
        S.find_postgres()
        S._as_pg_account(["true"])
    except UserError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def pg_reachable_folder(prefix: str = "ss-pg-") -> Iterator[Path]:
    """A short folder in the system's temporary folder that the ``postgres`` account can reach,
    removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_exports(proc: subprocess.Popen, log: Path, timeout: float) -> dict[str, str]:
    """``{NAME: VALUE}`` of the server's ``  export NAME=VALUE`` lines, once it has printed the
    last of them; an :class:`AssertionError` with the log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if f"export {OPTUNA_STORAGE_ENV}=" in text:
            return dict(re.findall(r"^  export (\w+)=(\S+)$", text, flags=re.M))
        assert proc.poll() is None, f"the server exited early:\n{text}"
        time.sleep(0.3)
    raise AssertionError(f"no tracking URI within {timeout} s:\n{log.read_text()}")


def postmaster_pid(pgdata: Path) -> int:
    """The first line of ``postmaster.pid``: the PostgreSQL server's process id."""
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
