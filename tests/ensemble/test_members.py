"""Tests of the ensemble (speedstructure.ensemble.members and .loading), the sample folders it
predicts (speedstructure.data.store) and the predict stage: real tiny models on CPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from speedstructure import cli
from speedstructure.config.schema import V_MAX, V_MIN, SimParams
from speedstructure.data.format import GATHER_NAMES
from speedstructure.data.samples import list_sample_ids
from speedstructure.data.store import FolderSamples, open_input
from speedstructure.engine.checkpoint import best_checkpoint, save_checkpoint
from speedstructure.ensemble.loading import default_model_uri, load_predictor
from speedstructure.ensemble.members import Ensemble, load_member, member_key, read_spec
from speedstructure.errors import DataError, UserError
from speedstructure.physics.seafloor import FloorPicker
from speedstructure.stages.predict import predict_to_submission
from support import GSHAPE, ROOT, TINY_VARIANT, VSHAPE, WATER, model_from, random_velocity

SHIPPED = ROOT / "params.yaml"
EVA = {**TINY_VARIANT, "fusion": "mean"}  # a mean-fusion network, for a module-scoped fixture
IDS = ["FOLDERSAMPLE000001", "FOLDERSAMPLE000002", "FOLDERSAMPLE000003"]


def _save(model, path: Path) -> Path:
    """A checkpoint as the training engine writes it (``best.pt``)."""
    ckpt = best_checkpoint(model.state_dict(), model.variant, {"epochs": 1}, 1, 0.1, {})
    save_checkpoint(ckpt, path)
    return path


def _trend(v: float):
    return model_from({"arch": "depth_trend"}).fit([np.full(VSHAPE, v, np.float32)] * 2)


def _gathers(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1e-3, (n, *GSHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Project folder with models/trend2.pt, trend4.pt and eva.pt; returns (root, eva model)."""
    root = tmp_path_factory.mktemp("ens_proj")
    _save(_trend(2.0), root / "models" / "trend2.pt")
    _save(_trend(4.0), root / "models" / "trend4.pt")
    torch.manual_seed(0)
    eva = model_from(EVA).eval()
    _save(eva, root / "models" / "eva.pt")
    return root, eva


def _spec(folds) -> dict:
    return {
        "format": 1,
        "folds": [
            {"fold": k, "members": [{"variant": v, "checkpoint": c, "weight": w} for v, c, w in ms]}
            for k, ms in folds
        ],
        "cv_mape": 0.1,
    }


TREND_SPEC = _spec(
    [
        (0, [("trend2", "models/trend2.pt", 0.25), ("trend4", "models/trend4.pt", 0.75)]),
        (1, [("trend2", "models/trend2.pt", 1.0)]),
    ]
)


@pytest.fixture
def sample_folder(tmp_path) -> Path:
    folder = tmp_path / "samples"
    x = _gathers(1, len(IDS))
    for sid, g in zip(IDS, x, strict=True):
        (folder / sid).mkdir(parents=True)
        for name, arr in zip(GATHER_NAMES, g, strict=True):
            np.save(folder / sid / name, arr)
    (folder / "notes").mkdir()  # not an 18-character id: ignored
    (folder / "README.txt").write_text("not a sample")
    return folder


# --------------------------------------------------------------------------- members


def test_load_member_restores_identical_predictions(members):
    root, eva = members
    x = torch.from_numpy(_gathers(0, 2))
    loaded = load_member(root / "models" / "eva.pt")
    assert not loaded.training
    assert type(loaded) is type(eva)
    for tta in (False, True):
        torch.testing.assert_close(
            loaded.predict(x, tta=tta), eva.predict(x, tta=tta), rtol=0, atol=0
        )
    for k, v in eva.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.variant == eva.variant  # the typed variant, rebuilt from the checkpoint
    t4 = load_member(root / "models" / "trend4.pt")
    torch.testing.assert_close(t4.predict(x), torch.full((2, *VSHAPE), 4.0))


def test_load_member_ignores_pretrained_weights(members, tmp_path):
    root, eva = members
    hub = dataclasses.replace(eva.variant, pretrained="timm")  # would download (offline: fails)
    ckpt = best_checkpoint(eva.state_dict(), hub, {"epochs": 1}, 1, 0.1, {})
    assert ckpt["variant"]["pretrained"] == "timm"
    save_checkpoint(ckpt, tmp_path / "hub.pt")
    loaded = load_member(tmp_path / "hub.pt")
    assert loaded.variant.pretrained == "none"
    x = torch.from_numpy(_gathers(0, 1))
    torch.testing.assert_close(loaded.predict(x), eva.predict(x), rtol=0, atol=0)


def test_load_member_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found") as ei:
        load_member(tmp_path / "missing.pt")
    assert "missing.pt" in str(ei.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a speedstructure checkpoint"):
        load_member(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_member(tmp_path / "junk.pt")
    torch.save({"model": {}, "variant": {"arch": "nope"}}, tmp_path / "arch.pt")
    with pytest.raises(UserError, match="arch must be one of") as ei:
        load_member(tmp_path / "arch.pt")
    assert "arch.pt" in str(ei.value)


# --------------------------------------------------------------------------- ensemble


def test_weighted_mean_per_fold_then_mean_over_folds(members):
    root, _ = members
    ens = Ensemble(TREND_SPEC, root=root, device="cpu")
    assert [k for k, _ in ens.folds] == [0, 1]
    pred = ens.predict(_gathers(3, 2))
    assert pred.shape == (2, *VSHAPE) and pred.dtype == np.float32
    expected = np.mean([0.25 * 2.0 + 0.75 * 4.0, 2.0])
    assert expected == 2.75
    np.testing.assert_array_equal(pred, np.full((2, *VSHAPE), 2.75, np.float32))
    # the weights matter: swapping them gives mean(0.75*2+0.25*4, 2) = 2.25
    swapped = _spec(
        [
            (0, [("trend2", "models/trend2.pt", 0.75), ("trend4", "models/trend4.pt", 0.25)]),
            (1, [("trend2", "models/trend2.pt", 1.0)]),
        ]
    )
    np.testing.assert_array_equal(
        Ensemble(swapped, root=root, device="cpu").predict(_gathers(3, 1)),
        np.full((1, *VSHAPE), 2.25, np.float32),
    )
    # explicit checkpoint files (by member key) win over the spec's paths
    ck = {member_key(1, "trend2"): root / "models" / "trend4.pt"}
    np.testing.assert_array_equal(
        Ensemble(TREND_SPEC, ck, root=root, device="cpu").predict(_gathers(3, 1)),
        np.full((1, *VSHAPE), (3.5 + 4.0) / 2, np.float32),
    )
    assert member_key(3, "tiny") == "fold3-tiny"


def test_ensemble_with_a_network_member(members):
    root, eva = members
    spec = _spec([(0, [("eva", "models/eva.pt", 0.5), ("trend2", "models/trend2.pt", 0.5)])])
    x = _gathers(4, 2)
    pred = Ensemble(spec, root=root, device="cpu").predict(x)
    want = 0.5 * eva.predict(torch.from_numpy(x), tta=True).numpy() + 0.5 * 2.0
    np.testing.assert_allclose(pred, want, rtol=1e-6, atol=1e-6)
    plain = Ensemble(spec, root=root, device="cpu", tta=False).predict(x)
    want_plain = 0.5 * eva.predict(torch.from_numpy(x), tta=False).numpy() + 0.5 * 2.0
    np.testing.assert_allclose(plain, want_plain, rtol=1e-6, atol=1e-6)


def test_read_spec_checks(tmp_path):
    good = tmp_path / "ens.json"
    good.write_text(json.dumps(TREND_SPEC))
    assert read_spec(good) == TREND_SPEC

    cases = {
        "weights.json": (
            _spec([(0, [("a", "a.pt", 0.5), ("b", "b.pt", 0.4)])]),
            "not on the simplex",
        ),
        "negative.json": (
            _spec([(0, [("a", "a.pt", 1.5), ("b", "b.pt", -0.5)])]),
            "not on the simplex",
        ),
        "nofolds.json": ({"format": 1, "folds": []}, "has no folds"),
        "nomembers.json": (_spec([(0, [("a", "a.pt", 1.0)]), (2, [])]), "fold 2 has no members"),
    }
    for name, (spec, msg) in cases.items():
        p = tmp_path / name
        p.write_text(json.dumps(spec))
        with pytest.raises(UserError, match=msg) as ei:
            read_spec(p)
        assert str(p) in str(ei.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a readable ensemble file") as ei:
        read_spec(bad)
    assert str(bad) in str(ei.value)


# --------------------------------------------------------------------------- inputs


def test_folder_samples(sample_folder):
    fs = FolderSamples(sample_folder)
    assert fs.sample_ids == IDS
    x = _gathers(1, len(IDS))
    for i, sid in enumerate(IDS):
        g = fs.read_gathers(sid)
        assert g.shape == GSHAPE and g.dtype == np.float32
        np.testing.assert_array_equal(g, x[i])
    assert isinstance(open_input(sample_folder), FolderSamples)


def test_folder_samples_errors(sample_folder, tmp_path):
    (sample_folder / IDS[1] / GATHER_NAMES[3]).unlink()
    with pytest.raises(DataError) as ei:
        FolderSamples(sample_folder)
    msg = str(ei.value)
    assert str(sample_folder / IDS[1]) in msg and GATHER_NAMES[3] in msg
    with pytest.raises(DataError, match="folder not found") as ei:
        FolderSamples(tmp_path / "nowhere")
    assert "nowhere" in str(ei.value)
    empty = tmp_path / "empty"
    (empty / "short_id").mkdir(parents=True)
    with pytest.raises(DataError, match="no sample folders") as ei:
        FolderSamples(empty)
    assert str(empty) in str(ei.value)
    with pytest.raises(DataError, match="input not found"):
        open_input(tmp_path / "missing.zip")


def test_folder_samples_bad_array_names_the_file(sample_folder):
    bad = sample_folder / IDS[2] / GATHER_NAMES[0]
    np.save(bad, np.zeros((10001, 30), np.float32))
    fs = FolderSamples(sample_folder)
    with pytest.raises(DataError, match="shape") as ei:
        fs.read_gathers(IDS[2])
    assert str(bad) in str(ei.value)


# --------------------------------------------------------------------------- predict


def test_predict_to_submission(members, sample_folder, tmp_path):
    root, _ = members
    spec = _spec(
        [
            (0, [("eva", "models/eva.pt", 0.5), ("trend2", "models/trend2.pt", 0.5)]),
            (1, [("trend4", "models/trend4.pt", 1.0)]),
        ]
    )
    ens = Ensemble(spec, root=root, device="cpu")
    out = tmp_path / "sub" / "out.npz"
    res = predict_to_submission(
        ens.predict, sample_folder, out, batch_size=2, progress=False, water_velocity=WATER
    )
    assert res["samples"] == len(IDS) and Path(res["output"]) == out
    with np.load(out) as sub:
        assert sorted(sub.files) == IDS
        want = ens.predict(np.stack([FolderSamples(sample_folder).read_gathers(s) for s in IDS]))
        for i, sid in enumerate(IDS):
            a = sub[sid]
            assert a.dtype == np.float64 and a.shape == VSHAPE and a.flags.c_contiguous
            np.testing.assert_allclose(a, want[i], rtol=1e-6, atol=1e-6)
        assert not np.allclose(sub[IDS[0]], sub[IDS[1]])  # the network member sees each input
    assert [p.name for p in out.parent.iterdir()] == ["out.npz"]  # no temporary files left


def test_predict_from_a_zip_clips_to_the_range(members, tiny_zips, tmp_path):
    root, _ = members
    z = tiny_zips["test"]
    ens = Ensemble(TREND_SPEC, root=root, device="cpu")
    out = tmp_path / "zip.npz"
    predict_to_submission(
        ens.predict, z, out, batch_size=4, v_range=(1.5, 2.5), progress=False, water_velocity=WATER
    )
    with np.load(out) as sub:
        assert sorted(sub.files) == sorted(list_sample_ids(z)) and len(sub.files) == 2
        for k in sub.files:
            np.testing.assert_array_equal(sub[k], np.full(VSHAPE, 2.5))  # 2.75 clipped
    # the default range is the challenge's, config.V_MIN to V_MAX: 2.75 stays
    predict_to_submission(ens.predict, z, out, batch_size=1, progress=False, water_velocity=WATER)
    assert (V_MIN, V_MAX) == (1.5, 4.5)
    with np.load(out) as sub:
        for k in sub.files:
            np.testing.assert_array_equal(sub[k], np.full(VSHAPE, 2.75))


def test_load_predictor_on_an_ensemble_file(members, sample_folder, tiny_params):
    root, _ = members
    params = tiny_params(root)
    (root / "ens_trend.json").write_text(json.dumps(TREND_SPEC))
    fn, desc = load_predictor("ens_trend.json", params)  # relative to the root
    assert "ens_trend.json" in desc
    np.testing.assert_array_equal(fn(_gathers(2, 1)), np.full((1, *VSHAPE), 2.75, np.float32))
    with pytest.raises(UserError, match="model file not found"):
        load_predictor("nope.json", params)
    (root / "broken.json").write_text("{")
    with pytest.raises(UserError, match="not a JSON model reference"):
        load_predictor("broken.json", params)
    assert default_model_uri(params) == "models:/speedstructure-ensemble@champion"


def test_cli_predict(members, sample_folder, tmp_path, monkeypatch, capsys):
    root, _ = members
    proj = tmp_path / "proj"
    (proj / "models").mkdir(parents=True)
    for name in ("trend2.pt", "trend4.pt"):
        (proj / "models" / name).write_bytes((root / "models" / name).read_bytes())
    raw = {**yaml.safe_load(SHIPPED.read_text()), "predict": {"batch_size": 2}}
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    (proj / "ensemble.json").write_text(json.dumps(TREND_SPEC))  # checkpoints relative to proj
    monkeypatch.chdir(proj)
    model = ["--model", "ensemble.json", "--quiet"]
    rc = cli.main(["predict", "--input", str(sample_folder), "--output", "out/sub.npz", *model])
    assert rc == 0
    assert f"predict: {len(IDS)} samples with ensemble file" in capsys.readouterr().out
    with np.load(proj / "out" / "sub.npz") as sub:
        assert sorted(sub.files) == IDS
        for sid in IDS:
            assert sub[sid].dtype == np.float64
            np.testing.assert_array_equal(sub[sid], np.full(VSHAPE, 2.75))
    # without --output: paths.submission of params.yaml
    assert cli.main(["predict", "--input", str(sample_folder), *model]) == 0
    with np.load(proj / raw["paths"]["submission"]) as sub:
        assert sorted(sub.files) == IDS
    # a missing input: exit 2, a message naming it, no submission written
    rc = cli.main(["predict", "--input", "nowhere", "--output", "out/other.npz", *model])
    assert rc == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (proj / "out" / "other.npz").exists()


def test_predict_refuses_targets_in_m_per_s_and_warns_of_gathers_on_another_scale(
    members, tmp_path, caplog
):
    """A labelled input is checked as ingest checks it (a model in m/s is one line naming the
    zip and the member); gathers 10^5 times louder than the challenge's are a warning naming
    the sample, and the prediction goes on."""
    from speedstructure.data.samples import ZipWriter

    root, _ = members
    ens = Ensemble(TREND_SPEC, root=root, device="cpu")
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 0.0155, (5, 10001, 31)).astype(np.float32)
    y = random_velocity(rng)
    ms = tmp_path / "ms.zip"
    with ZipWriter(ms) as zw:
        zw.add("MPERSMPERSMPERS001", x, y * 1000)
    with pytest.raises(DataError, match="look like m/s") as ei:
        predict_to_submission(
            ens.predict, ms, tmp_path / "a.npz", progress=False, water_velocity=WATER
        )
    assert str(ms) in str(ei.value) and "MPERSMPERSMPERS001/vp_model.npy" in str(ei.value)
    assert not (tmp_path / "a.npz").exists()
    loud = tmp_path / "loud.zip"
    with ZipWriter(loud) as zw:
        zw.add("LOUDLOUDLOUDLOUD01", x * 1e5, y)
    with caplog.at_level("WARNING"):
        predict_to_submission(
            ens.predict, loud, tmp_path / "b.npz", progress=False, water_velocity=WATER
        )
    notes = [r.getMessage() for r in caplog.records if "standard deviation" in r.getMessage()]
    assert len(notes) == 1 and "LOUDLOUDLOUDLOUD01" in notes[0] and str(loud) in notes[0]
    assert (tmp_path / "b.npz").is_file()


def test_load_member_gives_a_picked_floor_the_physics_its_training_recorded(tmp_path):
    record = {"arch": "depth_trend", "floor": "picked"}
    trained_with = FloorPicker(SimParams(dx=10.0), 1.48)
    model = model_from(record, floor_picker=trained_with)
    model.fit([np.full(VSHAPE, 2.0, np.float32)])
    path = tmp_path / "best.pt"
    meta = {"floor_picker": trained_with.record()}
    torch.save({"model": model.state_dict(), "variant": record, "meta": meta}, path)
    assert load_member(path).floor_picker == trained_with
    torch.save({"model": model.state_dict(), "variant": record, "meta": {}}, path)
    with pytest.raises(UserError, match="records no floor picker"):
        load_member(path)
    given = FloorPicker(SimParams(), WATER, "simulated")  # what a benchmark may supply
    assert load_member(path, default_floor_picker=given).floor_picker == given
    learned = model_from({"arch": "depth_trend"})
    torch.save({"model": learned.state_dict(), "variant": {"arch": "depth_trend"}}, path)
    assert load_member(path).floor_picker is None


def test_load_member_reads_the_earlier_record_of_no_pretrained_weights(tmp_path):
    eva = model_from(TINY_VARIANT)
    record = {**eva.variant.model_dict(), "pretrained": None}  # earlier records: null = none
    torch.save({"model": eva.state_dict(), "variant": record}, tmp_path / "best.pt")
    assert load_member(tmp_path / "best.pt").variant == eva.variant
