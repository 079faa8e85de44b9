"""``speedstructure server`` (``make server``): the team's MLflow tracking server on PostgreSQL.

It runs ``mlflow server`` with a PostgreSQL backend, so that several processes (``make
train-parallel``, several users' ``dvc repro``) log to one store at the same time, and serves
the artifacts itself (``--serve-artifacts``: clients upload through the server, so runs logged
from another machine keep their checkpoints' references, curves and models in one place).

* **A PostgreSQL of its own** (the default): the data folder ``mlruns/postgres`` (``--pgdata``)
  is created once with ``initdb`` (a superuser ``speedstructure`` with a random password, kept
  in ``<pgdata>/pgpass``; the databases ``mlflow`` and ``optuna``; a free port, kept in its
  ``postgresql.conf``), then started with ``pg_ctl`` on ``127.0.0.1`` only (its unix socket in
  the data folder, its log ``<pgdata>/postgres.log``) and stopped (``pg_ctl stop -m fast``) when
  the server stops.  PostgreSQL does not run as root: started by root, its programs run as the
  ``postgres`` account (``runuser``), which must reach the data folder.
* **An existing database**: ``--backend-store-uri postgresql://user@host:port/database``
  (any SQLAlchemy URL MLflow accepts); nothing else is started.

Artifacts go to ``mlruns/server-artifacts`` or ``--artifacts-destination`` (a folder or a URI
such as ``s3://bucket/path``).  MLflow listens on ``127.0.0.1:5000`` unless ``--host`` and
``--port`` say otherwise; arguments after ``--`` go to ``mlflow server`` unchanged (``--
--allowed-hosts gpu-box:5000`` for a server reached by name).  Once it answers on
``/health`` the command prints what clients export::

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    export SPEEDSTRUCTURE_OPTUNA_STORAGE=postgresql+psycopg://speedstructure@127.0.0.1:PORT/optuna?passfile=<pgdata>/pgpass

The URLs name the password file (libpq's ``passfile``), not the password.  Optuna's studies get
a database of their own in the same PostgreSQL: Optuna and MLflow both keep their schema
version in an ``alembic_version`` table, so they cannot share one database; its tables are
created when the server starts (two first writers creating them at once would collide).
Ctrl-C or SIGTERM stops ``mlflow server`` (its whole process group), then PostgreSQL, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from speedstructure.config.typed import project_root
from speedstructure.errors import UserError
from speedstructure.tracking.store import OPTUNA_STORAGE_ENV, hide_password, home_root

DB_USER = "speedstructure"
DATABASES = ("mlflow", "optuna")
PG_ACCOUNT = "postgres"  # the account PostgreSQL's programs run as when root starts them
PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu keep them off the PATH
DB_DIALECTS = ("postgresql", "mysql", "mssql", "sqlite")  # MLflow's SQL store
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
PG_TIMEOUT_S = 60


# --------------------------------------------------------------------------- PostgreSQL


def find_postgres() -> dict[str, str]:
    """``initdb``, ``pg_ctl`` and ``postgres``: from the PATH, else the newest of
    :data:`PG_BIN_GLOB`; a :class:`UserError` naming the first one missing."""
    found = {name: shutil.which(name) for name in PG_PROGRAMS}
    if all(found.values()):
        return found
    for folder in sorted(glob.glob(PG_BIN_GLOB), key=_version_key, reverse=True):
        paths = {name: os.path.join(folder, name) for name in PG_PROGRAMS}
        if all(os.access(p, os.X_OK) for p in paths.values()):
            return paths
    missing = next(name for name, path in found.items() if not path)
    raise UserError(
        f"{missing} not found on the PATH (nor in {PG_BIN_GLOB}): install PostgreSQL's server "
        "programs, or pass --backend-store-uri for an existing database"
    )


def _version_key(folder: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", folder))


def _as_pg_account(cmd: list[str]) -> list[str]:
    """``cmd`` as PostgreSQL must run it: as the caller, or as ``postgres`` for root."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam(PG_ACCOUNT)
    except KeyError:
        runuser = None
    if runuser is None:
        raise UserError(
            f"PostgreSQL does not run as root and there is no '{PG_ACCOUNT}' account (with "
            "runuser) to run it as: start the server as an ordinary user, or pass "
            "--backend-store-uri"
        )
    return [runuser, "-u", PG_ACCOUNT, "--", *cmd]


def _pg(cmd: list[str], what: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program (from ``/``: the caller's folder may be closed to it);
    a :class:`UserError` with its last message when it fails."""
    proc = subprocess.run(_as_pg_account(cmd), cwd="/", input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise UserError(f"{what} failed: {lines[-1].strip()}")
    return proc


def _chown_to_pg(path: Path) -> None:
    if os.geteuid() == 0:
        account = pwd.getpwnam(PG_ACCOUNT)
        os.chown(path, account.pw_uid, account.pw_gid)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the system's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int, what: str, option: str) -> None:
    """A :class:`UserError` when ``port`` on ``host`` cannot be bound (something listens)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"port {port} on {host} ({what}) is not free ({exc.strerror}): stop what "
                f"listens there or pass {option}"
            ) from exc


def init_cluster(data: Path, bins: dict[str, str]) -> None:
    """Create the data folder ``data`` (see the module docstring); built in a staging folder
    beside it and renamed, so an interrupted creation leaves no half cluster."""
    if (data / "PG_VERSION").is_file():
        return
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise UserError(
            f"{data}: exists and is not a PostgreSQL data folder; pass another --pgdata"
        )
    data.parent.mkdir(parents=True, exist_ok=True)
    reach = _as_pg_account(["test", "-x", str(data.parent)])
    if os.geteuid() == 0 and subprocess.run(reach, cwd="/").returncode != 0:
        raise UserError(
            f"{data.parent}: PostgreSQL runs as the '{PG_ACCOUNT}' account (this command runs "
            "as root), which cannot reach that folder: pass a --pgdata it can reach"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{data.name}-init-", dir=data.parent))
    try:
        _chown_to_pg(staging)
        password = secrets.token_urlsafe(24)
        pwfile = staging / "password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        _chown_to_pg(pwfile)
        new = staging / "data"
        _pg(
            [bins["initdb"], "-D", str(new), "-U", DB_USER, "-E", "UTF8", "--no-instructions",
             "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
            "initdb",
        )  # fmt: skip
        script = "".join(f"CREATE DATABASE {db};\n" for db in DATABASES)
        _pg([bins["postgres"], "--single", "-D", str(new), "postgres"], "CREATE DATABASE", script)
        with open(new / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# speedstructure server: local TCP only, the socket in the data folder\n"
                f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '.'\n"
                f"port = {free_port()}\n"
            )
        pgpass = new / "pgpass"
        pgpass.write_text(f"*:*:*:{DB_USER}:{password}\n")
        pgpass.chmod(0o600)
        _chown_to_pg(pgpass)
        if data.exists():
            data.rmdir()
        new.rename(data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL this command started: its data folder, port and programs."""

    data: Path
    port: int
    bins: dict[str, str]

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one of its databases (psycopg 3, the password in ``pgpass``)."""
        passfile = urllib.parse.quote(str(self.pgpass), safe="/")
        return (
            f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{database}?passfile={passfile}"
        )

    @property
    def pgpass(self) -> Path:
        return self.data / "pgpass"

    @property
    def log(self) -> Path:
        return self.data / "postgres.log"


def start_cluster(data: Path, bins: dict[str, str], port: int | None) -> Postgres:
    """``pg_ctl start`` on the configured port (or ``port``); a :class:`UserError` if that
    data folder already runs or the port is taken."""
    if _pg_status(data, bins) == 0:
        raise UserError(
            f"{data}: its PostgreSQL is already running (another `speedstructure server`?): "
            "stop that one first"
        )
    if port is None:
        conf = _pg([bins["postgres"], "-D", str(data), "-C", "port"], "reading its port")
        port = int(conf.stdout.strip())
    check_port("127.0.0.1", port, f"PostgreSQL of {data}", "--pg-port")
    pg = Postgres(data=data, port=port, bins=bins)
    cmd = [bins["pg_ctl"], "start", "-D", str(data), "-w", "-t", str(PG_TIMEOUT_S)]
    try:
        _pg([*cmd, "-l", str(pg.log), "-o", f"-p {port}"], "pg_ctl start")
    except UserError as exc:
        raise UserError(f"{exc}; {_last_log_line(pg.log)} (log {pg.log})") from None
    return pg


def _pg_status(data: Path, bins: dict[str, str]) -> int:
    """``pg_ctl status``: 0 running, 3 not running, 4 no data folder."""
    cmd = _as_pg_account([bins["pg_ctl"], "status", "-D", str(data)])
    return subprocess.run(cmd, cwd="/", capture_output=True).returncode


def _last_log_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in log.read_text().splitlines() if "FATAL" in line]
        if lines:
            return lines[-1].split("FATAL:", 1)[-1].strip()
    return "see its log"


def stop_cluster(pg: Postgres) -> None:
    """``pg_ctl stop -m fast``: the server this command started."""
    with _uninterrupted():
        stop = [pg.bins["pg_ctl"], "stop", "-D", str(pg.data), "-m", "fast", "-w"]
        try:
            _pg(stop, "pg_ctl stop")
        except UserError:
            if _pg_status(pg.data, pg.bins) == 0:  # still running; not running: already stopped
                raise
    print(f"speedstructure server: PostgreSQL of {pg.data} stopped", flush=True)


@contextlib.contextmanager
def _uninterrupted():
    """Ctrl-C and SIGTERM ignored while a stop completes (a second one must not cut it)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- MLflow


def check_backend_uri(uri: str) -> str:
    """``uri`` when it is a database URL MLflow's SQL store takes, else a :class:`UserError`."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme.split("+", 1)[0] not in DB_DIALECTS:
        raise UserError(
            f"--backend-store-uri {hide_password(uri)!r} is not a database URL: give "
            "postgresql://user@host:port/database (or mysql://, mssql://, sqlite:///file)"
        )
    return uri


def mlflow_command(
    backend: str, artifacts: str, host: str, port: int, workers: int, extra: list[str]
) -> list[str]:
    """``mlflow server`` of this environment, serving its artifacts from ``artifacts``."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", artifacts,
        "--host", host, "--port", str(port), "--workers", str(workers),
        *extra,
    ]  # fmt: skip


def create_optuna_tables(url: str) -> None:
    """Optuna's tables in the database ``url`` (idempotent), once, before any client."""
    import optuna

    try:
        optuna.storages.RDBStorage(url, skip_compatibility_check=True).engine.dispose()
    except Exception as exc:  # the driver's or SQLAlchemy's error, in one line
        message = " ".join(str(exc).split())[:300]
        raise UserError(f"Optuna's tables in {hide_password(url)}: {message}") from None


def start_mlflow(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in a session of its own (Ctrl-C reaches this command, which stops it)."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # as `make ui`: no job runner
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Until ``url`` + ``/health`` answers; a :class:`UserError` if the server exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with code {proc.returncode} (see above)")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise UserError(f"mlflow server did not answer on {url}/health within {timeout:.0f} s")


def stop_mlflow(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group (the CLI and its uvicorn workers), SIGKILL after
    ``grace`` seconds."""
    with _uninterrupted():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print("speedstructure server: mlflow server stopped", flush=True)


def _url_host(host: str) -> str:
    """The host clients on this machine use for a server bound to ``host``."""
    if host in WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _announce(url: str, host: str, backend: str, artifacts: str, pg: Postgres | None) -> None:
    lines = [
        f"speedstructure server: MLflow on {url} (Ctrl-C stops it)",
        f"  runs and models: {hide_password(backend)}",
        f"  artifacts:       {artifacts}",
    ]
    if pg is not None:
        lines.append(f"  PostgreSQL:      {pg.data} (log {pg.log})")
    lines.append("In each shell that runs stages, dvc repro or make train-parallel:")
    lines.append(f"  export MLFLOW_TRACKING_URI={url}")
    if pg is not None:
        lines.append(f"  export {OPTUNA_STORAGE_ENV}={pg.url('optuna')}")
    else:
        lines.append(
            f"  (Optuna's studies stay in paths.optuna_db unless {OPTUNA_STORAGE_ENV} names a "
            "database of their own)"
        )
    if host in WILDCARD_HOSTS:
        lines.append(
            f"From other machines: http://{socket.gethostname()}:{url.rsplit(':', 1)[1]} "
            "(MLflow accepts private IPs and localhost; add names with -- --allowed-hosts)"
        )
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------- the command


def _options(args: argparse.Namespace) -> dict:
    """The checked options (every error before anything starts)."""
    if args.backend_store_uri and (args.pgdata or args.pg_port is not None):
        raise UserError("--backend-store-uri names an existing database: drop --pgdata/--pg-port")
    for name in ("port", "pg_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            raise UserError(f"--{name.replace('_', '-')} {value}: not a port (0-65535; 0: free)")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: give at least 1")
    home = home_root(project_root())
    artifacts = args.artifacts_destination or str(home / "mlruns" / "server-artifacts")
    folder = None if "://" in artifacts else Path(artifacts).resolve()
    port = args.port or free_port(args.host if args.host not in WILDCARD_HOSTS else "127.0.0.1")
    return {
        "backend": check_backend_uri(args.backend_store_uri) if args.backend_store_uri else None,
        "pgdata": Path(args.pgdata or home / "mlruns" / "postgres").resolve(),
        "pg_port": free_port() if args.pg_port == 0 else args.pg_port,
        "artifacts": folder.as_uri() if folder else artifacts,
        "artifacts_folder": folder,
        "port": port,
    }


def serve(args: argparse.Namespace) -> None:
    """Start PostgreSQL (unless given a database) and ``mlflow server``; block until the
    server exits (an error) or a signal (Ctrl-C, SIGTERM) stops both."""
    opt = _options(args)
    check_port(args.host or "0.0.0.0", opt["port"], "mlflow server", "--port")
    bins = None if opt["backend"] else find_postgres()
    with contextlib.ExitStack() as stack:
        pg = None
        if bins is not None:
            init_cluster(opt["pgdata"], bins)
            pg = start_cluster(opt["pgdata"], bins, opt["pg_port"])
            stack.callback(stop_cluster, pg)
        backend = opt["backend"] or pg.url("mlflow")
        if opt["artifacts_folder"] is not None:
            opt["artifacts_folder"].mkdir(parents=True, exist_ok=True)
        cmd = mlflow_command(
            backend, opt["artifacts"], args.host, opt["port"], args.workers, args.mlflow_args
        )
        proc = start_mlflow(cmd)
        stack.callback(stop_mlflow, proc)
        if pg is not None:  # while MLflow starts
            create_optuna_tables(pg.url("optuna"))
        url = f"http://{_url_host(args.host)}:{opt['port']}"
        wait_healthy(proc, url, args.start_timeout)
        _announce(url, args.host, backend, str(opt["artifacts_folder"] or opt["artifacts"]), pg)
        rc = proc.wait()
        raise UserError(f"mlflow server exited with code {rc} (see above)")


DESCRIPTION = (
    "The team's MLflow tracking server: `mlflow server` on PostgreSQL (a local one it manages, "
    "in mlruns/postgres, or --backend-store-uri), serving the artifacts; prints the "
    "MLFLOW_TRACKING_URI to export."
)


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser(
        "server",
        help=cli.COMMANDS["server"][1],
        description=DESCRIPTION + " Ctrl-C or SIGTERM stops it and the PostgreSQL it started.",
        epilog="Arguments after `--` go to `mlflow server` unchanged.",
    )
    p.add_argument("--host", default="127.0.0.1", help="MLflow's address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="MLflow's port (default 5000; 0: free)")
    p.add_argument("--workers", type=int, default=2, help="MLflow's worker processes (default 2)")
    p.add_argument(
        "--backend-store-uri",
        metavar="URL",
        help="an existing database (postgresql://user@host:port/db) instead of a local PostgreSQL",
    )
    p.add_argument("--pgdata", metavar="DIR", help="the local PostgreSQL's data folder "
                   "(default: mlruns/postgres, created on first use)")  # fmt: skip
    p.add_argument(
        "--pg-port", type=int, help="its port (default: the free port chosen at its creation)"
    )
    p.add_argument(
        "--artifacts-destination",
        metavar="DIR|URI",
        help="where artifacts go (default: mlruns/server-artifacts)",
    )
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for /health")
    p.add_argument("mlflow_args", nargs="*", metavar="-- MLFLOW_ARG", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    try:
        serve(args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: both stopped by serve's exit stack
        print("speedstructure server: stopped", flush=True)
    return 0
