"""Physics refinement: the torch forward model matches the simulator; FWI lowers the misfit."""

from __future__ import annotations

import numpy as np
import pytest

from speedstructure.config import SimParams
from speedstructure.physics import observed_at_sim_rate, simulate_at_sim_rate
from speedstructure.synth.simulate import Simulator

SMALL = SimParams(dx=10.0, dt=0.0005, n_time=3001)
PREP = {"mute_after": 0.05, "taper": 0.02, "lowpass_hz": 20.0, "agc_window": 0.1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """deepwave on these small grids: one torch thread (more only contend for the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layered(nz: int = 200, floor: int = 60) -> np.ndarray:
    v = np.full((300, nz), 1.5, np.float32)
    z = np.arange(nz - floor, dtype=np.float32)
    v[:, floor:] = 1.9 + 0.004 * z
    v[:, floor + 60 : floor + 80] += 0.4
    return v


def test_the_torch_forward_model_is_the_simulator():
    import torch

    from speedstructure.physics import TorchForward
    from speedstructure.synth.simulate import coarsen_slowness

    sim = Simulator(SMALL)
    v = layered()
    fwd = TorchForward(sim)
    vt = torch.from_numpy(v)
    assert np.allclose(fwd.coarsen(vt).numpy(), coarsen_slowness(v, sim.factor), rtol=1e-5)
    got = fwd(vt).numpy()
    ref = simulate_at_sim_rate(v, sim)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_refinement_lowers_the_misfit_and_keeps_the_safeguards():

    from speedstructure.fwi import FwiSettings, invert

    sim = Simulator(SMALL)
    truth = layered()
    obs = observed_at_sim_rate(sim(truth), sim)
    start = np.where(truth > 1.55, truth * 0.95, truth).astype(np.float32)
    cfg = FwiSettings(iterations=2, grid_m=20, step=0.05, prep=PREP)
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
