"""``speedstructure train-parallel --address``: the training stages of a tiny project as Ray tasks
on a Ray cluster of this machine (a head and two worker nodes, one CPU and one logical GPU each,
the GPUs numbered 0 and 1), in both storage modes, and a task killed mid-training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from support import COUNTS, random_gathers, random_velocity, sample_id
from tiny_project import BIN, dvc, make_tiny_project, project_env, run, tiny_params

pytestmark = pytest.mark.slow

STAGES = ["train@tiny_a-f0", "train@tiny_b-f0"]


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


@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("ray") / "base", _params(), _write_random_zips)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head (no resources: the driver's) and two worker nodes with GPU ids 0 and 1.  The
    workers start with an MLflow store of their own in their environment: the tasks must log
    where the driver tells them (the project's store), not there."""
    from ray.cluster_utils import Cluster

    elsewhere = f"sqlite:///{tmp_path_factory.mktemp('elsewhere') / 'mlflow.db'}"

    head = {
        "num_cpus": 0,
        "num_gpus": 0,
        "include_dashboard": False,
        "_system_config": {"process_group_cleanup_enabled": True},  # as `ray start` is told
    }
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "MLFLOW_TRACKING_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = elsewhere
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
        for gpu in ("0", "1"):  # a node's GPU ids are its CUDA_VISIBLE_DEVICES at start
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    yield cluster
    cluster.shutdown()


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


def _train_runs(proj: Path, stage: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("speedstructure")
    return client.search_runs([exp.experiment_id], f"tags.dvc_stage = '{stage}'")


def _ran(out: str) -> set[str]:
    return {ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage")}


def _train_on_cluster(proj: Path, address: str, *options: str) -> str:
    cmd = [str(BIN / "speedstructure"), "train-parallel", "--address", address, *options]
    out = run(cmd, proj, timeout=400).stdout
    for stage in STAGES:
        assert f"{stage}: GPU" in out, out
    status = json.loads(dvc("status", "--json", cwd=proj).stdout)
    assert not [s for s in status if s.startswith("train@")], status  # recorded in dvc.lock
    assert "tune" in status, status  # what `dvc repro` runs next
    assert set(STAGES) <= set(yaml.safe_load((proj / "dvc.lock").read_text())["stages"])
    seen = {}
    for stage in STAGES:
        (r,) = _train_runs(proj, stage)
        seen[stage] = r.data.tags["cuda_visible_devices"]
        log = (proj / "logs/train-parallel" / f"{stage}.log").read_text()
        assert log.count(f"== {stage}: attempt on") == 1, log
        assert f"CUDA_VISIBLE_DEVICES='{seen[stage]}'" in log
    assert sorted(seen.values()) == ["0", "1"], seen  # each task its own GPU, and only it
    return out


def test_training_stages_run_on_the_cluster_in_both_storage_modes(
    base_project, ray_cluster, tmp_path
):
    timings = {}
    # (a) a shared file system: the tasks run in this checkout
    shared = _copy(base_project, tmp_path / "shared")
    t0 = time.time()
    _train_on_cluster(shared, ray_cluster.address)
    timings["shared"] = time.time() - t0

    # (b) nothing shared but git and a DVC remote: each task in a fresh clone
    proj = _copy(base_project, tmp_path / "clone")
    dvc("remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"), cwd=proj)
    run(["git", "commit", "-qam", "the DVC remote"], proj)
    head = run(["git", "rev-parse", "HEAD"], proj).stdout
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    t0 = time.time()
    clone = ["--storage", "clone", "--workdir", str(nodes), "--cache-dir", str(tmp_path / "cache")]
    _train_on_cluster(proj, ray_cluster.address, *clone)
    timings["clone"] = time.time() - t0
    assert not list(nodes.iterdir())  # the clones are gone; the nodes' DVC cache stays
    assert list((tmp_path / "cache").rglob("*"))
    assert run(["git", "rev-parse", "HEAD"], proj).stdout == head
    for stage in STAGES:  # the outputs are this checkout's, as if `dvc repro` had run here
        d = proj / "models" / stage.split("@")[1].replace("-f", "/fold_")
        assert (d / "best.pt").is_file() and json.loads((d / "metrics.json").read_text())
    t0 = time.time()
    rest = _ran(dvc("repro", cwd=proj).stdout)
    timings["repro"] = time.time() - t0
    assert {"tune", "evaluate"} <= rest and not [s for s in rest if s.startswith("train@")], rest
    assert dvc("status", "-q", cwd=proj, check=False).returncode == 0  # everything up to date
    print(f"durations: { {k: round(v, 1) for k, v in timings.items()} }")


def _process_of(cmd_words: list[str], cwd: Path, timeout: float = 180) -> int:
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


def _ray_worker_of(pid: int) -> int:
    """The Ray worker (``ray::...``) above ``pid``."""
    while pid > 1:
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError("no Ray worker above the training process")


def test_a_killed_task_is_retried_and_resumes_from_its_checkpoint(
    base_project, ray_cluster, tmp_path
):
    proj = _copy(base_project, tmp_path / "kill")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["epochs"] = 6
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage, out_dir = STAGES[0], proj / "models/tiny_a/fold_0"
    cmd = [str(BIN / "speedstructure"), "train-parallel", "--address", ray_cluster.address, stage]
    t0 = time.time()
    driver = subprocess.Popen(
        cmd, cwd=proj, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        trainer = _process_of(["speedstructure", "train", "tiny_a"], proj)
        while not (out_dir / "history.csv").is_file():  # an epoch is saved in last.pt
            assert driver.poll() is None, driver.stdout.read().decode()
            time.sleep(0.1)
        worker = _ray_worker_of(trainer)
        os.kill(worker, signal.SIGKILL)  # the task dies as on a lost node
        saved = len((out_dir / "history.csv").read_text().splitlines()) - 1
        out = driver.communicate(timeout=400)[0].decode()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out
    assert not os.path.exists(f"/proc/{trainer}")  # killed with its task (process group)
    log = (proj / "logs/train-parallel" / f"{stage}.log").read_text()
    assert log.count(f"== {stage}: attempt on") == 2, log  # Ray retried it
    assert "resuming after epoch" in log, log
    (r,) = _train_runs(proj, stage)  # one MLflow run, continued
    assert r.info.status == "FINISHED" and r.data.tags.get("resumes") == "1", r.data.tags
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mape")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], steps  # every epoch once
    assert json.loads((out_dir / "metrics.json").read_text())["epochs"] == 6
    assert dvc("status", stage, "-q", cwd=proj, check=False).returncode == 0
    print(f"killed after {saved} saved epoch(s); {time.time() - t0:.1f} s in all")
