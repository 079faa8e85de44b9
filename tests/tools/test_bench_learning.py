"""``speedstructure bench learning``: a variant trained on nested subsets (or longer) of a fold
and scored on its validation samples (a depth-trend variant on random data: no gradient
training, so the test is quick; what it checks is the scaling and the scores)."""

from __future__ import annotations

import numpy as np
import pytest

from speedstructure.tools.bench_learning import (
    FACTORS,
    PANELS,
    bench_learning,
    format_table,
    plot_curve,
    scores,
)
from support import WATER, sample_id


@pytest.fixture
def project(tmp_path, write_zips, tiny_params):
    zips = write_zips(tmp_path / "data", counts={"train": 14})
    params = tiny_params(
        tmp_path,
        variants={"trend": {"arch": "depth_trend"}},
        runs={"trend-f0": {"variant": "trend", "fold": 0}},
        ensemble={"variants": ["trend"], "hand_weights": {"trend": 1.0}},
    )
    table = params.path("folds_table")
    table.parent.mkdir(parents=True)
    rows = [f"{sample_id('train', i)},{zips['train']},{int(i < 2)}" for i in range(14)]
    table.write_text("sample_id,zip,fold\n" + "\n".join(rows) + "\n")
    return params


def test_samples_scale_as_nested_subsets_and_every_row_is_scored(project):
    out = bench_learning(project, scale="samples", fold=1)
    assert out["variant"] == "trend" and out["val_samples"] == 2
    rows = out["rows"]
    assert [r["factor"] for r in rows] == list(FACTORS)
    assert [r["samples"] for r in rows] == [3, 6, 12]  # a quarter, a half, all 12
    assert len({r["val_mape"] for r in rows}) == 3  # each subset fits another trend
    for r in rows:
        assert 0 < r["val_mape"] < 1 and 0 < r["band_mape"] < 1
    table = format_table(out)
    assert "scaling the samples" in table and table.count("\n") == len(FACTORS) + 1


def test_the_curve_is_a_png_with_one_panel_per_figure(project, tmp_path):
    from matplotlib.image import imread

    out = bench_learning(project, scale="samples", fold=1)
    path = plot_curve(out, tmp_path / "curves" / "learning.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert (width, height) == (round(320 * len(PANELS)), 300)  # 3.2 x 3.0 in per panel, 100 dpi
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left beside it


def test_epochs_scale_the_variants_epochs_on_every_sample(project):
    out = bench_learning(project, scale="epochs", fold=1)
    base = project.train_for("trend").epochs
    assert [(r["samples"], r["epochs"]) for r in out["rows"]] == [(12, base * f) for f in FACTORS]


def test_scores_of_a_perfect_and_a_flat_prediction(project):
    rng = np.random.default_rng(0)
    truth = rng.uniform(1.6, 4.5, (2, 300, 1259)).astype(np.float32)
    truth[:, :, :200] = WATER
    perfect = scores(truth, truth, project)
    assert perfect == {
        "val_mape": 0.0,
        "band_mape": 0.0,
        "lateral_r2": 1.0,
        "water_floor_error_m": 0.0,
    }
    flat = truth.mean(axis=1, keepdims=True).repeat(300, axis=1)
    assert scores(flat, truth, project)["lateral_r2"] == pytest.approx(0.0, abs=1e-9)
