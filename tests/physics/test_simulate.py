"""Physics checks of the simulator: timing, polarity, scale and grid fidelity."""

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from speedstructure.config.schema import SimParams, SynthConfig
from speedstructure.config.typed import ConfigError
from speedstructure.data.format import NX, NZ
from speedstructure.physics.simulate import (
    RECEIVER_DEPTH_M,
    RECEIVER_X_M,
    SOURCE_DEPTH_M,
    SOURCE_X_M,
    Simulator,
    check_sim,
    coarsen_slowness,
)

DT = 1e-4


@pytest.fixture(scope="module")
def homogeneous():
    v = np.full((NX, NZ), 2.0, np.float32)
    return Simulator(SimParams())(v)


def analytic_2d(offset_m: float, c: float, f0: float, nt: int) -> np.ndarray:
    """Analytic 2-D Green's function of the acoustic wave equation convolved with the Ricker.

    The Green's function 1/sqrt(t^2 - r^2) is singular at the arrival; it is taken as exact
    averages over sub-samples (its primitive is arccosh(t / r)), not sampled, so the
    reference is accurate at near offsets too.
    """
    sub = 4
    t = np.arange(nt * sub + 1) * DT / sub
    r_t = offset_m / c
    prim = np.arccosh(np.maximum(t / r_t, 1.0))
    g = np.diff(prim) / (DT / sub)
    tau = t[:-1] - 1.0 / f0
    a = (np.pi * f0 * tau) ** 2
    w = (1 - 2 * a) * np.exp(-a)
    return fftconvolve(g, w)[: nt * sub : sub]


def test_direct_arrival_timing_homogeneous(homogeneous):
    """Direct-wave peak at every receiver of every shot agrees with the analytic 2-D solution
    within 1 ms, near offsets of the off-grid sources (74, 149, 224, 299 m on a 5 m grid)
    included."""
    g = homogeneous
    for s, sx in enumerate(SOURCE_X_M):
        for r in range(len(RECEIVER_X_M)):
            off = np.hypot(RECEIVER_X_M[r] - sx, SOURCE_DEPTH_M - RECEIVER_DEPTH_M)
            ref = analytic_2d(off, 2000.0, 15.0, 6000)
            t_ref = (np.argmax(ref) + 1) * DT  # plus the one-sample recording delay
            t_sim = np.argmax(g[s, :6000, r]) * DT
            assert abs(t_sim - t_ref) <= 1e-3, (s, r, t_sim, t_ref)
            # and the kinematics: later than offset / velocity + wavelet delay
            assert t_sim >= off / 2000.0 + 1 / 15.0 - 1e-3


def test_polarity_and_scale_in_water():
    v = np.full((NX, NZ), 1.5, np.float32)
    g = Simulator(SimParams())(v)
    for s, r in ((0, 0), (2, 15), (4, 30)):
        tr = g[s, :, r]
        i = int(np.argmax(np.abs(tr)))
        assert tr[i] > 0, "direct arrival's central lobe must be positive"
        assert 0.19 < tr[i] < 0.27, tr[i]
    assert g.dtype == np.float32 and g.shape == (5, 10001, 31)
    assert np.isfinite(g).all()


def test_reflection_two_way_time():
    """One flat interface at 400 m: the reflection arrives at the predicted two-way time
    within 2 ms."""
    depth = 400
    v = np.full((NX, NZ), 1.5, np.float32)
    v[:, depth:] = 3.0
    g = Simulator(SimParams())(v)
    w = np.full((NX, NZ), 1.5, np.float32)
    direct = Simulator(SimParams())(w)
    refl = g - direct  # the reflection alone
    s, sx = 2, SOURCE_X_M[2]
    for r in (15, 5, 25):
        dx = RECEIVER_X_M[r] - sx
        # image source: path from (sx, 20) to the interface and up to (rx, 10)
        path = np.hypot(dx, (depth - SOURCE_DEPTH_M) + (depth - RECEIVER_DEPTH_M))
        ref = analytic_2d(path, 1500.0, 15.0, 10001)
        t_ref = (np.argmax(ref) + 1) * DT
        t_sim = np.argmax(refl[s, :, r]) * DT
        assert abs(t_sim - t_ref) <= 2e-3, (r, t_sim, t_ref)


def test_fidelity_coarse_vs_fine_layered():
    """Default 5 m grid against a 2 m run of a layered model: corr > 0.99, rel. L2 < 10 %."""
    from speedstructure.synth.velocity import generate_velocity

    cfg = SynthConfig(v_min=1.5, v_max=4.5, water_velocity=1.5, water_depth=(150, 400))
    v = generate_velocity(np.random.default_rng(3), "gentle_fold", cfg)
    coarse = Simulator(SimParams())(v).astype(np.float64)
    fine = Simulator(SimParams(dx=2.0))(v).astype(np.float64)
    corr = np.corrcoef(coarse.ravel(), fine.ravel())[0, 1]
    rel = np.linalg.norm(coarse - fine) / np.linalg.norm(fine)
    assert corr > 0.99, corr
    assert rel < 0.10, rel


def test_the_default_absorbing_cells_leave_no_boundary_echo_worth_the_name():
    """The default 20 absorbing cells (100 m) against 120: after 0.2 s (the reflections)
    the traces of a folded model differ by under 0.5 % RMS, far below what the 5 m grid
    itself may cost against a finer one (test_fidelity_coarse_vs_fine_layered allows 10 %)."""
    from speedstructure.synth.velocity import generate_velocity

    cfg = SynthConfig(v_min=1.5, v_max=4.5, water_velocity=1.5, water_depth=(150, 400))
    v = generate_velocity(np.random.default_rng(5), "strong_fold", cfg)
    default = Simulator(SimParams())(v).astype(np.float64)[:, 2000:]
    wide = Simulator(SimParams(pml_width=120))(v).astype(np.float64)[:, 2000:]
    rel = np.linalg.norm(default - wide) / np.linalg.norm(wide)
    assert rel < 0.005, rel


def test_the_organisers_grid_is_the_model_itself_on_nodes_with_no_resampling():
    """dx 1 m, dt 0.1 ms (``bench simulator``'s fine set): the model's own cells (one column
    added for the receiver at x = 300 m), every source and receiver on a node, and the record
    at its own step.  Not simulated here: about a minute a sample on one core."""
    sim = Simulator(SimParams(dx=1.0, dt=0.0001))
    assert (sim.factor, sim.up) == (1, 1)
    v = np.random.default_rng(0).uniform(1.5, 4.5, (NX, NZ)).astype(np.float32)
    np.testing.assert_array_equal(coarsen_slowness(v, 1)[:NX], v)
    assert coarsen_slowness(v, 1).shape == (NX + 1, NZ)
    for locations in (sim.source_locations, sim.receiver_locations):
        assert torch.equal(locations, locations.round())


def test_coarsen_slowness_harmonic_mean():
    v = np.full((NX, NZ), 2.0, np.float32)
    v[:, 1::2] = 4.0
    c = coarsen_slowness(v, 5)
    assert c.shape == (61, 252)
    # harmonic mean of 2 and 4 mixed about half-half lies below the arithmetic mean
    assert np.all(c < 3.0) and np.all(c > 2.0)
    assert np.allclose(coarsen_slowness(np.full((NX, NZ), 3.0, np.float32), 5), 3.0)


def test_bad_config(tiny_params, tmp_path):
    with pytest.raises(ValueError, match="integer multiple"):
        Simulator(SimParams(dt=0.00025 + 1e-6))
    with pytest.raises(ConfigError, match="dx"):
        check_sim(SimParams(dx=12.0))
    with pytest.raises(ConfigError, match=r"synth\.sim: unknown key\(s\) bogus"):
        tiny_params(tmp_path, synth={"sim": {"dx": 5, "bogus": 1}})
    # whole numbers given for float settings become floats, as the simulator expects
    sim = check_sim(tiny_params(tmp_path, synth={"sim": {"dx": 5, "freq": 15}}).synth.sim)
    assert sim == SimParams() and isinstance(sim.dx, float) and isinstance(sim.freq, float)
