"""Plain helpers the tests share (``from support import ...``; ``tests/`` is on the path by
``pythonpath`` in pyproject.toml).  Fixtures live in ``conftest.py``, which builds on these.

* ``ROOT``, ``SHIPPED_PARAMS``: the checkout and its ``params.yaml``;
* ``sample_id(split, i)``, ``random_gathers(rng)``, ``random_velocity(rng, *batch)``: samples in
  the challenge's layout with random arrays (no simulation);
* ``TINY_VARIANT``: a two-block EVA02-tiny variant mapping (28 px, 2 x 2 tokens);
* ``model_from(raw, **kw)``: :func:`build_model` of a variant mapping, parsed first (as the
  pipeline parses a ``variants:`` entry or a checkpoint record);
* ``trend_checkpoint(path, velocity)``: a depth-trend member checkpoint predicting ``velocity``;
* ``WATER``: the water velocity of the shipped ``params.yaml`` (``synth.water_velocity``);
* ``SMALL_SIM_SETTINGS``, ``SMALL_PREP``, ``layered_model()``: small physics cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PARAMS = ROOT / "params.yaml"

GSHAPE = (5, 10001, 31)
VSHAPE = (300, 1259)
COUNTS = {"train": 3, "train_extended_1": 2, "train_extended_2": 2, "test": 2}
PREFIX = {"train": "TR", "train_extended_1": "EA", "train_extended_2": "EB", "test": "TE"}
TINY_BACKBONE = "eva02_tiny_patch14_224.mim_in22k"


def sample_id(split: str, i: int) -> str:
    """An 18-character id that names its split: ``TR0000000000000003``."""
    return f"{PREFIX[split]}{i:016d}"


def random_gathers(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 1e-3, GSHAPE).astype(np.float32)


def random_velocity(rng: np.random.Generator, *batch: int) -> np.ndarray:
    """A random velocity model in the challenge's range, float32 ``(*batch, 300, 1259)``."""
    return rng.uniform(1.5, 4.5, (*batch, *VSHAPE)).astype(np.float32)


# a two-block EVA02-tiny on 28 px images (2 x 2 tokens per source)
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


def model_from(raw: Any, **kw):
    """The model of a variant mapping (or a typed variant), parsed as the pipeline parses it."""
    from speedstructure.config.load import parse_variant
    from speedstructure.models.build import build_model

    return build_model(parse_variant(raw), **kw)


def _shipped_water() -> float:
    import yaml

    return float(yaml.safe_load(SHIPPED_PARAMS.read_text())["synth"]["water_velocity"])


WATER = _shipped_water()


def trend_checkpoint(path: Path, velocity: float) -> Path:
    """A ``best.pt`` of the depth-trend baseline that predicts ``velocity`` everywhere."""
    import torch

    m = model_from({"arch": "depth_trend"})
    m.fit([np.full(VSHAPE, velocity, np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "variant": {"arch": "depth_trend"}}, path)
    return path


# ---- small physics cases (tests/physics): a 10 m grid and 0.3 s of record, deepwave runs
# them in about a second
SMALL_SIM_SETTINGS = {"dx": 10.0, "dt": 0.0005, "n_time": 3001}
SMALL_PREP = {"mute_after": 0.05, "taper": 0.02, "lowpass_hz": 20.0, "agc_window": 0.1}


def layered_model(nz: int = 200, floor: int = 60) -> np.ndarray:
    """Water to ``floor`` m, then a gradient with a faster layer: ``(300, nz)`` km/s."""
    v = np.full((300, nz), 1.5, np.float32)
    z = np.arange(nz - floor, dtype=np.float32)
    v[:, floor:] = 1.9 + 0.004 * z
    v[:, floor + 60 : floor + 80] += 0.4
    return v


def model_with_floor(floor: np.ndarray, below: float = 2.0) -> np.ndarray:
    """Water over ``floor`` (metres per column), ``below`` km/s under it rising with depth."""
    z = np.arange(1259)[None, :]
    v = below + 1.5e-3 * np.clip(z - floor[:, None], 0, None)
    return np.where(z < floor[:, None], WATER, v).astype(np.float32)
