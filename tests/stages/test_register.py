"""The MLflow model registry: pyfunc ensemble, versions, and the champion alias rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speedstructure.ensemble.members import CHAMPION
from speedstructure.errors import UserError
from speedstructure.stages.register import register_ensemble, run_register
from support import trend_checkpoint


@pytest.fixture
def mlflow_project(tmp_path, tiny_params):
    """``(root, params)``: two depth-trend member checkpoints (2.0 and 4.0 km/s) and an MLflow
    store and registered model of the project's own."""
    trend_checkpoint(tmp_path / "models/a/fold_0/best.pt", 2.0)
    trend_checkpoint(tmp_path / "models/b/fold_0/best.pt", 4.0)
    mlflow_cfg = {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}",
        "artifact_root": str(tmp_path / "mlruns/artifacts"),
        "experiment": "reg-test",
        "registered_model": "ens-test",
    }
    yield tmp_path, tiny_params(tmp_path, mlflow=mlflow_cfg)
    import mlflow

    mlflow.set_tracking_uri(None)


def _spec(root, cv: float, w_a: float):
    spec = {
        "format": 1,
        "cv_mape": cv,
        "folds": [
            {
                "fold": 0,
                "members": [
                    {"variant": "a", "checkpoint": "models/a/fold_0/best.pt", "weight": w_a},
                    {"variant": "b", "checkpoint": "models/b/fold_0/best.pt", "weight": 1.0 - w_a},
                ],
            }
        ],
    }
    path = root / f"ensemble_{cv}.json"
    path.write_text(json.dumps(spec))
    return path


def test_champion_moves_only_to_a_better_version(mlflow_project):
    import mlflow

    root, params = mlflow_project
    r1 = register_ensemble(_spec(root, 0.05, 0.25), params)
    assert (r1["version"], r1["champion"]) == (1, True)
    r2 = register_ensemble(_spec(root, 0.08, 0.5), params)  # worse: alias stays
    assert (r2["version"], r2["champion"], r2["champion_version"]) == (2, False, 1)
    client = mlflow.MlflowClient()
    assert int(client.get_model_version_by_alias("ens-test", CHAMPION).version) == 1
    model = mlflow.pyfunc.load_model("models:/ens-test@champion")
    x = np.zeros((1, 5, 10001, 31), np.float32)
    np.testing.assert_allclose(model.predict(x), 0.25 * 2.0 + 0.75 * 4.0, atol=1e-6)
    r2_model = mlflow.pyfunc.load_model("models:/ens-test/2")
    np.testing.assert_allclose(r2_model.predict(x), 3.0, atol=1e-6)
    with pytest.raises(Exception, match="shape"):  # the signature asks for a batch axis
        model.predict(x[0])
    # better: alias moves; the stage registers paths.ensemble and writes paths.registered
    params.path("ensemble").parent.mkdir(parents=True)
    _spec(root, 0.03, 1.0 - 1e-9).rename(params.path("ensemble"))
    r3 = run_register(params)
    assert (r3["version"], r3["champion"]) == (3, True)
    assert json.loads(params.path("registered").read_text()) == r3
    assert r3["model_uri"] == "models:/ens-test/3" and r3["cv_mape"] == 0.03
    assert int(client.get_model_version_by_alias("ens-test", CHAMPION).version) == 3
    versions = {int(v.version) for v in client.search_model_versions("name='ens-test'")}
    assert versions == {1, 2, 3}  # every version stays
    sig = mlflow.models.get_model_info("models:/ens-test/3").signature
    assert sig.inputs.inputs[0].shape == (-1, 5, 10001, 31)
    assert sig.outputs.inputs[0].shape == (-1, 300, 1259)


def test_missing_checkpoint_and_cv_are_named(mlflow_project):
    root, params = mlflow_project
    spec = json.loads(_spec(root, 0.05, 0.5).read_text())
    spec["folds"][0]["members"][1]["checkpoint"] = "models/none/best.pt"
    bad = root / "bad.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"models/none/best\.pt not found"):
        register_ensemble(bad, params)
    spec = json.loads(_spec(root, 0.05, 0.5).read_text())
    del spec["cv_mape"]
    bad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="cv_mape"):
        register_ensemble(bad, params)


def _md5_copies(folder, md5: str) -> list:
    from speedstructure.fsutil import file_md5

    return [p for p in folder.rglob("*") if p.is_file() and file_md5(p) == md5]


def test_each_checkpoint_is_stored_once_under_mlruns(
    mlflow_project, tiny_zips, tiny_variant, tiny_params, monkeypatch
):
    """Training stages log a reference to their checkpoint, `register` copies each member
    once into the registered model, and loading the model copies nothing more."""
    import tempfile

    from speedstructure.config.typed import as_plain
    from speedstructure.ensemble.loading import load_predictor
    from speedstructure.fsutil import file_md5
    from speedstructure.stages import train as T

    root, base = mlflow_project
    table = root / "folds.csv"
    rows = ["sample_id,zip,fold", f"TR{0:016d},{tiny_zips['train']},0"]
    rows += [f"TR{i:016d},{tiny_zips['train']},1" for i in (1, 2)]
    rows += [
        f"{p}{i:016d},{tiny_zips[s]},-1"
        for p, s in (("EA", "train_extended_1"), ("EB", "train_extended_2"))
        for i in (0, 1)
    ]
    table.write_text("\n".join(rows) + "\n")
    tiny = tiny_variant(backbone_kwargs={"embed_dim": 32, "num_heads": 2}, fusion="mean")
    raw_train = {
        "epochs": 1,
        "batch_size": 3,
        "val_batch_size": 2,
        "progress": False,
        "device": "cpu",
    }
    params = tiny_params(
        root,
        mlflow=as_plain(base.mlflow),
        variants={"tiny": tiny, "trend": {"arch": "depth_trend"}},
        runs={},
        ensemble={"variants": ["tiny", "trend"]},
        train={**as_plain(base.train), **raw_train},
    )
    results = {v: T.run_training_stage(params, v, 0, folds_table=table) for v in ("tiny", "trend")}
    md5 = {v: file_md5(r.best_path) for v, r in results.items()}
    assert all(not _md5_copies(root / "mlruns", m) for m in md5.values())  # references only
    spec = {
        "format": 1,
        "cv_mape": 0.1,
        "folds": [
            {
                "fold": 0,
                "members": [
                    {"variant": v, "checkpoint": str(r.best_path.relative_to(root)), "weight": 0.5}
                    for v, r in results.items()
                ],
            }
        ],
    }
    spec_path = root / "ensemble.json"
    spec_path.write_text(json.dumps(spec))
    reg = register_ensemble(spec_path, params)
    for v, m in md5.items():
        assert len(_md5_copies(root / "mlruns", m)) == 1, v  # the registered model's copy
    scratch = root / "scratch-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    predict, _ = load_predictor(reg["model_uri"], params)
    assert predict(np.zeros((1, 5, 10001, 31), np.float32)).shape == (1, 300, 1259)
    for v, m in md5.items():
        assert len(_md5_copies(root / "mlruns", m)) == 1, v  # loading copied nothing there
        assert not _md5_copies(scratch, m), v  # nor into a temporary download
