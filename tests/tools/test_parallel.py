"""``speedstructure train-parallel``: pending training stages as Ray tasks on a local Ray
instance, one GPU each, with a stand-in for DVC (the real one runs in test_pipeline and, on a
Ray cluster, in test_ray_cluster)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from speedstructure.errors import UserError
from speedstructure.tools import parallel as PL

FAKE_DVC = """
import json, os, sys, time
args = sys.argv[1:]
record = {record!r}
if args[:2] == ["status", "--json"]:
    print(json.dumps({{"train@a-f0": [], "train@b-f0": [], "train@c-f0": [], "tune": []}}))
    sys.exit(0)
if args[:2] == ["repro", "folds"]:
    open(record + "/prepared", "w").close()
    sys.exit(0)
assert args[:3] == ["--wait-for-lock", "repro", "--single-item"], args
stage = args[3]
t0 = time.time()
open(os.path.join(record, stage + ".started"), "w").close()
# a and b wait (up to a minute) for each other to start: only stages run at once both see it
pair = [os.path.join(record, s + ".started") for s in ("train@a-f0", "train@b-f0")]
while stage != "train@c-f0" and not all(map(os.path.exists, pair)) and time.time() < t0 + 60:
    time.sleep(0.05)
time.sleep(0.2)
with open(os.path.join(record, stage + ".json"), "w") as fh:
    json.dump({{"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "start": t0, "end": time.time(),
               "met": all(map(os.path.exists, pair)),
               "path_has_venv": os.path.dirname(sys.executable) in os.environ["PATH"]}}, fh)
print("ran", stage)
sys.exit(1 if stage.startswith("train@b") else 0)
"""


@pytest.fixture
def fake_dvc(tmp_path, monkeypatch):
    record = tmp_path / "record"
    record.mkdir()
    script = tmp_path / "fake_dvc.py"
    script.write_text(textwrap.dedent(FAKE_DVC.format(record=str(record))))
    monkeypatch.setattr(PL, "dvc_command", lambda: [sys.executable, str(script)])
    return record


def _runs(record) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in record.glob("train@*.json")}


def test_gpus_are_parsed_in_any_spelling():
    assert PL.parse_gpus("0,1") == PL.parse_gpus("0 1") == PL.parse_gpus(["0", "1"]) == ["0", "1"]
    assert PL.parse_gpus(["0,0", "1"]) == ["0", "0", "1"]  # two stages on GPU 0
    with pytest.raises(UserError, match="at least one GPU"):
        PL.parse_gpus(" , ")


def test_pending_stages_run_concurrently_one_gpu_each(fake_dvc, tmp_path, tiny_params):
    params = tiny_params(tmp_path)
    results = PL.train_parallel(params, ["0", "1"])
    assert (fake_dvc / "prepared").is_file()  # `dvc repro folds` first
    runs = _runs(fake_dvc)
    assert set(runs) == set(results) == {"train@a-f0", "train@b-f0", "train@c-f0"}  # not tune
    assert {runs["train@a-f0"]["gpu"], runs["train@b-f0"]["gpu"]} == {"0", "1"}
    assert all(r["path_has_venv"] for r in runs.values())
    a, b = runs["train@a-f0"], runs["train@b-f0"]
    assert a["met"] and b["met"]  # the first two ran at once (each saw the other start)
    assert a["start"] < b["end"] and b["start"] < a["end"]
    c = runs["train@c-f0"]
    assert c["start"] >= min(a["end"], b["end"]) - 0.05  # the third waited for a free GPU
    assert results["train@b-f0"]["returncode"] == 1 and results["train@a-f0"]["returncode"] == 0
    for stage, r in results.items():
        assert r["gpu"] == runs[stage]["gpu"]
        assert f"ran {stage}" in (params.path("parallel_logs") / f"{stage}.log").read_text()


def test_named_stages_and_the_command(fake_dvc, tmp_path, tiny_params, monkeypatch, capsys):
    params = tiny_params(tmp_path)
    results = PL.train_parallel(params, ["3"], ["train@c-f0"])
    assert list(results) == ["train@c-f0"] and _runs(fake_dvc)["train@c-f0"]["gpu"] == "3"
    with pytest.raises(UserError, match="not training stages: tune"):
        PL.train_parallel(params, ["0"], ["tune"])
    monkeypatch.setattr(PL, "load_params", lambda: params)
    args = argparse.Namespace(gpus=["0,1"], stages=[], json=None)
    assert PL._cmd(args) == 1  # train@b fails: exit 1, its log named
    out = capsys.readouterr()
    assert "train@b-f0: GPU" in out.out and "FAILED (see" in out.out
    assert "1 training stage(s) failed" in out.err


def test_a_gpu_listed_twice_takes_two_stages_and_the_options_are_checked_first(
    tmp_path, tiny_params
):
    assert PL.gpu_share(["0", "0", "1", "1"]) == (["0", "1"], 0.5)
    assert PL.gpu_share(["3"]) == (["3"], 1.0)
    with pytest.raises(UserError, match="the same number of times"):
        PL.gpu_share(["0", "0", "1"])
    params = tiny_params(tmp_path)  # no dvc runs: each is refused before anything starts
    with pytest.raises(UserError, match="not --address"):
        PL.train_parallel(params, ["0"], options=PL.ClusterOptions(address="head:6379"))
    with pytest.raises(UserError, match="--storage nfs"):
        PL.train_parallel(params, None, options=PL.ClusterOptions(storage="nfs"))


def test_a_task_sees_only_its_gpus_and_this_environments_dvc(monkeypatch):
    from speedstructure.tools import cluster_task

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert cluster_task.task_env(["2"])["CUDA_VISIBLE_DEVICES"] == "2"
    env = cluster_task.task_env([], {"MLFLOW_TRACKING_URI": "http://h:5000"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # no GPU asked: none visible (Ray sets nothing)
    assert env["MLFLOW_TRACKING_URI"] == "http://h:5000"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


LOCK = """schema: '2.0'
stages:
  folds:
    cmd: speedstructure folds
    outs:
    - path: folds/summary.json
      hash: md5
      md5: 0123
"""


def test_clone_storage_needs_a_committed_checkout_and_records_lock_entries_as_dvc(tmp_path):
    from dvc.utils.serialize import load_yaml

    from speedstructure.tools import cluster_clone

    (tmp_path / "params.yaml").write_text("train:\n  eps: 1.0e-08\n")
    (tmp_path / "dvc.lock").write_text(LOCK)
    (tmp_path / "folds").mkdir()
    (tmp_path / "folds/summary.json").write_text("{}")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True)
    (tmp_path / "folds/summary.json").write_text('{"a": 1}')  # an output: may differ
    (tmp_path / "dvc.lock").write_text(LOCK + "\n")
    assert cluster_clone.check_committed(tmp_path) == head.stdout.decode().strip()
    (tmp_path / "params.yaml").write_text("train:\n  eps: 1.0e-07\n")
    with pytest.raises(UserError, match="commit params.yaml first"):
        cluster_clone.check_committed(tmp_path)
    entry = {"cmd": "speedstructure train", "params": {"params.yaml": {"train.eps": 1e-08}}}
    cluster_clone.record_lock_entry(tmp_path, "train@a-f0", entry)
    lock = load_yaml(str(tmp_path / "dvc.lock"))
    assert lock["stages"]["train@a-f0"] == entry and "folds" in lock["stages"]
