"""Hostile files and hard faults (issue 13): what is guaranteed, each guarantee tested.

* safe loading: no unpickling anywhere in the code (a scan of the source), the registered
  model read without running the code stored with it;
* temporaries of a killed process are removed by the next run;
* one training is one MLflow run through SIGTERM, SIGKILL and the resumption; stale
  RUNNING runs are ended by the next run of their stage;
* one-line errors and exit codes, no ANSI codes on a non-terminal standard error;
* the CPU thread budget of training processes sharing a machine;
* a full disk leaves the previous store, checkpoint and submission intact; an MLflow
  outage does not stop training and loses no metric.

(The archive-member checks are in ``data/test_samples.py``, the K-Means file in
``stages/test_folds.py`` and the concurrent ``dvc repro`` in ``test_pipeline.py``.)
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from speedstructure import cli
from speedstructure.errors import UserError, WriteError
from speedstructure.tracking.runs import process_tags, start_run
from speedstructure.tracking.store import setup
from support import ROOT, trend_checkpoint

SRC = ROOT / "src" / "speedstructure"
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


# --------------------------------------------------------------------------- 1. safe loading

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal"}
UNSAFE_CALLS = {"joblib.load", "torch.jit.load", "yaml.unsafe_load", "yaml.full_load"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _unsafe_call(node: ast.Call) -> str:
    """Why a call may unpickle (or run) what it loads, '' if it cannot."""
    name, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
    if name in UNSAFE_CALLS or name.split(".")[0] in UNSAFE_MODULES:
        return name
    if name.endswith("read_pickle"):
        return name
    if _is(kw.get("allow_pickle"), True):
        return f"{name}(allow_pickle=True)"
    if _is(kw.get("weights_only"), False):
        return f"{name}(weights_only=False)"
    if name.endswith("torch.load") and not _is(kw.get("weights_only"), True):
        return "torch.load without weights_only=True"
    if name == "yaml.load" and _dotted(kw.get("Loader", ast.Constant(None))) not in (
        "yaml.SafeLoader",
        "yaml.CSafeLoader",
    ):
        return "yaml.load without a safe Loader"
    if name.startswith("mlflow.") and name.endswith(".load_model"):  # runs the model's code
        return name
    return ""


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every import of a pickle module and every call that may unpickle, in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [
                f"{filename}:{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            UNSAFE_MODULES
        ):
            found.append(f"{filename}:{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Call) and (why := _unsafe_call(node)):
            found.append(f"{filename}:{node.lineno}: {why}")
    return found


def test_the_scan_finds_every_kind_of_unsafe_load():
    snippets = [
        "import pickle",
        "import cloudpickle as cp",
        "from dill import loads",
        "joblib.load(p)",
        "np.load(p, allow_pickle=True)",
        "torch.load(p)",
        "torch.load(p, map_location='cpu')",
        "torch.load(p, weights_only=False)",
        "pd.read_pickle(p)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)",
        "yaml.unsafe_load(text)",
        "mlflow.pyfunc.load_model(uri)",
        "mlflow.sklearn.load_model(uri)",
        "torch.jit.load(p)",
    ]
    for code in snippets:
        assert unsafe_loads(code), code
    safe = [
        "np.load(p)",
        "np.load(p, allow_pickle=False)",
        "torch.load(p, map_location='cpu', weights_only=True)",
        "yaml.safe_load(text)",
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "json.loads(text)",
    ]
    for code in safe:
        assert not unsafe_loads(code), code


def test_no_unsafe_load_anywhere_in_the_package():
    found = [
        hit
        for path in sorted(SRC.rglob("*.py"))
        for hit in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "unsafe loads (pickle can run code): " + "; ".join(found)


def _mlflow_cfg(root: Path, **extra) -> dict:
    return {
        "tracking_uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "artifact_root": str(root / "mlruns" / "artifacts"),
        "experiment": "reliability",
        "registered_model": "ens-rel",
        "retry_seconds": 1,
        **extra,
    }


def test_registered_model_is_read_without_running_its_code(tmp_path, tiny_params, isolated_mlflow):
    import mlflow

    from speedstructure.ensemble.loading import load_predictor
    from speedstructure.stages.register import register_ensemble

    trend_checkpoint(tmp_path / "models/a/fold_0/best.pt", 2.0)
    trend_checkpoint(tmp_path / "models/b/fold_0/best.pt", 4.0)
    spec = {
        "format": 1,
        "cv_mape": 0.05,
        "folds": [
            {
                "fold": 0,
                "members": [
                    {"variant": "a", "checkpoint": "models/a/fold_0/best.pt", "weight": 0.25},
                    {"variant": "b", "checkpoint": "models/b/fold_0/best.pt", "weight": 0.75},
                ],
            }
        ],
    }
    (tmp_path / "ens.json").write_text(json.dumps(spec))
    params = tiny_params(tmp_path, mlflow=_mlflow_cfg(tmp_path))
    register_ensemble(tmp_path / "ens.json", params)
    x = np.zeros((1, 5, 10001, 31), np.float32)
    # tamper with the stored model: its code now leaves a mark when it is imported
    mark = tmp_path / "code_ran"
    stored = list((tmp_path / "mlruns").rglob("pyfunc.py"))
    assert stored
    for p in stored:
        p.write_text(p.read_text() + f"\nopen({str(mark)!r}, 'w').close()\n")
    fn, desc = load_predictor("models:/ens-rel@champion", params)
    np.testing.assert_allclose(fn(x), 0.25 * 2.0 + 0.75 * 4.0, atol=1e-6)
    assert desc == "models:/ens-rel@champion" and not mark.exists()
    # what mlflow.pyfunc.load_model would have done (the reason it is not used)
    mlflow.pyfunc.load_model("models:/ens-rel@champion")
    assert mark.exists()
    # an artifact path that leaves the model folder is refused
    mlmodel = next((tmp_path / "mlruns").rglob("MLmodel"))
    mlmodel.write_text(mlmodel.read_text().replace("path: artifacts/ens.json", "path: ../../x"))
    with pytest.raises(UserError, match="artifact 'ensemble' .* is not a file inside the model"):
        load_predictor("models:/ens-rel@champion", params)
    with pytest.raises(UserError, match="cannot load model 'models:/ens-rel/9'.*not found"):
        load_predictor("models:/ens-rel/9", params)


def test_model_option_names_a_directory_for_what_it_is(tmp_path, tiny_params):
    from speedstructure.ensemble.loading import load_predictor

    params = tiny_params(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError) as ei:
        load_predictor("models", params)
    assert str(ei.value).startswith(f"{tmp_path / 'models'}: is a directory, not a model")
    with pytest.raises(UserError, match="model file not found"):
        load_predictor("nothing.json", params)


# --------------------------------------------------------------------------- 3. temporaries


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_output_removes_the_temporaries_of_dead_processes_only(tmp_path):
    from speedstructure.fsutil import atomic_write_text

    target = tmp_path / "out.json"
    dead = tmp_path / f".out.json.tmp{_dead_pid()}"
    dead.mkdir()
    (dead / "half.npy").write_bytes(b"x" * 100)
    dead_file = tmp_path / f".out.json.tmp{_dead_pid()}.npz"
    dead_file.write_bytes(b"x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".out.json.tmp{live.pid}"
        alive.write_bytes(b"being written")
        other = tmp_path / f".other.json.tmp{_dead_pid()}"
        other.write_bytes(b"another output's")
        atomic_write_text(target, "{}")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([other.name, alive.name, "out.json"])
    finally:
        live.kill()
        live.wait()


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(SPEEDSTRUCTURE_ROOT=str(root), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# runs the command line with a hook: after `ingest` has packed its first split, signal
SLOW_INGEST = """
import os, signal, sys, time
from speedstructure.stages import ingest
from speedstructure.cli import main
pack = ingest._pack_split
def pack_then_signal(folder, z, bar):
    pack(folder, z, bar)
    os.kill(os.getpid(), getattr(signal, os.environ["HOOK_SIGNAL"]))
    time.sleep(30)
ingest._pack_split = pack_then_signal
sys.exit(main(sys.argv[1:]))
"""


def _params_file(root: Path, **sections) -> None:
    raw = {**SHIPPED, **sections}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_sigkilled_ingest_leaves_no_temporary_after_the_rerun(tmp_path, write_zips):
    write_zips(tmp_path / "data")
    _params_file(tmp_path)
    env = {**_env(tmp_path), "HOOK_SIGNAL": "SIGKILL"}
    cmd = [sys.executable, "-c", SLOW_INGEST, "ingest", "--quiet"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    left = [x.name for x in tmp_path.iterdir() if x.name.startswith(".store.tmp")]
    assert len(left) == 1 and not (tmp_path / "store").exists()  # what a killed run leaves
    rerun = [sys.executable, "-m", "speedstructure.cli", "ingest", "--quiet"]
    p = subprocess.run(rerun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not [x.name for x in tmp_path.rglob("*") if ".tmp" in x.name]
    assert (tmp_path / "store" / "index.csv").is_file()
    # SIGTERM: removed by the process itself, one line, exit 130
    env["HOOK_SIGNAL"] = "SIGTERM"
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip() == "speedstructure ingest: interrupted: resume with the same command"
    assert not [x.name for x in tmp_path.rglob("*") if ".tmp" in x.name]
    assert (tmp_path / "store" / "index.csv").is_file()  # the previous store is untouched


# ------------------------------------------------------------------- 4, 5, 6. training runs


def _training_project(root: Path, write_zips, tiny_variant, *, epochs: int = 3) -> Path:
    """A project with the shipped params plus variant ``tiny``, a fold table and an MLflow
    store of its own; returns the fold table."""
    write_zips(root / "data")
    train = {
        **SHIPPED["train"],
        "epochs": epochs,
        "cosine_epochs": epochs,
        "patience": 0,
        "progress": False,
        "device": "cpu",
        "batch_size": 2,
        "val_batch_size": 2,
    }
    variants = {**SHIPPED["variants"], "tiny": tiny_variant()}
    _params_file(root, train=train, variants=variants, mlflow=_mlflow_cfg(root))
    rows = ["sample_id,zip,fold"]
    rows += [f"TR{i:016d},data/train.zip,{i % 2}" for i in range(3)]
    rows += [f"EA{i:016d},data/train_extended_1.zip,-1" for i in range(2)]
    (root / "folds.csv").write_text("\n".join(rows) + "\n")
    return root / "folds.csv"


# runs the command line with a hook: right after last.pt of epoch HOOK_EPOCH is saved (before
# its metrics are logged), the process signals itself
SIGNAL_AFTER_SAVE = """
import os, signal, sys
from speedstructure.engine import checkpoint
from speedstructure.cli import main
save = checkpoint.TrainState.save
def save_then_signal(self, path):
    save(self, path)
    if self.epoch == int(os.environ["HOOK_EPOCH"]):
        os.kill(os.getpid(), getattr(signal, os.environ["HOOK_SIGNAL"]))
checkpoint.TrainState.save = save_then_signal
sys.exit(main(sys.argv[1:]))
"""

TRAIN_ARGS = ["train", "--variant", "tiny", "--fold", "0", "--folds", "folds.csv", "--quiet"]


def _train(root: Path, hook: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = _env(root)
    if hook is None:
        cmd = [sys.executable, "-m", "speedstructure.cli", *TRAIN_ARGS]
    else:
        cmd = [sys.executable, "-c", SIGNAL_AFTER_SAVE, *TRAIN_ARGS]
        env.update(HOOK_SIGNAL=hook[0], HOOK_EPOCH=str(hook[1]))
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _stage_runs(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reliability")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_stage = 'train@tiny-f0'")
    return client, runs


def _steps(client, run_id: str, key: str = "val_mape") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow  # three training processes: about a minute on 2 busy cores
def test_sigterm_then_sigkill_then_rerun_is_one_finished_run_with_every_epoch(
    tmp_path, write_zips, tiny_variant
):
    from speedstructure.engine.checkpoint import TrainState

    _training_project(tmp_path, write_zips, tiny_variant, epochs=3)
    # SIGTERM after epoch 1: one line, exit 130, the run KILLED
    p = _train(tmp_path, ("SIGTERM", 1))
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "speedstructure train: interrupted: resume with the same command"
    )
    assert "Traceback" not in p.stderr and "\x1b" not in p.stderr
    client, runs = _stage_runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    run_id = runs[0].info.run_id
    state = TrainState.load(tmp_path / "models/tiny/fold_0/last.pt")
    assert state.run_id == run_id and state.epoch == 1
    # SIGKILL right after epoch 2 is saved, before its metrics are logged: left RUNNING
    p = _train(tmp_path, ("SIGKILL", 2))
    assert p.returncode == -signal.SIGKILL
    client, runs = _stage_runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "RUNNING")]
    assert _steps(client, run_id) == [1]
    # the rerun continues the same run: every epoch logged once, FINISHED
    p = _train(tmp_path)
    assert p.returncode == 0, p.stderr
    client, runs = _stage_runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    for key in ("val_mape", "train_loss", "lr", "epoch_seconds"):
        assert _steps(client, run_id, key) == [1, 2, 3], key
    run = runs[0]
    assert run.data.tags["resumes"] == "2" and run.data.tags["pid"] != ""
    assert int(run.data.params["train.threads"]) >= 1  # the thread budget is recorded
    assert run.data.metrics["epochs_run"] == 3
    history = (tmp_path / "models/tiny/fold_0/history.csv").read_text().splitlines()
    assert len(history) == 4


def test_stale_running_runs_are_ended_by_the_next_run_of_their_stage(
    tmp_path, tiny_params, isolated_mlflow
):
    import mlflow

    params = tiny_params(tmp_path, mlflow=_mlflow_cfg(tmp_path))
    exp_id = setup(params)
    client = mlflow.MlflowClient()
    host = process_tags()["host"]

    def running(**tags):
        return client.create_run(exp_id, tags={"dvc_stage": "folds", **tags}).info.run_id

    dead = running(host=host, pid=str(_dead_pid()))
    mine = running(**process_tags())  # this process: alive
    elsewhere = running(host="another-host", pid="1")
    untagged = running()
    other_stage = client.create_run(
        exp_id, tags={"dvc_stage": "tune", "host": host, "pid": str(_dead_pid())}
    ).info.run_id
    with start_run("folds", params, tags={"dvc_stage": "folds"}) as run:
        pass
    status = {r: client.get_run(r).info.status for r in (dead, mine, elsewhere, untagged)}
    assert status == {dead: "KILLED", mine: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    assert "is gone" in client.get_run(dead).data.tags["ended_by"]
    assert client.get_run(other_stage).info.status == "RUNNING"  # not this stage's
    new = client.get_run(run.info.run_id)
    assert new.info.status == "FINISHED" and new.data.tags["pid"] == str(os.getpid())


def test_corrupt_or_malicious_last_pt_is_one_line_without_torch_advice(
    tmp_path, write_zips, tiny_variant, monkeypatch, capsys
):
    import pickle

    _training_project(tmp_path, write_zips, tiny_variant)
    monkeypatch.setenv("SPEEDSTRUCTURE_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "models/tiny/fold_0/last.pt"
    last.parent.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    contents = {
        "malicious": lambda: torch.save({"x": Payload()}, last, pickle_module=pickle),
        "garbage": lambda: last.write_bytes(b"\x00garbage"),
        "not a state": lambda: torch.save({"epoch": "three"}, last),
    }
    reasons = {
        "malicious": "unsupported content: Trying to load unsupported GLOBAL posix.system",
        "garbage": "not a readable checkpoint",
        "not a state": "not a training state (no 'fingerprint' entry)",
    }
    for what, write in contents.items():
        write()
        assert cli.main([*TRAIN_ARGS, "--no-mlflow"]) == 2, what
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after the INFO diagnostics, if any
        assert line.startswith(f"speedstructure train: error: {last}: not a "), err
        assert "Traceback" not in err and "Error:" not in err.replace(line, ""), err
        assert reasons[what] in line and line.endswith("; remove it to train afresh"), line
        assert "weights_only" not in err, err
        assert "\x1b" not in err
    assert not (tmp_path / "pwned").exists()


COLOUR_COMMAND = """
import logging, sys, types, warnings
from mlflow.utils.warnings_utils import color_warning
from speedstructure import cli

def command(args):
    color_warning("coloured warning", stacklevel=1, color="yellow")  # what MLflow warns with
    warnings.warn("\\x1b[1mplain warning\\x1b[0m", UserWarning, stacklevel=1)
    logging.getLogger("mlflow").warning("mlflow colour", extra={"color": "red"})
    logging.getLogger("speedstructure.x").warning("\\x1b[1mbold log\\x1b[0m")
    print("\\x1b[31mred\\x1b[0m", file=sys.stderr)
    return 0

module = types.ModuleType("colour_command")
module.add_commands = lambda sub: sub.add_parser("colour").set_defaults(func=command)
sys.modules["colour_command"] = module
cli.COMMANDS["colour"] = ("colour_command", "test")
sys.exit(cli.main(["colour"]))
"""


def test_no_ansi_codes_when_stderr_is_not_a_terminal(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", COLOUR_COMMAND],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    for text in ("coloured warning", "plain warning", "mlflow colour", "bold log", "red"):
        assert text in p.stderr, (text, p.stderr)
    assert "\x1b" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- 6. threads


def test_thread_budget_is_the_cores_shared_by_the_training_processes(monkeypatch):
    from speedstructure.config.load import parse_params
    from speedstructure.config.typed import ConfigError
    from speedstructure.engine import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    py, ss = "/v/bin/python", "/v/bin/speedstructure"
    procs = [[py, ss, "train", "--variant", "a"], [py, "-u", "-m", "speedstructure.cli", "train"]]
    launcher = [py, "/v/bin/torchrun", "--nproc_per_node", "2", "-m", "speedstructure.cli"]
    others = [[py, ss, "ingest"], [*launcher, "train"], ["bash"], [py, ss, "train-parallel"]]
    monkeypatch.setattr(runtime, "_cmdlines", lambda: procs + others)
    assert runtime.training_processes() == 2 and runtime.resolve_threads(None) == 4
    monkeypatch.setattr(runtime, "_cmdlines", lambda: others)
    assert runtime.resolve_threads(None) == 8  # this process alone (not a CLI training)
    workers = [["dvc", "exp", "queue-worker", f"dvc-exp-1-{i}@localhost"] for i in range(3)]
    monkeypatch.setattr(runtime, "_cmdlines", lambda: others + workers)
    assert runtime.resolve_threads(None) == 2  # 8 cores // 3 queue workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.resolve_threads(None) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert runtime.resolve_threads(None) == 1
    assert runtime.resolve_threads(3) == 3  # train.threads wins
    with pytest.raises(UserError, match="train.threads"):
        runtime.resolve_threads(0)
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="train.threads"):
        parse_params({**SHIPPED, "train": {**SHIPPED["train"], "threads": "many"}})


# --------------------------------------------------------------------------- 7. full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def test_full_disk_while_writing_the_store_keeps_the_previous_store(
    tmp_path, write_zips, monkeypatch, capsys
):
    from speedstructure.stages import ingest

    write_zips(tmp_path / "data")
    _params_file(tmp_path)
    monkeypatch.setenv("SPEEDSTRUCTURE_ROOT", str(tmp_path))
    assert cli.main(["ingest", "--quiet"]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "store").rglob("*.csv")}
    capsys.readouterr()
    monkeypatch.setattr(ingest.os, "posix_fallocate", _enospc)
    assert cli.main(["ingest", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"speedstructure ingest: error: {tmp_path / 'store'}: not written (No space left on "
        "device); its previous version is unchanged\n"
    )
    assert {p: p.read_bytes() for p in (tmp_path / "store").rglob("*.csv")} == before
    assert not _no_temporaries(tmp_path)


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(
    tmp_path, write_zips, tiny_variant, tiny_params, monkeypatch
):
    from speedstructure.engine import checkpoint as C
    from speedstructure.stages.train import run_training

    table = _training_project(tmp_path, write_zips, tiny_variant, epochs=2)
    params = tiny_params(tmp_path, **yaml.safe_load((tmp_path / "params.yaml").read_text()))
    kw = {"folds_table": table, "progress": False, "threads": 1}
    run_training(params, "tiny", 0, epochs=1, **kw)
    last = tmp_path / "models/tiny/fold_0/last.pt"
    good = last.read_bytes()

    def save_half_then_fail(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        _enospc()

    with monkeypatch.context() as m, pytest.raises(WriteError) as ei:
        m.setattr(C.torch, "save", save_half_then_fail)
        run_training(params, "tiny", 0, **kw)
    assert str(ei.value).startswith(f"{tmp_path / 'models/tiny/fold_0'}/") and (
        "not written (No space left on device); its previous version is unchanged"
    ) in str(ei.value)
    assert last.read_bytes() == good and C.TrainState.load(last).epoch == 1
    assert not _no_temporaries(tmp_path / "models")
    res = run_training(params, "tiny", 0, **kw)  # disk freed: resumes from epoch 1
    assert res.epochs_run == 2 and len(res.history) == 2


def test_full_disk_while_writing_the_submission_keeps_the_previous_one(tmp_path, monkeypatch):
    from speedstructure.data import submission as S

    path = tmp_path / "sub.npz"
    ids = [f"TE{i:016d}" for i in range(3)]
    with S.SubmissionWriter(path) as w:
        for sid in ids:
            w.add(sid, np.full((300, 1259), 2.0))
    good = path.read_bytes()
    calls = []
    real = S.np.lib.format.write_array

    def write_then_fill_up(member, arr, **kw):
        calls.append(1)
        if len(calls) == 2:
            _enospc()
        return real(member, arr, **kw)

    monkeypatch.setattr(S.np.lib.format, "write_array", write_then_fill_up)
    with pytest.raises(WriteError) as ei, S.SubmissionWriter(path) as w:
        for sid in ids:
            w.add(sid, np.full((300, 1259), 3.0))
    assert str(ei.value) == (
        f"{path}: not written (No space left on device); its previous version is unchanged"
    )
    assert path.read_bytes() == good and not _no_temporaries(tmp_path)


# --------------------------------------------------------------------------- 7. MLflow outage


def _failing_metric_batches(monkeypatch, failures: int | None):
    """The tracking client's metric batches fail (``database is locked``) ``failures`` times
    (None: until the test ends); other calls go through."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real, count = MlflowClient.log_batch, {"n": 0}

    def log_batch(self, run_id, metrics=(), *a, **k):
        if metrics and (failures is None or count["n"] < failures):
            count["n"] += 1
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(self, run_id, metrics, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    return count


def test_tracking_outage_does_not_stop_training_nor_lose_metrics(
    tmp_path, write_zips, tiny_variant, tiny_params, monkeypatch, caplog, isolated_mlflow
):
    from speedstructure.stages.train import run_training_stage

    table = _training_project(tmp_path, write_zips, tiny_variant, epochs=3)
    params = tiny_params(tmp_path, **yaml.safe_load((tmp_path / "params.yaml").read_text()))
    kw = {"folds_table": table, "progress": False, "threads": 1}
    # locked while epochs 1 and 2 are logged: training goes on, epoch 3 flushes everything
    _failing_metric_batches(monkeypatch, failures=2)
    with caplog.at_level(logging.WARNING, logger="speedstructure.tracking"):
        res = run_training_stage(params, "tiny", 0, **kw)
    assert res.epochs_run == 3
    assert "MLflow tracking failed ((sqlite3.OperationalError) database is locked)" in caplog.text
    assert "works again" in caplog.text
    client, runs = _stage_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert _steps(client, runs[0].info.run_id) == [1, 2, 3]


def test_tracking_down_at_the_end_fails_the_stage_and_the_rerun_logs_the_rest(
    tmp_path, write_zips, tiny_variant, tiny_params, monkeypatch, isolated_mlflow
):
    from speedstructure.stages.train import run_training_stage

    table = _training_project(tmp_path, write_zips, tiny_variant, epochs=2)
    params = tiny_params(tmp_path, **yaml.safe_load((tmp_path / "params.yaml").read_text()))
    kw = {"folds_table": table, "progress": False, "threads": 1}
    with monkeypatch.context() as m:
        _failing_metric_batches(m, failures=None)
        with pytest.raises(UserError, match="training finished and saved.*rerun the same command"):
            run_training_stage(params, "tiny", 0, **kw)  # mlflow.retry_seconds = 1
    assert (tmp_path / "models/tiny/fold_0/best.pt").is_file()
    client, runs = _stage_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"] and _steps(client, runs[0].info.run_id) == []
    res = run_training_stage(params, "tiny", 0, **kw)  # server back: nothing to train
    assert res.epochs_run == 2
    client, runs = _stage_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert _steps(client, runs[0].info.run_id) == [1, 2]
