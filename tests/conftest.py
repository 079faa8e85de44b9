"""Shared fixtures: an offline environment for every test, tiny challenge zips, tiny variants.

Every test runs offline and never writes to the project's own MLflow store.  The
fixtures build data in the challenge's layout with random arrays (no simulation):

* ``write_zips(folder, counts=..., seed=...)``: the four challenge zips, ids prefixed by split;
* ``tiny_zips``: those zips once per session (3 + 2 + 2 training samples, 2 test samples);
* ``tiny_variant(**overrides)``: a two-block EVA02-tiny variant mapping (28 px, 2 x 2 tokens);
* ``tiny_params(root, **sections)``: a :class:`~speedstructure.config.Params` rooted at ``root``;
* ``isolated_mlflow``: MLflow's process-wide tracking URI, registry URI and active experiment
  restored after the test, and no run left active;
* ``trend_checkpoint(path, velocity)``: a depth-trend member checkpoint predicting ``velocity``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

GSHAPE = (5, 10001, 31)
VSHAPE = (300, 1259)
COUNTS = {"train": 3, "train_extended_1": 2, "train_extended_2": 2, "test": 2}
PREFIX = {"train": "TR", "train_extended_1": "EA", "train_extended_2": "EB", "test": "TE"}
TINY_BACKBONE = "eva02_tiny_patch14_224.mim_in22k"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("SPEEDSTRUCTURE_ROOT", raising=False)


def sample_id(split: str, i: int) -> str:
    """An 18-character id that names its split: ``TR0000000000000003``."""
    return f"{PREFIX[split]}{i:016d}"


def random_gathers(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 1e-3, GSHAPE).astype(np.float32)


def random_velocity(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(1.5, 4.5, VSHAPE).astype(np.float32)


def _write_zips(
    folder: Path, counts: dict[str, int] | None = None, seed: int = 0
) -> dict[str, Path]:
    from speedstructure.config import SPLITS
    from speedstructure.dataio import ZipWriter

    counts = {**COUNTS, **(counts or {})}
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    zips = {}
    for split in SPLITS:
        zips[split] = folder / f"{split}.zip"
        with ZipWriter(zips[split]) as zw:
            for i in range(counts[split]):
                target = None if split == "test" else random_velocity(rng)
                zw.add(sample_id(split, i), random_gathers(rng), target)
    return zips


@pytest.fixture
def write_zips() -> Callable[..., dict[str, Path]]:
    """``write_zips(folder, counts=None, seed=0)``: the four zips in ``folder``, split -> path."""
    return _write_zips


@pytest.fixture(scope="session")
def tiny_zips(tmp_path_factory) -> dict[str, Path]:
    """The four zips with :data:`COUNTS` samples, written once per session (read-only use)."""
    return _write_zips(tmp_path_factory.mktemp("tiny") / "data")


# a two-block EVA02-tiny on 28 px images (2 x 2 tokens per source); module-level tests that
# cannot take a fixture import it (`from conftest import TINY_VARIANT`)
TINY_VARIANT: dict[str, Any] = {
    "arch": "eva_fusion",
    "backbone": TINY_BACKBONE,
    "pretrained": "none",
    "img_size": 28,
    "depth": 2,
    "split_at": 1,
    "fusion": "dual",
    "channel_heads": 4,
    "fusion_heads": 2,
}


def _tiny_variant(**overrides: Any) -> dict[str, Any]:
    cfg = dict(TINY_VARIANT)
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_variant() -> Callable[..., dict[str, Any]]:
    """``tiny_variant(**overrides)``: a mapping for a tiny ``eva_fusion`` variant."""
    return _tiny_variant


@pytest.fixture
def tiny_params() -> Callable[..., Any]:
    """``tiny_params(root, **sections)``: the project's ``params.yaml`` with ``sections``
    replaced (e.g. ``variants={...}``, ``runs={...}``), parsed and rooted at ``root``."""
    import yaml

    from speedstructure.config import parse_params

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())

    def make(root: Path, **sections: Any):
        raw = {**shipped, **sections}
        return parse_params(raw, root=Path(root))

    return make


@pytest.fixture
def isolated_mlflow(monkeypatch):
    """Restore MLflow's process-wide state after a test that points it at its own store."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    yield
    while mlflow.active_run() is not None:  # never leak a run into the next test
        mlflow.end_run()


def trend_checkpoint(path: Path, velocity: float) -> Path:
    """A ``best.pt`` of the depth-trend baseline that predicts ``velocity`` everywhere."""
    import torch

    from speedstructure.model import build_model

    m = build_model({"arch": "depth_trend"})
    m.fit([np.full(VSHAPE, velocity, np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "variant": {"arch": "depth_trend"}}, path)
    return path


# ---- small physics cases (tests/test_qc.py, tests/test_refine.py: `from conftest import ...`)
# a 10 m grid and 0.3 s of record: deepwave runs them in about a second
SMALL_SIM_SETTINGS = {"dx": 10.0, "dt": 0.0005, "n_time": 3001}
SMALL_PREP = {"mute_after": 0.05, "taper": 0.02, "lowpass_hz": 20.0, "agc_window": 0.1}


def layered_model(nz: int = 200, floor: int = 60) -> np.ndarray:
    """Water to ``floor`` m, then a gradient with a faster layer: ``(300, nz)`` km/s."""
    v = np.full((300, nz), 1.5, np.float32)
    z = np.arange(nz - floor, dtype=np.float32)
    v[:, floor:] = 1.9 + 0.004 * z
    v[:, floor + 60 : floor + 80] += 0.4
    return v


@pytest.fixture(scope="module")
def one_torch_thread():
    """deepwave on small grids: one torch thread (more only contend for the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
