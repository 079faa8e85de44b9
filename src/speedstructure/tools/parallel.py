"""``speedstructure train-parallel``: the training stages at once, one Ray task (one GPU) each.

``dvc repro`` runs the ``train@<run>`` stages one after another.  This command runs them as
Ray tasks, on this machine's GPUs or on a Ray cluster, and leaves the project as ``dvc repro``
would (outputs in the DVC cache, ``dvc.lock`` updated):

1. ``dvc repro folds``: what every training stage needs (``ingest``, ``folds``), once;
2. the training stages to run: those named, or every ``train@...`` stage that
   ``dvc status`` reports as changed (the ones ``dvc repro`` would run);
3. one Ray task per stage, asking for one GPU (``--cpus-per-task`` CPUs each where the
   cluster has no GPU): the task (:mod:`speedstructure.tools.cluster_task`) sets
   ``CUDA_VISIBLE_DEVICES`` from ``ray.get_gpu_ids()`` and runs
   ``dvc --wait-for-lock repro --single-item train@<run>``, its output in
   ``<paths.parallel_logs>/<stage>.log``.  Ray queues the stages until a GPU is free, and
   retries a task whose worker or node dies (``--max-retries``): the stage resumes from its
   ``last.pt``.

Where: without ``--address``, a local Ray instance on this machine's GPUs (``--gpus 0,1``
picks them; a GPU listed twice takes two stages at once: ``--gpus 0,0,1,1``); with
``--address HEAD:6379`` (or ``auto``), the Ray cluster there.  Storage (``--storage``):
``shared``, the default, runs the tasks in this checkout, which every node mounts at the same
path; ``clone`` runs each in a fresh clone of this commit that pulls its inputs from the DVC
remote and pushes its outputs, which this checkout then records and pulls
(:mod:`speedstructure.tools.cluster_clone`).

Afterwards ``dvc repro`` finds the training stages up to date and runs ``tune``, ``register``,
``predict`` and ``evaluate``.  A failed stage does not stop the others; the command then exits
1 and names the logs.  ``make train-parallel GPUS="0 1"`` and
``make train-cluster ADDRESS=head:6379`` run it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.errors import UserError

log = logging.getLogger(__name__)
TRAIN_PREFIX = "train@"
STORAGES = ("shared", "clone")


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """Where and how the tasks run (the command's options)."""

    address: str | None = None  # a Ray cluster; None: a local instance on this machine
    storage: str = "shared"  # shared | clone
    cpus_per_task: float = 1.0
    max_retries: int = 3
    repo: str | None = None  # clone: the git URL or path the nodes clone (default: this checkout)
    remote: str | None = None  # clone: the DVC remote (default: the project's default remote)
    workdir: str | None = None  # clone: where on a node the clones go (default: its temp dir)
    cache_dir: str | None = None  # clone: a DVC cache on each node that its clones share


def dvc_command() -> list[str]:
    """DVC of this environment (the one the package is installed in)."""
    return [sys.executable, "-m", "dvc"]


def _dvc_for_tasks() -> list[str] | None:
    """The DVC the tasks run: None (each task's own environment's), unless replaced here."""
    cmd = dvc_command()
    return None if cmd == [sys.executable, "-m", "dvc"] else cmd


def parse_gpus(spec: str | list[str]) -> list[str]:
    """``"0,1"``, ``"0 1"`` or ``["0", "1"]`` -> ``["0", "1"]`` (repeats allowed)."""
    items = spec if isinstance(spec, list) else [spec]
    gpus = [g for item in items for g in str(item).replace(",", " ").split()]
    if not gpus:
        raise UserError("--gpus: name at least one GPU (e.g. --gpus 0,1)")
    return gpus


def gpu_share(gpus: list[str]) -> tuple[list[str], float]:
    """The distinct GPUs of ``gpus`` and the GPU fraction each task asks for: ``0,0,1,1`` ->
    ``(["0", "1"], 0.5)``, two stages per GPU."""
    counts = Counter(gpus)
    if len(set(counts.values())) != 1:
        raise UserError(f"--gpus {','.join(gpus)}: list every GPU the same number of times")
    return list(counts), 1.0 / next(iter(counts.values()))


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


# --------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_session(
    address: str | None, gpus: list[str] | None, slots_cpus: float = 1.0
) -> Iterator[Any]:
    """Ray connected to the cluster at ``address``, or to a new local instance on ``gpus``
    (``None``: the GPUs Ray finds) with process-group cleanup on; disconnected (the local
    instance stopped) afterwards."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        kw: dict[str, Any] = {}
        if gpus is not None:
            distinct, _ = gpu_share(gpus)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(distinct)  # Ray's GPU ids: these
            kw = {
                "num_gpus": len(distinct),
                "num_cpus": max(os.cpu_count() or 1, math.ceil(len(gpus) * slots_cpus)),
            }
        try:
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                _system_config={"process_group_cleanup_enabled": True},
                **kw,
            )
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
    try:
        yield ray
    finally:
        ray.shutdown()


def task_resources(ray: Any, gpus: list[str] | None, cpus_per_task: float) -> dict[str, float]:
    """One GPU per task (its share with ``--gpus`` repeats), or only CPUs on a cluster
    without GPUs."""
    n_gpus = float(ray.cluster_resources().get("GPU", 0))
    if n_gpus <= 0:
        log.info("no GPU in the Ray cluster: each stage on %g CPU(s)", cpus_per_task)
        return {"num_gpus": 0, "num_cpus": cpus_per_task}
    share = gpu_share(gpus)[1] if gpus else 1.0
    return {"num_gpus": share, "num_cpus": cpus_per_task}


def _failure(stage: str, exc: BaseException) -> dict[str, Any]:
    said = " ".join(str(exc).split())
    return {"stage": stage, "returncode": -1, "gpu": "", "node": "", "seconds": 0.0, "error": said}


def run_on_ray(
    ray: Any,
    specs: dict[str, dict[str, Any]],
    resources: dict[str, float],
    max_retries: int,
    on_result: Any = None,
) -> dict[str, dict[str, Any]]:
    """Submit one task per spec and collect ``{stage: result}`` as they finish (``on_result``
    turns a result into its final form); a task that fails for good is a failed stage."""
    from speedstructure.tools.cluster_task import run_stage

    remote = ray.remote(run_stage)
    refs = {
        remote.options(**resources, max_retries=max_retries, name=stage).remote(spec): stage
        for stage, spec in specs.items()
    }
    results: dict[str, dict[str, Any]] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                stage = refs[ref]
                try:
                    res = {"stage": stage, **ray.get(ref)}
                except Exception as exc:  # RayError: the task failed after its retries
                    res = _failure(stage, exc)
                if on_result is not None:
                    res = on_result(res)
                results[stage] = _report(res)
    except BaseException:  # Ctrl-C or SIGTERM: stop the stages still running
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results


def _report(res: dict[str, Any]) -> dict[str, Any]:
    ok = res["returncode"] == 0
    log.info(
        "%s: %s on %s GPU %s after %.1f s",
        res["stage"],
        "done" if ok else "FAILED",
        res.get("node") or "?",
        res.get("gpu") or "none",
        res.get("seconds", 0.0),
    )
    return {k: v for k, v in res.items() if k != "stage"}


def train_parallel(
    params: Params,
    gpus: list[str] | None = None,
    stages: list[str] | None = None,
    options: ClusterOptions | None = None,
) -> dict[str, dict[str, Any]]:
    """Steps 1-3 of the module docstring; the result of each stage run."""
    opts = options or ClusterOptions()
    root = params.root
    unknown = [s for s in stages or [] if not s.startswith(TRAIN_PREFIX)]
    if unknown:
        raise UserError(f"not training stages: {', '.join(unknown)} (expected train@<run>)")
    if opts.storage not in STORAGES:
        raise UserError(f"--storage {opts.storage}: expected one of {', '.join(STORAGES)}")
    if opts.address and gpus:
        raise UserError("--gpus picks this machine's GPUs for a local Ray instance, not --address")
    if gpus:
        gpu_share(gpus)  # the spelling is checked before anything runs
    prepare(root)
    todo = list(stages) if stages else pending_training_stages(root)
    if not todo:
        log.info("every training stage is up to date")
        return {}
    log_dir = params.path("parallel_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    specs, on_result = _specs(params, todo, opts, log_dir)
    where = opts.address or f"this machine (GPUs {', '.join(gpus) if gpus else 'found by Ray'})"
    log.info("%d training stage(s) on Ray: %s, %s storage", len(todo), where, opts.storage)
    with ray_session(opts.address, gpus, opts.cpus_per_task) as ray:
        resources = task_resources(ray, gpus, opts.cpus_per_task)
        return run_on_ray(ray, specs, resources, opts.max_retries, on_result)


def _driver_tracking(params: Params) -> dict[str, str]:
    """The driver's MLflow store for every task: the experiment is created once, here, and the
    tasks log where the driver would, whatever the Ray workers' own environment says."""
    from speedstructure.tracking import store

    store.setup(params)
    return {"MLFLOW_TRACKING_URI": store.settings(params)["tracking_uri"]}


def _specs(
    params: Params, todo: list[str], opts: ClusterOptions, log_dir: Path
) -> tuple[dict[str, dict[str, Any]], Any]:
    """Each stage's task spec, and what turns a task's result into the stage's result."""
    root, dvc = params.root, _dvc_for_tasks()
    common: dict[str, Any] = {"storage": opts.storage, "dvc": dvc, "log_dir": str(log_dir)}
    if opts.storage == "shared":
        for stage in todo:
            (log_dir / f"{stage}.log").write_text("")  # this run's log (retries add to it)

        def named_log(res: dict[str, Any]) -> dict[str, Any]:
            return {**res, "log": res.get("log") or str(log_dir / f"{res['stage']}.log")}

        env = {"env": _driver_tracking(params)}
        return {s: {**common, **env, "stage": s, "root": str(root)} for s in todo}, named_log
    from speedstructure.tools import cluster_clone

    plan = cluster_clone.plan(params, todo, dvc_command(), opts.repo, opts.remote)
    uncached = plan.pop("uncached")
    common.update(plan, workdir=opts.workdir, cache_dir=opts.cache_dir)
    specs = {s: {**common, "stage": s, "uncached": uncached[s]} for s in todo}

    def on_result(res: dict[str, Any]) -> dict[str, Any]:
        return cluster_clone.bring_back(root, res, log_dir, dvc_command(), opts.remote)

    return specs, on_result


# --------------------------------------------------------------------------- CLI


DESCRIPTION = (
    "Run the pending training stages of dvc.yaml as Ray tasks, one GPU each, on this "
    "machine's GPUs (--gpus) or on a Ray cluster (--address); each through `dvc repro` so "
    "dvc.lock and the cache are updated."
)


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser(
        "train-parallel", help=cli.COMMANDS["train-parallel"][1], description=DESCRIPTION
    )
    p.add_argument("--address", default=None, help="Ray cluster HEAD:6379 or auto (default: local)")
    p.add_argument("--gpus", nargs="+", help="local GPU ids: 0,1,2,3 or 0 1 2 3 (default: all)")
    p.add_argument(
        "--storage", choices=STORAGES, default="shared", help="shared checkout, or clone per task"
    )
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per stage (default 1)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a task that dies")
    p.add_argument("--repo", default=None, help="clone: git URL or path the nodes clone")
    p.add_argument("--remote", default=None, help="clone: DVC remote (default: the default one)")
    p.add_argument("--workdir", default=None, help="clone: folder for the clones on each node")
    p.add_argument("--cache-dir", default=None, help="clone: DVC cache shared by a node's clones")
    p.add_argument("stages", nargs="*", metavar="STAGE", help="train@<run> (default: pending)")
    cli.add_json_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from speedstructure import cli

    params = load_params()
    opts = ClusterOptions(
        address=getattr(args, "address", None),
        storage=getattr(args, "storage", "shared"),
        cpus_per_task=getattr(args, "cpus_per_task", 1.0),
        max_retries=getattr(args, "max_retries", 3),
        repo=getattr(args, "repo", None),
        remote=getattr(args, "remote", None),
        workdir=getattr(args, "workdir", None),
        cache_dir=getattr(args, "cache_dir", None),
    )
    gpus = parse_gpus(args.gpus) if args.gpus else None
    results = train_parallel(params, gpus, args.stages, opts)
    failed = {s: r for s, r in results.items() if r["returncode"] != 0}
    for stage, r in sorted(results.items()):
        state = "ok" if r["returncode"] == 0 else f"FAILED (see {r.get('log') or r.get('error')})"
        where = f" on {r['node']}" if r.get("node") else ""
        print(f"{stage}: GPU {r.get('gpu') or 'none'}{where}, {r['seconds']:.1f} s, {state}")
    cli.write_json_output(args.json, results)
    if failed:
        print(f"{len(failed)} training stage(s) failed", file=sys.stderr)
        return 1
    print("training stages done; `dvc repro` runs the rest of the pipeline")
    return 0
