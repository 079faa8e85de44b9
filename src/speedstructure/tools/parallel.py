"""``speedstructure train-parallel --gpus 0,1,2,3``: the training stages at once, one GPU each.

``dvc repro`` runs the ``train@<run>`` stages one after another.  On a machine with several
GPUs this command runs them concurrently, each on its own GPU, and leaves the project as
``dvc repro`` would (outputs in the DVC cache, ``dvc.lock`` updated):

1. ``dvc repro folds``: what every training stage needs (``ingest``, ``folds``), once;
2. the training stages to run: those named, or every ``train@...`` stage that
   ``dvc status`` reports as changed (the ones ``dvc repro`` would run);
3. one worker per entry of ``--gpus`` runs ``dvc --wait-for-lock repro --single-item
   train@<run>`` with ``CUDA_VISIBLE_DEVICES`` set to its GPU and takes the next stage
   whenever one finishes.  DVC holds its repository lock only while it collects a stage
   and while it commits the outputs, not while the stage's command runs, so the
   commands overlap; each stage's command output goes to
   ``<paths.parallel_logs>/<stage>.log``.

A GPU may be listed twice (``--gpus 0,0,1,1``: two stages per GPU).  Afterwards
``dvc repro`` finds the training stages up to date and runs ``tune``, ``register``,
``predict`` and ``evaluate``.  A failed stage does not stop the others; the command
then exits 1 and names the logs.  ``make train-parallel GPUS="0 1 2 3"`` runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.errors import UserError

log = logging.getLogger(__name__)
TRAIN_PREFIX = "train@"


def dvc_command() -> list[str]:
    """DVC of this environment (the one the package is installed in)."""
    return [sys.executable, "-m", "dvc"]


def parse_gpus(spec: str | list[str]) -> list[str]:
    """``"0,1"``, ``"0 1"`` or ``["0", "1"]`` -> ``["0", "1"]`` (repeats allowed)."""
    items = spec if isinstance(spec, list) else [spec]
    gpus = [g for item in items for g in str(item).replace(",", " ").split()]
    if not gpus:
        raise UserError("--gpus: name at least one GPU (e.g. --gpus 0,1)")
    return gpus


def _env(gpu: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def pending_training_stages(root: Path) -> list[str]:
    """The ``train@...`` stages ``dvc repro`` would run now (changed deps, params or outs)."""
    proc = subprocess.run(
        [*dvc_command(), "status", "--json"], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise UserError(f"dvc status failed: {' '.join(proc.stderr.split())[:300]}")
    changed = json.loads(proc.stdout or "{}")
    return sorted(s for s in changed if s.startswith(TRAIN_PREFIX))


def prepare(root: Path) -> None:
    """``dvc repro folds``: the sample store and the fold table every training stage reads."""
    proc = subprocess.run([*dvc_command(), "repro", "folds"], cwd=root, env=_env(""))
    if proc.returncode != 0:
        raise UserError("dvc repro folds failed: the training stages need its outputs")


def _start(stage: str, gpu: str, root: Path, log_dir: Path) -> dict[str, Any]:
    log_path = log_dir / f"{stage}.log"
    fh = open(log_path, "w")  # noqa: SIM115 - closed when the process ends
    cmd = [*dvc_command(), "--wait-for-lock", "repro", "--single-item", stage]
    proc = subprocess.Popen(cmd, cwd=root, env=_env(gpu), stdout=fh, stderr=subprocess.STDOUT)
    log.info("%s: started on GPU %s (log %s)", stage, gpu, log_path)
    return {"stage": stage, "gpu": gpu, "proc": proc, "fh": fh, "log": log_path, "t0": time.time()}


def _finished(job: dict[str, Any]) -> dict[str, Any]:
    job["fh"].close()
    rc = job["proc"].returncode
    secs = round(time.time() - job["t0"], 1)
    log.info(
        "%s: %s on GPU %s after %.1f s",
        job["stage"],
        "done" if rc == 0 else "FAILED",
        job["gpu"],
        secs,
    )
    return {"gpu": job["gpu"], "returncode": rc, "seconds": secs, "log": str(job["log"])}


def run_parallel(
    stages: list[str], gpus: list[str], root: Path, log_dir: Path, poll: float = 0.5
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` with one worker per entry of ``gpus``; ``{stage: result}``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(stages), {}, {}
    free = list(range(len(gpus)))
    try:
        while pending or running:
            while free and pending:
                slot = free.pop(0)
                running[slot] = _start(pending.pop(0), gpus[slot], root, log_dir)
            time.sleep(poll)
            for slot, job in list(running.items()):
                if job["proc"].poll() is not None:
                    results[job["stage"]] = _finished(running.pop(slot))
                    free.append(slot)
    except BaseException:  # Ctrl-C or SIGTERM: stop the stages this command started
        for job in running.values():
            job["proc"].terminate()
        for job in running.values():
            job["proc"].wait()
            job["fh"].close()
        raise
    return results


def train_parallel(
    params: Params, gpus: list[str], stages: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Steps 1-3 of the module docstring; the result of each stage run."""
    root = params.root
    unknown = [s for s in stages or [] if not s.startswith(TRAIN_PREFIX)]
    if unknown:
        raise UserError(f"not training stages: {', '.join(unknown)} (expected train@<run>)")
    prepare(root)
    todo = list(stages) if stages else pending_training_stages(root)
    if not todo:
        log.info("every training stage is up to date")
        return {}
    log.info("%d training stage(s) on GPU(s) %s", len(todo), ", ".join(gpus))
    return run_parallel(todo, gpus, root, params.path("parallel_logs"))


# --------------------------------------------------------------------------- CLI


DESCRIPTION = (
    "Run the pending training stages of dvc.yaml concurrently, one per GPU of --gpus "
    "(CUDA_VISIBLE_DEVICES), each through `dvc repro` so dvc.lock and the cache are updated."
)


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser(
        "train-parallel", help=cli.COMMANDS["train-parallel"][1], description=DESCRIPTION
    )
    p.add_argument("--gpus", required=True, nargs="+", help="GPU ids: 0,1,2,3 or 0 1 2 3")
    p.add_argument("stages", nargs="*", metavar="STAGE", help="train@<run> (default: pending)")
    cli.add_json_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from speedstructure import cli

    params = load_params()
    results = train_parallel(params, parse_gpus(args.gpus), args.stages)
    failed = {s: r for s, r in results.items() if r["returncode"] != 0}
    for stage, r in sorted(results.items()):
        state = "ok" if r["returncode"] == 0 else f"FAILED (see {r['log']})"
        print(f"{stage}: GPU {r['gpu']}, {r['seconds']:.1f} s, {state}")
    cli.write_json_output(args.json, results)
    if failed:
        print(f"{len(failed)} training stage(s) failed", file=sys.stderr)
        return 1
    print("training stages done; `dvc repro` runs the rest of the pipeline")
    return 0
