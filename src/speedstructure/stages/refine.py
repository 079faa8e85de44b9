"""The ``refine`` stage (optional): full-waveform inversion started from each prediction.

Each chosen test sample's predicted model (``paths.submission``) is refined toward its
input gathers by ``refine.iterations`` gradient steps of :func:`speedstructure.physics.fwi.invert`
(water layer fixed, velocity bounds, a coarse ``refine.grid_m`` update, step halving, a
misfit that never rises).  The refined submission (every sample: the refined ones
replaced) goes to ``paths.refined``/``submission.npz`` beside the original, with a
per-sample table; with test targets, MAPE and R2_lat before and after, per depth band.

Off by default (``refine.enabled: false``: about a minute per sample on 2 CPU cores, far
beyond the budget of ``make demo``): the DVC stage then writes only its metrics (a note)
and an empty folder.  ``make refine`` (``speedstructure refine --run [--samples N|ID,...]``)
runs it whatever ``enabled`` says.

"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.schema import V_MAX, V_MIN, Params
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_json, atomic_write_text
from speedstructure.physics.fwi import fwi_settings
from speedstructure.reports.qc import refine_summary
from speedstructure.tracking.runs import log_metrics, log_params, stage_run

DESCRIPTION = (
    "Refine predictions by full-waveform inversion through the simulator (optional: "
    "refine.enabled or --run); a refined submission beside the original, before/after."
)
SUBMISSION_NAME = "submission.npz"
TABLE_NAME = "per_sample.csv"
NOTE_NAME = "README.txt"


def choose_samples(ids: list[str], samples: str | int | None) -> list[str]:
    """``samples``: None (all), a count N (the first N, sorted) or comma-separated ids."""
    if samples is None or samples == "":
        return list(ids)
    text = str(samples)
    if text.isdigit():
        return list(ids)[: int(text)]
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(ids))
    if unknown:
        raise UserError(f"--samples: not in the submission: {', '.join(unknown[:5])}")
    return chosen


def refine_samples(params: Params, ids: list[str], sub, cfg, progress: bool) -> dict[str, Any]:
    """``{sample id: FwiResult}`` of the chosen samples."""
    from tqdm import tqdm

    from speedstructure.data.samples import ZipSamples
    from speedstructure.physics.fwi import invert
    from speedstructure.physics.misfit import observed_at_sim_rate
    from speedstructure.physics.simulate import Simulator

    sim = Simulator(params.synth.sim)
    results = {}
    with ZipSamples(params.zip_path("test")) as z:
        for sid in tqdm(ids, desc="refine", unit="sample", disable=not progress):
            obs = observed_at_sim_rate(z.read_gathers(sid), sim)
            results[sid] = invert(sim, obs, sub[sid].astype(np.float32), cfg)
    return results


def before_after(params: Params, sub, results: dict) -> dict[str, Any] | None:
    """MAPE (overall, per depth band) and R2_lat of the refined samples before and after;
    None without test targets."""
    from speedstructure.metrics import lateral_r2, relative_error

    path = params.test_labels_path()
    if not path.is_file():
        return None
    ids = list(results)
    from speedstructure.data.submission_check import VelocityArchive

    with VelocityArchive(path, "test targets") as lab:
        truths = np.stack([lab[s].astype(np.float32) for s in ids])
    before = np.stack([sub[s].astype(np.float32) for s in ids])
    after = np.stack([results[s].model for s in ids])
    out: dict[str, Any] = {}
    for name, pred in (("before", before), ("after", after)):
        err = relative_error(pred, truths)
        edges = params.evaluate.depth_bands
        out[name] = {
            "mape": float(err.mean(dtype=np.float64)),
            "lateral_r2": lateral_r2(pred, truths),
            "per_depth": {
                f"{a}-{b}": float(err[:, :, int(a) : int(b)].mean(dtype=np.float64))
                for a, b in zip(edges[:-1], edges[1:], strict=True)
            },
            "per_sample_mape": err.mean(axis=(1, 2), dtype=np.float64).tolist(),
        }
    return out


def write_outputs(params: Params, sub, results: dict, scores, summary) -> list[Path]:
    """The refined submission (every sample), the per-sample table, the metrics (no timings:
    those go to MLflow and the console)."""
    from speedstructure.data.submission import SubmissionWriter
    from speedstructure.reports.qc import lean_summary

    folder = params.path("refined")
    folder.mkdir(parents=True, exist_ok=True)
    with SubmissionWriter(folder / SUBMISSION_NAME, v_range=(V_MIN, V_MAX)) as w:
        for sid in sorted(sub.files):
            w.add(sid, results[sid].model if sid in results else sub[sid])
    rows = ["sample_id,misfit_before,misfit_after,iterations,mape_before,mape_after"]
    for i, (sid, r) in enumerate(results.items()):
        mb = f"{scores['before']['per_sample_mape'][i]:.6f}" if scores else ""
        ma = f"{scores['after']['per_sample_mape'][i]:.6f}" if scores else ""
        rows.append(f"{sid},{r.misfits[0]:.6f},{r.misfits[-1]:.6f},{len(r.misfits) - 1},{mb},{ma}")
    table = atomic_write_text(folder / TABLE_NAME, "\n".join(rows) + "\n")
    return [
        folder / SUBMISSION_NAME,
        table,
        atomic_write_json(params.path("refine_metrics"), lean_summary(summary)),
    ]


def write_disabled(params: Params) -> dict[str, Any]:
    """``refine.enabled: false``: a note in the metrics and an empty refined folder."""
    folder = params.path("refined")
    folder.mkdir(parents=True, exist_ok=True)
    for old in (folder / SUBMISSION_NAME, folder / TABLE_NAME):
        old.unlink(missing_ok=True)
    note = "refine.enabled is false: nothing refined (`make refine` runs it)."
    atomic_write_text(folder / NOTE_NAME, note + "\n")
    summary = {"enabled": False, "n_refined": 0, "note": note}
    atomic_write_json(params.path("refine_metrics"), summary)
    return summary


def run_refine(
    params: Params,
    *,
    force: bool = False,
    samples: str | int | None = None,
    iterations: int | None = None,
    track: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The stage (see the module doc); ``force`` runs it even with ``refine.enabled: false``."""
    from speedstructure.data.submission_check import load_submission
    from speedstructure.engine.runtime import set_threads

    if not (params.refine.enabled or force):
        return write_disabled(params)
    tags = {"stage": "refine", "dvc_stage": "refine"}
    with stage_run(track, "refine", params, tags=tags):
        threads = set_threads(params.refine.threads, "refine.threads")
        cfg = fwi_settings(params, iterations)
        if track:
            log_params({"refine": vars(cfg) | {"threads": threads}})
        all_ids, sub = load_submission(params.path("submission"))
        with sub:
            ids = choose_samples(all_ids, samples if samples is not None else params.refine.samples)
            t0 = time.perf_counter()
            results = refine_samples(params, ids, sub, cfg, progress)
            scores = before_after(params, sub, results)
            summary = refine_summary(results, scores, time.perf_counter() - t0, cfg)
            files = write_outputs(params, sub, results, scores, summary)
        if track:
            _log_mlflow(summary, files)
    return summary


def _log_mlflow(summary: dict[str, Any], files: list[Path]) -> None:
    import mlflow

    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    for when in ("before", "after"):
        if when in summary:
            flat[f"mape_{when}"] = summary[when]["mape"]
            flat[f"lateral_r2_{when}"] = summary[when]["lateral_r2"]
    log_metrics(flat)
    for f in files[1:]:
        mlflow.log_artifact(str(f), artifact_path="refine")


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("refine", help=cli.COMMANDS["refine"][1], description=DESCRIPTION)
    p.add_argument("--run", action="store_true", help="refine even if refine.enabled is false")
    p.add_argument(
        "--samples", default=None, help="N (the first N samples) or comma-separated sample ids"
    )
    p.add_argument("--iterations", type=int, default=None, help="override refine.iterations")
    cli.add_mlflow_option(p)
    cli.add_quiet_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    s = run_refine(
        load_params(),
        force=args.run,
        samples=args.samples,
        iterations=args.iterations,
        track=args.mlflow,
        progress=not args.quiet,
    )
    if not s["enabled"]:
        print(f"refine: {s['note']}")
        return 0
    line = (
        f"refine: {s['n_refined']} samples, misfit {s['misfit_before']:.4f} -> "
        f"{s['misfit_after']:.4f}, {s['seconds_per_sample']:.1f} s per sample"
    )
    if "before" in s:
        b, a = s["before"], s["after"]
        line += (
            f"; MAPE {b['mape']:.5f} -> {a['mape']:.5f}, "
            f"R2_lat {b['lateral_r2']:.3f} -> {a['lateral_r2']:.3f}"
        )
    print(line)
    return 0
