"""The water floor picked from the gathers (seafloor.py) and imposed on predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speedstructure import seafloor
from speedstructure.config import parse_variant
from speedstructure.metrics import water_floor_depth
from speedstructure.model import build_model
from speedstructure.synth.simulate import Simulator

X = np.arange(300)


def _model_with_floor(floor: np.ndarray, below: float = 2.0) -> np.ndarray:
    """Water over ``floor`` (metres per column), ``below`` km/s under it rising with depth."""
    z = np.arange(1259)[None, :]
    v = below + 1.5e-3 * np.clip(z - floor[:, None], 0, None)
    return np.where(z < floor[:, None], 1.5, v).astype(np.float32)


@pytest.fixture(scope="module")
def curved():
    floor = np.round(250 + 20 * np.sin(X / 300 * np.pi)).astype(int)
    v = _model_with_floor(floor)
    return floor, v, Simulator()(v)


def test_the_picked_floor_matches_a_curved_floor_within_a_few_metres(curved):
    floor, _, gathers = curved
    picked = seafloor.pick_floor(gathers)
    assert np.isfinite(picked).all()
    assert np.abs(picked - floor).mean() < 4.0
    assert np.abs(picked - floor).max() < 10.0


def test_a_water_only_record_gives_no_pick():
    direct, delay = seafloor.water_response()
    assert 0.05 < delay < 0.1  # the 15 Hz Ricker peaks about 1/f after its start
    assert np.isnan(seafloor.pick_floor(direct)).all()


def test_impose_floor_moves_each_column_and_keeps_the_structure_below():
    pred = _model_with_floor(np.full(300, 200))
    target = np.where(X < 150, 230.0, np.nan)  # NaN: the column is kept
    out = seafloor.impose_floor(pred, target)
    depth = water_floor_depth(out)
    assert (depth[:150] == 230).all() and (depth[150:] == 200).all()
    np.testing.assert_array_equal(out[0, 230:1000], pred[0, 200:970])  # shifted, not rescaled
    assert (out[:150, :230] == 1.5).all()
    np.testing.assert_array_equal(out[150:], pred[150:])


def test_a_variant_with_a_picked_floor_predicts_it(curved):
    floor, _, gathers = curved
    raw = {"arch": "depth_trend", "floor": "picked"}
    model = build_model(parse_variant(raw))
    model.fit([_model_with_floor(np.full(300, 150), below=2.5)])
    x = torch.from_numpy(gathers[None])
    learned = build_model(parse_variant({"arch": "depth_trend"}))
    learned.fit([_model_with_floor(np.full(300, 150), below=2.5)])
    assert np.abs(water_floor_depth(learned.predict(x)[0].numpy()) - floor).mean() > 50
    depth = water_floor_depth(model.predict(x)[0].numpy())
    assert np.abs(depth - floor).mean() < 4.0
