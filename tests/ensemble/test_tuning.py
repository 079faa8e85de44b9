"""Tests of ensemble-weight tuning (speedstructure.ensemble.tuning and .scoring) and the tune
stage: real Optuna, small arrays."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml

from speedstructure.config.typed import ConfigError
from speedstructure.data.samples import ZipWriter
from speedstructure.ensemble.scoring import Scorer, TuneError, weighted_mape
from speedstructure.ensemble.tuning import (
    choose_weighting,
    dirichlet_weights,
    fit_weights,
    gain_over_equal,
    optuna_storage,
    split_half_report,
)
from speedstructure.errors import UserError
from speedstructure.stages.tune import add_commands, run_tune
from support import ROOT

SHIPPED = ROOT / "params.yaml"

TRUE_W = np.array([0.6, 0.3, 0.1])


def _problem(seed: int = 0, n: int = 12, shape=(30, 40)):
    """Three members, each far off alone, whose mix with TRUE_W is the truth plus 0.5 % noise.

    Member m = truth * (1 + 0.2 (a_m E1 + b_m E2) + noise), with structured error
    fields E1, E2 and sum_m w_m a_m = sum_m w_m b_m = 0 only at w = TRUE_W.
    """
    rng = np.random.default_rng(seed)
    x, z = np.linspace(0, 1, shape[0])[:, None], np.linspace(0, 1, shape[1])
    truth = np.stack(
        [
            np.clip(
                rng.uniform(1.5, 2.5)
                + rng.uniform(0.5, 1.5) * z
                + 0.2 * np.sin(6 * x + rng.uniform(0, 6)),
                1.5,
                4.5,
            )
            for _ in range(n)
        ]
    )
    e1 = np.stack([np.sin(3 * x * rng.uniform(1, 3) + 4 * z + rng.uniform(0, 6)) for _ in range(n)])
    e2 = np.stack([np.cos(5 * z * rng.uniform(1, 3) - 2 * x + rng.uniform(0, 6)) for _ in range(n)])
    a, b = (1.0, -1.0, -3.0), (1.0, -3.0, 3.0)
    assert abs(TRUE_W @ a) < 1e-12 and abs(TRUE_W @ b) < 1e-12
    preds = np.stack(
        [
            truth * (1 + 0.2 * (am * e1 + bm * e2) + rng.normal(0, 0.005, truth.shape))
            for am, bm in zip(a, b, strict=True)
        ]
    )
    return preds.astype(np.float32), truth.astype(np.float32)


def _ref_mape(preds, targets, w):
    ens = np.tensordot(np.asarray(w, np.float64), preds.astype(np.float64), axes=1)
    per = np.abs(targets - ens) / (np.abs(targets) + 1e-8)
    return float(per.reshape(len(targets), -1).mean(axis=1).mean())


# --------------------------------------------------------------------------- core


def test_weighted_mape_matches_reference_any_dtype_and_subset():
    preds, truth = _problem(n=7, shape=(5, 12))
    preds, truth = preds.reshape(3, 7, 5, 6, 2), truth.reshape(7, 5, 6, 2)  # any trailing dims
    w = np.array([0.2, 0.5, 0.3])
    for p in (preds, preds.astype(np.float16), preds.astype(np.float64)):
        assert weighted_mape(p, truth, w) == pytest.approx(_ref_mape(p, truth, w), rel=1e-6)
    sc = Scorer(preds, truth, chunk_cells=130)  # chunks of 2 samples
    idx = [6, 0, 3, 4, 1]
    assert sc(w, idx) == pytest.approx(_ref_mape(preds[:, idx], truth[idx], w), rel=1e-6)
    assert sc.member_mapes() == pytest.approx(
        [_ref_mape(preds, truth, e) for e in np.eye(3)], rel=1e-6
    )
    with pytest.raises(TuneError, match="sum to 1"):
        sc([0.5, 0.5, 0.5])
    with pytest.raises(TuneError, match="do not match"):
        Scorer(preds, truth[:, :4])
    bad = preds.copy()
    bad[1, 2, 0, 0, 0] = np.nan
    with pytest.raises(TuneError, match="not finite"):
        Scorer(bad, truth)


def test_dirichlet_weights_on_simplex():
    assert dirichlet_weights([0.5, 0.5, 0.5]) == pytest.approx([1 / 3] * 3)
    w = dirichlet_weights([0.0, 0.3, 1.0])  # u = 0 and u = 1 are safe
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0) and w[2] == 0.0
    assert dirichlet_weights([1.0, 1.0]) == pytest.approx([0.5, 0.5])


def test_tuning_recovers_known_weights():
    preds, truth = _problem()
    sc = Scorer(preds, truth)
    equal = sc(np.full(3, 1 / 3))
    assert sc.member_mapes().min() > 0.1 and equal > 0.1  # no member, nor the plain mean, is good
    w, study = fit_weights(preds, truth, n_trials=100, seed=0)
    assert w.shape == (3,) and w.sum() == pytest.approx(1.0) and (w >= 0).all()
    np.testing.assert_allclose(w, TRUE_W, atol=0.05)
    assert weighted_mape(preds, truth, w) < 0.2 * equal
    assert len(study.trials) == 100
    first = study.trials[0]
    assert first.user_attrs["weights"] == pytest.approx([1 / 3] * 3)  # equal weights enqueued first
    assert study.best_trial.user_attrs["weights"] == pytest.approx(w.tolist())


def test_single_member_needs_no_study():
    preds, truth = _problem(n=3)
    w, study = fit_weights(preds[:1], truth, n_trials=10, seed=0)
    assert w.tolist() == [1.0] and study is None


def test_split_half_never_scores_on_tuned_samples():
    preds, truth = _problem(n=7)
    names = ["a", "b", "c"]
    rep = split_half_report(
        preds, truth, names, {"a": 2.0, "b": 1.0, "zz": 5.0}, n_trials=20, seed=1, split_seed=3
    )
    assert rep["strategies"] == ["best_single", "equal", "hand", "tuned"]
    assert len(rep["halves"]) == 2
    seen = []
    for h in rep["halves"]:
        tune_idx, held = set(h["tune_idx"]), set(h["heldout_idx"])
        assert tune_idx and held and not tune_idx & held
        assert tune_idx | held == set(range(7))
        seen.append(sorted(held))
        held_l, tune_l = h["heldout_idx"], h["tune_idx"]
        # scores are on the held-out half only ...
        w = np.array([h["tuned_weights"][n] for n in names])
        assert h["heldout"]["tuned"] == pytest.approx(
            _ref_mape(preds[:, held_l], truth[held_l], w), rel=1e-6
        )
        assert h["heldout"]["hand"] == pytest.approx(
            _ref_mape(preds[:, held_l], truth[held_l], [2 / 3, 1 / 3, 0]), rel=1e-6
        )
        # ... and the tuning saw only the tuning half: the same fit on that half alone gives
        # the same weights
        w_alone, _ = fit_weights(preds[:, tune_l], truth[tune_l], n_trials=20, seed=1)
        np.testing.assert_allclose(w, w_alone, atol=1e-9)
        member = [_ref_mape(preds[:, tune_l], truth[tune_l], e) for e in np.eye(3)]
        assert h["best_single"] == names[int(np.argmin(member))]
    assert sorted(seen[0] + seen[1]) == list(range(7))  # each sample held out exactly once
    for s in rep["strategies"]:
        want = sum(h["heldout"][s] * len(h["heldout_idx"]) for h in rep["halves"]) / 7
        assert rep["heldout"][s] == pytest.approx(want)
        assert rep["heldout_per_sample"][s].shape == (7,)
        assert rep["heldout"][s] == pytest.approx(rep["heldout_per_sample"][s].mean())
    hand = [_ref_mape(preds[:, [i]], truth[[i]], [2 / 3, 1 / 3, 0]) for i in range(7)]
    np.testing.assert_allclose(rep["heldout_per_sample"]["hand"], hand, rtol=1e-6)
    # halves with opposite optima: member a is exact on half A only, c on half B only (b never);
    # weights tuned on one half must follow that half alone
    half_a = rep["halves"][0]["tune_idx"]  # the split depends on n and split_seed only
    rng = np.random.default_rng(2)
    err = 0.3 * np.abs(rng.standard_normal(truth.shape)) + 0.05
    in_a = np.isin(np.arange(7), half_a)[:, None, None]
    opp = np.stack(
        [
            truth * (1 + np.where(in_a, 0, err)),
            truth * (1 + err),
            truth * (1 + np.where(in_a, err, 0)),
        ]
    ).astype(np.float32)
    rep2 = split_half_report(opp, truth, names, None, n_trials=40, seed=1, split_seed=3)
    h_ab, h_ba = rep2["halves"]
    assert h_ab["tune_idx"] == half_a
    assert h_ab["best_single"] == "a" and h_ba["best_single"] == "c"
    assert h_ab["tuned_weights"]["a"] > 0.8 and h_ba["tuned_weights"]["c"] > 0.8
    assert h_ab["heldout"]["tuned"] > 5 * h_ab["tune_mape"]["tuned"]  # fitted on A, scored on B
    no_hand = split_half_report(preds, truth, names, None, n_trials=5, seed=1, split_seed=3)
    assert "hand" not in no_hand["heldout"]
    with pytest.raises(TuneError, match="at least 2"):
        split_half_report(preds[:, :1], truth[:1], names, None, n_trials=5, seed=1, split_seed=3)


def test_optuna_parameters_are_named_by_member_without_changing_the_result():
    """optuna-dashboard shows parameter names: ``u_<member>``, the weights as user attributes
    ``w_<member>``; TPE draws in suggestion order, so the names change no number."""
    preds, truth = _problem(n=6)
    names = ["tiny_dual42", "tiny_single4", "baseline_depth_trend"]
    w_named, named = fit_weights(preds, truth, n_trials=15, seed=2, names=names)
    w_plain, plain = fit_weights(preds, truth, n_trials=15, seed=2)
    np.testing.assert_array_equal(w_named, w_plain)
    assert [t.value for t in named.trials] == [t.value for t in plain.trials]
    assert list(named.trials[3].params) == [f"u_{n}" for n in names]
    best = named.best_trial.user_attrs
    assert [best[f"w_{n}"] for n in names] == pytest.approx(w_named.tolist())
    with pytest.raises(TuneError, match="unique"):
        fit_weights(preds, truth, n_trials=2, seed=0, names=["a", "a", "b"])


def test_study_resumes_by_name(tmp_path, caplog):
    preds, truth = _problem(n=4)
    db = tmp_path / "sub" / "optuna.db"
    url = f"sqlite:///{db}"

    def n_complete():
        st = optuna.load_study(study_name="w", storage=url)
        return len([t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE])

    w1, s1 = fit_weights(preds, truth, n_trials=6, seed=0, storage=db, study_name="w")
    assert db.is_file() and n_complete() == 6
    w2, _ = fit_weights(preds, truth, n_trials=6, seed=0, storage=db, study_name="w")
    assert n_complete() == 6  # nothing new to run
    np.testing.assert_array_equal(w1, w2)
    w3, s3 = fit_weights(preds, truth, n_trials=9, seed=0, storage=str(db), study_name="w")
    assert n_complete() == 9  # only the 3 missing trials ran
    assert s3.best_value <= s1.best_value
    params = [tuple(t.params.values()) for t in s3.trials]
    assert len(set(params)) == len(params)  # resumed trials do not replay the first ones
    # another objective under the same name: refused, or restarted on request
    other = preds[::-1].copy()
    with pytest.raises(TuneError, match="other members or predictions"):
        fit_weights(other, truth, n_trials=9, seed=0, storage=db, study_name="w")
    with caplog.at_level("WARNING", logger="speedstructure.ensemble.tuning"):
        fit_weights(
            other, truth, n_trials=2, seed=0, storage=db, study_name="w", restart_stale=True
        )
    assert n_complete() == 2
    assert "study 'w' in the Optuna storage was tuned on other members" in caplog.text
    assert "starting it afresh" in caplog.text


# --------------------------------------------------------------------------- stage


def _sid(i: int) -> str:
    return f"TUNE{i:014d}"


N_VAL = 4  # validation samples per fold
FOLDS = (0, 1)


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """One zip per fold with small targets (gathers are zeros)."""
    d = tmp_path_factory.mktemp("tune_data")
    rng = np.random.default_rng(5)
    z = np.linspace(0.0, 1.0, 1259, dtype=np.float32)
    targets = {}
    for k in FOLDS:
        with ZipWriter(d / f"fold{k}.zip") as zw:
            for i in range(N_VAL):
                sid = _sid(10 * k + i)
                y = np.clip(rng.uniform(1.6, 2.4) + rng.uniform(0.5, 1.5) * z, 1.5, 4.5)
                targets[sid] = np.repeat(y[None], 300, 0).astype(np.float32)
                zw.add(sid, np.zeros((5, 10001, 31), np.float32), targets[sid])
    return d, targets


def _sections(n_trials: int = 6) -> dict[str, Any]:
    """The ``params.yaml`` sections of the test project (the rest: the shipped file)."""
    trend = {"arch": "depth_trend"}
    return {
        "variants": {"tiny_a": trend, "tiny_b": trend, "baseline_depth_trend": trend},
        "runs": {
            **{f"{v}-f{k}": {"variant": v, "fold": k} for v in ("tiny_a", "tiny_b") for k in FOLDS},
            "baseline_depth_trend-f0": {"variant": "baseline_depth_trend", "fold": 0},
        },
        "ensemble": {
            "variants": ["tiny_a", "tiny_b"],
            "hand_weights": {"tiny_a": 0.8, "tiny_b": 0.5, "x": 1.0},
        },
        "tune": {"n_trials": n_trials, "seed": 42, "study_prefix": "sw", "split_seed": 0},
    }


def _project(root: Path, shared_data, tiny_params, n_trials: int = 6):
    """A project in ``root``: data, fold table and every run's val_preds.npz; its Params."""
    from speedstructure.engine.checkpoint import save_val_preds

    params = tiny_params(root, **_sections(n_trials))
    data_dir, targets = shared_data
    params.path("data").symlink_to(data_dir, target_is_directory=True)
    rows = ["sample_id,zip,split,group,fold"]
    for k in FOLDS:
        rows += [f"{_sid(10 * k + i)},data/fold{k}.zip,train,g{k},{k}" for i in range(N_VAL)]
    params.path("folds_table").parent.mkdir(parents=True)
    params.path("folds_table").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(7)
    for variant, scale in (("tiny_a", 0.04), ("tiny_b", 0.08)):
        for k in FOLDS:
            ids = [_sid(10 * k + i) for i in range(N_VAL)]
            if variant == "tiny_b":
                ids = ids[::-1]  # another id order than the fold table's
            preds = np.stack(
                [targets[s] * (1 + scale * rng.standard_normal((300, 1259))) for s in ids]
            )
            out = params.run_dir(variant, k)
            out.mkdir(parents=True)
            save_val_preds(out / "val_preds.npz", ids, preds.astype(np.float32))
            (out / "best.pt").write_bytes(b"")
    return params


def test_optuna_storage_is_the_environment_s_database_else_paths_optuna_db(
    tmp_path, tiny_params, monkeypatch
):
    params = tiny_params(tmp_path)
    monkeypatch.delenv("SPEEDSTRUCTURE_OPTUNA_STORAGE", raising=False)
    assert optuna_storage(params) == params.path("optuna_db") == tmp_path / "mlruns/optuna.db"
    url = "postgresql+psycopg://speedstructure@127.0.0.1:5433/optuna"  # speedstructure server's
    monkeypatch.setenv("SPEEDSTRUCTURE_OPTUNA_STORAGE", url)
    assert optuna_storage(params) == url
    monkeypatch.setenv("SPEEDSTRUCTURE_OPTUNA_STORAGE", "elsewhere/optuna.db")  # a file: as paths
    assert optuna_storage(params) == tmp_path / "elsewhere/optuna.db"


def test_run_tune_end_to_end(tmp_path, shared_data, tiny_params, monkeypatch):
    from speedstructure.engine.checkpoint import load_val_preds

    params = _project(tmp_path, shared_data, tiny_params)
    res = run_tune(params, track=False)
    assert res["files"]["ensemble"] == tmp_path / "ensemble" / "ensemble.json"
    ens = json.loads(params.path("ensemble").read_text())
    assert ens == json.loads(json.dumps(res["ensemble"]))
    assert ens["format"] == 1 and ens["variants"] == ["tiny_a", "tiny_b"]
    assert [f["fold"] for f in ens["folds"]] == [0, 1]
    _, targets = shared_data
    for f in ens["folds"]:
        k = f["fold"]
        assert f["n_val"] == N_VAL
        assert [m["variant"] for m in f["members"]] == ["tiny_a", "tiny_b"]
        assert [m["checkpoint"] for m in f["members"]] == [
            f"models/{v}/fold_{k}/best.pt" for v in ("tiny_a", "tiny_b")
        ]
        w = np.array([m["weight"] for m in f["members"]])
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
        assert set(f["heldout"]) == {"best_single", "equal", "hand", "tuned"}
        # tune.weights auto: with members this unequal another weighting beats equal weights
        # held out by more than a standard error; the less noisy member weighs more
        assert f["strategy"] != "equal"
        gain = f["gain_over_equal"][f["strategy"]]
        assert gain["gain"] > gain["se"] > 0
        assert gain["gain"] == pytest.approx(f["heldout"]["equal"] - f["heldout"][f["strategy"]])
        assert w[0] > w[1]
        assert set(f["tuned_weights"]) == {"tiny_a", "tiny_b"}
        # whole-fold MAPEs, recomputed from the files
        ids = [_sid(10 * k + i) for i in range(N_VAL)]
        tgt = np.stack([targets[s] for s in ids])
        preds = []
        for v in ("tiny_a", "tiny_b"):
            got, arr = load_val_preds(params.run_dir(v, k) / "val_preds.npz")
            preds.append(arr[[got.index(s) for s in ids]])
        preds = np.stack(preds)
        assert f["val_mape"] == pytest.approx(_ref_mape(preds, tgt, w), rel=1e-5)
        assert f["val_mape"] <= _ref_mape(preds, tgt, [0.5, 0.5]) + 1e-7
        for m, e in zip(f["members"], np.eye(2), strict=True):
            assert m["val_mape"] == pytest.approx(_ref_mape(preds, tgt, e), rel=1e-5)
    chosen = [f["heldout"][f["strategy"]] for f in ens["folds"]]
    assert ens["cv_mape"] == pytest.approx(np.mean(chosen)) and ens["weights"] == "auto"
    lean = json.loads(params.path("tune_metrics").read_text())  # the DVC metrics
    assert set(lean) == {"cv_mape", "heldout"} and lean["cv_mape"] == pytest.approx(ens["cv_mape"])
    metrics = json.loads(params.path("tune_report").read_text())  # the detail
    assert metrics["cv_mape"] == pytest.approx(ens["cv_mape"])
    assert set(metrics["folds"]) == {"fold0", "fold1"}
    assert set(metrics["heldout"]) == {"best_single", "equal", "hand", "tuned"}
    assert [metrics["folds"][f"fold{k}"]["strategy"] for k in (0, 1)] == [
        f["strategy"] for f in ens["folds"]
    ]
    csv_rows = params.path("tune_weights").read_text().splitlines()
    assert csv_rows[0] == "fold,variant,member,weight" and len(csv_rows) == 5
    assert csv_rows[1].startswith("0,tiny_a,tiny_a @ fold 0,")  # one bar per fold and member
    assert params.path("tune_plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert params.path("optuna_db").is_file()

    # the CLI, run again: the stored studies resume (no new trials) and give the same weights
    raw = {**yaml.safe_load(SHIPPED.read_text()), **_sections()}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SPEEDSTRUCTURE_ROOT", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--no-mlflow"])
    assert args.func(args) == 0
    again = json.loads(params.path("ensemble").read_text())
    assert [[m["weight"] for m in f["members"]] for f in again["folds"]] == [
        [m["weight"] for m in f["members"]] for f in ens["folds"]
    ]
    st = optuna.load_study(study_name="sw-fold0", storage=f"sqlite:///{params.path('optuna_db')}")
    assert len(st.trials) == 6


def test_run_tune_missing_val_preds_and_bad_config(tmp_path, shared_data, tiny_params):
    params = _project(tmp_path, shared_data, tiny_params, n_trials=2)
    (params.run_dir("tiny_b", 1) / "val_preds.npz").unlink()
    with pytest.raises(
        UserError,
        match=r"tiny_b/fold_1/val_preds\.npz: not found.*'tiny_b-f1'.*"
        r"train --variant tiny_b --fold 1",
    ):
        run_tune(params, track=False)
    sections = _sections(n_trials=2)
    bad = {**sections, "ensemble": {**sections["ensemble"], "variants": ["tiny_a", "nope"]}}
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        run_tune(tiny_params(tmp_path, **bad), track=False)
    no_run = {
        **sections,
        "variants": {**sections["variants"], "tiny_c": {"arch": "depth_trend"}},
        "ensemble": {**sections["ensemble"], "variants": ["tiny_a", "tiny_c"]},
    }
    with pytest.raises(ConfigError, match="'tiny_c'.*no training run"):
        run_tune(tiny_params(tmp_path, **no_run), track=False)
    with pytest.raises(UserError, match="--n-trials must be >= 1"):
        run_tune(params, track=False, n_trials=0)


def test_run_tune_rejects_mismatched_ids(tmp_path, shared_data, tiny_params):
    from speedstructure.engine.checkpoint import load_val_preds, save_val_preds

    params = _project(tmp_path, shared_data, tiny_params, n_trials=2)
    path = params.run_dir("tiny_b", 0) / "val_preds.npz"
    ids, arr = load_val_preds(path)
    save_val_preds(path, ids[:-1], arr[:-1])
    with pytest.raises(
        UserError, match=r"tiny_b/fold_0/val_preds\.npz: holds other sample ids than .*tiny_a"
    ):
        run_tune(params, track=False)
    save_val_preds(path, [_sid(99), *ids[:-1]], arr)
    sections = _sections(n_trials=2)
    sections["ensemble"]["variants"] = ["tiny_b", "tiny_a"]
    with pytest.raises(
        UserError, match=r"tiny_b/fold_0/val_preds\.npz: sample ids differ .* fold 0"
    ):
        run_tune(tiny_params(tmp_path, **sections), track=False)


@pytest.mark.slow
def test_mlflow_logging(tmp_path, shared_data, tiny_params):
    """``run_tune(track=True)`` logs through speedstructure.tracking to the project's store."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _project(tmp_path, shared_data, tiny_params, n_trials=4)
    mlflow_cfg = {
        "tracking_uri": uri,
        "artifact_root": str(tmp_path / "artifacts"),
        "experiment": "tune-test",
    }
    params = tiny_params(tmp_path, **_sections(n_trials=4), mlflow=mlflow_cfg)
    run_tune(params, track=True)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"tune", "tune-fold0", "tune-fold1"}
    assert runs["tune"].data.params["storage"] == params.paths.optuna_db
    assert runs["tune"].data.params["n_trials"] == "4"
    fold0 = runs["tune-fold0"]
    assert fold0.data.tags["mlflow.parentRunId"] == runs["tune"].info.run_id
    assert fold0.data.params["members"] == "tiny_a,tiny_b"
    hist = client.get_metric_history(fold0.info.run_id, "trial_mape")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3]
    assert {"weight_tiny_a", "weight_tiny_b", "heldout_tuned", "heldout_hand", "val_mape"} <= set(
        fold0.data.metrics
    )
    arts = {a.path for a in client.list_artifacts(runs["tune"].info.run_id, "tune")}
    assert {"tune/ensemble.json", "tune/tune_heldout.png"} <= arts


def test_auto_keeps_equal_weights_unless_another_weighting_is_lower_beyond_noise():
    equal = 0.05 + 0.01 * np.random.default_rng(0).random(40)
    sign = np.tile([1.0, -1.0], 20)  # differences of mean exactly the shift
    per = {
        "best_single": equal - 0.0005 + 0.01 * sign,  # lower on average, within its noise
        "equal": equal,
        "hand": equal + 0.003,  # worse on every sample
        "tuned": equal - 0.0002 + 0.0001 * sign,  # a little lower on every sample
    }
    heldout = {k: float(v.mean()) for k, v in per.items()}
    gains = gain_over_equal(per)
    assert gains["equal"] == {"gain": 0.0, "se": 0.0}
    assert gains["best_single"]["gain"] == pytest.approx(0.0005)
    assert gains["best_single"]["se"] == pytest.approx(0.01 / np.sqrt(40), rel=0.02)
    assert heldout["best_single"] < heldout["tuned"] < heldout["equal"]
    assert choose_weighting(heldout, "auto", gains) == "tuned"  # the only one beyond noise
    clear = {**per, "best_single": equal - 0.001}
    assert choose_weighting(heldout, "auto", gain_over_equal(clear)) == "best_single"
    noise = {**per, "tuned": per["best_single"] + 0.0001}
    assert choose_weighting(heldout, "auto", gain_over_equal(noise)) == "equal"
    one = dict.fromkeys(("best_single", "equal", "tuned"), equal)  # one member: all tie
    one_mape = {k: float(v.mean()) for k, v in one.items()}
    assert choose_weighting(one_mape, "auto", gain_over_equal(one)) == "equal"
    assert choose_weighting(heldout, "hand", gains) == "hand"  # named: used as it is
    with pytest.raises(TuneError, match="tune.weights: hand: not available"):
        choose_weighting({"equal": 0.05}, "hand", gains)


@pytest.mark.parametrize("setting", ["equal", "tuned", "best_single"])
def test_tune_weights_named_are_used_on_every_fold(tmp_path, shared_data, tiny_params, setting):
    import dataclasses

    params = _project(tmp_path, shared_data, tiny_params)
    params = dataclasses.replace(params, tune=dataclasses.replace(params.tune, weights=setting))
    ens = run_tune(params, track=False)["ensemble"]
    for f in ens["folds"]:
        assert f["strategy"] == setting
        w = [m["weight"] for m in f["members"]]
        if setting == "equal":
            assert w == [0.5, 0.5]
        elif setting == "best_single":
            assert w == [1.0, 0.0]  # tiny_a: the less noisy member
        else:
            assert w == pytest.approx(list(f["tuned_weights"].values()))
    assert ens["cv_mape"] == pytest.approx(np.mean([f["heldout"][setting] for f in ens["folds"]]))
