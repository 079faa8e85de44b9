"""The column network (``arch: column``, speedstructure.models.column): its binning, its
floor-relative output, its inputs picked and prepared per sample, its configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speedstructure.config.schema import SimParams
from speedstructure.config.typed import ConfigError
from speedstructure.data.flips import flip_inputs, flip_target
from speedstructure.metrics import water_floor_depth
from speedstructure.models.column import (
    LEVEL_CENTRE,
    LEVEL_FEATURES,
    binning,
    depth_to_floor_relative,
    fill_floor,
    floor_relative_to_depth,
)
from speedstructure.physics.seafloor import FloorPicker, pick_floor, seafloor_velocity
from support import WATER, model_from, model_with_floor, random_gathers, random_velocity

SMALL = {
    "arch": "column",
    "width": 8,
    "hidden": 16,
    "knots": 16,
    "time_samples": 64,
    "midpoint_bins": 10,
}
PICKER = FloorPicker(SimParams(), WATER)


def _curved_model() -> tuple[np.ndarray, np.ndarray]:
    floor = np.round(240 + 25 * np.sin(np.arange(300) / 300 * np.pi)).astype(int)
    return floor, model_with_floor(floor)


def test_every_trace_lands_in_one_cell_and_cells_average():
    w, mask = binning((0.0, 50.0, 100.0, 175.0, 301.0), 30)
    assert w.shape == (155, 4 * 30) and mask.shape == (4, 30)
    assert ((w > 0).sum(axis=1) == 1).all()  # one cell per trace
    used = w.sum(axis=0) > 0
    np.testing.assert_allclose(w.sum(axis=0)[used], 1.0, rtol=1e-6)  # a mean over its traces
    np.testing.assert_array_equal(used.reshape(4, 30), mask)
    assert mask.any(axis=0).all()  # every 10 m midpoint bin holds traces


def test_floor_relative_columns_round_trip_below_the_floor():
    floor, v = _curved_model()
    knots = 1259
    rel = depth_to_floor_relative(v, floor.astype(float), knots)
    back = floor_relative_to_depth(
        torch.from_numpy(rel)[None], torch.from_numpy(floor)[None].double(), WATER
    )[0].numpy()
    np.testing.assert_array_equal(water_floor_depth(back, WATER), floor)
    assert (back[np.arange(1259)[None, :] < floor[:, None]] == WATER).all()
    np.testing.assert_allclose(back, v, atol=2e-3)


def test_fill_floor_interpolates_gaps_and_falls_back():
    f = np.full(300, np.nan)
    f[[10, 20]] = [100.0, 200.0]
    filled = fill_floor(f, 250.0)
    assert filled[15] == 150.0 and filled[0] == 100.0 and filled[299] == 200.0
    assert (fill_floor(np.full(300, np.nan), 250.0) == 250.0).all()


def test_relative_floor_belongs_to_the_column_network_only():
    with pytest.raises(ConfigError, match="relative"):
        model_from({"arch": "depth_trend", "floor": "relative"})
    with pytest.raises(ConfigError, match="relative"):
        model_from({**SMALL, "floor": "picked"})


def test_the_column_network_needs_the_physics_of_the_data():
    model = model_from(SMALL)
    with pytest.raises(ValueError, match="floor_picker"):
        model.prepare(torch.from_numpy(random_gathers(np.random.default_rng(0)))[None])


def test_prepare_is_per_sample_and_carries_the_picked_floor(curved_floor):
    floor, v, gathers = curved_floor
    model = model_from(SMALL, floor_picker=PICKER)
    other = random_gathers(np.random.default_rng(1)) + gathers
    x = torch.from_numpy(np.stack([gathers, other]).astype(np.float32))
    both = model.prepare(x)
    assert both.shape == (2, model.prepared_numel)
    torch.testing.assert_close(both[:1], model.prepare(x[:1]), rtol=0, atol=0)
    picked = pick_floor(gathers, PICKER.sim, PICKER.water_velocity)
    np.testing.assert_allclose(both[0, -300:].numpy(), picked, rtol=1e-6)
    assert np.abs(picked - floor).mean() < 4.0
    mirrored = model.prepare(flip_inputs(x[:1], "consistent"))[0, -300:].numpy()
    assert np.abs(mirrored[::-1] - picked).max() < 2.0  # the flipped sample's floor, mirrored


def test_the_velocity_read_under_the_floor_is_prepared_after_the_floor(curved_floor):
    _, _, gathers = curved_floor
    plain = model_from(SMALL, floor_picker=PICKER)
    model = model_from({**SMALL, "seafloor_velocity": True}, floor_picker=PICKER)
    assert model.prepared_numel == plain.prepared_numel + 1
    assert not hasattr(plain, "level")  # a variant without the key: the network as before
    x = torch.from_numpy(gathers.astype(np.float32))[None]
    p = model.prepare(x)
    torch.testing.assert_close(p[:, :-1], plain.prepare(x), rtol=0, atol=0)
    read = seafloor_velocity(gathers, PICKER.sim, WATER)
    assert float(p[0, -1]) == pytest.approx(read, rel=1e-6)


def test_water_only_gathers_read_the_centre_velocity_with_a_warning(caplog):
    from speedstructure.physics.seafloor import water_response

    model = model_from({**SMALL, "seafloor_velocity": True}, floor_picker=PICKER)
    direct, _ = water_response(PICKER.sim, WATER)
    p = model.prepare(torch.from_numpy(direct.astype(np.float32))[None])
    assert float(p[0, -1]) == pytest.approx(LEVEL_CENTRE)
    assert "no sea-floor reflection to read a velocity from" in caplog.text


def test_the_read_velocity_moves_every_knot_along_its_learned_path(curved_floor):
    """The linear path starts at zero (the network as without it); with positive weights a
    faster read velocity gives a faster column everywhere below the floor, water unchanged."""
    floor, v, gathers = curved_floor
    model = model_from({**SMALL, "seafloor_velocity": True}, floor_picker=PICKER)
    model.fit_prior([v])
    assert float(model.level.weight.abs().sum()) == 0.0
    p = model.prepare(torch.from_numpy(gathers.astype(np.float32))[None])
    model.mix[0].weight.data[:, -1] = 0.0  # the channel alone would move it too
    with torch.no_grad():
        slow, fast = p.clone(), p.clone()
        slow[0, -1], fast[0, -1] = 2.0, 3.0
        torch.testing.assert_close(model(slow, prepared=True), model(fast, prepared=True))
        model.level.weight.fill_(0.5)
        a, b = model(slow, prepared=True)[0].numpy(), model(fast, prepared=True)[0].numpy()
    below = np.arange(1259)[None, :] >= np.ceil(p[0, -301:-1].numpy())[:, None]
    assert (b[below] > a[below]).all()
    np.testing.assert_array_equal(a[~below], b[~below])
    assert (a[~below] == WATER).all()


def test_a_checkpoint_that_reads_the_velocity_loads_and_predicts_the_same(curved_floor, tmp_path):
    """Saved as training saves it (the variant's record, the picker in ``meta``) and loaded
    as the ensemble loads its members: the linear path and the level read's map come back, and
    so does the prediction."""
    from speedstructure.ensemble.members import load_member

    floor, v, gathers = curved_floor
    record = {**SMALL, "seafloor_velocity": True, "level_read": True}
    torch.manual_seed(3)
    model = model_from(record, floor_picker=PICKER)
    model.fit_prior([v])
    model.fit_level_reader(_levels_of(curved_floor))
    with torch.no_grad():
        model.level.weight.normal_()
        model.head.weight.normal_(std=0.01)
    path = tmp_path / "best.pt"
    meta = {"floor_picker": PICKER.record()}
    torch.save(
        {"model": model.state_dict(), "variant": model.variant.model_dict(), "meta": meta}, path
    )
    loaded = load_member(path)
    assert loaded.reads_level and loaded.reads_trend and bool(loaded.level_fitted)
    x = torch.from_numpy(gathers.astype(np.float32))[None]
    torch.testing.assert_close(loaded.predict(x), model.predict(x), rtol=0, atol=0)


def test_an_untrained_network_predicts_its_prior_below_the_picked_floor(curved_floor):
    floor, v, gathers = curved_floor
    model = model_from(SMALL, floor_picker=PICKER)
    rng = np.random.default_rng(2)
    targets = [v, np.clip(random_velocity(rng), 1.6, None)]
    targets[1][:, :200] = WATER  # a second target with a flat floor at 200 m
    model.fit_prior(targets)
    assert float(model.floor_default) == pytest.approx((floor.mean() + 200.0) / 2, rel=1e-6)
    x = torch.from_numpy(gathers.astype(np.float32))[None]
    pred = model.predict(x, tta=False)[0].numpy()
    picked = fill_floor(pick_floor(gathers, PICKER.sim, WATER), 0.0)
    np.testing.assert_array_equal(water_floor_depth(pred, WATER), np.ceil(picked - 1e-9))
    assert pred.min() >= 1.5 and pred.max() <= 4.5
    with_tta = model.predict(x, tta=True)[0].numpy()  # the flipped pass picks the mirror image
    depth_difference = water_floor_depth(with_tta, WATER) - water_floor_depth(pred, WATER)
    assert np.abs(depth_difference).max() <= 1
    # the head starts at zero: each column is the prior, the same at every x
    below = [pred[x, int(np.ceil(picked[x])) + 1] for x in range(300)]
    np.testing.assert_allclose(below, below[0], rtol=1e-3)


def test_the_loss_trains_the_column_network_towards_a_lateral_change(curved_floor):
    """Two steps of AdamW on one flipped and one plain sample lower the loss: gradients flow
    through the floor-relative placement."""
    _, v, gathers = curved_floor
    torch.manual_seed(0)
    model = model_from(SMALL, floor_picker=PICKER)
    model.fit_prior([v])
    x = torch.from_numpy(np.stack([gathers, flip_inputs(gathers, "consistent")]).astype(np.float32))
    y = torch.from_numpy(np.stack([v, flip_target(v)]) * 1.1)
    prepared = model.prepare(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = ((model(prepared, prepared=True) - y).abs() / y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_under_bf16_autocast_the_velocities_and_depths_stay_float32(curved_floor):
    """``amp: auto`` trains the column network in bf16 on CPUs with native bf16: the encoder
    runs in bf16 but the columns are placed in float32 (bf16 holds depths above 256 m only to
    2-8 m), so the water floor lands exactly where it does without autocast."""
    floor, v, gathers = curved_floor
    torch.manual_seed(0)
    model = model_from({**SMALL, "seafloor_velocity": True}, floor_picker=PICKER)
    model.fit_prior([v])
    torch.nn.init.normal_(model.head.weight, std=0.01)
    p = model.prepare(torch.from_numpy(gathers.astype(np.float32))[None])
    with torch.no_grad():
        plain = model(p, prepared=True)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(p, prepared=True)[0]
    assert mixed.dtype == torch.float32
    np.testing.assert_array_equal(
        water_floor_depth(mixed.numpy(), WATER), water_floor_depth(plain.numpy(), WATER)
    )
    torch.testing.assert_close(mixed, plain, rtol=0.02, atol=0.0)


class _Samples(torch.utils.data.Dataset):
    """Gathers and targets in memory, as the training engine's datasets give them."""

    def __init__(self, gathers: list[np.ndarray], targets: list[np.ndarray]):
        self.gathers, self.targets = gathers, targets

    def __len__(self) -> int:
        return len(self.gathers)

    def target(self, i: int) -> np.ndarray:
        return self.targets[i]

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.gathers[i].astype(np.float32))
        return x, torch.from_numpy(self.targets[i]), i


def _levels_of(curved_floor) -> _Samples:
    """Four samples whose reflections are 0.5-2x the curved floor's and whose sediments are
    correspondingly faster, below 600 m twice as much: levels the read can follow, band by
    band."""
    from speedstructure.physics.seafloor import oriented_direct_wave, water_response

    floor, v, gathers = curved_floor
    g = gathers.astype(np.float64)
    direct = oriented_direct_wave(g, water_response(PICKER.sim, WATER)[0], PICKER.sim.record_dt)
    scales = (0.5, 1.0, 1.5, 2.0)
    z = np.arange(1259)[None, :]
    below, deep = z >= floor[:, None], z >= 600
    targets = [
        np.where(below, v * np.where(deep, 0.8 + 0.2 * c, 0.9 + 0.1 * c), v).astype(np.float32)
        for c in scales
    ]
    return _Samples([direct + c * (g - direct) for c in scales], targets)


def _level(pred: np.ndarray, floor: np.ndarray) -> float:
    return float(pred[np.arange(1259)[None, :] >= floor[:, None]].mean())


def test_the_level_read_is_fitted_on_the_training_set_and_blended_in_at_eval(curved_floor):
    """``level_read``: the ridge maps are fitted on the training set (the same from the raw
    samples as from the engine's prepared cache), one a depth band; training mode predicts as
    without them; in eval mode each band's level below the picked floor moves to
    ``level_blend`` of its read."""
    from speedstructure.engine.data import PreparedInputs

    samples = _levels_of(curved_floor)
    torch.manual_seed(0)
    plain = model_from({**SMALL, "seafloor_velocity": True}, floor_picker=PICKER)
    record = {**SMALL, "seafloor_velocity": True, "level_read": True, "level_blend": 1.0}
    model = model_from(record, floor_picker=PICKER)
    assert model.prepared_numel == plain.prepared_numel + LEVEL_FEATURES
    for m in (plain, model):
        m.load_state_dict(plain.state_dict(), strict=False)
        m.fit_prior(samples.targets)
    model.fit_level_reader(samples)
    cached = model_from(record, floor_picker=PICKER)
    cached.fit_prior(samples.targets)
    cached.fit_level_reader(PreparedInputs(samples, cached.prepare))
    for key in ("level_mean", "level_scale", "level_coef", "level_intercept"):
        torch.testing.assert_close(getattr(cached, key), getattr(model, key), rtol=1e-6, atol=1e-9)

    x = samples[3][0][None]
    p = model.prepare(x)
    floor = p[0, model._n_image : model._n_image + 300].numpy()
    model.train(), plain.train()
    with torch.no_grad():
        torch.testing.assert_close(model(p, prepared=True), plain(plain.prepare(x), prepared=True))
    model.eval()
    with torch.no_grad():
        read = model._band_levels(model(p, prepared=True)[0].numpy(), floor)
    truth = model._band_levels(samples.targets[3], floor)
    assert model.level_edges == (0.0, 300.0, 600.0, 900.0, 1259.0) and len(read) == 4
    assert bool(model.level_band_fitted.all())
    np.testing.assert_allclose(read, truth, rtol=0.03)  # each band follows its four levels
    own = model._band_levels(plain.predict(x, tta=False)[0].numpy(), floor)
    assert (np.abs(own - truth)[2:] > 0.2).all()  # the deep bands: far from them without


def test_a_level_blend_outside_zero_to_one_and_bands_that_do_not_rise_are_refused():
    with pytest.raises(ConfigError, match="level_blend"):
        model_from({**SMALL, "level_read": True, "level_blend": 1.5}, floor_picker=PICKER)
    for bands in ([600, 300], [300, 300], [0, 600], [300, 1300]):
        with pytest.raises(ConfigError, match="level_bands"):
            model_from({**SMALL, "level_read": True, "level_bands": bands}, floor_picker=PICKER)
    one = model_from({**SMALL, "level_read": True, "level_bands": []}, floor_picker=PICKER)
    assert one.level_edges == (0.0, 1259.0) and one.level_coef.shape == (1, LEVEL_FEATURES)
