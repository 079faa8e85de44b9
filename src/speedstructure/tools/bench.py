"""Benchmarks (``make bench``): speed and fidelity figures, never asserted in unit tests.

``speedstructure bench data`` measures

* generation throughput: samples per second of the full generator (velocity
  model + five-shot simulation + zip writing) with ``synth.workers`` processes,
  as the median of ``--repeats`` runs;
* simulation fidelity: the default coarse grid (``synth.sim.dx``) against a
  fine-grid run (``--fine-dx``, 2 m by default) of the same velocity models, one
  per structural family: correlation and relative L2 error of the delivered
  gathers, plus the direct arrival's peak and the gathers' standard deviation.

``speedstructure bench store`` measures random-access reads of whole samples
(five gathers + target) from the ingested store against the same reads
straight from the challenge zips: median samples per second of several passes.

``speedstructure bench model`` measures, for the default profile's variants,
training (forward + backward + optimizer step) and inference samples per second
on this machine, and the achieved FLOP rate (forward FLOPs counted on the meta
device, x 3 for training) as a fraction of the measured fp32 matrix-multiply
peak (median of several large matmuls).

``speedstructure bench training`` times training steps as an epoch runs them (the real
:class:`~speedstructure.engine.loop.Trainer` on samples of the ingested store: loading, flip,
forward, backward, optimizer step) for the default profile's trained variants, in three
set-ups side by side in one run: *before* (Muon orthogonalising in bf16, as torch's Muon
does, and the gathers read and prepared every step: the engine until this benchmark was
written), *fp32 Muon* (the same, orthogonalising in float32) and *after* (the engine's
rules: ``muon_precision: auto``, ``cache_inputs: true``); the median of ``--repeats`` steps
after a warm-up step, with the machine's CPU capability and whether bf16 is native; and each
set-up's validation MAPE after the same 2 epochs on the same 16 training samples (a scale at
which bf16 Muon on a CPU that emulates it still fits in ``make bench``).  Equal numerics of
the cache are a test (``test_cached_inputs_train_exactly_...``); full-length figures are in
the README.

``speedstructure bench gpu [--variant V] [--steps N]`` checks and times the competition
variants' training path on this machine (:mod:`speedstructure.tools.bench_gpu`; it imports only
torch, timm, numpy and pyyaml, and exits 1 when a check fails).

``speedstructure bench simulator`` measures the floor picker and a trained model on test models
simulated on the organisers' grid (1 m, 0.1 ms) against the project's own gathers
(:mod:`speedstructure.tools.bench_simulator`); ``bench level`` how much of the velocity level
ideal reflections carry (:mod:`speedstructure.tools.bench_level`).

``speedstructure bench parallel`` starts two tiny trainings at once and compares them with
running them one after the other, with the automatic thread budget (``train.threads:
null``) and with every process taking all cores (:mod:`speedstructure.tools.bench_parallel`).

Results print as JSON (``learning``, ``simulator``, ``level``: a table); ``--json FILE`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.load import load_params
from speedstructure.config.schema import SPLITS, V_MAX, V_MIN, Params, SimParams, SynthConfig

log = logging.getLogger(__name__)


def fidelity(v: np.ndarray, sim: SimParams, fine_dx: float) -> dict[str, float]:
    """Compare the delivered gathers of ``v`` on the configured grid and on a fine grid."""
    from speedstructure.physics.simulate import Simulator

    # The fine run keeps the same output interval; deepwave sub-steps as CFL needs.
    fine = dataclasses.replace(sim, dx=float(fine_dx))
    g_c = Simulator(sim)(v).astype(np.float64)
    g_f = Simulator(fine)(v).astype(np.float64)
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


def generation_rates(cfg: SynthConfig, samples: int, repeats: int) -> list[float]:
    """Samples per second of ``repeats`` runs of the generator, ``samples`` samples each."""
    from speedstructure.synth.dataset import generate

    rates = []
    for r in range(repeats):
        small = dataclasses.replace(
            cfg,
            seed=int(cfg.seed) + r,
            n_train=samples,
            n_extended_1=0,
            n_extended_2=0,
            n_test=0,
            ood=dataclasses.replace(cfg.ood, n_test=0),  # no OOD set: `samples` in all
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate(small, Path(tmp), progress=False)
            rates.append(samples / (time.perf_counter() - t0))
    return rates


def bench_data(
    cfg: SynthConfig, samples: int, repeats: int, fine_dx: float, families: int
) -> dict[str, Any]:
    from speedstructure.synth.velocity import FAMILIES, generate_velocity

    rates = generation_rates(cfg, samples, repeats)
    fid: dict[str, Any] = {}
    for fam in FAMILIES[:families]:
        v = generate_velocity(np.random.default_rng(7), fam, cfg)
        t0 = time.perf_counter()
        fid[fam] = {k: round(val, 5) for k, val in fidelity(v, cfg.sim, fine_dx).items()}
        fid[fam]["seconds"] = round(time.perf_counter() - t0, 1)
    return {
        "generation": {
            "samples_per_run": samples,
            "workers": int(cfg.workers),
            "runs": repeats,
            "samples_per_second_median": round(statistics.median(rates), 3),
            "samples_per_second_all": [round(x, 3) for x in rates],
        },
        "fidelity": {
            "coarse_dx": cfg.sim.dx,
            "fine_dx": fine_dx,
            "per_family": fid,
            "min_corr": min(f["corr"] for f in fid.values()) if fid else None,
            "max_rel_l2": max(f["rel_l2"] for f in fid.values()) if fid else None,
        },
    }


def _read_rates(readers: dict[str, Any], ids: list[str], repeats: int, samples: int):
    """Samples per second of each reader (name -> read function) over random picks of ``ids``."""
    rng = np.random.default_rng(0)
    res: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):
        pick = [ids[i] for i in rng.integers(len(ids), size=samples)]
        for name, read in readers.items():
            t0 = time.perf_counter()
            for sid in pick:
                read(sid)
            res[name].append(samples / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in res.items()}


def bench_store(params: Params, repeats: int, samples: int) -> dict[str, Any]:
    """Samples per second of random whole-sample reads: store vs zips (median of ``repeats``)."""
    from speedstructure.data.samples import ZipSamples
    from speedstructure.data.store import StoreSamples

    store = StoreSamples(params.path("store"))
    zips = [ZipSamples(params.zip_path(s)) for s in SPLITS if s != "test"]
    try:
        where = {sid: z for z in zips for sid in z.sample_ids}
        ids = [i for i in store.sample_ids if i in where]
        if not ids:
            raise ValueError("the store holds no training samples: run `dvc repro ingest` first")
        readers = {"zip": lambda s: where[s].read(s), "store": store.read}
        med = _read_rates(readers, ids, repeats, samples)
    finally:
        for z in zips:
            z.close()
    return {
        "samples_per_pass": samples,
        "passes": repeats,
        "store_samples_per_second_median": round(med["store"], 1),
        "zip_samples_per_second_median": round(med["zip"], 1),
        "store_speedup": round(med["store"] / med["zip"], 2),
    }


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Median fp32 FLOP/s of an ``n x n`` matrix product on the CPU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def _step_times(model, opt, x, y, repeats: int) -> tuple[float, float]:
    """Median seconds of one training step and of one inference pass (after a warm-up)."""
    import torch

    from speedstructure.metrics import mape

    train_t, infer_t = [], []
    for r in range(repeats + 1):  # the first pass warms up
        t0 = time.perf_counter()
        loss = mape(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        with torch.no_grad():
            model.eval()
            model(x)
            model.train()
        t2 = time.perf_counter()
        if r:
            train_t.append(t1 - t0)
            infer_t.append(t2 - t1)
    return statistics.median(train_t), statistics.median(infer_t)


def bench_model(params: Params, variants: list[str], repeats: int, batch: int) -> dict[str, Any]:
    """Training and inference samples/s of each variant on random inputs (CPU), and the FLOP
    rate as a fraction of the matmul peak."""
    import torch

    from speedstructure.engine.optim import build_optimizer
    from speedstructure.models.build import build_model, forward_flops
    from speedstructure.physics.seafloor import FloorPicker

    peak = matmul_peak()
    out: dict[str, Any] = {
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "variants": {},
    }
    x = torch.randn(batch, 5, 10001, 31) * 0.015
    y = V_MIN + (V_MAX - V_MIN) * torch.rand(batch, 300, 1259)
    for name in variants:
        variant = params.variant(name)
        if variant.arch == "depth_trend":
            continue
        fwd = forward_flops(build_model(variant, meta=True)) * batch
        torch.manual_seed(0)
        model = build_model(variant, floor_picker=FloorPicker.from_synth(params.synth))
        opt = build_optimizer(model, params.train_for(name))
        tr, inf = _step_times(model, opt, x, y, repeats)
        out["variants"][name] = {
            "forward_gflops_per_sample": round(fwd / batch / 1e9, 2),
            "train_samples_per_second": round(batch / tr, 2),
            "infer_samples_per_second": round(batch / inf, 2),
            "train_fraction_of_peak": round(3 * fwd / tr / peak, 3),
            "infer_fraction_of_peak": round(fwd / inf / peak, 3),
        }
    return out


TRAINING_SETUPS = {  # name -> TrainConfig changes (bench training)
    "before": {"muon_precision": "bf16", "cache_inputs": False},
    "fp32_muon": {"muon_precision": "fp32", "cache_inputs": False},
    "after": {"muon_precision": "auto", "cache_inputs": True},
}


def _training_rows(params: Params, n: int, n_val: int = 0):
    """The first ``n`` training rows of fold 0 (and its first ``n_val`` validation rows),
    read from the ingested store."""
    from speedstructure.engine.data import read_folds_table, rows_in_store
    from speedstructure.errors import UserError

    table, store = params.path("folds_table"), params.path("store")
    if not store.is_dir() or not table.is_file():
        raise UserError(
            f"{store}: bench training needs the store and the folds: run `dvc repro folds`"
        )
    rows, val = read_folds_table(table, 0, params.root)
    rows, val = rows_in_store(store, table, rows[:n], val[:n_val])
    return (rows, val) if n_val else rows


def short_training_mape(
    params: Params, name: str, changes: dict, n_train: int = 16, n_val: int = 8, epochs: int = 2
) -> float:
    """Validation MAPE of ``name`` trained ``epochs`` epochs on ``n_train`` store samples
    with ``changes`` (the same seed, samples and schedule in every set-up): whether a
    set-up trains as the others do, at a scale ``make bench`` can afford for bf16 Muon on
    a CPU that emulates it."""
    from speedstructure.engine.data import SampleDataset
    from speedstructure.engine.loop import train_model
    from speedstructure.engine.runtime import pick_device, seed_everything
    from speedstructure.models.build import build_model
    from speedstructure.physics.seafloor import FloorPicker

    over = {"epochs": epochs, "cosine_epochs": epochs, "patience": 0, "progress": False}
    cfg = dataclasses.replace(params.train_for(name), **over, **changes)
    rows, val = _training_rows(params, n_train, n_val)
    device = pick_device(cfg.device)
    seed_everything(int(cfg.seed))
    variant = params.variant(name)
    picker = FloorPicker.from_synth(params.synth)
    model = build_model(variant, device=device, floor_picker=picker)
    train_ds, val_ds = SampleDataset(rows), SampleDataset(val)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        res = train_model(model, train_ds, val_ds, cfg, tmp, device=device, variant=variant)
    train_ds.close()
    val_ds.close()
    return float(res.history[-1]["val_mape"])


def step_seconds(params: Params, name: str, changes: dict, repeats: int) -> dict[str, float]:
    """Median seconds of an epoch's training step of ``name`` with ``changes`` to its
    training settings (loading included), and the seconds the input cache took per sample."""
    import torch

    from speedstructure.engine.data import SampleDataset
    from speedstructure.engine.loop import Trainer
    from speedstructure.engine.results import Run
    from speedstructure.engine.runtime import Dist, pick_device
    from speedstructure.models.build import build_model
    from speedstructure.physics.seafloor import FloorPicker

    cfg = dataclasses.replace(params.train_for(name), progress=False, **changes)
    rows = _training_rows(params, cfg.batch_size * (repeats + 1))
    device = pick_device(cfg.device)
    torch.manual_seed(0)
    picker = FloorPicker.from_synth(params.synth)
    model = build_model(params.variant(name), device=device, floor_picker=picker)
    ds = SampleDataset(rows)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(
            Run(cfg=cfg, out_dir=Path(tmp), ranks=Dist(), device=device), model, ds, None
        )
        setup = time.perf_counter() - t0
        trainer.net.train()
        times, t_prev = [], time.perf_counter()
        for i, batch in enumerate(trainer.loader):
            trainer.train_batch(batch, i, 1)
            times.append(time.perf_counter() - t_prev)
            t_prev = time.perf_counter()
    ds.close()
    return {"step": statistics.median(times[1:]), "setup_per_sample": setup / len(rows)}


def bench_training(params: Params, variants: list[str], repeats: int) -> dict[str, Any]:
    """Training samples per second of each variant in each of :data:`TRAINING_SETUPS`."""
    import torch

    from speedstructure.engine.runtime import cpu_capability, native_bf16

    out: dict[str, Any] = {
        "cpu_capability": cpu_capability(),
        "native_bf16": native_bf16(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "steps_timed": repeats,
        "variants": {},
    }
    for name in variants:
        batch = params.train_for(name).batch_size
        res = {}
        for setup, changes in TRAINING_SETUPS.items():
            t = step_seconds(params, name, changes, repeats)
            res[setup] = {
                "step_seconds_median": round(t["step"], 4),
                "train_samples_per_second": round(batch / t["step"], 2),
                "setup_seconds_per_sample": round(t["setup_per_sample"], 4),
                "val_mape_2_epochs_16_samples": round(
                    short_training_mape(params, name, changes), 5
                ),
            }
            log.info("bench training: %s %s: %.3f s per step", name, setup, t["step"])
        before = res["before"]["train_samples_per_second"]
        res["after_over_before"] = round(res["after"]["train_samples_per_second"] / before, 2)
        res["after_over_fp32_muon"] = round(
            res["after"]["train_samples_per_second"] / res["fp32_muon"]["train_samples_per_second"],
            2,
        )
        out["variants"][name] = res
    return out


def _cmd(args: argparse.Namespace) -> int:
    from speedstructure.cli import write_json_output

    params = load_params()
    out: dict[str, Any] = {}
    if args.what in ("data", "all"):
        out["data"] = bench_data(
            params.synth, args.samples, args.repeats, args.fine_dx or 2.0, args.families
        )
    if args.what in ("store", "all"):
        out["store"] = bench_store(params, args.repeats, max(args.samples, 16))
    if args.what in ("model", "all"):
        names = args.variants or [k for k, v in params.variants.items() if v.profile == "default"]
        out["model"] = bench_model(params, names, args.repeats, args.batch)
    if args.what == "training":  # not part of `all`: the bf16 set-up is slow on most CPUs
        from speedstructure.tools.doctor import trained_variants

        names = args.variants or trained_variants(params)
        out["training"] = bench_training(params, names, max(5, args.repeats))
    if args.what == "parallel":  # not part of `all`: it trains (minutes)
        from speedstructure.tools.bench_parallel import bench_parallel

        out["parallel"] = bench_parallel(
            params,
            variant=(args.variant or ["tiny_dual42"])[0],
            samples=max(args.samples, 16),
            epochs=args.epochs,
            repeats=args.repeats,
        )
    if args.what in TABLES:  # not part of `all`: minutes to an hour; they print tables
        module = importlib.import_module(f"speedstructure.tools.bench_{args.what}")
        out[args.what] = module.run_from_args(params, args)
    if args.what == "gpu":  # never part of `all`: it is the GPU machine's check
        from speedstructure.tools.bench_gpu import run_bench_gpu

        out["gpu"] = run_bench_gpu(params, args.variant, args.steps)
    if args.json != "-" and args.what not in TABLES:
        print(json.dumps(out, indent=2))
    write_json_output(args.json, out)
    return 0 if out.get("gpu", {}).get("ok", True) else 1


# benches with a module of their own that prints a table: learning trains three models (up
# to an hour), simulator simulates on a 1 m grid (minutes), level draws 3,000 models (a minute)
TABLES = ("learning", "simulator", "level")
BENCHES = ("data", "store", "model", "training", "gpu", "parallel", *TABLES)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from speedstructure.cli import add_json_option

    p = subparsers.add_parser(
        "bench",
        description="Benchmarks: data generation, store reads, model speed (`all`: the three); "
        "`learning`: a variant trained on 1x, 2x, 4x the samples (or epochs), scored; "
        "`simulator`: the floor picker and a trained model on test models simulated at 1 m / "
        "0.1 ms against the project's gathers; `level`: how much of the velocity level the "
        "reflections carry (ideal traces, the level read's ridge map); "
        "`training`: training steps before/after the precision rule and the input cache; "
        "`gpu`: the competition variants' training path checked and timed (bf16, fp16, "
        "validation, TTA, save + resume) with random weights; `parallel`: two tiny trainings "
        "at once against one after the other.",
    )
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=[*BENCHES, "all"],
    )
    p.add_argument(
        "--samples",
        type=int,
        default=8,
        help="samples generated per timing run; simulator: test models in the fine set",
    )
    p.add_argument("--repeats", type=int, default=3, help="timing runs (the median is reported)")
    p.add_argument(
        "--fine-dx",
        type=float,
        default=None,
        help="grid spacing (m) of the reference run (data: 2; simulator: 1)",
    )
    p.add_argument(
        "--families", type=int, default=6, help="velocity families in the fidelity check"
    )
    p.add_argument("--variants", nargs="*", help="model variants (default: the default profile's)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the model benchmark")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="V",
        help="gpu: a variant to check (repeatable; default: the competition profile's); "
        "learning: the variant to scale (default: the ensemble's first)",
    )
    p.add_argument("--steps", type=int, default=20, help="gpu: training steps per precision")
    p.add_argument("--epochs", type=int, default=2, help="parallel: epochs of each training")
    p.add_argument(
        "--scale",
        choices=["samples", "epochs"],
        default="samples",
        help="learning: scale the training samples (a quarter, a half, all) or the epochs",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="learning: the curve's PNG (default: bench/learning_<variant>_<scale>.png)",
    )
    from speedstructure.tools.bench_simulator import add_arguments

    add_arguments(p)
    add_json_option(p)
    p.set_defaults(func=_cmd)
