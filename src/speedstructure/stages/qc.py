"""The ``qc`` stage: is every predicted velocity model consistent with its own gathers?

Each model of the submission (``paths.submission``) is re-simulated with the project's
simulator at the challenge's acquisition (``synth.sim``: the one that made the synthetic
data, so the true model reproduces its gathers up to float error) and compared with the
input gathers of the test zip (:mod:`speedstructure.physics`): after the direct arrival
(muted: it is the same for every model), low-passed, gain-controlled, the normalised L2
misfit and the mean per-trace correlation.  No labels are needed: on real data the table
ranks the predictions to distrust first.  With test targets (the synthetic set) the stage
also reports the Spearman rank correlation between the misfit and the true MAPE.  The
samples are simulated side by side in ``qc.workers`` spawned processes of ``qc.threads``
torch threads each (the rows stay in the submission's order).

``speedstructure qc [--samples N] [--mlflow/--no-mlflow] [--quiet]`` writes::

    qc_metrics   summary: misfit, correlation, Spearman vs MAPE (seconds per sample: MLflow)
    qc_table     CSV: sample_id, misfit, trace_correlation, rank (1 = worst) [, mape]
    qc_figure    PNG: observed, simulated and residual gathers of the worst samples

"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.schema import Params, SimParams
from speedstructure.data.submission_check import load_submission
from speedstructure.fsutil import atomic_write_json
from speedstructure.physics.misfit import preprocess_settings
from speedstructure.reports.qc import SHOT, lean_summary, plot_worst, summarise, write_table
from speedstructure.tracking.runs import log_metrics, log_params, stage_run

DESCRIPTION = (
    "Re-simulate every predicted model and compare with its input gathers (misfit, per-trace "
    "correlation after the direct arrival); table, figure, MLflow."
)


@dataclass(frozen=True)
class Checker:
    """What one qc process needs to check a sample: the simulator's settings, the water
    velocity, the preprocessing settings, the test zip and its torch threads."""

    sim: SimParams  # synth.sim
    water_velocity: float
    settings: dict[str, Any]
    zip_path: str
    threads: int


_STATE: dict[str, Any] = {}  # per process: the simulator, the preprocessing, the open zip


def _start(checker: Checker) -> None:
    """Build this process's simulator and preprocessing and open the test zip (once)."""
    import torch

    from speedstructure.data.samples import ZipSamples
    from speedstructure.physics.misfit import Preprocess
    from speedstructure.physics.simulate import Simulator

    torch.set_num_threads(checker.threads)
    sim = Simulator(checker.sim)
    water = checker.water_velocity
    _STATE["sim"] = sim
    _STATE["prep"] = Preprocess.for_simulator(sim, water_velocity=water, **checker.settings)
    _STATE["zip"] = ZipSamples(checker.zip_path)


def _check(job: tuple[str, np.ndarray]) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """One sample's row (misfit, trace correlation, seconds) and its compared shot."""
    from speedstructure.physics.misfit import misfit, observed_at_sim_rate
    from speedstructure.physics.misfit import simulate_at_sim_rate as simulate
    from speedstructure.physics.misfit import trace_correlation as correlation

    sid, model = job
    sim, prep = _STATE["sim"], _STATE["prep"]
    t0 = time.perf_counter()
    o = prep(observed_at_sim_rate(_STATE["zip"].read_gathers(sid), sim))
    s = prep(simulate(model, sim))
    res = {"misfit": misfit(o, s), "trace_correlation": correlation(o, s)}
    row = {"sample_id": sid, **res, "seconds": time.perf_counter() - t0}
    return row, (o[SHOT].astype(np.float32), s[SHOT].astype(np.float32))


def _stop() -> None:
    if "zip" in _STATE:
        _STATE.pop("zip").close()
    _STATE.clear()


def check_samples(
    params: Params, ids: list[str], sub, progress: bool = True, threads: int = 1, workers: int = 1
):
    """``(rows, shots)``: one row per sample, in ``ids``'s order (misfit, trace correlation,
    seconds) and the compared (preprocessed) observed and simulated gathers of shot
    :data:`SHOT`; the samples are simulated in ``workers`` spawned processes of ``threads``
    torch threads each (one: in this process)."""
    from tqdm import tqdm

    checker = Checker(
        params.synth.sim,
        float(params.synth.water_velocity),
        preprocess_settings(params),
        str(params.zip_path("test")),
        threads,
    )
    workers = max(1, min(len(ids), int(workers)))
    jobs = ((sid, sub[sid].astype(np.float32)) for sid in ids)
    bar = {"total": len(ids), "desc": "qc", "unit": "sample", "disable": not progress}
    if workers == 1:
        _start(checker)
        try:
            done = [_check(job) for job in tqdm(jobs, **bar)]
        finally:
            _stop()
    else:  # spawned: deepwave's OpenMP runtime does not survive a fork of a threaded parent
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, ctx, initializer=_start, initargs=(checker,))
        with pool:
            done = list(tqdm(pool.map(_check, jobs), **bar))
    rows = [row for row, _ in done]
    return rows, {row["sample_id"]: shot for row, shot in done}


def true_mape(params: Params, ids: list[str], sub) -> np.ndarray | None:
    """Per-sample MAPE against the test targets, None without them."""
    from speedstructure.metrics import per_sample_mape

    path = params.test_labels_path()
    if not path.is_file():
        return None
    from speedstructure.data.submission_check import VelocityArchive

    with VelocityArchive(path, "test targets") as lab:
        if not set(ids) <= set(lab.files):
            return None
        return np.array([float(per_sample_mape(sub[s][None], lab[s][None])[0]) for s in ids])


def run_qc(
    params: Params, *, track: bool = True, progress: bool = True, samples: int | None = None
) -> dict[str, Any]:
    """The stage (see the module doc); returns the summary."""
    from speedstructure.engine.runtime import resolve_threads, set_threads

    tags = {"stage": "qc", "dvc_stage": "qc"}
    with stage_run(track, "qc", params, tags=tags):  # opened first: crashes FAIL it
        threads = set_threads(params.qc.threads, "qc.threads")
        workers = resolve_threads(params.qc.workers, "qc.workers")
        if track:
            log_params({"qc": preprocess_settings(params), "threads": threads, "workers": workers})
        ids, sub = load_submission(params.path("submission"), samples)
        with sub:
            rows, shots = check_samples(params, ids, sub, progress, threads, workers)
            mape = true_mape(params, ids, sub)
        summary = summarise(rows, mape, params.qc.worst_samples)
        dt = float(params.synth.sim.dt)
        files = [
            atomic_write_json(params.path("qc_metrics"), lean_summary(summary)),
            write_table(params.path("qc_table"), rows, mape),
            plot_worst(shots, summary["worst"], dt, params.path("qc_figure")),
        ]
        if track:
            _log_mlflow(summary, files)
    return summary


def _log_mlflow(summary: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    log_metrics({k: v for k, v in summary.items() if k not in ("worst", "labels")})
    for f in files:
        mlflow.log_artifact(str(f), artifact_path="qc")


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("qc", help=cli.COMMANDS["qc"][1], description=DESCRIPTION)
    p.add_argument("--samples", type=int, default=None, help="only the first N samples")
    cli.add_mlflow_option(p)
    cli.add_quiet_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    s = run_qc(load_params(), track=args.mlflow, progress=not args.quiet, samples=args.samples)
    line = (
        f"qc: {s['n_samples']} samples, misfit mean {s['misfit_mean']:.4f} "
        f"(median {s['misfit_median']:.4f}), trace correlation {s['trace_correlation_mean']:.3f}, "
        f"{s['seconds_per_sample']:.2f} s per sample"
    )
    if "spearman_misfit_mape" in s:
        line += f"; Spearman(misfit, MAPE) {s['spearman_misfit_mape']:.3f}"
    print(line + f"\n  worst: {', '.join(s['worst'])}")
    return 0
