"""``speedstructure bench simulator``: robustness to the simulator that made the gathers.

The organisers' gathers (and real data) come from a 1 m grid with a 0.1 ms step; the project's
own come from its simulator on ``synth.sim.dx`` (5 m, resampled to 0.1 ms).  This benchmark
keeps a small set of the synthetic test set's velocity models simulated on a fine grid (1 m,
0.1 ms by default, deepwave through :class:`~speedstructure.physics.simulate.Simulator`) in
``--folder`` (``bench/simulator/``, not versioned): a challenge-layout ``test.zip`` of the
gathers, ``test_labels.npz`` of the models and ``meta.json`` recording :func:`set_digest` of
the settings and the models.  A later run reuses the set while the digest matches, else
simulates it again.

Per sample and on average it measures the correlation of the fine gathers with the project's
gathers of the same model (``data/test.zip``), the water-floor picker's mean absolute error
against the true floor on both sets of gathers, for each picking method
(:data:`speedstructure.physics.seafloor.METHODS`), and, with a trained model (``--model``: a
``best.pt``, an ensemble file, the register stage's JSON (``paths.registered``) or a
``models:/`` URI; by default the registered model when the pipeline has run), its MAPE on both
sets and their ratio (per picking method for a ``floor: picked`` model).  The
table shows the issue's bar: the picker within :data:`FLOOR_BAR_M` on the fine set, the MAPE
ratio within :data:`MAPE_RATIO_BAR`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.schema import Params, SimParams
from speedstructure.config.typed import as_plain

log = logging.getLogger(__name__)

FINE_DX = 1.0  # m: the organisers' grid
FINE_DT = 0.0001  # s: the organisers' step
FINE_PML_WIDTH = 40  # absorbing cells of the fine set (40 m at 1 m, as the set was first made)
SET_ZIP = "test.zip"  # the fine gathers, challenge layout (no targets)
SET_LABELS = "test_labels.npz"  # their velocity models, keyed by sample id
SET_META = "meta.json"  # the digest, the settings, the ids, the time per sample
FLOOR_BAR_M = 5.0  # the issue's bar: the floor picked within 5 m on the fine set ...
MAPE_RATIO_BAR = 1.10  # ... and the MAPE on it within 10 % of the project's gathers'
LATE_S = 0.25  # s: the second correlation starts here, after the direct wave (reflections)


# --------------------------------------------------------------------------- the set


def fine_settings(sim: SimParams, dx: float = FINE_DX, dt: float = FINE_DT) -> SimParams:
    """``synth.sim`` on the fine grid: ``dx`` metres, output every ``dt`` seconds,
    :data:`FINE_PML_WIDTH` absorbing cells (the same stencil order, wavelet and delivered
    sampling), checked."""
    from speedstructure.physics.simulate import check_sim

    fine = dataclasses.replace(sim, dx=float(dx), dt=float(dt), pml_width=FINE_PML_WIDTH)
    return check_sim(fine)


def set_digest(sim: SimParams, ids: list[str], models: np.ndarray) -> str:
    """What determines the set's bytes: the fine settings, the ids and each model's bytes."""
    doc = {
        "sim": as_plain(sim),
        "ids": list(ids),
        "models": [hashlib.sha256(np.ascontiguousarray(m, np.float32)).hexdigest() for m in models],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def read_test_models(params: Params, n: int) -> tuple[list[str], np.ndarray]:
    """The first ``n`` sample ids of the test zip (its order) and their models from the test
    targets, float32 ``(n, 300, 1259)``."""
    from speedstructure.data.samples import list_sample_ids
    from speedstructure.data.submission_check import VelocityArchive

    ids = list_sample_ids(params.zip_path("test"))[:n]
    with VelocityArchive(params.test_labels_path(), "test targets") as lab:
        models = np.stack([lab[s].astype(np.float32) for s in ids])
    return ids, models


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The set's ``meta.json``, or None when the set is absent or incomplete."""
    meta = folder / SET_META
    if not all((folder / n).is_file() for n in (SET_ZIP, SET_LABELS, SET_META)):
        return None
    try:
        return json.loads(meta.read_text())
    except ValueError:
        return None


def reusable(folder: Path, digest: str) -> bool:
    """Whether ``folder`` holds a complete set made with the settings and models of ``digest``."""
    meta = read_meta(folder)
    return meta is not None and meta.get("digest") == digest


def write_set(
    folder: Path, sim: SimParams, ids: list[str], models: np.ndarray, simulate=None
) -> dict[str, Any]:
    """Simulate ``models`` with ``sim`` into ``folder`` (zip, labels, then ``meta.json`` last,
    each atomically) and return the meta; ``simulate`` (default: the project's
    :class:`~speedstructure.physics.simulate.Simulator` of ``sim``) maps a model to its gathers."""
    import torch

    from speedstructure.data.samples import ZipWriter
    from speedstructure.fsutil import atomic_output, atomic_write_json

    if simulate is None:
        from speedstructure.physics.simulate import Simulator

        simulate = Simulator(sim)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SET_META).unlink(missing_ok=True)  # a set being rewritten is never "reusable"
    seconds, cpu = [], []
    with ZipWriter(folder / SET_ZIP) as zw:
        for i, (sid, v) in enumerate(zip(ids, models, strict=True)):
            t0, c0 = time.perf_counter(), time.process_time()
            gathers = simulate(v)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            log.info(
                "bench simulator: sample %d/%d (%s) simulated in %.1f s (%.1f s of CPU)",
                i + 1,
                len(ids),
                sid,
                seconds[-1],
                cpu[-1],
            )
            zw.add(sid, gathers, None)
    with atomic_output(folder / SET_LABELS, suffix=".npz") as tmp:
        np.savez(tmp, **{s: np.asarray(v, np.float32) for s, v in zip(ids, models, strict=True)})
    meta = {
        "digest": set_digest(sim, ids, models),
        "sim": as_plain(sim),
        "ids": list(ids),
        "seconds_per_sample": [round(s, 1) for s in seconds],
        "cpu_seconds_per_sample": [round(s, 1) for s in cpu],
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(folder / SET_META, meta)
    return meta


def ensure_set(
    params: Params, folder: Path, sim: SimParams, n: int, simulate=None
) -> tuple[dict, bool]:
    """The fine set of the first ``n`` test models in ``folder``: reused when its digest
    matches, else simulated (:func:`write_set`).  Returns its meta and whether it was reused."""
    ids, models = read_test_models(params, n)
    digest = set_digest(sim, ids, models)
    if reusable(folder, digest):
        log.info("bench simulator: reusing %s (digest %s)", folder, digest)
        return read_meta(folder) or {}, True
    log.info("bench simulator: simulating %d models at dx %g m, dt %g s", n, sim.dx, sim.dt)
    return write_set(folder, sim, ids, models, simulate), False


# --------------------------------------------------------------------------- a trained model


@dataclasses.dataclass
class Trained:
    """A trained model under test: its prediction function ``(B, 5, 10001, 31) -> (B, 300,
    1259)``, its networks (those with ``floor: picked`` get the picking method under test)
    and a description."""

    predict: Any
    networks: list
    description: str

    def pickers(self) -> list:
        return [n for n in self.networks if getattr(n, "floor_picker", None) is not None]

    def use_method(self, method: str) -> None:
        for net in self.pickers():
            net.floor_picker = dataclasses.replace(net.floor_picker, method=method)


def load_trained(params: Params, model: str | None) -> Trained | None:
    """``--model``: a checkpoint (``.pt``), or anything :func:`load_predictor` reads; by
    default the registered model (``paths.registered``) or the tuned ensemble when there is
    one, else None (the benchmark then reports no MAPE)."""
    import torch

    from speedstructure.config.typed import resolve_path
    from speedstructure.ensemble.loading import load_predictor
    from speedstructure.ensemble.members import Ensemble, load_member
    from speedstructure.physics.seafloor import FloorPicker

    if model is None:
        found = [params.path(k) for k in ("registered", "ensemble") if params.path(k).is_file()]
        if not found:
            log.info("bench simulator: no trained model (no --model, nothing registered): no MAPE")
            return None
        model = str(found[0])
    if model.endswith(".pt"):
        path = resolve_path(model, params.root)
        net = load_member(path, default_floor_picker=FloorPicker.from_synth(params.synth))

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return net.predict(torch.from_numpy(np.asarray(x, np.float32))).float().numpy()

        return Trained(predict, [net], f"checkpoint {path}")
    predict, description = load_predictor(model, params)
    owner = getattr(predict, "__self__", None)
    nets = [n for _, ms in owner.folds for n, _ in ms] if isinstance(owner, Ensemble) else []
    return Trained(predict, nets, description)


# --------------------------------------------------------------------------- measurements


def gather_correlation(a: np.ndarray, b: np.ndarray, start: int = 0) -> float:
    """Pearson correlation of two samples' gathers ``(5, T, 31)`` from time sample ``start``."""
    a, b = (np.asarray(g)[:, start:].astype(np.float64).ravel() for g in (a, b))
    return float(np.corrcoef(a, b)[0, 1])


def floor_error(picked: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean absolute error (m) of a pick over its picked columns, and the picked fraction."""
    ok = np.isfinite(picked)
    if not ok.any():
        return float("nan"), 0.0
    return float(np.abs(picked[ok] - truth[ok]).mean()), float(ok.mean())


def measure(
    params: Params, folder: Path, ids: list[str], trained: Trained | None
) -> list[dict[str, Any]]:
    """One row per sample: the gathers' correlation, each picking method's floor error on
    the project's gathers (``own``) and on the fine set's (``fine``), and the model's MAPE."""
    from speedstructure.data.samples import ZipSamples
    from speedstructure.data.submission_check import VelocityArchive
    from speedstructure.metrics import mape, water_floor_depth
    from speedstructure.physics.seafloor import METHODS, pick_floor

    water, sim = float(params.synth.water_velocity), params.synth.sim
    late = int(round(LATE_S / sim.record_dt))
    methods = METHODS if trained is not None and trained.pickers() else (None,)
    rows = []
    with (
        ZipSamples(params.zip_path("test")) as own,
        ZipSamples(folder / SET_ZIP) as fine,
        VelocityArchive(folder / SET_LABELS, "fine-grid targets") as labels,
    ):
        for sid in ids:
            truth = labels[sid].astype(np.float32)
            gathers = {"own": own.read_gathers(sid), "fine": fine.read_gathers(sid)}
            floor = water_floor_depth(truth, water).astype(np.float64)
            row: dict[str, Any] = {
                "sample_id": sid,
                "floor_m": round(float(floor.mean()), 1),
                "corr": gather_correlation(gathers["own"], gathers["fine"]),
                "corr_late": gather_correlation(gathers["own"], gathers["fine"], late),
            }
            for method in METHODS:
                for name, g in gathers.items():
                    err, cover = floor_error(pick_floor(g, sim, water, method), floor)
                    row[f"floor_{method}_{name}"] = err
                    row[f"picked_{method}_{name}"] = cover
            for method in methods if trained is not None else ():
                if method is not None:
                    trained.use_method(method)
                key = "mape" if method is None else f"mape_{method}"
                for name, g in gathers.items():
                    row[f"{key}_{name}"] = mape(trained.predict(g[None]), truth[None])
            rows.append(row)
            log.info("bench simulator: %s measured", sid)
    return rows


def train_floor_errors(params: Params, n: int) -> dict[str, Any]:
    """Each picking method's mean floor error (m) on the first ``n`` samples of the training
    zip (the project's own gathers) against their true floors."""
    from speedstructure.data.samples import ZipSamples
    from speedstructure.metrics import water_floor_depth
    from speedstructure.physics.seafloor import METHODS, pick_floor

    water, sim = float(params.synth.water_velocity), params.synth.sim
    errors: dict[str, list[float]] = {m: [] for m in METHODS}
    with ZipSamples(params.zip_path("train")) as z:
        for sid in z.sample_ids[:n]:
            gathers, target = z.read(sid)
            floor = water_floor_depth(target, water).astype(np.float64)
            for m in METHODS:
                errors[m].append(floor_error(pick_floor(gathers, sim, water, m), floor)[0])
    return {
        "n_samples": min(n, len(errors[METHODS[0]])),
        **{m: float(np.nanmean(e)) for m, e in errors.items()},
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the samples of every measured figure, the MAPE ratios (mean fine MAPE over
    mean own MAPE) and whether the issue's bar is met."""
    keys = [k for k in rows[0] if k != "sample_id"]
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    out: dict[str, Any] = {"n_samples": len(rows), "mean": mean, "bar": {}}
    for k in keys:
        if k.startswith("floor_") and k.endswith("_fine"):
            out["bar"][k] = bool(mean[k] <= FLOOR_BAR_M)
        if k.startswith("mape") and k.endswith("_fine"):
            stem = k.removesuffix("_fine")
            ratio = mean[k] / mean[f"{stem}_own"]
            out[f"{stem}_ratio"] = ratio
            out["bar"][f"{stem}_ratio"] = bool(ratio <= MAPE_RATIO_BAR)
    return out


# --------------------------------------------------------------------------- report


def _cell(value: float, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or not np.isfinite(value) else f"{value:{width}{fmt}}"


def table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: per sample and on average the gathers' correlation,
    each method's floor error on both sets (a ``*`` where columns went unpicked), the MAPE
    on both sets and their ratio; then the issue's bar, met or not."""
    from speedstructure.physics.seafloor import DEFAULT_METHOD, METHODS

    rows, summary = report["samples"], report["summary"]
    mean = {"sample_id": "mean", **summary["mean"]}
    mape_keys = sorted({k.rsplit("_", 1)[0] for k in mean if k.startswith("mape")})
    sim = report["fine_sim"]
    lines = [
        f"Simulator benchmark: {summary['n_samples']} test models simulated at dx "
        f"{sim['dx']:g} m, dt {sim['dt'] * 1000:g} ms, against the project's gathers "
        f"(dx {report['own_sim']['dx']:g} m, dt {report['own_sim']['dt'] * 1000:g} ms)",
        f"model: {report['model'] or 'none (no MAPE)'}",
    ]
    head = f"  {'sample':<20} {'floor':>6} {'corr':>8} {'late':>8}"
    sub = f"  {'':<20} {'(m)':>6} {'':>8} {'corr':>8}"
    for m in METHODS:
        label = f"{m} pick" + (" (default)" if m == DEFAULT_METHOD else "")
        head += f"  {label:>17}"
        sub += f"  {'own':>8} {'fine':>8}"
    for k in mape_keys:
        head += f"  {k.replace('_', ' '):>26}"
        sub += f"  {'own':>8} {'fine':>8} {'ratio':>8}"
    lines += [head, sub, "  " + "-" * (len(sub) - 2)]
    for r in [*rows, mean]:
        line = f"  {r['sample_id']:<20} {_cell(r['floor_m'], '.1f', 6)}"
        line += f" {_cell(r['corr'], '.5f', 8)} {_cell(r['corr_late'], '.5f', 8)}"
        for m in METHODS:
            for s in ("own", "fine"):
                mark = "*" if r.get(f"picked_{m}_{s}", 1.0) < 1.0 else " "
                line += f"  {_cell(r[f'floor_{m}_{s}'], '.2f', 7)}{mark}"
        for k in mape_keys:
            ratio = r[f"{k}_fine"] / r[f"{k}_own"]
            line += f"  {_cell(r[f'{k}_own'], '.4f', 8)} {_cell(r[f'{k}_fine'], '.4f', 8)}"
            line += f" {_cell(ratio, '.3f', 8)}"
        lines.append(line)
    lines.append(
        "  floor error: mean |picked - true| (m) over picked columns (*: some unpicked); "
        f"late corr: from {LATE_S:g} s"
    )
    train = report.get("train_floor")
    if train:
        figures = ", ".join(f"{m} {train[m]:.2f} m" for m in METHODS)
        lines.append(
            f"floor error on {train['n_samples']} training samples (project's gathers): {figures}"
        )
    bar = summary["bar"]
    for m in METHODS:
        key = f"floor_{m}_fine"
        ok = "MET" if bar[key] else "NOT MET"
        lines.append(
            f"bar: {m} pick on the fine set within {FLOOR_BAR_M:g} m: {ok} "
            f"({summary['mean'][key]:.2f} m)"
        )
    for k in mape_keys:
        ok = "MET" if bar[f"{k}_ratio"] else "NOT MET"
        lines.append(
            f"bar: {k.replace('_', ' ')} fine / own within {MAPE_RATIO_BAR:.2f}: {ok} "
            f"({summary[f'{k}_ratio']:.3f})"
        )
    return "\n".join(lines)


def run(
    params: Params,
    folder: Path,
    samples: int,
    dx: float = FINE_DX,
    dt: float = FINE_DT,
    model: str | None = None,
    train_samples: int = 0,
) -> dict[str, Any]:
    """The benchmark: the fine set made or reused, then measured (see the module docstring)."""
    sim = fine_settings(params.synth.sim, dx, dt)
    meta, reused = ensure_set(params, folder, sim, samples)
    trained = load_trained(params, model)
    rows = measure(params, folder, meta["ids"], trained)
    return {
        "fine_sim": as_plain(sim),
        "own_sim": as_plain(params.synth.sim),
        "folder": str(folder),
        "digest": meta["digest"],
        "reused": reused,
        "seconds_per_sample": meta.get("seconds_per_sample"),
        "cpu_seconds_per_sample": meta.get("cpu_seconds_per_sample"),
        "torch_threads": meta.get("torch_threads"),
        "model": trained.description if trained is not None else None,
        "samples": rows,
        "summary": summarise(rows),
        "train_floor": train_floor_errors(params, train_samples) if train_samples else None,
    }


def add_arguments(p) -> None:
    """The options of ``speedstructure bench simulator`` (``--samples`` and ``--fine-dx`` are
    shared with the other benchmarks)."""
    p.add_argument(
        "--fine-dt", type=float, default=None, help="simulator: the fine set's step (s, 0.0001)"
    )
    p.add_argument(
        "--folder",
        default="bench/simulator",
        help="simulator: the fine set's folder (reused while its settings digest matches)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="simulator: a checkpoint (.pt), ensemble file, registered.json or models:/ URI "
        "(default: the registered model, if any)",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=48,
        help="simulator: training samples the picking methods are also scored on (0: none)",
    )


def run_from_args(params: Params, args) -> dict[str, Any]:
    """``speedstructure bench simulator``: :func:`run` with the command's options; prints the
    table."""
    from speedstructure.config.typed import resolve_path

    report = run(
        params,
        resolve_path(args.folder, params.root),
        args.samples,
        dx=args.fine_dx or FINE_DX,
        dt=args.fine_dt or FINE_DT,
        model=args.model,
        train_samples=args.train_samples,
    )
    print(table(report))
    return report
