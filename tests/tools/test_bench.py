"""``speedstructure bench training``: the three set-ups side by side, through the real engine
(a tiny variant on a tiny store; the figures are the benchmark's, not asserted here)."""

from __future__ import annotations

import torch

from speedstructure.stages.ingest import build_store
from speedstructure.tools import bench
from support import sample_id


def test_bench_training_times_before_fp32_and_after_and_the_cache_changes_no_number(
    tmp_path, tiny_zips, tiny_params, tiny_variant
):
    params = tiny_params(
        tmp_path,
        variants={"tiny": {**tiny_variant(), "train": {"batch_size": 2, "val_batch_size": 2}}},
        runs={"tiny-f0": {"variant": "tiny", "fold": 0}},
        ensemble={"variants": ["tiny"], "hand_weights": {"tiny": 1.0}},
    )
    build_store(tiny_zips, params.path("store"), root=tmp_path, progress=False)
    table = params.path("folds_table")
    table.parent.mkdir(parents=True)
    rows = [f"{sample_id('train', i)},{tiny_zips['train']},{i % 2}" for i in range(3)]
    rows += [
        f"{sample_id('train_extended_1', i)},{tiny_zips['train_extended_1']},-1" for i in (0, 1)
    ]
    table.write_text("sample_id,zip,fold\n" + "\n".join(rows) + "\n")
    out = bench.bench_training(params, ["tiny"], repeats=1)
    assert out["cpu_capability"] and isinstance(out["native_bf16"], bool)
    res = out["variants"]["tiny"]
    assert set(bench.TRAINING_SETUPS) <= set(res)
    for setup in bench.TRAINING_SETUPS:
        assert res[setup]["train_samples_per_second"] > 0
        assert res[setup]["step_seconds_median"] > 0
    # the cache and the precision rule (fp32 on a CPU) train exactly as fp32 Muon does
    if not torch.cuda.is_available():
        assert (
            res["after"]["val_mape_2_epochs_16_samples"]
            == res["fp32_muon"]["val_mape_2_epochs_16_samples"]
        )
    want = res["after"]["train_samples_per_second"] / res["before"]["train_samples_per_second"]
    assert res["after_over_before"] == round(want, 2)
