"""Physics consistency: the misfit is zero for the true model and grows with a perturbation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speedstructure.config.schema import SimParams
from speedstructure.physics.misfit import (
    Preprocess,
    compare,
    observed_at_sim_rate,
    simulate_at_sim_rate,
)
from speedstructure.physics.simulate import Simulator
from support import SMALL_PREP, SMALL_SIM_SETTINGS, WATER, layered_model

SMALL = SimParams(**SMALL_SIM_SETTINGS)  # 10 m grid, 0.3 s: fast
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturbed(v: np.ndarray, factor: float) -> np.ndarray:
    return np.where(v > 1.55, np.clip(v * factor, 1.5, 4.5), v).astype(np.float32)


@pytest.fixture(scope="module")
def small_case():
    sim = Simulator(SMALL)
    truth = layered_model()
    return sim, truth, observed_at_sim_rate(sim(truth), sim)


def test_observed_gathers_decimate_to_the_simulators_own_samples(small_case):
    sim, truth, obs = small_case
    direct = simulate_at_sim_rate(truth, sim)
    assert obs.shape == direct.shape
    assert np.abs(obs - direct).max() <= 1e-4 * np.abs(obs).max()


def test_misfit_is_zero_for_the_true_model_and_grows_with_the_perturbation(small_case):
    sim, truth, obs = small_case
    prep = Preprocess.for_simulator(sim, water_velocity=WATER, **SMALL_PREP)
    results = [
        compare(obs, simulate_at_sim_rate(perturbed(truth, f), sim), prep) for f in (1.0, 1.03, 1.1)
    ]
    misfits = [r["misfit"] for r in results]
    assert misfits[0] < 1e-6
    assert results[0]["trace_correlation"] > 0.999999
    assert misfits[0] < misfits[1] < misfits[2]
    assert results[2]["trace_correlation"] < results[1]["trace_correlation"] < 1


def test_the_mute_removes_the_direct_arrival(small_case):
    sim, truth, obs = small_case
    prep = Preprocess.for_simulator(sim, water_velocity=WATER, **SMALL_PREP)
    mute = prep.mute()
    assert mute.shape == obs.shape
    # the first samples (direct arrival, identical for every model) carry no weight
    assert (mute[..., : int(0.05 / prep.dt)] == 0).all()
    assert (mute[..., -1] == 1).all()


def _test_zip_of_one_model(data, ids: list[str]) -> np.ndarray:
    """``data/test.zip`` holding the gathers of one layered model (the challenge's
    acquisition) under every id; returns the model."""
    from speedstructure.data.samples import ZipWriter

    truth = np.pad(layered_model(nz=400), ((0, 0), (0, 859)), mode="edge")
    gathers = Simulator(SimParams())(truth)
    data.mkdir()
    with ZipWriter(data / "test.zip") as zw:
        for sid in ids:
            zw.add(sid, gathers, None)
    return truth


def test_qc_stage_ranks_a_perturbed_prediction_worse(tmp_path, tiny_params):
    """End to end on the challenge acquisition: three predictions of one model."""
    from speedstructure.stages.qc import run_qc

    ids = ["QC00000000000000A0", "QC00000000000000B0", "QC00000000000000C0"]
    data = tmp_path / "data"
    truth = _test_zip_of_one_model(data, ids)
    preds = {ids[0]: truth, ids[1]: perturbed(truth, 1.03), ids[2]: perturbed(truth, 1.1)}
    (tmp_path / "submission").mkdir()
    np.savez(tmp_path / "submission" / "submission.npz", **preds)
    np.savez(data / "test_labels.npz", **dict.fromkeys(ids, truth))
    params = tiny_params(tmp_path)
    summary = run_qc(params, track=False, progress=False)
    assert summary["worst"][0] == ids[2]
    assert summary["spearman_misfit_mape"] == pytest.approx(1.0)
    table = (tmp_path / params.paths.qc_table).read_text().splitlines()
    assert table[0].startswith("sample_id,misfit,trace_correlation") and len(table) == 4
    assert (tmp_path / params.paths.qc_figure).is_file()
    # versioned outputs hold no timings (the same params give the same bytes)
    assert "seconds" not in table[0]
    metrics = json.loads((tmp_path / params.paths.qc_metrics).read_text())
    assert "seconds_per_sample" not in metrics and "worst" not in metrics
    assert metrics["spearman_misfit_mape"] == pytest.approx(1.0)


def test_qc_processes_give_the_same_rows_in_the_same_order(tmp_path, tiny_params):
    """Two spawned processes (``qc.workers: 2``) give the same misfits, correlations and
    compared shots as one process, in the submission's order."""
    from speedstructure.stages.qc import check_samples

    ids = ["QC00000000000000C1", "QC00000000000000A1", "QC00000000000000B1"]
    truth = _test_zip_of_one_model(tmp_path / "data", ids)
    sub = {ids[0]: perturbed(truth, 1.1), ids[1]: truth, ids[2]: perturbed(truth, 1.03)}
    params = tiny_params(tmp_path)
    results = {w: check_samples(params, ids, sub, progress=False, workers=w) for w in (1, 2)}
    (rows1, shots1), (rows2, shots2) = results[1], results[2]
    assert [r["sample_id"] for r in rows2] == ids
    for a, b in zip(rows1, rows2, strict=True):
        assert (a["misfit"], a["trace_correlation"]) == (b["misfit"], b["trace_correlation"])
    assert rows2[0]["misfit"] > rows2[2]["misfit"] > rows2[1]["misfit"]
    for sid in ids:
        np.testing.assert_array_equal(shots1[sid][1], shots2[sid][1])
