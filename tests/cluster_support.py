"""Plain helpers of tests/tools/test_ray_cluster.py (``from cluster_support import ...``): the
commands of README "On a cluster", and the processes that following them starts.

* ``Readme``: the commands of the section's code block; ``step(command)`` checks that the
  README has exactly that command and records it as followed;
* ``at(words, address)``: a README command aimed at a head at ``address`` (``HEAD:6379``);
* ``exported(words)``: the assignments of an ``export A=1 B=2`` line;
* ``Server``: ``make server`` running (make's process, its log, what it printed), stopped by the
  pid of the ``speedstructure server`` process make runs;
* ``RayNodes``: the ``ray start --block`` processes of the nodes, started one by one and stopped
  by their pids (Ctrl-C), with every process of the cluster found by its temp dir;
* ``process_of(words, cwd)``, ``ray_worker_of(pid)``: a running command, the Ray worker above it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from server_support import pid_alive
from speedstructure.tracking.store import OPTUNA_STORAGE_ENV
from support import ROOT

README_SECTION = "## On a cluster"


def readme_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The commands of the code block of README "On a cluster", as words (comments dropped,
    continued lines joined), in order."""
    text = readme.read_text()
    section = text.split(f"\n{README_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [words for words in (shlex.split(ln, comments=True) for ln in lines) if words]


class Readme:
    """The README's commands, each taken by the step that runs it (:meth:`step`)."""

    def __init__(self) -> None:
        self.commands = readme_commands()
        self.followed: list[list[str]] = []

    def step(self, command: str) -> list[str]:
        """``command``'s words, after checking that the README has exactly this command."""
        words = shlex.split(command)
        assert words in self.commands, f"README On a cluster has no `{command}`: {self.commands}"
        if words not in self.followed:
            self.followed.append(words)
        return list(words)

    def everything_but(self, program: str) -> list[list[str]]:
        """The README's commands, in order, less those of ``program``."""
        return [c for c in self.commands if c[0] != program]


def at(words: list[str], address: str) -> list[str]:
    """A README command aimed at the head at ``address`` (for ``HEAD:6379``, ``6379``)."""
    port = address.rsplit(":", 1)[1]
    swap = {"HEAD:6379": address, "ADDRESS=HEAD:6379": f"ADDRESS={address}", "6379": port}
    return [swap.get(w, w) for w in words]


def exported(words: list[str]) -> dict[str, str]:
    """``export A=1 B=2`` -> ``{"A": "1", "B": "2"}``."""
    assert words[0] == "export", words
    return dict(w.split("=", 1) for w in words[1:])


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@dataclasses.dataclass
class Server:
    """``make server`` running in ``checkout``: make's process, its log, what it printed."""

    make: subprocess.Popen
    log: Path
    checkout: Path
    port: int
    exports: dict[str, str] = dataclasses.field(default_factory=dict)
    postmaster: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pgdata(self) -> Path:
        return self.checkout / "mlruns" / "postgres"

    @property
    def pg_port(self) -> int:
        return int(re.search(r"@127\.0\.0\.1:(\d+)/", self.exports[OPTUNA_STORAGE_ENV]).group(1))

    def stop(self) -> int:
        """SIGTERM to ``speedstructure server`` (make's child: the recipe's one command), which
        stops mlflow and PostgreSQL; make's exit code once it has ended (at once if it has)."""
        if self.make.poll() is None:
            for pid in children(self.make.pid):
                os.kill(pid, signal.SIGTERM)
        try:
            return self.make.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.make.kill()
            raise


@dataclasses.dataclass
class RayNodes:
    """The nodes' ``ray start --block`` processes (``--temp-dir temp_dir``), in start order."""

    temp_dir: Path
    procs: list[tuple[subprocess.Popen, Path]] = dataclasses.field(default_factory=list)

    def start(self, cmd: list[str], env: dict[str, str], log_file: Path) -> None:
        """Start one node (its output in ``log_file``); :meth:`wait` waits until it runs."""
        with open(log_file, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, log_file))

    def wait(self, timeout: float = 120) -> None:
        """Until every node's ``ray start`` says "Ray runtime started."; an AssertionError
        with its output if one exits first."""
        deadline = time.monotonic() + timeout
        for proc, log_file in self.procs:
            while "Ray runtime started." not in log_file.read_text():
                text = log_file.read_text()[-3000:]
                assert proc.poll() is None, f"{shlex.join(proc.args)} exited:\n{text}"
                assert time.monotonic() < deadline, f"{shlex.join(proc.args)}: not started"
                time.sleep(0.3)

    def processes(self) -> list[int]:
        """Every running process whose command line names this cluster's temp dir."""
        mark, pids = str(self.temp_dir).encode(), []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if mark in Path(f"/proc/{pid}/cmdline").read_bytes() and pid_alive(int(pid)):
                    pids.append(int(pid))
            except OSError:
                continue
        return pids

    def stop(self) -> list[int]:
        """Ctrl-C (SIGINT) to each node's ``ray start --block``, the last started first; the
        pids of the cluster's processes still running 10 s after they have all ended."""
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.3)
        return self.processes()


def process_of(cmd_words: list[str], cwd: Path, timeout: float = 180) -> int:
    """The pid of the process whose command line holds ``cmd_words`` and runs in ``cwd``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                here = Path(os.readlink(f"/proc/{pid}/cwd")) == cwd.resolve()
            except OSError:
                continue
            words = [os.path.basename(a) for a in argv.split("\0")]
            if here and all(w in words for w in cmd_words):
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no process {cmd_words} in {cwd}")


def ray_worker_of(pid: int) -> int:
    """The Ray worker (``ray::...``) above ``pid``."""
    while pid > 1:
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError("no Ray worker above the training process")
