"""Figures and the ``plot-sample`` subcommand."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from speedstructure import cli
from speedstructure.config.schema import SynthConfig
from speedstructure.reports.plots import plot_sample, plot_velocity_grid
from speedstructure.synth.velocity import FAMILIES, generate_velocity
from support import random_gathers, sample_id

IDS = (sample_id("train", 0), sample_id("train", 1))


@pytest.fixture
def train_zip(tiny_zips):
    return tiny_zips["train"]


def _check_png(path, min_w=600, min_h=300):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return img


def test_plot_sample_cli_default_first_sample(train_zip, tmp_path, capsys):
    out = tmp_path / "figs" / "sample.png"
    rc = cli.main(["plot-sample", "--zip", str(train_zip), "--output", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    img = _check_png(out)
    assert img.shape[1] > img.shape[0]  # gathers side by side with the model: wide figure
    assert [p.name for p in out.parent.iterdir()] == ["sample.png"]  # no temp file left


def test_plot_sample_cli_named_sample(train_zip, tmp_path):
    out = tmp_path / "b.png"
    assert (
        cli.main(
            ["plot-sample", "--zip", str(train_zip), "--sample-id", IDS[1], "--output", str(out)]
        )
        == 0
    )
    _check_png(out)


def test_plot_sample_cli_missing_sample(train_zip, tmp_path, capsys):
    out = tmp_path / "x.png"
    rc = cli.main(
        [
            "plot-sample",
            "--zip",
            str(train_zip),
            "--sample-id",
            "ZZZZZZZZZZZZZZZZZ9",
            "--output",
            str(out),
        ]
    )
    assert rc != 0
    assert "ZZZZZZZZZZZZZZZZZ9" in capsys.readouterr().err
    assert not out.exists()


def test_plot_sample_cli_missing_zip(tmp_path):
    assert (
        cli.main(
            [
                "plot-sample",
                "--zip",
                str(tmp_path / "nope.zip"),
                "--output",
                str(tmp_path / "x.png"),
            ]
        )
        != 0
    )


def test_plot_sample_without_velocity(tmp_path):
    out = plot_sample(
        random_gathers(np.random.default_rng(1)), None, tmp_path / "g.png", title="test set"
    )
    _check_png(out)


def test_plot_velocity_grid(tmp_path):
    rng = np.random.default_rng(2)
    models = [generate_velocity(rng, f, SynthConfig()) for f in FAMILIES]
    out = plot_velocity_grid(models, list(FAMILIES), tmp_path / "grid.png", ncols=3)
    _check_png(out)
    with pytest.raises(ValueError):
        plot_velocity_grid(models, ["one title"], tmp_path / "bad.png")


def test_figures_are_world_readable_and_a_fitted_baseline_gets_one_panel(tmp_path):
    import os
    import stat

    from matplotlib.image import imread

    from speedstructure.reports.plots import plot_training_curves

    old = os.umask(0o022)
    try:
        trained = plot_training_curves(
            [
                {"epoch": 1, "train_loss": 0.1, "val_mape": 0.09, "lr": 1e-3},
                {"epoch": 2, "train_loss": 0.08, "val_mape": 0.07, "lr": 5e-4},
            ],
            tmp_path / "trained.png",
        )
        fitted = plot_training_curves(
            [{"epoch": 0, "train_loss": float("nan"), "val_mape": 0.1, "lr": 0.0}],
            tmp_path / "fitted.png",
        )
    finally:
        os.umask(old)
    for path in (trained, fitted):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # the baseline's figure is one panel (not a dot beside an lr = 0 panel): narrower
    assert imread(fitted).shape[1] < imread(trained).shape[1]
