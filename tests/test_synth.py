import json

import numpy as np

from speedstructure.dataio import ZipSamples
from speedstructure.synth import generate, make_sample_ids

CFG = {
    "seed": 5, "n_train": 2, "n_extended_1": 1, "n_extended_2": 1, "n_test": 1, "workers": 2,
    "v_min": 1.5, "v_max": 4.5, "water_velocity": 1.5, "water_depth": [150, 400],
    "families": ["flat", "dipping", "gentle_fold", "strong_fold", "faulted", "intrusion"],
    "sim": {"dx": 10.0, "dt": 0.001},
}


def test_generate_layout_and_determinism(tmp_path):
    s1 = generate(CFG, tmp_path / "a", progress=False)
    generate({**CFG, "workers": 1}, tmp_path / "b", progress=False)
    for name in ("train", "train_extended_1", "train_extended_2", "test"):
        assert (tmp_path / "a" / f"{name}.zip").read_bytes() == (tmp_path / "b" / f"{name}.zip").read_bytes()
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


def test_sample_ids_unique():
    ids = make_sample_ids(1, 2000)
    assert len(set(ids)) == 2000 and all(len(i) == 18 and i.isalnum() for i in ids)
