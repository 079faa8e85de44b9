"""Physics refinement: the torch forward model matches the simulator; FWI lowers the misfit."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from speedstructure.config.schema import SimParams
from speedstructure.physics.misfit import observed_at_sim_rate, simulate_at_sim_rate
from speedstructure.physics.simulate import Simulator
from support import SMALL_PREP, SMALL_SIM_SETTINGS, WATER, layered_model

SMALL = SimParams(**SMALL_SIM_SETTINGS)  # 10 m grid, 0.3 s: fast
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_torch_forward_model_is_the_simulator():
    import torch

    from speedstructure.physics.misfit import TorchForward
    from speedstructure.physics.simulate import coarsen_slowness

    sim = Simulator(SMALL)
    v = layered_model()
    fwd = TorchForward(sim)
    vt = torch.from_numpy(v)
    assert np.allclose(fwd.coarsen(vt).numpy(), coarsen_slowness(v, sim.factor), rtol=1e-5)
    got = fwd(vt).numpy()
    ref = simulate_at_sim_rate(v, sim)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_refinement_lowers_the_misfit_and_keeps_the_safeguards():

    from speedstructure.physics.fwi import FwiSettings, invert

    sim = Simulator(SMALL)
    truth = layered_model()
    obs = observed_at_sim_rate(sim(truth), sim)
    start = np.where(truth > 1.55, truth * 0.95, truth).astype(np.float32)
    cfg = FwiSettings(water_velocity=WATER, iterations=2, grid_m=20, step=0.05, prep=SMALL_PREP)
    res = invert(sim, obs, start, cfg)
    assert len(res.misfits) >= 2
    assert all(b < a for a, b in zip(res.misfits, res.misfits[1:], strict=False))
    assert res.misfits[-1] < res.misfits[0]
    assert (res.model[:, :60] == 1.5).all()  # the water layer is fixed
    assert res.model.min() >= 1.5 and res.model.max() <= 4.5
    err = lambda m: np.abs(m - truth)[:, 60:].mean()  # noqa: E731
    assert err(res.model) < err(start)


def test_sample_choice_and_the_disabled_stage(tmp_path, tiny_params):
    from speedstructure.errors import UserError
    from speedstructure.stages.refine import choose_samples, run_refine

    ids = ["a", "b", "c"]
    assert choose_samples(ids, None) == ids
    assert choose_samples(ids, 2) == ["a", "b"]
    assert choose_samples(ids, "c,a") == ["c", "a"]
    with pytest.raises(UserError):
        choose_samples(ids, "zz")
    params = tiny_params(tmp_path)
    summary = run_refine(params, track=False)
    assert summary == {"enabled": False, "n_refined": 0, "note": summary["note"]}
    assert (tmp_path / params.paths.refine_metrics).is_file()
    assert (tmp_path / params.paths.refined).is_dir()


def test_refined_outputs_hold_no_timings(tmp_path, tiny_params):
    import json

    from speedstructure.physics.fwi import FwiResult
    from speedstructure.reports.qc import refine_summary
    from speedstructure.stages.refine import TABLE_NAME, write_outputs

    params = tiny_params(tmp_path)
    sid = "a" * 18
    start = np.full((300, 1259), 2.0, np.float32)
    results = {sid: FwiResult(start + 0.1, [1.0, 0.5], seconds=12.3, evaluations=3)}
    cfg = SimpleNamespace(iterations=1, grid_m=20)
    summary = refine_summary(results, None, 12.3, cfg)
    assert summary["seconds_per_sample"] == pytest.approx(12.3)  # for MLflow and the console
    np.savez(tmp_path / "sub.npz", **{sid: start})
    with np.load(tmp_path / "sub.npz") as sub:
        write_outputs(params, sub, results, None, summary)
    written = json.loads((tmp_path / params.paths.refine_metrics).read_text())
    assert "seconds_per_sample" not in written and written["misfit_after"] == 0.5
    table = (tmp_path / params.paths.refined / TABLE_NAME).read_text().splitlines()
    assert "seconds" not in table[0] and table[1].startswith(f"{sid},1.000000,0.500000,1,")
