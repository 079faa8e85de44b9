"""The synthetic dataset generator (speedstructure.synth.dataset): layout, determinism, digest."""

import dataclasses
import json
from pathlib import Path

import numpy as np

from speedstructure.config import SPLITS, SimParams, SynthConfig, load_params
from speedstructure.dataio import ZipSamples
from speedstructure.synth.dataset import config_digest, generate, make_sample_ids, up_to_date

REPO = Path(__file__).resolve().parents[1]
CFG = SynthConfig(
    seed=5,
    n_train=2,
    n_extended_1=1,
    n_extended_2=1,
    n_test=1,
    workers=2,
    sim=SimParams(dx=10.0, dt=0.001),
)
# config_digest of the shipped params.yaml's synth section, as the untyped generator
# computed it (data/synth_meta.json records it): existing data stays up to date.
SHIPPED_DIGEST = "6b69390a52bcc85d"


def test_generate_layout_and_determinism(tmp_path):
    s1 = generate(CFG, tmp_path / "a", progress=False)
    generate(dataclasses.replace(CFG, workers=1), tmp_path / "b", progress=False)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.zip").read_bytes() == (
            tmp_path / "b" / f"{name}.zip"
        ).read_bytes()
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
    assert len(set(ids)) == 5
    assert json.loads((tmp_path / "a" / "synth_meta.json").read_text())["digest"] == s1["digest"]
    assert up_to_date(CFG, tmp_path / "a") and up_to_date(CFG, tmp_path / "b")
    assert not up_to_date(dataclasses.replace(CFG, seed=6), tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir() if ".tmp" in p.name] == []


def test_sample_ids_unique():
    ids = make_sample_ids(1, 2000)
    assert len(set(ids)) == 2000 and all(len(i) == 18 and i.isalnum() for i in ids)


def test_digest_of_the_shipped_params_is_unchanged():
    synth = load_params(REPO / "params.yaml").synth
    assert config_digest(synth) == SHIPPED_DIGEST
    # workers do not change the bytes, everything else does
    assert config_digest(dataclasses.replace(synth, workers=7)) == SHIPPED_DIGEST
    assert config_digest(dataclasses.replace(synth, seed=1)) != SHIPPED_DIGEST
    sim = dataclasses.replace(synth.sim, dx=10.0)
    assert config_digest(dataclasses.replace(synth, sim=sim)) != SHIPPED_DIGEST
