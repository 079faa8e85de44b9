"""The synthetic dataset generator (speedstructure.synth.dataset): layout, determinism, digest,
the out-of-distribution test set."""

import dataclasses
import json

import numpy as np

from speedstructure.config.load import load_params
from speedstructure.config.schema import SPLITS, SimParams, SynthConfig, SynthOodConfig
from speedstructure.data.samples import ZipSamples
from speedstructure.metrics import water_floor_depth
from speedstructure.synth.dataset import (
    config_digest,
    format_summary,
    generate,
    make_sample_ids,
    ood_config,
    up_to_date,
)
from support import ROOT, WATER

CFG = SynthConfig(
    seed=5,
    n_train=2,
    n_extended_1=1,
    n_extended_2=1,
    n_test=1,
    workers=2,
    water_depth=(100, 150),
    sim=SimParams(dx=10.0, dt=0.001),
    ood=SynthOodConfig(n_test=2, seed=11, water_depth=(300, 350)),  # floors apart from the rest
)
# config_digest of the shipped params.yaml's synth section (data/synth_meta.json records it;
# while it matches, `speedstructure synth` regenerates nothing).  Changed deliberately by
# issue 10: the priors (v_top, v_bottom, trend_power, water_depth) became broader synth keys
# and the out-of-distribution set (synth.ood) was added, so existing data is regenerated;
# again by issue 20: the test and out-of-distribution sets grew from 24 to 48 samples each,
# then the absorbing layer went from 40 to 20 cells (synth.sim.pml_width; 1.6x faster).
SHIPPED_DIGEST = "a710150bb3466093"


def test_generate_layout_and_determinism(tmp_path):
    s1 = generate(CFG, tmp_path / "a", progress=False)
    generate(dataclasses.replace(CFG, workers=1), tmp_path / "b", progress=False)
    zips = [*SPLITS, "test_ood"]
    truths = [f"{s}_truth.npz" for s in zips]  # the generator's facts beside every zip
    for name in (*[f"{s}.zip" for s in zips], *truths, "synth_meta.json"):
        # every file byte-identical (no timings in the metadata): data.dvc matches everywhere
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert s1["seconds"] >= 0 and "seconds" not in (tmp_path / "a" / "synth_meta.json").read_text()
    ids = []
    for name in ("train", "train_extended_1", "train_extended_2"):
        with ZipSamples(tmp_path / "a" / f"{name}.zip") as z:
            assert z.has_targets
            ids += z.sample_ids
            x, y = z.read(z.sample_ids[0])
            assert x.shape == (5, 10001, 31) and y.shape == (300, 1259)
    with ZipSamples(tmp_path / "a" / "test.zip") as z:
        assert not z.has_targets
        ids += z.sample_ids
        labels = np.load(tmp_path / "a" / "test_labels.npz")
        assert sorted(labels.files) == z.sample_ids
    with ZipSamples(tmp_path / "a" / "test_ood.zip") as z:  # gathers only, targets beside it
        assert not z.has_targets and len(z.sample_ids) == 2
        ids += z.sample_ids
        x = z.read_gathers(z.sample_ids[0])
        assert x.shape == (5, 10001, 31) and np.isfinite(x).all()
        ood_labels = np.load(tmp_path / "a" / "test_ood_labels.npz")
        assert sorted(ood_labels.files) == z.sample_ids
    assert len(set(ids)) == 7  # unique across all five zips
    # each set drawn from its own priors: the floors lie in their own water_depth range
    floors = water_floor_depth(np.stack([labels[k] for k in labels.files]), WATER)
    ood_floors = water_floor_depth(np.stack([ood_labels[k] for k in ood_labels.files]), WATER)
    assert floors.min() >= 100 and floors.max() <= 150
    assert ood_floors.min() >= 300 and ood_floors.max() <= 350
    assert s1["ood"]["samples"] == 2 and s1["ood"]["seed"] == 11
    assert s1["ood"]["priors"]["water_depth"] == [300, 350]
    assert "test_ood.zip" in format_summary(s1, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "synth_meta.json").read_text())["digest"] == s1["digest"]
    assert up_to_date(CFG, tmp_path / "a") and up_to_date(CFG, tmp_path / "b")
    assert not up_to_date(dataclasses.replace(CFG, seed=6), tmp_path / "a")
    shifted = dataclasses.replace(CFG.ood, v_top=(2.0, 2.1))
    assert not up_to_date(dataclasses.replace(CFG, ood=shifted), tmp_path / "a")
    (tmp_path / "a" / "test_ood_labels.npz").unlink()
    assert not up_to_date(CFG, tmp_path / "a")  # the OOD set belongs to the outputs
    assert [p.name for p in (tmp_path / "a").iterdir() if ".tmp" in p.name] == []


def test_sample_ids_unique():
    ids = make_sample_ids(1, 2000)
    assert len(set(ids)) == 2000 and all(len(i) == 18 and i.isalnum() for i in ids)
    again = make_sample_ids(1, 10, exclude=frozenset(ids[:5]))  # the same seed, others taken
    assert again[:5] == ids[5:10] and not set(again) & set(ids[:5])


def test_ood_config_shifts_only_the_priors_and_the_seed():
    cfg = load_params(ROOT / "params.yaml").synth
    ood = ood_config(cfg)
    assert ood.seed == cfg.ood.seed != cfg.seed
    for key in ("v_top", "v_bottom", "trend_power", "water_depth"):
        assert getattr(ood, key) == getattr(cfg.ood, key) != getattr(cfg, key), key
    keep = ("families", "sim", "water_velocity", "v_min", "v_max")
    assert all(getattr(ood, k) == getattr(cfg, k) for k in keep)
    # the shipped shifts: faster sediments, slower bottoms, a steeper trend, deeper water,
    # each partly outside the training range
    assert cfg.ood.v_top[1] > cfg.v_top[1] and cfg.ood.v_top[0] > cfg.v_top[0]
    assert cfg.ood.v_bottom[0] < cfg.v_bottom[0] and cfg.ood.v_bottom[1] < cfg.v_bottom[1]
    assert cfg.ood.trend_power[0] < cfg.trend_power[0]
    assert cfg.ood.water_depth[1] > cfg.water_depth[1]
    assert cfg.ood.n_test > 0


def test_no_ood_set_when_its_size_is_zero(tmp_path):
    cfg = dataclasses.replace(
        CFG, n_train=1, n_extended_1=0, n_extended_2=0, n_test=1, ood=SynthOodConfig(n_test=0)
    )
    (tmp_path / "test_ood.zip").write_bytes(b"stale")  # from an earlier generation
    (tmp_path / "test_ood_truth.npz").write_bytes(b"stale")
    summary = generate(cfg, tmp_path, progress=False)
    assert "ood" not in summary and "test_ood" not in format_summary(summary, tmp_path)
    assert not (tmp_path / "test_ood.zip").exists()
    assert not (tmp_path / "test_ood_truth.npz").exists()
    assert not (tmp_path / "test_ood_labels.npz").exists()
    assert up_to_date(cfg, tmp_path)


def test_digest_of_the_shipped_params_is_unchanged():
    synth = load_params(ROOT / "params.yaml").synth
    assert config_digest(synth) == SHIPPED_DIGEST
    # workers do not change the bytes, everything else does
    assert config_digest(dataclasses.replace(synth, workers=7)) == SHIPPED_DIGEST
    assert config_digest(dataclasses.replace(synth, seed=1)) != SHIPPED_DIGEST
    sim = dataclasses.replace(synth.sim, dx=10.0)
    assert config_digest(dataclasses.replace(synth, sim=sim)) != SHIPPED_DIGEST
    # every prior and the OOD set are part of the digest
    for key, value in [
        ("v_top", (1.6, 2.5)),
        ("v_bottom", (3.6, 4.5)),
        ("trend_power", (0.5, 1.4)),
        ("water_depth", (100, 449)),
    ]:
        changed = dataclasses.replace(synth, **{key: value})
        assert config_digest(changed) != SHIPPED_DIGEST, key
        ood = dataclasses.replace(synth.ood, **{key: value})
        assert config_digest(dataclasses.replace(synth, ood=ood)) != SHIPPED_DIGEST, key
    for key, value in [("seed", 1), ("n_test", 3)]:
        ood = dataclasses.replace(synth.ood, **{key: value})
        assert config_digest(dataclasses.replace(synth, ood=ood)) != SHIPPED_DIGEST, key
