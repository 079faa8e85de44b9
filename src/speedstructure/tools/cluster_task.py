"""One Ray task of ``speedstructure train-parallel``: one training stage, on the node Ray picks.

:func:`run_stage` is the task's body; the driver (:mod:`speedstructure.tools.parallel`) submits
it with ``ray.remote`` and one GPU (or CPUs) per task.  It sets ``CUDA_VISIBLE_DEVICES`` from
``ray.get_gpu_ids()`` itself (Ray sets nothing for a task that asks for no GPU: then it is
empty), puts the ``bin/`` of its Python first on ``PATH`` and runs
``dvc --wait-for-lock repro --single-item <stage>``, in one of two storage modes:

* ``shared`` (a file system every node mounts at the same path): in the shared checkout
  (``spec["root"]``), the output appended to ``<paths.parallel_logs>/<stage>.log``.  DVC holds
  the repository lock only while it collects the stage and records its outputs, so the stages
  overlap; a task that Ray retries (``max_retries``: its worker or node died) reruns the same
  command, which resumes from ``last.pt`` (the outputs are ``persist``);
* ``clone`` (nothing shared but git and a DVC remote): in a fresh clone of ``spec["repo"]`` at
  the driver's commit with the driver's ``dvc.lock``: ``dvc pull`` of the inputs the driver
  pushed (store, fold table), the stage, ``dvc push`` of its outputs.  The task returns the
  stage's ``dvc.lock`` entry, the bytes of its ``cache: false`` outputs (small text committed to
  git, never in the remote) and its log; the clone is removed.  The driver records the entry,
  writes those files and ``dvc pull`` s the rest (:mod:`speedstructure.tools.cluster_clone`).

Each attempt starts its log with a ``== <stage>: attempt`` line naming the node, the process and
``CUDA_VISIBLE_DEVICES``.  Ray kills the processes a dead task started only when its
process-group cleanup is on (``RAY_process_group_cleanup_enabled=1``, which the local instance
of ``train-parallel`` sets); otherwise the header says so.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ATTEMPT = "== {stage}: attempt on {node} (pid {pid}), CUDA_VISIBLE_DEVICES={gpus!r}, {when}\n"
NO_PG_CLEANUP = (
    "== warning: this Ray worker shares its process group (Ray's process-group cleanup is off:"
    " start Ray with RAY_process_group_cleanup_enabled=1); if the task is killed, its dvc and"
    " training processes keep running\n"
)


def default_dvc() -> list[str]:
    """DVC of the task's own environment."""
    return [sys.executable, "-m", "dvc"]


def task_env(gpus: list[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the stage: its GPUs only, this Python's ``bin/`` first on ``PATH``."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["stage"]`` (see the module docstring); ``{"returncode", "gpu", "node",
    "seconds", ...}`` plus ``log`` (shared) or ``log_text``, ``lock``, ``files`` (clone)."""
    import ray

    gpus = [str(g) for g in ray.get_gpu_ids()]
    env = task_env(gpus, spec.get("env"))
    node, t0 = socket.gethostname(), time.time()
    header = ATTEMPT.format(
        stage=spec["stage"],
        node=node,
        pid=os.getpid(),
        gpus=env["CUDA_VISIBLE_DEVICES"],
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if os.getpgrp() != os.getpid():
        header += NO_PG_CLEANUP
    run = _in_clone if spec["storage"] == "clone" else _in_shared
    out = run(spec, env, header)
    out.update(gpu=",".join(gpus), node=node, seconds=round(time.time() - t0, 1))
    return out


def _repro(spec: dict[str, Any]) -> list[str]:
    dvc = spec.get("dvc") or default_dvc()
    return [*dvc, "--wait-for-lock", "repro", "--single-item", spec["stage"]]


def _earlier_attempts(log_path: Path) -> list[int]:
    """The process groups of this run's earlier attempts on this node (from their headers):
    a retried task's worker leads its own group when process-group cleanup is on."""
    node = socket.gethostname()
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    found = re.findall(r"^== .*?: attempt on (\S+) \(pid (\d+)\)", text, flags=re.M)
    return [int(pid) for host, pid in found if host == node and int(pid) != os.getpgrp()]


def _wait_until_gone(groups: list[int], fh: IO[str], timeout: float = 120.0) -> None:
    """Wait (at most ``timeout``) until the processes of ``groups`` have ended: Ray retries a
    task as soon as its worker dies, while its cleanup may still be stopping the dead worker's
    dvc, whose entry in DVC's per-output lock would make the retry fail as busy."""
    deadline = time.time() + timeout
    for group in groups:
        fh.write(f"== waiting for the earlier attempt's processes (group {group}) to end\n")
        fh.flush()
        while time.time() < deadline:
            try:
                os.killpg(group, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.5)


def _in_shared(spec: dict[str, Any], env: dict[str, str], header: str) -> dict[str, Any]:
    log_path = Path(spec["log_dir"]) / f"{spec['stage']}.log"
    earlier = _earlier_attempts(log_path)
    with open(log_path, "a") as fh:
        fh.write(header)
        fh.flush()
        _wait_until_gone(earlier, fh)
        proc = subprocess.run(
            _repro(spec), cwd=spec["root"], env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    return {"returncode": proc.returncode, "log": str(log_path)}


def _step(cmd: list[str], cwd: Path, env: dict[str, str], fh: IO[str]) -> int:
    fh.write(f"$ {' '.join(cmd)}\n")
    fh.flush()
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


def _clone_steps(spec: dict[str, Any], work: Path, env: dict[str, str], fh: IO[str]) -> int:
    """Clone, pull the inputs, run the stage, push its outputs; the first failing exit code."""
    dvc = spec.get("dvc") or default_dvc()
    remote = ["-r", spec["remote"]] if spec.get("remote") else []
    rc = _step(
        ["git", "clone", "--quiet", "--no-checkout", spec["repo"], str(work)], work.parent, env, fh
    )
    rc = rc or _step(["git", "checkout", "--quiet", "--detach", spec["commit"]], work, env, fh)
    if rc:
        return rc
    (work / "dvc.lock").write_text(spec["lock"])  # the driver's: its store and folds entries
    steps = []
    if spec.get("cache_dir"):
        steps.append([*dvc, "config", "--local", "cache.dir", spec["cache_dir"]])
    if spec.get("inputs"):
        steps.append([*dvc, "pull", *remote, *spec["inputs"]])
    steps += [_repro(spec), [*dvc, "push", *remote, spec["stage"]]]
    for cmd in steps:
        rc = _step(cmd, work, env, fh)
        if rc:
            return rc
    return 0


def _in_clone(spec: dict[str, Any], env: dict[str, str], header: str) -> dict[str, Any]:
    from dvc.utils.serialize import load_yaml  # DVC's YAML (1.2: `1e-08` is a number)

    stage = spec["stage"]
    base = Path(
        tempfile.mkdtemp(
            prefix=f"speedstructure-{stage.replace('@', '-')}-", dir=spec.get("workdir")
        )
    )
    work, log_path = base / "checkout", base / "stage.log"
    # the clone's own code, as `pip install -e .` in it would run it
    env = {**env, "PYTHONPATH": os.pathsep.join([str(work / "src"), env.get("PYTHONPATH", "")])}
    try:
        with open(log_path, "w") as fh:
            fh.write(header)
            rc = _clone_steps(spec, work, env, fh)
        out: dict[str, Any] = {"returncode": rc, "log_text": log_path.read_text(errors="replace")}
        if rc == 0:
            out["lock"] = load_yaml(str(work / "dvc.lock"))["stages"][stage]
            out["files"] = {rel: (work / rel).read_bytes() for rel in spec.get("uncached", [])}
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)
