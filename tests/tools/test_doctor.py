"""``speedstructure doctor``: its screen, its exit code, and the projection's arithmetic."""

from __future__ import annotations

import shutil

import pytest

from speedstructure.cli import main
from speedstructure.config.load import load_params
from speedstructure.engine.runtime import resolve_threads
from speedstructure.tools import machine
from speedstructure.tools.doctor import (
    RUN_OVERHEAD_S,
    STAGE_OVERHEAD_S,
    Rates,
    cost_checks,
    project_pipeline,
)
from support import ROOT


@pytest.fixture
def fresh_project(tmp_path, monkeypatch):
    """A checkout with the shipped params.yaml and nothing generated yet."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("SPEEDSTRUCTURE_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return tmp_path


def test_a_small_disk_exits_1_with_one_line_naming_it(fresh_project, monkeypatch, capsys):
    monkeypatch.setattr(machine, "free_disk", lambda path: 2.0e9)
    assert main(["doctor", "--no-measure"]) == 1
    out = capsys.readouterr().out
    reasons = [line for line in out.splitlines() if line.startswith("disk:")]
    assert len(reasons) == 1, out
    # the default profile's 456 samples (408 + the 48 out of distribution) project 3.5 GB of
    # zips (the former 384 + 24 wrote 3.1 GB: data.dvc 3,146,962,999 bytes), as much again in
    # the store, and both again in the DVC cache (dvc add and dvc repro copy them there)
    assert reasons[0].startswith(
        "disk: 2 GB free, the default profile needs about 16 GB "
        "(zips 3.5 + store 3.5 + DVC cache 7.0 + checkpoints"
    )
    assert "ok: this machine" not in out


def test_enough_disk_exits_0_and_shows_the_machine(fresh_project, monkeypatch, capsys):
    monkeypatch.setattr(machine, "free_disk", lambda path: 500.0e9)
    assert main(["doctor", "--no-measure"]) == 0
    out = capsys.readouterr().out
    for label in ("CPU", "bf16 on the CPU", "cores", "GPUs", "versions", "free disk", "MLflow"):
        assert f"  {label} " in out, label
    assert "torch uses " in out and "Muon orthogonalises in float32" in out
    assert "new store, will be created" in out
    assert out.rstrip().endswith("ok: this machine can run the default profile")


def test_the_competition_profile_without_a_gpu_is_a_reason(fresh_project, monkeypatch):
    import torch

    params = load_params()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    competition = type(params)(**{**params.__dict__, "profile": "competition"})
    checks = cost_checks(competition)
    assert [c.problem for c in checks][0].startswith("gpu: the competition profile")


def test_the_projection_adds_up_the_measured_rates(fresh_project):
    params = load_params()
    s = params.synth
    rates = {"tiny_dual42": Rates(train=10.0, infer=40.0)}
    proj = project_pipeline(params, rates, sim_s=2.0)
    n_val = s.n_train / params.folds.n_folds
    n_train = s.n_train - n_val + s.n_extended_1 + s.n_extended_2
    runs = [r for r in params.runs.values() if r.variant == "tiny_dual42"]
    epochs = params.train_for("tiny_dual42").epochs
    per_run = epochs * (n_train / 10.0 + n_val / 40.0) + 2 * n_val / 40.0 + RUN_OVERHEAD_S
    assert proj.training == pytest.approx(len(runs) * per_run)
    # an input cache adds one preparation of every training sample and its mirror per run
    cached = project_pipeline(params, {"tiny_dual42": Rates(10.0, 40.0, prepare=20.0)}, 2.0)
    assert cached.training == pytest.approx(len(runs) * (per_run + 2 * n_train / 20.0))
    samples = s.n_train + s.n_extended_1 + s.n_extended_2 + s.n_test + s.ood.n_test
    assert proj.data == pytest.approx(samples * 2.0 / s.workers)  # no zips yet
    workers = min(resolve_threads(params.qc.workers, "qc.workers"), s.n_test)
    assert proj.qc == pytest.approx(s.n_test * 2.0 / workers)  # in qc.workers processes
    assert proj.total == pytest.approx(
        proj.data + proj.training + proj.prediction + proj.qc + STAGE_OVERHEAD_S
    )


def test_every_trained_variant_of_the_default_profile_is_measured(fresh_project):
    """The column network picks floors inside forward(): the doctor builds every variant with
    the data's floor picker (it once failed there with a traceback)."""
    from speedstructure.tools.doctor import measure_variant, trained_variants

    params = load_params()
    assert "column" in trained_variants(params)
    rates = measure_variant(params, "column", steps=1)
    assert rates.train > 0 and rates.infer > 0
    assert params.train_for("column").cache_inputs and rates.prepare > 0
