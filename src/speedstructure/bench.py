"""Benchmarks (``make bench``): speed and fidelity figures, never asserted in unit tests.

``speedstructure bench data`` measures

* generation throughput: samples per second of the full generator (velocity
  model + five-shot simulation + zip writing) with ``synth.workers`` processes,
  as the median of ``--repeats`` runs;
* simulation fidelity: the default coarse grid (``synth.sim.dx``) against a
  fine-grid run (``--fine-dx``, 2 m by default) of the same velocity models, one
  per structural family: correlation and relative L2 error of the delivered
  gathers, plus the direct arrival's peak and the gathers' standard deviation.

Results are printed and, with ``--json``, written to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config import load_params, section


def fidelity(v: np.ndarray, coarse: dict[str, Any], fine_dx: float) -> dict[str, float]:
    """Compare the delivered gathers of ``v`` on the configured grid and on a fine grid."""
    from speedstructure.simulate import SimConfig, Simulator

    c = SimConfig.from_params(coarse)
    # The fine run keeps the same output interval; deepwave sub-steps as CFL needs.
    f = SimConfig.from_params({**coarse, "dx": fine_dx})
    g_c = Simulator(c)(v).astype(np.float64)
    g_f = Simulator(f)(v).astype(np.float64)
    corr = float(np.corrcoef(g_c.ravel(), g_f.ravel())[0, 1])
    rel = float(np.linalg.norm(g_c - g_f) / np.linalg.norm(g_f))
    # After the direct wave: from 0.25 s on, where the reflections live.
    late = slice(2500, None)
    corr_late = float(np.corrcoef(g_c[:, late].ravel(), g_f[:, late].ravel())[0, 1])
    return {
        "corr": corr,
        "rel_l2": rel,
        "corr_after_0.25s": corr_late,
        "direct_peak": float(g_c[0, :, 0].max()),
        "gather_std": float(g_c.std()),
    }


def bench_data(cfg: dict[str, Any], samples: int, repeats: int, fine_dx: float, families: int) -> dict[str, Any]:
    from speedstructure.synth import generate
    from speedstructure.velocity import FAMILIES, generate_velocity

    rates = []
    for r in range(repeats):
        small = {**cfg, "seed": int(cfg["seed"]) + r, "n_train": samples, "n_extended_1": 0,
                 "n_extended_2": 0, "n_test": 0}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate(small, Path(tmp), progress=False)
            rates.append(samples / (time.perf_counter() - t0))
    fid: dict[str, Any] = {}
    for fam in FAMILIES[:families]:
        v = generate_velocity(np.random.default_rng(7), fam, cfg)
        t0 = time.perf_counter()
        fid[fam] = {k: round(val, 5) for k, val in fidelity(v, cfg["sim"], fine_dx).items()}
        fid[fam]["seconds"] = round(time.perf_counter() - t0, 1)
    return {
        "generation": {
            "samples_per_run": samples,
            "workers": int(cfg.get("workers", 1)),
            "runs": repeats,
            "samples_per_second_median": round(statistics.median(rates), 3),
            "samples_per_second_all": [round(x, 3) for x in rates],
        },
        "fidelity": {"coarse_dx": cfg["sim"]["dx"], "fine_dx": fine_dx, "per_family": fid,
                     "min_corr": min(f["corr"] for f in fid.values()) if fid else None,
                     "max_rel_l2": max(f["rel_l2"] for f in fid.values()) if fid else None},
    }


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    out: dict[str, Any] = {}
    if args.what in ("data", "all"):
        out["data"] = bench_data(dict(section(params, "synth")), args.samples, args.repeats, args.fine_dx,
                                 args.families)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: generation speed and simulation fidelity")
    p.add_argument("what", nargs="?", default="all", choices=["data", "all"])
    p.add_argument("--samples", type=int, default=8, help="samples generated per timing run")
    p.add_argument("--repeats", type=int, default=3, help="timing runs (the median is reported)")
    p.add_argument("--fine-dx", type=float, default=2.0, help="grid spacing (m) of the reference run")
    p.add_argument("--families", type=int, default=6, help="velocity families in the fidelity check")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=_cmd)
