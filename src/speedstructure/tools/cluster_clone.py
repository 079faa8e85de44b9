"""The driver's side of ``train-parallel --storage clone``: nodes that share no file system.

Before the tasks (:func:`plan`): the checkout must be committed (the tasks clone the driver's
commit; only ``dvc.lock`` and pipeline outputs may differ from it), a DVC remote must be set,
and the stages' inputs that DVC tracks (the store, the fold table, the zips it names, a
variant's pretrained weights) are pushed to it.  The MLflow tracking URI goes to the tasks as
``MLFLOW_TRACKING_URI`` (the experiment is created first, with this checkout's artifact root);
on machines that share nothing it must be a tracking server.

After each task (:func:`bring_back`): its log is written to ``<paths.parallel_logs>/<stage>.log``,
the stage's ``dvc.lock`` entry recorded in this checkout's ``dvc.lock`` (DVC's own YAML
round trip, as ``dvc repro`` writes it), its ``cache: false`` outputs written, and
``dvc pull --force <stage>`` brings the cached ones from the remote.  Then ``dvc status``
finds the stage up to date, exactly as if ``dvc repro`` had run it here.

Why not DVC's run-cache (``dvc push --run-cache`` on the node, ``dvc repro --pull`` here):
DVC refuses it for stages with ``persist`` outputs and skips it for stages with ``cache: false``
outputs, and the training stages have both (resuming from ``last.pt``; metrics and history in
git); docs/cluster.md has the measurements.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from speedstructure.config.schema import Params
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"git {' '.join(args)}: {' '.join(proc.stderr.split())[:300]}")
    return proc.stdout


def _dvc_ok(dvc: list[str], root: Path, *args: str) -> str:
    proc = subprocess.run([*dvc, *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())[:400]
        raise UserError(f"dvc {' '.join(args)} failed: {said}")
    return proc.stdout


def _lock_outs(root: Path) -> set[str]:
    import yaml

    path = root / "dvc.lock"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.is_file() else {}
    return {o["path"] for s in stages.values() for o in s.get("outs", [])}


def check_committed(root: Path) -> str:
    """HEAD's commit; a :class:`UserError` when tracked files other than ``dvc.lock``, the
    pipeline's outputs and their ``.gitignore`` differ from it (the clones would not see them)."""
    commit = _git(root, "rev-parse", "HEAD").strip()
    outs = _lock_outs(root)
    changed = _git(root, "diff", "--name-only", "HEAD").split()
    stray = [
        f
        for f in changed
        if f != "dvc.lock"
        and not f.endswith(".gitignore")
        and not any(f == o or f.startswith(o.rstrip("/") + "/") for o in outs)
    ]
    if stray:
        raise UserError(
            "--storage clone trains this checkout's commit in fresh clones: commit "
            f"{', '.join(stray[:6])}{' ...' if len(stray) > 6 else ''} first"
        )
    return commit


def _fold_table_zips(params: Params) -> list[str]:
    """The zips the fold table names (relative paths): a training stage checks that they exist
    even when it reads the sample store, though they are no dep of it."""
    import csv

    path = params.path("folds_table")
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return sorted({row["zip"] for row in csv.DictReader(fh)})


def stage_io(params: Params, stages: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The inputs of ``stages`` that DVC tracks (their deps that are outputs of a stage or of a
    ``.dvc`` file, the zips of the fold table, each variant's pretrained weights file), and
    each stage's ``cache: false`` outputs (paths relative to the root)."""
    from dvc.exceptions import OutputNotFoundError
    from dvc.repo import Repo

    root = params.root
    inputs: set[str] = set()
    uncached: dict[str, list[str]] = {}
    zips = [(str((root / z).resolve()), z) for z in _fold_table_zips(params)]
    with Repo(str(root)) as repo:
        for name in stages:
            (stage,) = repo.stage.collect(name)
            paths = [(dep.fs_path, dep.def_path) for dep in stage.deps] + zips
            run = params.runs.get(name.split("@", 1)[1])
            pretrained = params.variant(run.variant).pretrained if run else "none"
            if pretrained not in ("none", "timm"):
                paths.append((str((root / pretrained).resolve()), pretrained))
            for fs_path, def_path in paths:
                try:  # a file inside a tracked folder counts (DVC pulls it alone)
                    repo.find_outs_by_path(fs_path, strict=False)
                except OutputNotFoundError:
                    continue
                inputs.add(str(def_path))
            uncached[name] = [str(o.def_path) for o in stage.outs if not o.use_cache]
    return sorted(inputs), uncached


def plan(
    params: Params, stages: list[str], dvc: list[str], repo: str | None, remote: str | None
) -> dict[str, Any]:
    """What every clone task needs (see the module docstring); pushes the inputs."""
    from speedstructure.tracking import store

    root = params.root
    commit = check_committed(root)
    if not remote and not _dvc_ok(dvc, root, "remote", "default").strip():
        raise UserError(
            "--storage clone needs a DVC remote that this machine and the nodes reach: "
            "`dvc remote add -d NAME URL` (committed in .dvc/config), or --remote NAME"
        )
    inputs, uncached = stage_io(params, stages)
    if inputs:
        log.info("pushing the stages' inputs to the DVC remote: %s", ", ".join(inputs))
        _dvc_ok(dvc, root, "push", *(["-r", remote] if remote else []), *inputs)
    store.setup(params)  # the experiment exists, with this checkout's artifact root
    uri = store.settings(params)["tracking_uri"]
    if uri.startswith("sqlite:"):
        log.warning(
            "MLflow tracks to a file (%s): tasks on other machines cannot reach it; run "
            "`mlflow server` and set MLFLOW_TRACKING_URI=http://HOST:PORT",
            uri,
        )
    lock = root / "dvc.lock"
    return {
        "repo": repo or str(root),
        "commit": commit,
        "lock": lock.read_text() if lock.is_file() else "",
        "inputs": inputs,
        "uncached": uncached,
        "remote": remote,
        "env": {"MLFLOW_TRACKING_URI": uri},
    }


def record_lock_entry(root: Path, stage: str, entry: dict[str, Any]) -> None:
    """``entry`` as the ``dvc.lock`` entry of ``stage``, written as DVC writes the file."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(str(root / "dvc.lock")) as data:
        if not data:
            data["schema"] = "2.0"
        data.setdefault("stages", {})[stage] = entry


def bring_back(
    root: Path, result: dict[str, Any], log_dir: Path, dvc: list[str], remote: str | None
) -> dict[str, Any]:
    """A clone task's ``result`` into this checkout (see the module docstring); the result with
    ``log`` (its path here) and, when the outputs could not be brought back, ``error``."""
    stage = result["stage"]
    log_path = log_dir / f"{stage}.log"
    atomic_write_text(log_path, result.pop("log_text", ""))
    result["log"] = str(log_path)
    entry, files = result.pop("lock", None), result.pop("files", {})
    if result.get("returncode") != 0 or entry is None:
        return result
    record_lock_entry(root, stage, entry)
    for rel, data in files.items():
        atomic_write_bytes(root / rel, data)
    cmd = [*dvc, "pull", "--force", *(["-r", remote] if remote else []), stage]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    with open(log_path, "a") as fh:
        fh.write(f"== driver: dvc {' '.join(cmd[len(dvc) :])}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        result.update(returncode=proc.returncode, error="dvc pull of its outputs failed")
    return result
