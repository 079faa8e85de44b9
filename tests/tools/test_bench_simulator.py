"""``speedstructure bench simulator``: the fine set's settings digest and reuse, the
measurements and the table (a stand-in simulator and model: the real 1 m run takes minutes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from speedstructure.config.schema import SimParams
from speedstructure.data.samples import list_sample_ids
from speedstructure.tools import bench_simulator as bs
from support import random_velocity


@pytest.fixture
def project(tmp_path, write_zips, tiny_params):
    """A project whose data folder holds the tiny zips and test targets for its test ids."""
    zips = write_zips(tmp_path / "data")
    ids = list_sample_ids(zips["test"])
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "data" / "test_labels.npz", **{s: random_velocity(rng) for s in ids})
    return tiny_params(tmp_path)


class CountingSimulator:
    """Stands in for the 1 m simulator: gathers that depend on the model, calls counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, v: np.ndarray) -> np.ndarray:
        self.calls += 1
        rng = np.random.default_rng(int(v.mean() * 1000))
        return rng.normal(0.0, 1e-3, (5, 10001, 31)).astype(np.float32)


def test_the_fine_settings_keep_everything_but_the_grid_step_and_absorbing_cells():
    fine = bs.fine_settings(SimParams())
    assert (fine.dx, fine.dt, fine.pml_width) == (1.0, 0.0001, bs.FINE_PML_WIDTH)
    assert dataclasses.replace(fine, dx=5.0, dt=0.0005, pml_width=20) == SimParams()


def test_the_set_is_written_once_and_reused_while_its_digest_matches(project, tmp_path):
    folder = tmp_path / "bench" / "simulator"
    sim = bs.fine_settings(project.synth.sim)
    first = CountingSimulator()
    meta, reused = bs.ensure_set(project, folder, sim, 2, simulate=first)
    assert not reused and first.calls == 2
    assert {p.name for p in folder.iterdir()} == {bs.SET_ZIP, bs.SET_LABELS, bs.SET_META}
    assert list_sample_ids(folder / bs.SET_ZIP) == meta["ids"]
    assert meta["sim"]["dx"] == 1.0 and len(meta["cpu_seconds_per_sample"]) == 2

    again = CountingSimulator()
    meta2, reused = bs.ensure_set(project, folder, sim, 2, simulate=again)
    assert reused and again.calls == 0 and meta2["digest"] == meta["digest"]

    coarser = CountingSimulator()  # other settings: simulated again
    meta3, reused = bs.ensure_set(project, folder, bs.fine_settings(sim, dx=2.0), 2, coarser)
    assert not reused and coarser.calls == 2 and meta3["digest"] != meta["digest"]


def test_the_digest_follows_the_settings_the_ids_and_the_models():
    rng = np.random.default_rng(0)
    models = random_velocity(rng, 2)
    sim, ids = SimParams(dx=1.0, dt=0.0001), ["a" * 18, "b" * 18]
    base = bs.set_digest(sim, ids, models)
    assert bs.set_digest(sim, list(ids), models.copy()) == base
    assert bs.set_digest(dataclasses.replace(sim, pml_width=80), ids, models) != base
    assert bs.set_digest(sim, ids[::-1], models) != base
    changed = models.copy()
    changed[1, 0, 0] += 0.1
    assert bs.set_digest(sim, ids, changed) != base


def test_an_incomplete_set_is_not_reused(tmp_path):
    (tmp_path / bs.SET_META).write_text('{"digest": "x"}')
    assert not bs.reusable(tmp_path, "x")  # no zip, no labels
    (tmp_path / bs.SET_ZIP).write_bytes(b"")
    (tmp_path / bs.SET_LABELS).write_bytes(b"")
    assert bs.reusable(tmp_path, "x") and not bs.reusable(tmp_path, "y")
    (tmp_path / bs.SET_META).write_text("{not json")
    assert not bs.reusable(tmp_path, "x")


def _report(rows: list[dict]) -> dict:
    return {
        "fine_sim": {"dx": 1.0, "dt": 0.0001},
        "own_sim": {"dx": 5.0, "dt": 0.0005},
        "model": "checkpoint best.pt",
        "samples": rows,
        "summary": bs.summarise(rows),
        "train_floor": {"n_samples": 48, "record": 2.02, "simulated": 2.05},
    }


def _row(sid: str, record: float, simulated: float, own: float, fine: float) -> dict:
    row = {"sample_id": sid, "floor_m": 250.0, "corr": 0.99999, "corr_late": 0.9998}
    for method, err in (("record", record), ("simulated", simulated)):
        for name in ("own", "fine"):
            row[f"floor_{method}_{name}"] = err if name == "fine" else 2.0
            row[f"picked_{method}_{name}"] = 1.0
        row[f"mape_{method}_own"] = own
        row[f"mape_{method}_fine"] = fine if method == "simulated" else own
    return row


def test_the_table_shows_the_bar_met_and_not_met():
    rows = [_row("A" * 18, 2.0, 2.0, 0.05, 0.05), _row("B" * 18, 3.0, 30.0, 0.05, 0.07)]
    rows[1]["picked_simulated_fine"] = 0.9
    report = _report(rows)
    summary = report["summary"]
    assert summary["mean"]["floor_simulated_fine"] == pytest.approx(16.0)
    assert summary["mape_simulated_ratio"] == pytest.approx(0.06 / 0.05)
    assert summary["bar"] == {
        "floor_record_fine": True,
        "floor_simulated_fine": False,
        "mape_record_ratio": True,
        "mape_simulated_ratio": False,
    }
    text = bs.table(report)
    assert "bar: record pick on the fine set within 5 m: MET (2.50 m)" in text
    assert "bar: simulated pick on the fine set within 5 m: NOT MET (16.00 m)" in text
    assert "bar: mape simulated fine / own within 1.10: NOT MET (1.200)" in text
    assert "bar: mape record fine / own within 1.10: MET (1.000)" in text
    mean = next(line for line in text.splitlines() if line.strip().startswith("mean"))
    assert "16.00" in mean and "1.200" in mean
    assert "30.00*" in text  # a pick with unpicked columns is marked
    assert "on 48 training samples (project's gathers): record 2.02 m, simulated 2.05 m" in text


def test_measure_reads_both_sets_and_scores_a_model(project, tmp_path):
    folder = tmp_path / "fine"
    sim = bs.fine_settings(project.synth.sim)
    meta, _ = bs.ensure_set(project, folder, sim, 2, CountingSimulator())
    trained = bs.Trained(lambda g: np.full((len(g), 300, 1259), 3.0, np.float32), [], "constant")
    rows = bs.measure(project, folder, meta["ids"], trained)
    assert [r["sample_id"] for r in rows] == meta["ids"]
    for r in rows:
        assert -1.0 <= r["corr"] <= 1.0 and -1.0 <= r["corr_late"] <= 1.0
        assert {"floor_record_own", "floor_simulated_fine", "mape_own", "mape_fine"} <= set(r)
        assert r["mape_own"] == r["mape_fine"] > 0  # the constant model ignores its input
    assert "bar: mape fine / own within 1.10: MET (1.000)" in bs.table(_report(rows))
    train = bs.train_floor_errors(project, 2)  # the tiny training zip: random gathers
    assert train["n_samples"] == 2 and set(train) == {"n_samples", "record", "simulated"}
