"""Shared fixtures: an offline environment for every test, tiny challenge zips, tiny variants.

Every test runs offline and never writes to the project's own MLflow store.  The
fixtures build data in the challenge's layout with random arrays (no simulation); the plain
helpers they use (sample ids, random arrays, ``TINY_VARIANT``, ``trend_checkpoint``, small
physics cases) are in ``support.py``, which tests import as ``from support import ...``.

* ``write_zips(folder, counts=..., seed=...)``: the four challenge zips, ids prefixed by split;
* ``tiny_zips``: those zips once per session (3 + 2 + 2 training samples, 2 test samples);
* ``tiny_variant(**overrides)``: a two-block EVA02-tiny variant mapping (28 px, 2 x 2 tokens);
* ``tiny_params(root, **sections)``: a :class:`~speedstructure.config.schema.Params` rooted at
  ``root``;
* ``isolated_mlflow``: MLflow's process-wide tracking URI, registry URI and active experiment
  restored after the test, and no run left active;
* ``one_torch_thread``: one torch thread for a module (deepwave on small grids).

Tests marked ``gpu`` need a CUDA device: they are skipped where torch sees none.

The test files sit in ``tests/<layer>/`` as the package's modules do in
``src/speedstructure/<layer>/`` (cross-cutting ones in ``tests/``).  The folders have no
``__init__.py``: pytest imports each file by its name alone, so every ``test_*.py`` name must
be unique across the folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import (
    COUNTS,
    SHIPPED_PARAMS,
    TINY_VARIANT,
    random_gathers,
    random_velocity,
    sample_id,
)

# The longest modules (the pipeline end to end, a Ray cluster), started first so that the
# workers of ``pytest -n`` (``make test``, files kept whole by ``--dist loadfile``) end together
LONGEST_FIRST = ("test_pipeline.py", "test_ray_cluster.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first; the tests marked ``gpu`` skipped when torch sees no CUDA."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: order kept
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); torch sees none")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("SPEEDSTRUCTURE_ROOT", raising=False)


def _write_zips(
    folder: Path, counts: dict[str, int] | None = None, seed: int = 0
) -> dict[str, Path]:
    from speedstructure.config.schema import SPLITS
    from speedstructure.data.samples import ZipWriter

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

    from speedstructure.config.load import parse_params

    shipped = yaml.safe_load(SHIPPED_PARAMS.read_text())

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


@pytest.fixture(scope="session")
def curved_floor():
    """A gently curved water floor (230-250 m) over a linear rise: ``(floor, velocity,
    gathers)``, simulated once per session with the default simulator settings."""
    from speedstructure.config.schema import SimParams
    from speedstructure.physics.simulate import Simulator
    from support import model_with_floor

    floor = np.round(250 + 20 * np.sin(np.arange(300) / 300 * np.pi)).astype(int)
    v = model_with_floor(floor)
    return floor, v, Simulator(SimParams())(v)


@pytest.fixture(scope="module")
def one_torch_thread():
    """deepwave on small grids: one torch thread (more only contend for the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
