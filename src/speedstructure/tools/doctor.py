"""``speedstructure doctor`` (``make doctor``): what this machine is and what the active profile
will cost on it, on one screen, in under 30 s.

* **Machine**: the CPU and the instruction set torch uses (``AVX2``, ``AVX512``, ...), whether
  bf16 is native (:func:`speedstructure.engine.runtime.native_bf16`) and so which precision the
  training picks; the cores and the threads a training will use; GPUs and their memory; the
  memory; free disk where ``data/``, the DVC cache and ``$TMPDIR`` live; the versions of
  Python, torch, DVC, MLflow and Optuna.
* **Project**: whether the MLflow store answers, and which DVC stages are pending.
* **Cost**: a few timed training steps of each trained variant of the active profile (on
  random inputs of the challenge's shapes, through the engine's optimizer in the precision
  the device gets), turned into the projected time of the whole pipeline: data generation
  when ``data/`` is missing (one simulated sample, timed), the training runs, predicting the
  test sets, the physics check, each training run's start-up (:data:`RUN_OVERHEAD_S`) and the
  stages' (:data:`STAGE_OVERHEAD_S`).  On a
  GPU the competition variants' hours per fold instead, from a short run of
  ``bench gpu``'s engine path.

It exits 0 when the machine can run the active profile, else 1 with one line per reason
(disk, memory, no GPU for a GPU profile).

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speedstructure.config.load import load_params
from speedstructure.config.schema import Params
from speedstructure.tools.machine import (
    Check,
    disk_checks,
    machine_checks,
    memory_checks,
    profile_samples,
)

log = logging.getLogger(__name__)

# Calibrated on the demo (2-core AMD EPYC, AVX2, fresh clone: 21 min 06 s): what is neither
# training, data generation, prediction nor the physics check (a dozen stage start-ups with
# their torch, MLflow and DVC imports, `dvc add`, ingest and folds on 408 samples, Optuna's 360
# trials, the registry): the measured total less the other parts, 150-175 s
STAGE_OVERHEAD_S = 150.0
# Measured on the same demo: a training run takes about 22 s more than its epochs (the
# process and MLflow start, the depth-trend prior, the input cache, the last checkpoint's
# validation predictions): 234 s for 8 epochs of 26.5 s of `tiny_dual42`
RUN_OVERHEAD_S = 20.0


# --------------------------------------------------------------------------- the project


def mlflow_check(params: Params) -> Check:
    """Whether the tracking store answers (SQLite: its folder is writable and the file
    opens; a server: ``/health`` within 3 s)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    if uri.startswith("sqlite:///"):
        return _sqlite_check(uri, params.root)
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as resp:
                return Check("project", "MLflow", f"{uri} answers ({resp.status})")
        except OSError as exc:
            return Check("project", "MLflow", f"{uri} does not answer ({exc})")
    return Check("project", "MLflow", f"{uri} (not checked)")


def _sqlite_check(uri: str, root: Path) -> Check:
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///"))
    path = path if path.is_absolute() else root / path
    folder = path.parent
    if not path.exists():
        ok = os.access(folder if folder.exists() else root, os.W_OK)
        state = "new store, will be created" if ok else "its folder is not writable"
        return Check("project", "MLflow", f"{path} ({state})")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=3) as con:
            runs = con.execute("select count(*) from runs").fetchone()[0]
        return Check("project", "MLflow", f"{path} reachable, {runs} runs")
    except sqlite3.Error as exc:
        return Check("project", "MLflow", f"{path} not readable ({exc})")


def dvc_check(root: Path, timeout: float = 15.0) -> Check:
    """The DVC stages ``dvc status`` finds changed (or that the repository is clean)."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    try:
        res = subprocess.run(
            [dvc, "status", "--json"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        )
        pending = sorted(k for k in json.loads(res.stdout or "{}") if not k.endswith(".dvc"))
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        return Check("project", "DVC", f"status unknown ({type(exc).__name__})")
    if not pending:
        return Check("project", "DVC", "clean: `dvc repro` has nothing to run")
    shown = ", ".join(pending[:6]) + (f" and {len(pending) - 6} more" if len(pending) > 6 else "")
    return Check("project", "DVC", f"{len(pending)} stages pending: {shown}")


# --------------------------------------------------------------------------- the cost


@dataclasses.dataclass
class Rates:
    """Measured on this machine: training and inference samples per second of a variant, and
    with ``train.cache_inputs`` the samples per second its input preparation runs at (the
    training engine prepares each sample and its mirror image once, then trains on them)."""

    train: float
    infer: float
    prepare: float | None = None


def _timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (a fresh
    process's first steps allocate and tune kernels; with one warm-up step the demo's doctor
    measured `tiny_dual42` at 9.2 training samples/s, later runs at 13.3-14.4)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_variant(params: Params, name: str, steps: int = 2) -> Rates:
    """A few training steps (forward in the variant's resolved ``amp``, MAPE, backward, the
    engine's optimizer) and inference passes of ``name`` on random inputs at its batch sizes,
    on the CPU or the GPU training would use."""
    import torch

    from speedstructure.config.schema import V_MAX, V_MIN
    from speedstructure.engine.optim import build_optimizer
    from speedstructure.engine.runtime import amp_dtype, autocast, pick_device
    from speedstructure.metrics import mape
    from speedstructure.models.build import build_model
    from speedstructure.physics.seafloor import FloorPicker

    cfg = params.train_for(name)
    dev = pick_device(cfg.device)
    torch.manual_seed(0)
    picker = FloorPicker.from_synth(params.synth)  # the column network picks floors in forward
    model = build_model(params.variant(name), device=dev, floor_picker=picker).to(dev)
    opt = build_optimizer(model, cfg, device=dev)
    b, vb = int(cfg.batch_size), int(cfg.val_batch_size)
    x = torch.randn(max(b, vb), 5, 10001, 31, device=dev) * 0.0155
    y = V_MIN + (V_MAX - V_MIN) * torch.rand(b, 300, 1259, device=dev)

    amp = amp_dtype(cfg.amp, dev)
    cached = bool(cfg.cache_inputs) and callable(getattr(model, "prepare", None))
    if cached:  # as the engine's input cache: prepared once, trained on many times
        with torch.no_grad():
            inputs = model.prepare(x[:b])  # also the warm-up of the timed preparation
            prepare_s = _timed(lambda: model.prepare(x[:b]), 1, warmup=0) / b
    else:
        inputs = x[:b]

    def step():
        with autocast(dev, amp):
            pred = model(inputs, prepared=True) if cached else model(inputs)
        mape(pred, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)

    def infer():
        with torch.no_grad():
            model(x[:vb])
        _sync(dev)

    train_s = _timed(step, steps)
    model.eval()
    infer_s = _timed(infer, 1, warmup=1)
    return Rates(train=b / train_s, infer=vb / infer_s, prepare=1 / prepare_s if cached else None)


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def simulation_seconds(params: Params) -> float:
    """Seconds to simulate one sample's five shots (one velocity model, one process), as
    data generation and the physics check do."""
    import numpy as np

    from speedstructure.physics.simulate import Simulator
    from speedstructure.synth.velocity import FAMILIES, generate_velocity

    v = generate_velocity(np.random.default_rng(0), FAMILIES[0], params.synth)
    sim = Simulator(params.synth.sim)
    t0 = time.perf_counter()
    sim(v)
    return time.perf_counter() - t0


@dataclasses.dataclass
class Projection:
    """Projected seconds of each part of ``make demo`` (``dvc repro`` from scratch)."""

    data: float
    training: float
    prediction: float
    qc: float
    overhead: float

    @property
    def total(self) -> float:
        return self.data + self.training + self.prediction + self.qc + self.overhead


def project_pipeline(params: Params, rates: dict[str, Rates], sim_s: float) -> Projection:
    """The pipeline's time from the measured rates: every run's epochs in full (early stopping
    only shortens it), validation each epoch and the flip-TTA validation predictions at the
    end; the test and out-of-distribution sets predicted with flip TTA by the ensemble
    (predict) and again run by run (evaluate); one simulation per test sample, in
    ``qc.workers`` processes (qc); data generation when the zips are missing."""
    from speedstructure.engine.runtime import resolve_threads

    s = params.synth
    n_fold = s.n_train / params.folds.n_folds
    n_train = s.n_train - n_fold + s.n_extended_1 + s.n_extended_2
    training = 0.0
    for run in params.runs.values():
        r = rates.get(run.variant)
        if r is not None:
            epochs = params.train_for(run.variant).epochs
            epoch = n_train / r.train + n_fold / r.infer
            training += epochs * epoch + 2 * n_fold / r.infer + RUN_OVERHEAD_S
            if r.prepare:  # the input cache: every training sample and its mirror, once
                training += 2 * n_train / r.prepare
    members = [run.variant for run in params.runs.values() if run.variant in rates]
    infer = statistics.median(r.infer for r in rates.values()) if rates else 1.0
    tests = s.n_test + s.ood.n_test
    prediction = 2 * len(members) * (s.n_test + tests) / infer
    have_zips = all(params.zip_path(z).is_file() for z in params.data.zips)
    data = 0.0 if have_zips else profile_samples(params) * sim_s / max(1, s.workers)
    qc_workers = resolve_threads(params.qc.workers, "qc.workers")
    qc = s.n_test * sim_s / max(1, min(qc_workers, s.n_test))
    return Projection(data, training, prediction, qc, STAGE_OVERHEAD_S)


def trained_variants(params: Params) -> list[str]:
    """The active profile's variants that are trained by gradient (not the baselines)."""
    names = dict.fromkeys(run.variant for run in params.runs.values())
    return [n for n in names if params.variant(n).arch != "depth_trend"]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def cost_checks(params: Params) -> list[Check]:
    """The projection of the active profile: ``make demo`` on a CPU profile, the competition
    variants' hours per fold on a GPU."""
    import torch

    if params.profile == "competition":
        if not torch.cuda.is_available():
            return [
                Check(
                    "cost",
                    "competition",
                    "needs a GPU",
                    "gpu: the competition profile trains EVA02-Large at 560 px and needs CUDA "
                    "(about 13 h per fold on an A6000); none is visible here",
                )
            ]
        return gpu_cost_checks(params)
    rates = {name: measure_variant(params, name) for name in trained_variants(params)}
    sim_s = simulation_seconds(params)
    proj = project_pipeline(params, rates, sim_s)
    checks = [
        Check("cost", name, f"{r.train:.1f} training / {r.infer:.1f} inference samples/s")
        for name, r in rates.items()
    ]
    checks.append(Check("cost", "one simulated sample", f"{sim_s:.1f} s"))
    parts = (
        f"data {_minutes(proj.data)}, training {_minutes(proj.training)}, prediction "
        f"{_minutes(proj.prediction)}, qc {_minutes(proj.qc)}, stages {_minutes(proj.overhead)}"
    )
    checks.append(Check("cost", "make demo", f"about {_minutes(proj.total)} ({parts})"))
    return checks


def gpu_cost_checks(params: Params, steps: int = 3) -> list[Check]:
    """Hours per fold of each competition variant from ``steps`` bf16 training steps at
    batch 1 (the path ``bench gpu`` checks at length)."""
    from speedstructure.engine.runtime import pick_device
    from speedstructure.tools.bench_gpu import bench_config, bench_trainer, train_steps

    device = pick_device("cuda")
    checks = []
    names = [n for n, v in params.variants.items() if v.profile == "competition"]
    with tempfile.TemporaryDirectory(prefix="doctor-") as tmp:
        for name in names[:1]:
            cfg = bench_config(params, name, "bf16", device)
            trainer, _, _ = bench_trainer(params.variant(name), cfg, device, Path(tmp), 0, steps)
            res = train_steps(trainer, device)
            checks.append(
                Check(
                    "cost",
                    name,
                    f"{res['samples_per_second']:.2f} samples/s, about "
                    f"{res['projected_hours_per_fold']:.1f} h per fold (the other competition "
                    "variants differ only in their fusion: about the same)",
                )
            )
    return checks


# --------------------------------------------------------------------------- the screen


def diagnose(params: Params, *, measure: bool = True) -> list[Check]:
    """Every check, in screen order (``measure=False`` skips the timed cost section)."""
    checks = machine_checks(params) + memory_checks() + disk_checks(params)
    checks += [mlflow_check(params), dvc_check(params.root)]
    if measure:
        checks += cost_checks(params)
    return checks


def render(checks: list[Check], profile: str) -> str:
    width = max(len(c.label) for c in checks)
    lines, section = [], None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(f"{section} (profile {profile})" if section == "cost" else section)
        lines.append(f"  {c.label:<{width}}  {c.value}")
    problems = [c.problem for c in checks if c.problem]
    lines.append("")
    if problems:
        lines += problems
    else:
        lines.append(f"ok: this machine can run the {profile} profile")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    from speedstructure.cli import write_json_output

    t0 = time.perf_counter()
    params = load_params()
    checks = diagnose(params, measure=not args.no_measure)
    print(render(checks, params.profile))
    log.info("doctor: %.1f s", time.perf_counter() - t0)
    write_json_output(args.json, [dataclasses.asdict(c) for c in checks])
    return 1 if any(c.problem for c in checks) else 0


def add_commands(subparsers) -> None:
    from speedstructure.cli import add_json_option

    p = subparsers.add_parser(
        "doctor",
        help="this machine, the project's state and the active profile's projected cost",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--no-measure", action="store_true", help="skip the timed steps (the cost section)"
    )
    add_json_option(p)
    p.set_defaults(func=_cmd)
