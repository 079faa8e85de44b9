"""One model across nodes: ``speedstructure train`` under ``torchrun --nnodes 2`` (c10d
rendezvous, gloo on CPU), two "nodes" on this machine, against one process with the same
global batch; and nodes that do not share the output folder stop when they resume.  Slow:
several training processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_loop import TINY_VARIANT, _cfg, _make_sample, _sid

from speedstructure.config.typed import as_plain
from speedstructure.data.samples import ZipWriter
from speedstructure.engine.checkpoint import TrainState
from support import ROOT

pytestmark = pytest.mark.slow

# Why the two trainings are the same computation (up to float rounding):
# * the global batch: 2 ranks x batch 1 against 1 process x batch 2, 6 training samples (an even
#   count: DistributedSampler pads nothing) in 3 optimizer steps per epoch.  The sampler's
#   permutation is drawn from seed + epoch alone (not the rank): rank r takes positions r, r + 2,
#   ... of it, so step k of the two ranks together sees the samples of the single process's
#   batch k.  The MAPE is a mean over equally sized samples and DDP averages the ranks'
#   gradients: the mean gradient of the same 2 samples.
# * the seed rule (runtime.training_seed): the initial weights are drawn from the seed on every
#   rank; rank 1's seed + 1 only feeds flips and dropout, and there are none (flip_prob 0, the
#   tiny model has no dropout or drop path).
# * the schedule: T_0 null (one cosine period over the cosine phase).  A T_0 counts steps of one
#   process and is divided by the world size (same per-process batch, W times the samples per
#   step); with the same global batch that would shorten the period for the two ranks.
# * one CPU thread per process (train.threads 1).
WORLD_BATCH = 2
TRAIN = {"epochs": 2, "T_0": None, "cosine_epochs": 2, "flip_prob": 0.0, "threads": 1}
# float rounding only: the largest difference of a weight or EMA weight after the 6 steps (Muon
# included) was 7.2e-7 here (fusion.self_attn.in_proj_bias; 12 of 80 tensors bit-identical)
WEIGHT_ATOL = 1e-5

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")
    env = {k: os.environ.get(k) for k in keys}
    Path(os.environ["SPEEDSTRUCTURE_ROOT"], "launch_env.json").write_text(json.dumps(env))
    from speedstructure.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _project(root: Path, batch_size: int) -> Path:
    """A project folder of its own (a node's disk): ``params.yaml`` with the variant ``tiny``."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    train = {**as_plain(_cfg(**TRAIN)), "batch_size": batch_size}
    raw = {**shipped, "train": train, "variants": {**shipped["variants"], "tiny": TINY_VARIANT}}
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def _path(*parts: str | Path) -> Path:
    """``Path(*parts)`` with its parent folders made."""
    path = Path(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    script: Path, root: Path, folds: Path, torchrun: list[str], *args: str
) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "SPEEDSTRUCTURE_ROOT": str(root),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [*torchrun, str(script)] if torchrun else [sys.executable, str(script)]
    cmd += ["train", "--variant", "tiny", "--fold", "0", "--folds", str(folds), "--quiet", *args]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: stopped with its ranks on a timeout
    )


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """The processes' output once they have ended; on a timeout all of them are stopped."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _node(rdzv: str, run_id: str, node_rank: int) -> list[str]:
    """One node's ``torchrun``.  With c10d the nodes' ranks follow the order in which they
    join the rendezvous (torchrun ignores ``--node-rank`` there, with a warning): the test reads
    which node got global rank 0 from the ranks' environment."""
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        rdzv,
        "--rdzv-id",
        run_id,
    ]


@pytest.fixture
def folds(tmp_path) -> Path:
    """8 samples: fold 0 (2 samples) validates, the other 6 train."""
    rng = np.random.default_rng(0)
    zpath = tmp_path / "train.zip"
    with ZipWriter(zpath) as zw:
        for i in range(8):
            zw.add(_sid(i), *_make_sample(rng))
    table = tmp_path / "folds.csv"
    lines = ["sample_id,zip,fold"] + [
        f"{_sid(i)},{zpath},{i % 4 if i < 6 else -1}" for i in range(8)
    ]
    table.write_text("\n".join(lines) + "\n")
    return table


def test_two_nodes_train_as_one_process_with_the_same_global_batch(tmp_path, folds):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    rdzv, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    nodes = [_project(tmp_path / f"node{i}", WORLD_BATCH // 2) for i in range(2)]
    single = _project(tmp_path / "single", WORLD_BATCH)
    procs = [_launch(script, root, folds, _node(rdzv, run_id, i)) for i, root in enumerate(nodes)]
    procs.append(_launch(script, single, folds, []))
    outs = _wait(procs)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    envs = [json.loads((root / "launch_env.json").read_text()) for root in nodes]
    # torchrun's ranks: one process per node, LOCAL_RANK 0 on both, global ranks 0 and 1
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0"]
    assert sorted(e["RANK"] for e in envs) == ["0", "1"]
    assert [e["WORLD_SIZE"] for e in envs] == ["2", "2"]
    main_root = nodes[[e["RANK"] for e in envs].index("0")]
    other_root = nodes[[e["RANK"] for e in envs].index("1")]
    run_dir = Path("models", "tiny", "fold_0")
    # only global rank 0 writes: checkpoints, metrics and its MLflow store; rank 1's disk has none
    assert (main_root / run_dir / "last.pt").is_file() and (main_root / "mlruns").is_dir()
    assert not (other_root / "models").exists() and not (other_root / "mlruns").exists()
    multi = torch.load(main_root / run_dir / "last.pt", weights_only=True)
    one = torch.load(single / run_dir / "last.pt", weights_only=True)
    assert multi["fingerprint"]["world_size"] == 2 and one["fingerprint"]["world_size"] == 1
    assert multi["opt_steps"] == one["opt_steps"] == 6
    diffs = {
        f"{part}.{k}": float((multi[part][k] - one[part][k]).abs().max())
        for part in ("model", "ema")
        for k in one[part]
        if one[part][k].is_floating_point()
    }
    worst = max(diffs, key=diffs.get)
    print(f"largest weight difference: {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= WEIGHT_ATOL, (worst, diffs[worst])
    curves = [[(h["train_loss"], h["val_mape"]) for h in st["history"]] for st in (multi, one)]
    np.testing.assert_allclose(*curves, rtol=1e-5)


def test_nodes_that_do_not_share_the_output_folder_stop_on_resume(tmp_path, folds):
    """A requeued job whose nodes do not share the output folder: one node finds ``last.pt``,
    the other none; every rank stops with the reason instead of training from different
    states (which rank gets which node is the rendezvous's choice)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    nodes = [_project(tmp_path / f"node{i}", WORLD_BATCH // 2) for i in range(2)]
    TrainState(fingerprint={"world_size": 2}, epoch=2).save(
        _path(nodes[0], "models", "tiny", "fold_0", "last.pt")
    )
    rdzv, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    procs = [
        _launch(script, root, folds, _node(rdzv, run_id, i), "--no-mlflow")
        for i, root in enumerate(nodes)
    ]
    for p, out in zip(procs, _wait(procs, timeout=120), strict=True):
        assert p.returncode != 0, out[-4000:]
        assert "the ranks do not find the same training state" in out, out[-4000:]
        assert "every node shares" in out and "epoch 2" in out and "none" in out
