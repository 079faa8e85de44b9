"""Scoring helpers of the evaluate stage (the stage itself runs in test_pipeline)."""

import numpy as np

from speedstructure.evaluate import format_report, relative_error
from speedstructure.train import per_sample_mape


def test_relative_error_is_the_challenge_metric():
    rng = np.random.default_rng(0)
    g = rng.uniform(1.5, 4.5, (2, 300, 1259)).astype(np.float32)
    p = g * rng.uniform(0.9, 1.1, g.shape).astype(np.float32)
    err = relative_error(p, g)
    assert err.shape == g.shape and err.dtype == np.float32
    np.testing.assert_allclose(err, np.abs(g - p) / (np.abs(g) + 1e-8), rtol=1e-6)
    import torch

    np.testing.assert_allclose(err.mean(axis=(1, 2)), per_sample_mape(torch.from_numpy(p), torch.from_numpy(g)).numpy(),
                               rtol=1e-5)


def test_report_table():
    m = {"n_test": 3, "baseline_mape": 0.08, "best_single_mape": 0.05, "ensemble_mape": 0.04,
         "best_single": {"run": "a-f0"}, "ratio_to_baseline": 0.5,
         "registered": {"model_uri": "models:/x/2", "champion": False, "champion_version": 1}}
    text = format_report(m, "sub.npz")
    assert "depth-trend baseline" in text and "0.08000" in text and "best single model (a-f0)" in text
    assert "ensemble / baseline = 0.500" in text and "models:/x/2 (champion stays v1)" in text
