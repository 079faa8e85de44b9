"""README "On a cluster", followed step by step on this machine, against a real tracking server:
``make server`` (MLflow on a PostgreSQL it starts), a Ray cluster started with the README's
``ray start`` commands (a head and two worker nodes, one logical GPU each, numbered 0 and 1),
the two training stages of a tiny project through ``make train-cluster`` in shared storage (one
task killed mid-training: Ray retries it and it resumes), then, the project carried on with a
stage's params changed, that stage in clone storage, ``dvc repro``; then the server and every
node stopped by their process ids.

The commands come from the README's code block, so the test breaks when the README changes:
each step takes its command by its exact text there (``HEAD:6379`` becomes the head's
address), and the last check is that every command of the block but ``torchrun`` (one model
across nodes: tests/engine/test_multinode.py) was run, in the README's order.  What the test
adds to a README command is only what three nodes and a server on one shared machine need:

* ``make train-cluster ... STORAGE=clone CACHE_DIR=DIR``: a DVC cache for the node's clones;
* ``make server SERVER_PORT=P`` (a free port), in a folder holding what it reads of this
  checkout (Makefile, pyproject.toml, .dvc/config, the environment), which the ``postgres``
  account can reach (the tests run as root; pytest's folders are closed to it);
* ``ray start``: ``--temp-dir`` (a folder of the test's), free ports for the dashboard and the
  nodes' agents, a small object store and ``--block`` (each node stays a child process of the
  test, stopped by its pid); the workers ``--num-gpus 1`` (this machine has no GPU: one logical
  GPU each, its id from ``CUDA_VISIBLE_DEVICES``), a ``TMPDIR`` of the test's (where clone
  mode's clones go) and another MLflow store in their environment, which no task may use;
* ``RAY_AUTH_TOKEN``: a token of the test's own, so ``ray get-auth-token --generate`` neither
  reads nor writes this machine's ``~/.ray/auth_token``.

The ingest and folds stages run once (logged to the server) before the shared-mode copy is
made: the driver's first step, done while the workers start, for time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster_support import (
    RayNodes,
    Readme,
    Server,
    at,
    exported,
    process_of,
    ray_worker_of,
)
from server_support import (
    listening,
    pg_reachable_folder,
    pid_alive,
    postgres_usable,
    postmaster_pid,
    wait_for_exports,
)
from speedstructure.tools.server import free_port
from support import COUNTS, ROOT, random_gathers, random_velocity, sample_id
from tiny_project import (
    BIN,
    check_make_keeps_env,
    dvc,
    make_tiny_project,
    project_env,
    run,
    tiny_params,
)

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

STAGES = ["train@tiny_a-f0", "train@tiny_b-f0"]
KILLED, EPOCHS = STAGES[0], 3  # shared mode: tiny_a trains 3 epochs and is killed after one
EXPERIMENT = "speedstructure"
NOT_FOLLOWED_HERE = "torchrun"  # tests/engine/test_multinode.py


def _write_random_zips(folder: Path) -> None:
    """The four challenge zips with random arrays (no simulation: training only needs shapes)."""
    from speedstructure.config.schema import SPLITS
    from speedstructure.data.samples import ZipWriter

    counts = {**COUNTS, "train": 8, "test": 3}
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with ZipWriter(folder / f"{split}.zip") as zw:
            for i in range(counts[split]):
                target = None if split == "test" else random_velocity(rng)
                zw.add(sample_id(split, i), random_gathers(rng), target)


def _params() -> dict:
    """Two tiny variants on fold 0 (one training stage per worker node)."""
    params = tiny_params()
    params["variants"].pop("baseline_depth_trend")
    runs = {f"{v}-f0": {"variant": v, "fold": 0} for v in ("tiny_a", "tiny_b")}
    params["runs"] = runs
    params["profiles"]["default"]["runs"] = runs
    params["evaluate"]["baseline"] = "tiny_a"  # evaluate's reference runs
    return params


# --------------------------------------------------------------------------- the stack


@dataclasses.dataclass
class Stack:
    """What the README's first steps leave running, and the project the drivers copy."""

    readme: Readme
    server: Server
    nodes: RayNodes
    address: str  # the head's
    env: dict[str, str]  # the README's Ray exports (every node and the driver)
    nodes_tmp: Path  # the worker nodes' TMPDIR
    elsewhere: Path  # the MLflow store in the worker nodes' environment
    project: Path


def _start_server(readme: Readme, checkout: Path, log_file: Path) -> Server:
    """README: ``make server`` (no wait), in a checkout of what it reads: this checkout's
    Makefile, pyproject.toml (its mtime kept: make finds the environment installed),
    .dvc/config (where ``make setup`` writes the plots page) and the environment."""
    (checkout / ".dvc").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", ".gitignore", ".dvc/config"):
        shutil.copy2(ROOT / name, checkout / name)
    (checkout / ".venv").symlink_to(BIN.parent)
    check_make_keeps_env(checkout)
    port = free_port()
    cmd = [*readme.step("make server"), f"SERVER_PORT={port}"]
    with open(log_file, "w") as out:
        make = subprocess.Popen(
            cmd, cwd=checkout, env=project_env(), stdout=out, stderr=subprocess.STDOUT
        )
    return Server(make=make, log=log_file, checkout=checkout, port=port)


def _ray_node_options(nodes: RayNodes) -> list[str]:
    """What every node on this machine adds to the README's command (the module docstring)."""
    return ["--temp-dir", str(nodes.temp_dir), "--object-store-memory", str(150 << 20),
            "--dashboard-agent-listen-port", str(free_port()), "--block"]  # fmt: skip


def _start_head(readme: Readme, nodes: RayNodes, logs: Path) -> tuple[dict[str, str], str]:
    """README: the exports of every node, the token, the head node (started); the exports
    and the head's address."""
    exports = {
        **exported(readme.step("export RAY_AUTH_MODE=token RAY_process_group_cleanup_enabled=1")),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # the test's own (see the module docstring)
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    said = run(readme.step("ray get-auth-token --generate"), logs, **exports).stdout
    assert said.strip() == exports["RAY_AUTH_TOKEN"]
    address = f"127.0.0.1:{free_port()}"
    head = at(readme.step("ray start --head --port 6379 --num-gpus 0 --num-cpus 0"), address)
    head += ["--include-dashboard", "false", "--dashboard-port", str(free_port())]
    nodes.start([*head, *_ray_node_options(nodes)], {**project_env(), **exports}, logs / "head")
    return exports, address


def _start_workers(readme: Readme, nodes: RayNodes, address: str, env: dict, logs: Path) -> None:
    """README: a worker node per logical GPU, one after the other (nodes starting at once on
    one machine may pick the same socket names in the session folder: the later one's raylet
    then fails to bind its object store's socket)."""
    worker = at(readme.step("ray start --address HEAD:6379"), address) + ["--num-gpus", "1"]
    for gpu in ("0", "1"):  # a node's GPU ids: its CUDA_VISIBLE_DEVICES at start
        node_env = {**project_env(), **env, "CUDA_VISIBLE_DEVICES": gpu}
        nodes.start([*worker, *_ray_node_options(nodes)], node_env, logs / f"worker{gpu}")
        nodes.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The README's steps up to the driver's: the server, the exports, the nodes; the project
    with ingest and folds run.  The server, the head and the project are made at the same
    time (the README's first step runs in a terminal of its own), and the folds run while
    the workers start."""
    reason = postgres_usable()
    if reason:
        pytest.skip(reason)
    readme, tmp = Readme(), tmp_path_factory.mktemp("cluster")
    nodes_tmp, elsewhere = tmp / "nodes-tmp", tmp / "elsewhere" / "mlflow.db"
    nodes_tmp.mkdir()
    with contextlib.ExitStack() as cleanup:
        t0 = time.time()
        folder = cleanup.enter_context(pg_reachable_folder("ss-srv-"))
        server = _start_server(readme, folder / "checkout", tmp / "make-server.log")
        cleanup.callback(server.stop)
        nodes = RayNodes(Path(tempfile.mkdtemp(prefix="ss-ray-")))  # short: Ray's socket paths
        cleanup.callback(shutil.rmtree, nodes.temp_dir, ignore_errors=True)
        cleanup.callback(_stop_or_kill, nodes)
        env, address = _start_head(readme, nodes, tmp)
        base = make_tiny_project(tmp / "base", _params(), _write_random_zips)  # meanwhile
        server.exports = wait_for_exports(server.make, server.log, timeout=150)
        server.postmaster = postmaster_pid(server.pgdata)
        nodes.wait()
        t1 = time.time()
        with open(tmp / "folds.log", "w") as out:  # while the workers start
            folds = subprocess.Popen(
                [str(BIN / "dvc"), "repro", "folds"], cwd=base, stdout=out,
                stderr=subprocess.STDOUT, env={**project_env(), "MLFLOW_TRACKING_URI": server.url},
            )  # fmt: skip
        cleanup.callback(folds.kill)
        elsewhere_env = {"TMPDIR": str(nodes_tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere}"}
        _start_workers(readme, nodes, address, {**env, **elsewhere_env}, tmp)
        t2 = time.time()
        assert folds.wait(timeout=300) == 0, (tmp / "folds.log").read_text()
        run(["git", "add", "-A"], base)
        run(["git", "commit", "-qm", "ingest and folds"], base)
        log.info("setup: project, server and head %.1f s, workers %.1f s, then folds %.1f s",
                 t1 - t0, t2 - t1, time.time() - t2)  # fmt: skip
        yield Stack(readme, server, nodes, address, env, nodes_tmp, elsewhere, base)


def _stop_or_kill(nodes: RayNodes) -> None:
    for pid in nodes.stop():  # only after a failure: the last test checks that none is left
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- checks


def _client(srv: Server):
    import mlflow

    return mlflow.MlflowClient(srv.url, registry_uri=srv.url)


def _runs(srv: Server, stage: str, since_ms: int) -> list:
    """The runs of ``stage`` on the server that started after ``since_ms``."""
    client = _client(srv)
    exp = client.get_experiment_by_name(EXPERIMENT)
    flt = f"tags.dvc_stage = '{stage}' and attributes.start_time >= {since_ms}"
    return client.search_runs([exp.experiment_id], flt)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


def _ran(out: str) -> set[str]:
    return {ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage")}


def _check_trained(
    proj: Path, out: str, srv: Server, since: int, attempts: dict[str, int]
) -> tuple[dict, dict]:
    """The stages of ``attempts`` done and recorded (no training stage left), each with
    ``attempts[stage]`` attempts and one FINISHED run on the server tagged with its last
    attempt's GPU, and no local MLflow store; the runs and the first attempts' GPUs by stage."""
    for stage in attempts:
        assert f"{stage}: GPU" in out, out
    status = json.loads(dvc("status", "--json", cwd=proj).stdout)
    assert not [s for s in status if s.startswith("train@")], status  # recorded in dvc.lock
    assert "tune" in status, status  # what `dvc repro` runs next
    assert set(STAGES) <= set(yaml.safe_load((proj / "dvc.lock").read_text())["stages"])
    runs, first = {}, {}
    for stage in attempts:
        (runs[stage],) = _runs(srv, stage, since)  # on the server, in its one experiment
        assert runs[stage].info.status == "FINISHED", runs[stage].info
        text = (proj / "logs/train-parallel" / f"{stage}.log").read_text()
        pattern = rf"^== {re.escape(stage)}: attempt on .*CUDA_VISIBLE_DEVICES='(\d)'"
        gpus = re.findall(pattern, text, flags=re.M)
        assert len(gpus) == attempts[stage], text
        assert runs[stage].data.tags["cuda_visible_devices"] == gpus[-1]
        first[stage] = gpus[0]
    assert not (proj / "mlruns").exists()  # nothing in a local store
    return runs, first


def _shared_mode_with_a_task_killed(proj: Path, cmd: list[str], env: dict, srv: Server) -> None:
    """``cmd`` (make train-cluster) in the shared checkout ``proj``; the Ray worker of the
    killed stage SIGKILLed after its first saved epoch (as on a lost node)."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["variants"]["tiny_a"]["train"] = {"epochs": EPOCHS}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out_dir, since = proj / "models/tiny_a/fold_0", _now_ms()
    driver = subprocess.Popen(
        cmd, cwd=proj, env={**project_env(), **env}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        trainer = process_of(["speedstructure", "train", "tiny_a"], proj)
        while not (out_dir / "history.csv").is_file():  # an epoch is saved in last.pt
            assert driver.poll() is None, driver.stdout.read().decode()
            time.sleep(0.1)
        os.kill(ray_worker_of(trainer), signal.SIGKILL)
        saved = len((out_dir / "history.csv").read_text().splitlines()) - 1
        out = driver.communicate(timeout=400)[0].decode()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out
    assert not pid_alive(trainer)  # killed with its task (process group)
    runs, first = _check_trained(proj, out, srv, since, {KILLED: 2, STAGES[1]: 1})  # a retry
    assert sorted(first.values()) == ["0", "1"], first  # each task its own GPU, and only it
    text = (proj / "logs/train-parallel" / f"{KILLED}.log").read_text()
    assert "resuming after epoch" in text, text
    r = runs[KILLED]  # one MLflow run, continued
    assert r.data.tags.get("resumes") == "1", r.data.tags
    history = _client(srv).get_metric_history(r.info.run_id, "val_mape")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), history  # each once
    assert json.loads((out_dir / "metrics.json").read_text())["epochs"] == EPOCHS
    log.info("shared mode: %s killed after %d saved epoch(s)", KILLED, saved)


def _check_one_experiment_and_the_model(srv: Server, proj: Path, since: int) -> None:
    """Every run on the server in one experiment (the two modes' trainings among them); the
    model that ``register`` wrote down is a version in the server's registry, its files in
    the server's artifact store."""
    client = _client(srv)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert {r.info.experiment_id for r in runs} == {exp.experiment_id}, experiments
    recent = [r for r in runs if r.info.start_time >= since]
    per_stage = {s: sum(r.data.tags.get("dvc_stage") == s for r in recent) for s in STAGES}
    assert per_stage == {KILLED: 2, STAGES[1]: 1}, per_stage  # shared mode; clone mode
    assert {"tune", "register", "evaluate"} <= {r.data.tags.get("dvc_stage") for r in recent}
    paths = yaml.safe_load((proj / "params.yaml").read_text())["paths"]
    registered = json.loads((proj / paths["registered"]).read_text())
    mv = client.get_model_version(registered["name"], str(registered["version"]))
    assert mv.run_id == registered["run_id"]
    assert client.get_run(mv.run_id).info.experiment_id == exp.experiment_id
    assert client.get_model_version_by_alias(registered["name"], "champion").version == mv.version
    assert list((srv.checkout / "mlruns/server-artifacts").rglob("MLmodel"))


# --------------------------------------------------------------------------- the tests


def test_the_readme_section_followed_step_by_step_on_a_tracking_server(stack, tmp_path):
    readme, server, timings = stack.readme, stack.server, {}
    driver = "export MLFLOW_TRACKING_URI=... SPEEDSTRUCTURE_OPTUNA_STORAGE=..."
    names = exported(readme.step(driver))
    assert sorted(names) == sorted(server.exports), server.exports  # what the server printed
    env, since = {**stack.env, **server.exports}, _now_ms()

    # (a) a shared file system: the tasks run in this checkout; one is killed and retried
    shared, t0 = _copy(stack.project, tmp_path / "shared"), time.time()
    cmd = at(readme.step("make train-cluster ADDRESS=HEAD:6379"), stack.address)
    _shared_mode_with_a_task_killed(shared, cmd, env, server)
    timings["shared"] = time.time() - t0

    # (b) nothing shared but git and a DVC remote: each task in a fresh clone on its node.
    # The same project carried on: params.yaml as committed (tiny_a's extra epochs dropped),
    # so tiny_a's stage is the one pending
    proj = _copy(shared, tmp_path / "clone")
    run(["git", "checkout", "--", "params.yaml"], proj)
    dvc("remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"), cwd=proj)
    run(["git", "commit", "-qam", "the DVC remote; the training stages so far"], proj)
    head, t0, t_ms = run(["git", "rev-parse", "HEAD"], proj).stdout, time.time(), _now_ms()
    cmd = at(readme.step("make train-cluster ADDRESS=HEAD:6379 STORAGE=clone"), stack.address)
    node_cache = tmp_path / "node-cache"  # one DVC cache per node, shared by its clones
    out = run([*cmd, f"CACHE_DIR={node_cache}"], proj, timeout=400, **env).stdout
    assert f"{STAGES[1]}: GPU" not in out, out  # up to date since (a)
    _check_trained(proj, out, server, t_ms, {KILLED: 1})
    timings["clone"] = time.time() - t0
    text = (proj / "logs/train-parallel" / f"{KILLED}.log").read_text()
    assert f" --no-checkout {proj.resolve()} {stack.nodes_tmp}/speedstructure-" in text
    assert not list(stack.nodes_tmp.glob("speedstructure-*"))  # the clone is gone ...
    assert list(node_cache.rglob("*"))  # ... not the node's cache
    metrics = json.loads((proj / "models/tiny_a/fold_0/metrics.json").read_text())
    assert metrics["epochs"] == 1  # the clone's training, brought back
    assert run(["git", "rev-parse", "HEAD"], proj).stdout == head

    t0 = time.time()
    rest = _ran(run(readme.step("dvc repro"), proj, **env).stdout)
    timings["repro"] = time.time() - t0
    assert {"tune", "register", "evaluate"} <= rest, rest
    assert not [s for s in rest if s.startswith("train@")], rest  # no training reran
    assert dvc("status", "-q", cwd=proj, check=False).returncode == 0  # everything up to date
    _check_one_experiment_and_the_model(server, proj, since)
    assert not stack.elsewhere.exists()  # no task logged where its node's environment said
    # every command of the README's block, in its order, but torchrun's (test_multinode.py)
    assert readme.followed == readme.everything_but(NOT_FOLLOWED_HERE)
    log.info("durations: %s", {k: round(v, 1) for k, v in timings.items()})


def test_the_server_and_every_node_stop_by_their_process_ids(stack):
    """The end of the session: each node's ``ray start`` stopped by its pid takes all of its
    processes along; ``speedstructure server`` stopped by its pid stops mlflow and PostgreSQL,
    and make ends with exit code 0."""
    nodes, server = stack.nodes, stack.server
    assert len(nodes.processes()) > len(nodes.procs), "the cluster was not running"
    assert nodes.stop() == []
    assert pid_alive(server.postmaster) and listening(server.port)
    rc = server.stop()
    text = server.log.read_text()
    assert rc == 0, text
    assert "mlflow server stopped" in text and f"PostgreSQL of {server.pgdata} stopped" in text
    assert not pid_alive(server.postmaster) and not (server.pgdata / "postmaster.pid").exists()
    assert not listening(server.port) and not listening(server.pg_port)
