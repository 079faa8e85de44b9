"""The MLflow workflow around the stages: runs opened before the work (a crash leaves a FAILED
run, Ctrl-C a KILLED one), the register run's members/weights/CV figures, the model card of
the registered model and its versions, a registry read that writes nothing into the store,
a moved checkout named and relocated, and ``make ui`` without MLflow's job runner."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import speedstructure.ensemble.card as modelcard

# the stage modules whose look-ups the crash helpers replace (`import ... as`: a module object)
import speedstructure.stages.evaluate as evaluate_stage
import speedstructure.stages.folds as folds_stage
import speedstructure.stages.register as register_stage
import speedstructure.stages.tune as tune_stage
from speedstructure.errors import UserError
from speedstructure.stages.evaluate import run_evaluate
from speedstructure.stages.folds import run_folds
from speedstructure.stages.register import register_ensemble
from speedstructure.stages.tune import run_tune
from speedstructure.tracking.runs import start_run
from speedstructure.tracking.store import relocate, settings
from support import ROOT, trend_checkpoint

MLFLOW_CFG = {  # relative, as in the shipped params.yaml: resolved against the checkout
    "tracking_uri": "sqlite:///mlruns/mlflow.db",
    "artifact_root": "mlruns/artifacts",
    "experiment": "workflow",
    "registered_model": "ens-wf",
    "retry_seconds": 1,
}


def _runs(params) -> dict:
    import mlflow

    client = mlflow.MlflowClient(settings(params)["tracking_uri"])
    exp = client.get_experiment_by_name(MLFLOW_CFG["experiment"])
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _slowly_raise(exc: BaseException):
    def work(*args, **kwargs):
        time.sleep(0.3)  # the run must already be open while the work runs
        raise exc

    return work


# --------------------------------------------------------------------------- run status


def _crash_folds(params, monkeypatch, exc):
    monkeypatch.setattr(folds_stage, "make_folds", _slowly_raise(exc))
    run_folds(params, track=True, progress=False)


def _crash_tune(params, monkeypatch, exc):
    monkeypatch.setattr(tune_stage, "member_runs", _slowly_raise(exc))
    run_tune(params, track=True)


def _crash_evaluate(params, monkeypatch, exc):
    params.test_labels_path().parent.mkdir(parents=True, exist_ok=True)
    params.test_labels_path().write_bytes(b"")
    monkeypatch.setattr(evaluate_stage, "load_test_set", _slowly_raise(exc))
    run_evaluate(params, track=True, progress=False)


def _crash_register(params, monkeypatch, exc):
    monkeypatch.setattr(register_stage, "read_spec", _slowly_raise(exc))
    register_ensemble(params.root / "ensemble.json", params)


CRASHES = {
    "folds": _crash_folds,
    "tune": _crash_tune,
    "evaluate": _crash_evaluate,
    "register": _crash_register,
}


def test_a_stage_run_is_open_during_the_work_and_ends_failed_or_killed(
    tmp_path, tiny_params, monkeypatch, isolated_mlflow
):
    import mlflow

    params = tiny_params(tmp_path, mlflow=MLFLOW_CFG)  # one store for all (each is seconds)
    for stage, crash in CRASHES.items():
        for exc, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
            with monkeypatch.context() as m, pytest.raises(type(exc)):
                crash(params, m, exc)
            (run,) = mlflow.search_runs(
                filter_string=f"tags.dvc_stage = '{stage}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
                output_format="list",
            )
            assert (stage, run.info.status) == (stage, status)
            assert run.info.run_name == stage
            assert run.info.end_time - run.info.start_time >= 300  # opened before the work
    # without test labels (real data) evaluate describes the submission: none is there

    params.test_labels_path().unlink()
    with pytest.raises(UserError, match="submission"):
        run_evaluate(params, track=True, progress=False)
    (run,) = mlflow.search_runs(
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list"
    )
    assert (run.info.run_name, run.info.status) == ("evaluate", "FAILED")


# --------------------------------------------------------------------------- registry


def _project(root: Path, tiny_params):
    """A checkout with two depth-trend members of fold 0, its fold table and ensemble file."""
    trend_checkpoint(root / "models/a/fold_0/best.pt", 2.0)
    trend_checkpoint(root / "models/b/fold_0/best.pt", 4.0)
    params = tiny_params(root, mlflow=MLFLOW_CFG)
    (params.path("data") / modelcard.SYNTH_META).parent.mkdir(parents=True)
    (params.path("data") / modelcard.SYNTH_META).write_text("{}")
    rows = ["sample_id,zip,split,group,fold"]
    rows += [f"T{i},data/train.zip,train,0,{i % 2}" for i in range(6)]
    rows += [f"E{i},data/train_extended_1.zip,train_extended_1,0,-1" for i in range(4)]
    params.path("folds_table").parent.mkdir(parents=True)
    params.path("folds_table").write_text("\n".join(rows) + "\n")
    members = [
        {"variant": v, "checkpoint": f"models/{v}/fold_0/best.pt", "weight": w, "val_mape": m}
        for v, w, m in (("a", 0.25, 0.07), ("b", 0.75, 0.06))
    ]
    heldout = {"best_single": 0.061, "equal": 0.058, "tuned": 0.05}
    spec = {
        "format": 1,
        "cv_mape": 0.05,
        "weights": "auto",
        "folds": [
            {"fold": 0, "members": members, "val_mape": 0.049, "n_val": 3, "heldout": heldout}
        ],
    }
    params.path("ensemble").parent.mkdir(parents=True)
    params.path("ensemble").write_text(json.dumps(spec))
    return params


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its md5 and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _register_and_check_the_run(params):
    import mlflow

    r = register_ensemble(params.path("ensemble"), params)
    client = mlflow.MlflowClient()
    run = client.get_run(r["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["members"] == "a,b" and run.data.params["fold0.members"] == "a,b"
    m = run.data.metrics
    assert m["fold0/weight_a"] == 0.25 and m["fold0/weight_b"] == 0.75
    assert m["cv_mape"] == 0.05 and m["heldout_equal"] == 0.058 and m["fold0/val_mape"] == 0.049
    arts = {a.path for a in client.list_artifacts(r["run_id"], "register")}
    assert arts == {"register/ensemble.json", "register/model_card.md"}
    return client, r


def _check_the_cards(client, version_card: str):
    assert version_card.startswith("# ens-wf version 1\n")
    for part in (
        "Source: synthetic",
        "- fold 0: members trained on 7 samples (3 train + 4 extended), validated on 3",
        "| 0 | a | 0.2500 | 0.07000 |",
        "- CV MAPE (held-out, split-half, each fold's chosen weighting): 0.05000",
        "- held-out MAPE, best single weights: 0.06100",
        "- weighting (tune.weights auto): equal weights unless another is lower held out by more "
        "than one standard error of the per-sample difference",
        f"## Test\n\n{modelcard.PENDING}\n",
        'mlflow.pyfunc.load_model("models:/ens-wf/1", dst_path=tempfile.mkdtemp())',
        "speedstructure predict --model models:/ens-wf/1 ",
    ):
        assert part in version_card, part
    assert "## Calibration" not in version_card  # no figures given: no section
    described = client.get_registered_model("ens-wf").description
    assert "version 1 (CV MAPE 0.05000)" in described
    assert 'mlflow.pyfunc.load_model("models:/ens-wf@champion"' in described
    # the evaluate stage completes the version's card: test figures, calibration when given
    metrics = {"n_test": 2, "ensemble_mape": 0.0421, "ratio_to_baseline": 0.5}
    modelcard.update_card(client, {"name": "ens-wf", "version": 1}, metrics)
    card = client.get_model_version("ens-wf", "1").description
    assert "- test MAPE: 0.04210 (2 samples)\n- ensemble / baseline: 0.50000" in card
    assert modelcard.PENDING not in card and "## Calibration" not in card
    metrics["calibration"] = {"coverage_90": 0.875, "sharpness": 0.1, "method": "split"}
    modelcard.update_card(client, {"name": "ens-wf", "version": 1}, metrics)
    card = client.get_model_version("ens-wf", "1").description
    assert "## Calibration\n\n- coverage 90: 0.87500\n- sharpness: 0.10000\n" in card
    headings = re.findall(r"^## (.+)$", card, flags=re.M)
    assert headings[-3:] == ["Test", "Calibration", "How to load"]
    assert card.count("- test MAPE") == 1


def test_register_logs_the_ensemble_and_describes_the_model_and_its_version(
    tmp_path, tiny_params, isolated_mlflow
):
    params = _project(tmp_path, tiny_params)
    client, r = _register_and_check_the_run(params)
    version = client.get_model_version("ens-wf", str(r["version"]))
    _check_the_cards(client, version.description)
    run = client.get_run(r["run_id"])  # the card is the register run's description too
    assert run.data.tags["mlflow.note.content"] == version.description


def test_registry_reads_write_nothing_and_a_moved_checkout_is_named_then_relocated(
    tmp_path, tiny_params, isolated_mlflow
):
    from speedstructure.ensemble.loading import load_predictor

    home = tmp_path / "checkout"
    params = _project(home, tiny_params)
    _register_and_check_the_run(params)
    x = np.zeros((1, 5, 10001, 31), np.float32)
    before = _snapshot(home / "mlruns")
    fn, _ = load_predictor("models:/ens-wf@champion", params)
    np.testing.assert_allclose(fn(x), 0.25 * 2.0 + 0.75 * 4.0, atol=1e-6)
    assert _snapshot(home / "mlruns") == before  # not one byte (nor mtime) of the store changed

    moved = tmp_path / "moved"
    shutil.copytree(home, moved, symlinks=True)
    copy = tiny_params(moved, mlflow=MLFLOW_CFG)
    with pytest.raises(UserError) as err:
        load_predictor("models:/ens-wf@champion", copy)
    assert str(err.value) == (
        f"{moved / 'mlruns/mlflow.db'}: this MLflow store records its artifacts in {home}, "
        f"not in this checkout {moved} (it was moved or copied): run `speedstructure "
        "relocate-mlruns` to point it here"
    )
    done = relocate(copy)
    assert done["from"] == str(home) and done["to"] == str(moved) and done["rows"] >= 4
    fn, _ = load_predictor("models:/ens-wf@champion", copy)
    np.testing.assert_allclose(fn(x), 3.5, atol=1e-6)
    with start_run("after-move", copy) as run:
        assert run.info.artifact_uri.startswith((moved / "mlruns/artifacts").as_uri() + "/")
    assert _snapshot(home / "mlruns") == before  # the original checkout was never touched
    assert relocate(copy)["from"] is None  # nothing left to do


def test_model_card_sections_and_the_synth_meta_name():
    from speedstructure.synth.dataset import META_NAME

    assert modelcard.SYNTH_META == META_NAME
    card = "# m\n\nintro\n\n## Test\n\nold\n\n## How to load\n\nx\n"
    new = modelcard.with_section(card, "Test", "new figures")
    assert new == "# m\n\nintro\n\n## Test\n\nnew figures\n\n## How to load\n\nx\n"
    added = modelcard.with_section(new, "Calibration", "- a: 1")
    assert added.index("## Calibration") < added.index("## How to load")
    assert modelcard.calibration_section({"note": "text", "bad": float("nan")}) is None
    assert modelcard.test_section({"n_test": 3, "labels": "none"}).startswith("No test labels")


def test_make_ui_runs_without_the_job_runner():
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\nui:", 1)[1].split("\n\n", 1)[0]
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in recipe
    assert "--host 127.0.0.1" in recipe and "--workers 1" in recipe
