"""The truth files beside the synthetic zips: the generator's facts (family, water floor,
structural surface, intrusion body, trend), written by ``synth`` and by ``synth --truth-only``."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import yaml

from speedstructure.cli import main
from speedstructure.config.schema import SPLITS, SimParams, SynthConfig, SynthOodConfig
from speedstructure.config.typed import as_plain
from speedstructure.data.samples import ZipSamples
from speedstructure.data.truth import load_truth, truth_path
from speedstructure.synth.dataset import generate, make_model
from speedstructure.synth.velocity import FAMILIES, generate_model, generate_velocity
from support import ROOT, WATER

CFG = SynthConfig(
    seed=3,
    n_train=3,
    n_extended_1=1,
    n_extended_2=1,
    n_test=2,
    workers=2,
    families=("flat", "intrusion"),
    water_depth=(100, 150),
    sim=SimParams(dx=10.0, dt=0.001),
    ood=SynthOodConfig(n_test=2, seed=11),
)
ZIPS = (*SPLITS, "test_ood")


def _first_sediment(v: np.ndarray) -> np.ndarray:
    """Per column, the first cell that is not water."""
    return np.argmax(v != WATER, axis=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_model_returns_the_same_array_and_its_facts(family):
    cfg = SynthConfig()
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(6):
        v, facts = generate_model(rng_a, family, cfg)
        assert v.tobytes() == generate_velocity(rng_b, family, cfg).tobytes()
        assert facts.family == family
        np.testing.assert_array_equal(facts.floor, _first_sediment(v))
        assert cfg.v_top[0] <= facts.v_top <= cfg.v_top[1]
        assert cfg.v_bottom[0] <= facts.v_bottom <= cfg.v_bottom[1]
        assert cfg.trend_power[0] <= facts.trend_power <= cfg.trend_power[1]
        assert facts.h.shape == (300,)
        if family == "flat":
            assert (facts.h == 0).all()
        if family == "dipping":  # a straight line
            np.testing.assert_allclose(np.diff(facts.h, 2), 0.0, atol=1e-9)
        if family != "intrusion":
            assert facts.body is None
            continue
        body = facts.body
        assert body.shape == (300, 1259) and body.dtype == bool and body.any()
        z = np.arange(1259)[None, :]
        assert not (body & (z < facts.floor[:, None])).any()  # below the water floor only
        assert v[body].min() >= 3.97  # 4.0-4.5 km/s, +- 0.02 across x


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, generate(CFG, out, progress=False)


def _targets(out, name: str) -> dict[str, np.ndarray]:
    if name in ("test", "test_ood"):
        with np.load(out / f"{name}_labels.npz", allow_pickle=False) as lab:
            return {k: lab[k] for k in lab.files}
    with ZipSamples(out / f"{name}.zip") as z:
        return {sid: z.read_target(sid) for sid in z.sample_ids}


def test_a_truth_file_beside_every_zip_matches_the_targets(generated):
    out, summary = generated
    seen = set()
    for name in ZIPS:
        path = out / f"{name}_truth.npz"
        assert path == truth_path(out / f"{name}.zip")
        with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickle
            arrays = {k: z[k] for k in z.files}
        n = len(arrays["ids"])
        assert arrays["ids"].dtype.kind == arrays["family"].dtype.kind == "U"
        assert {
            k: arrays[k].dtype for k in ("v_top", "v_bottom", "trend_power", "h")
        } == dict.fromkeys(("v_top", "v_bottom", "trend_power", "h"), np.dtype(np.float32))
        assert arrays["floor"].dtype == np.int16 and arrays["floor"].shape == (n, 300)
        assert arrays["h"].shape == (n, 300) and arrays["body"].shape == (n, 300, 158)
        truth = load_truth(path)
        targets = _targets(out, name)
        assert sorted(truth.ids) == sorted(targets)
        info = summary["ood"] if name == "test_ood" else summary["splits"][name]
        fams, counts = np.unique(truth.family, return_counts=True)
        assert dict(zip(fams.tolist(), counts.tolist(), strict=True)) == info["families"]
        bodies = truth.bodies()
        for i, sid in enumerate(truth.ids):
            v = targets[sid]
            np.testing.assert_array_equal(truth.floor[i], _first_sediment(v))
            assert bodies[i].any() == (truth.family[i] == "intrusion")
            assert (v[bodies[i]] >= 3.97).all()
        seen |= set(truth.family)
    assert seen == {"flat", "intrusion"}  # both families drawn (the seed is chosen so)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def _params_file(tmp_path, cfg: SynthConfig):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"] = as_plain(cfg)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_truth_only_reproduces_the_files_and_rejects_a_mismatch(generated, tmp_path, capsys):
    src, _ = generated
    out = tmp_path / "data"
    shutil.copytree(src, out)
    originals = {n: (out / f"{n}_truth.npz").read_bytes() for n in ZIPS}
    for n in ZIPS:
        (out / f"{n}_truth.npz").unlink()
    params = str(_params_file(tmp_path, CFG))
    args = ["synth", "--params", params, "--output", str(out), "--quiet"]
    assert main([*args, "--truth-only"]) == 0
    assert "truth files written" in capsys.readouterr().out
    assert {n: (out / f"{n}_truth.npz").read_bytes() for n in ZIPS} == originals  # same bytes
    # up to date but without truth files (generated before they existed): only they are written
    (out / "train_truth.npz").unlink()
    before = (out / "train.zip").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "train_truth.npz").read_bytes() == originals["train"]
    assert (out / "train.zip").stat().st_mtime_ns == before  # nothing regenerated
    # a target that is not the generator's: one line naming the zip, nothing written
    for n in ZIPS:
        (out / f"{n}_truth.npz").unlink()
    labels = dict(np.load(out / "test_labels.npz"))
    sid = sorted(labels)[0]
    labels[sid] = labels[sid] + np.float32(0.01)
    np.savez(out / "test_labels.npz", **labels)
    capsys.readouterr()
    assert main([*args, "--truth-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"test.zip: sample '{sid}' is not the velocity" in err
    assert not list(out.glob("*_truth.npz"))
    # other synth params (another seed): the zips are not what they generate
    other = str(_params_file(tmp_path, dataclasses.replace(CFG, seed=4)))
    assert main(["synth", "--params", other, "--output", str(out), "--truth-only"]) == 2
    assert "train.zip: other sample ids than the synth params generate" in capsys.readouterr().err


def test_make_model_is_the_generated_sample(generated):
    out, _ = generated
    truth = load_truth(out / "train_truth.npz")
    targets = _targets(out, "train")
    for i, sid in enumerate(truth.ids):  # ids in the zip's order: sample i of the stream
        v, facts = make_model(CFG, 0, i)
        assert v.tobytes() == targets[sid].tobytes() and facts.family == truth.family[i]


def test_load_truth_of_real_data_is_none(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="speedstructure.data.truth"):
        assert load_truth(tmp_path / "test_truth.npz") is None
    assert "no truth file test_truth.npz" in caplog.text and len(caplog.records) == 1
