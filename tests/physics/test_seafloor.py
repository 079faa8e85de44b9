"""The water floor picked from the gathers (speedstructure.physics.seafloor) and imposed on
predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speedstructure.config.schema import SimParams
from speedstructure.errors import UserError
from speedstructure.metrics import water_floor_depth
from speedstructure.physics.seafloor import (
    DEFAULT_METHOD,
    METHODS,
    FloorPicker,
    impose_floor,
    pick_floor,
    read_seafloor,
    record_delay,
    seafloor_velocity,
    water_response,
)
from support import WATER, model_from, model_with_floor

X = np.arange(300)


@pytest.mark.parametrize("method", METHODS)
def test_the_picked_floor_matches_a_curved_floor_within_a_few_metres(curved_floor, method):
    floor, _, gathers = curved_floor
    picked = pick_floor(gathers, SimParams(), WATER, method)
    assert np.isfinite(picked).all()
    assert np.abs(picked - floor).mean() < 4.0
    assert np.abs(picked - floor).max() < 10.0


@pytest.mark.parametrize("method", METHODS)
def test_mirrored_gathers_give_the_mirrored_floor(curved_floor, method):
    """Gathers flipped consistently (receivers and source order reversed, as training's flip
    augmentation and flip test-time augmentation do) are recognised: the pick is mirrored."""
    from speedstructure.data.flips import flip_inputs

    _, _, gathers = curved_floor
    picked = pick_floor(gathers, SimParams(), WATER, method)
    mirrored = pick_floor(flip_inputs(gathers, "consistent"), SimParams(), WATER, method)
    assert np.isfinite(mirrored).all()
    assert np.abs(mirrored[::-1] - picked).max() < 2.0


@pytest.mark.parametrize("method", METHODS)
def test_a_water_only_record_gives_no_pick(method):
    direct, delay = water_response(SimParams(), WATER)
    assert 0.05 < delay < 0.1  # the 15 Hz Ricker peaks about 1/f after its start
    assert np.isnan(pick_floor(direct, SimParams(), WATER, method)).all()


def test_the_record_delay_is_the_simulated_one_and_follows_a_shifted_record():
    direct, delay = water_response(SimParams(), WATER)
    assert record_delay(direct, 1e-4, WATER) == pytest.approx(delay, abs=2e-4)
    later = np.concatenate([np.zeros_like(direct[:, :5]), direct[:, :-5]], axis=1)
    assert record_delay(later, 1e-4, WATER) == pytest.approx(
        record_delay(direct, 1e-4, WATER) + 5e-4
    )


def test_the_record_pick_holds_where_the_record_and_the_simulator_differ(curved_floor):
    """Gathers 10 % weaker and 0.5 ms later than the project's simulator makes them (another
    simulator's calibration): the record method times the direct wave on the record itself
    and keeps the floor; subtracting the simulated direct wave leaves it in the residual."""
    floor, _, gathers = curved_floor
    other = 0.9 * np.concatenate([np.zeros_like(gathers[:, :5]), gathers[:, :-5]], axis=1)
    picked = pick_floor(other, SimParams(), WATER, "record")
    assert np.isfinite(picked).all()
    assert np.abs(picked - floor).mean() < 4.0
    subtracted = pick_floor(other, SimParams(), WATER, "simulated")
    assert not (np.abs(subtracted - floor) < 10.0).all()


def test_an_unknown_method_is_refused(curved_floor):
    with pytest.raises(ValueError, match="expected one of"):
        pick_floor(curved_floor[2], SimParams(), WATER, "guess")
    with pytest.raises(ValueError, match="expected one of"):
        FloorPicker(SimParams(), WATER, "guess")


def test_the_picker_records_its_method_and_older_records_pick_with_the_default():
    picker = FloorPicker(SimParams(), WATER, "simulated")
    assert FloorPicker.from_record(picker.record(), "ck") == picker
    older = {k: v for k, v in picker.record().items() if k != "method"}
    assert FloorPicker.from_record(older, "ck").method == DEFAULT_METHOD == "record"
    with pytest.raises(UserError, match="floor_picker.method"):
        FloorPicker.from_record({**older, "method": "guess"}, "ck")


def test_impose_floor_moves_each_column_and_keeps_the_structure_below():
    pred = model_with_floor(np.full(300, 200))
    target = np.where(X < 150, 230.0, np.nan)  # NaN: the column is kept
    out = impose_floor(pred, target, WATER)
    depth = water_floor_depth(out, WATER)
    assert (depth[:150] == 230).all() and (depth[150:] == 200).all()
    np.testing.assert_array_equal(out[0, 230:1000], pred[0, 200:970])  # shifted, not rescaled
    assert (out[:150, :230] == 1.5).all()
    np.testing.assert_array_equal(out[150:], pred[150:])


def test_a_variant_with_a_picked_floor_predicts_it(curved_floor):
    floor, _, gathers = curved_floor
    raw = {"arch": "depth_trend", "floor": "picked"}
    model = model_from(raw, floor_picker=FloorPicker(SimParams(), WATER))
    model.fit([model_with_floor(np.full(300, 150), below=2.5)])
    x = torch.from_numpy(gathers[None])
    learned = model_from({"arch": "depth_trend"})
    learned.fit([model_with_floor(np.full(300, 150), below=2.5)])
    assert np.abs(water_floor_depth(learned.predict(x)[0].numpy(), WATER) - floor).mean() > 50
    depth = water_floor_depth(model.predict(x)[0].numpy(), WATER)
    assert np.abs(depth - floor).mean() < 4.0


@pytest.fixture(scope="module")
def two_floors():
    """Flat floors at 200 m over 1.8 and 3.0 km/s sediments: ``{velocity: gathers}``."""
    from speedstructure.physics.simulate import Simulator

    simulate = Simulator(SimParams())
    return {v: simulate(model_with_floor(np.full(300, 200), v)) for v in (1.8, 3.0)}


@pytest.mark.parametrize("method", METHODS)
def test_the_velocity_under_the_floor_is_read_from_the_reflection_strength(two_floors, method):
    """Read from the sea-floor reflection's peak over the direct wave's (2-D spreading), it
    is within 2 % of the sediment's velocity, slow or fast (the first cells rise 1.5 m/s per
    metre), and the faster floor reads faster."""
    read = {v: seafloor_velocity(g, SimParams(), WATER, method) for v, g in two_floors.items()}
    for v, r in read.items():
        assert r == pytest.approx(v, rel=0.02)
    assert read[3.0] > read[1.8] + 1.0


def test_the_velocity_read_holds_under_a_curved_floor_and_the_mirror_image(curved_floor):
    from speedstructure.data.flips import flip_inputs

    _, _, gathers = curved_floor
    read = seafloor_velocity(gathers, SimParams(), WATER)
    # model_with_floor's 2.0 km/s under the floor; 20 m of relief bends the reflection's
    # wavefront, so its strength (1.94 measured) is no longer the flat floor's
    assert read == pytest.approx(2.0, rel=0.05)
    mirrored = seafloor_velocity(flip_inputs(gathers, "consistent"), SimParams(), WATER)
    assert mirrored == pytest.approx(read, rel=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_one_pass_reads_the_floor_and_the_velocity_as_the_two_functions_do(curved_floor, method):
    gathers = curved_floor[2]
    floor, velocity = read_seafloor(gathers, SimParams(), WATER, method)
    np.testing.assert_array_equal(floor, pick_floor(gathers, SimParams(), WATER, method))
    assert velocity == seafloor_velocity(gathers, SimParams(), WATER, method)


def test_a_water_only_record_has_no_velocity_to_read():
    direct, _ = water_response(SimParams(), WATER)
    assert np.isnan(seafloor_velocity(direct, SimParams(), WATER))
