"""The physics-based synthetic dataset: the project's embedded default data.

``speedstructure synth`` (``make data``) draws velocity models
(:mod:`speedstructure.synth.velocity`), simulates their five shot gathers
(:mod:`speedstructure.physics.simulate`) and writes the challenge's four zips to
``paths.data`` (or ``--output``)::

    data/train.zip  data/train_extended_1.zip  data/train_extended_2.zip  data/test.zip
    data/test_labels.npz        # test targets keyed by sample id (scoring only)
    data/test_ood.zip           # the out-of-distribution test set: gathers only
    data/test_ood_labels.npz    # its targets
    data/<zip stem>_truth.npz   # beside every zip: what was drawn (family, floor, h, body, trend)
    data/synth_meta.json        # the synth params that made them

The out-of-distribution (OOD) test set (``synth.ood``, file names
``data.ood_zip`` / ``data.ood_labels``) has its own seed and size and shifted
prior ranges (``v_top``, ``v_bottom``, ``trend_power``, ``water_depth``);
``synth.ood.n_test: 0`` writes none.  Every sample has its own random stream
derived from ``(seed, split, index)`` (the OOD set: ``(ood.seed, 4, index)``),
so the output does not depend on the number of worker processes, and the same
seed gives byte-identical zips.  Sample ids (18 alphanumerics) are unique
across all zips, the OOD one included.  Generation runs in ``synth.workers``
processes with a progress bar.  ``synth_meta.json`` records :func:`config_digest` of the ``synth``
section and what was drawn (no timings: the same settings give the same bytes, so
``data.dvc`` matches on every machine); while the digest matches, ``speedstructure synth``
regenerates nothing but the truth files when they are missing
(:mod:`speedstructure.synth.truth`; ``--truth-only`` writes them alone, checked against the
zips' targets).  Existing zips that this generator did not write (real challenge data, say)
are never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import string
import time
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from speedstructure.config.load import load_params
from speedstructure.config.schema import PRIOR_KEYS, SPLITS, DataConfig, SimParams, SynthConfig
from speedstructure.config.typed import as_plain
from speedstructure.data.samples import ZipWriter
from speedstructure.data.truth import TRUTH_SUFFIX, save_truth, truth_path
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_output, atomic_write_json
from speedstructure.synth.truth import missing_truths, truth_of, write_truth_only
from speedstructure.synth.velocity import ModelFacts

SIZE_KEYS: dict[str, str] = {  # split -> the synth key with its number of samples
    "train": "n_train",
    "train_extended_1": "n_extended_1",
    "train_extended_2": "n_extended_2",
    "test": "n_test",
}
UNLABELLED = "test"  # the split whose zip holds no targets (they go to test_labels.npz)
META_NAME = "synth_meta.json"
LABELS_NAME = "test_labels.npz"
OOD_SPLIT_INDEX = len(SPLITS)  # the OOD set's stream index, apart from every challenge split
_ALPHABET = np.array(list(string.ascii_letters + string.digits))
log = logging.getLogger(__name__)


def make_sample_ids(
    seed: int, n: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """``n`` unique 18-character alphanumeric ids, reproducible from ``seed``, none in
    ``exclude``."""
    rng = np.random.default_rng([seed, 0x1D])
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        sid = "".join(_ALPHABET[rng.integers(len(_ALPHABET), size=18)])
        if sid not in seen and sid not in exclude:
            seen.add(sid)
            ids.append(sid)
    return ids


def sample_rng(seed: int, split_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_index, index])


def ood_config(cfg: SynthConfig) -> SynthConfig:
    """``cfg`` with the OOD set's seed and shifted prior ranges (``synth.ood``)."""
    return dataclasses.replace(
        cfg, seed=int(cfg.ood.seed), **{k: getattr(cfg.ood, k) for k in PRIOR_KEYS}
    )


def make_model(cfg: SynthConfig, split_index: int, index: int) -> tuple[np.ndarray, ModelFacts]:
    """``(velocity, facts)`` of sample ``index`` of a split: its family and model drawn from
    the sample's own stream (:func:`sample_rng`)."""
    from speedstructure.synth.velocity import generate_model, sample_family

    rng = sample_rng(int(cfg.seed), split_index, index)
    family = sample_family(rng, cfg.families)
    return generate_model(rng, family, cfg)


# Worker state: one Simulator per process (built once, reused for every sample).
_SIM = None


def _init_worker(sim: SimParams) -> None:
    import torch

    from speedstructure.physics.simulate import Simulator

    torch.set_num_threads(1)
    global _SIM
    _SIM = Simulator(sim)


def _make_sample(job: tuple[SynthConfig, int, int]) -> tuple[ModelFacts, np.ndarray, np.ndarray]:
    cfg, split_index, index = job
    v, facts = make_model(cfg, split_index, index)
    return facts, _SIM(v), v


def config_digest(cfg: SynthConfig) -> str:
    """A digest of everything that determines the generated bytes (all of ``synth`` but
    ``workers``); the same as the untyped generator's for the same settings."""
    keep = {k: v for k, v in as_plain(cfg).items() if k != "workers"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def outputs(out_dir: Path) -> list[Path]:
    return [out_dir / f"{name}.zip" for name in SPLITS] + [
        out_dir / LABELS_NAME,
        out_dir / META_NAME,
    ]


def ood_outputs(out_dir: Path, data: DataConfig | None = None) -> list[Path]:
    """The OOD test set's zip and targets (``data.ood_zip``, ``data.ood_labels``)."""
    data = data or DataConfig()
    return [out_dir / data.ood_zip, out_dir / data.ood_labels]


def up_to_date(cfg: SynthConfig, out_dir: Path, data: DataConfig | None = None) -> bool:
    meta = out_dir / META_NAME
    expected = outputs(out_dir) + (ood_outputs(out_dir, data) if cfg.ood.n_test > 0 else [])
    if not all(p.exists() for p in expected):
        return False
    try:
        return json.loads(meta.read_text()).get("digest") == config_digest(cfg)
    except (OSError, ValueError):
        return False


@dataclass
class _Tally:
    """What :func:`generate` collects while it writes: test targets and statistics."""

    labels: dict[str, np.ndarray] = field(default_factory=dict)
    velocities: list[np.ndarray] = field(default_factory=list)
    gather_std: list[float] = field(default_factory=list)

    def add(self, sid: str, velocity: np.ndarray, gathers: np.ndarray, labelled: bool) -> None:
        if not labelled:
            self.labels[sid] = velocity
        self.velocities.append(velocity[:, ::16].ravel())
        self.gather_std.append(float(gathers.std()))

    def stats(self) -> dict[str, float]:
        vv = np.concatenate(self.velocities) if self.velocities else np.zeros(1)
        g_std = self.gather_std
        return {
            "velocity_mean": round(float(vv.mean()), 4),
            "velocity_min": round(float(vv.min()), 4),
            "velocity_max": round(float(vv.max()), 4),
            "gather_std_median": round(float(np.median(g_std)) if g_std else 0.0, 5),
        }


def _check_outputs(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite zips the generator did not write (no metadata) without ``force``."""
    foreign = [p for p in outputs(out_dir)[: len(SPLITS)] if p.exists()]
    if foreign and not (out_dir / META_NAME).exists() and not force:
        raise UserError(
            f"{out_dir}: holds {', '.join(p.name for p in foreign)} not written by the generator "
            "(real challenge data?); refusing to overwrite without --force"
        )


def split_sizes(cfg: SynthConfig) -> dict[str, int]:
    """Samples per split (``synth.n_*``), in the order of
    :data:`~speedstructure.config.schema.SPLITS`."""
    sizes = {name: int(getattr(cfg, SIZE_KEYS[name])) for name in SPLITS}
    for name, n in sizes.items():
        if n < 0:
            raise UserError(f"params.yaml: synth size for '{name}' is negative ({n})")
    return sizes


def _write_split(
    pool: Executor,
    cfg: SynthConfig,
    split_index: int,
    ids: list[str],
    zip_path: Path,
    tally: _Tally,
    bar: tqdm,
    labelled: bool,
) -> dict[str, Any]:
    """Simulate one split's samples in ``pool`` and write its zip (with the targets if
    ``labelled``, else into ``tally.labels``) and its truth file; returns its summary."""
    facts: list[ModelFacts] = []
    jobs = [(cfg, split_index, i) for i in range(len(ids))]
    with ZipWriter(zip_path) as zw:
        for sid, (f, gathers, v) in zip(
            ids, pool.map(_make_sample, jobs, chunksize=1), strict=True
        ):
            zw.add(sid, gathers, v if labelled else None)
            tally.add(sid, v, gathers, labelled)
            facts.append(f)
            bar.update(1)
    save_truth(truth_of(zip_path, ids, facts))
    families = Counter(f.family for f in facts)
    return {"samples": len(ids), "families": dict(sorted(families.items()))}


def _save_labels(path: Path, labels: dict[str, np.ndarray]) -> None:
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, **labels)


def _write_ood(
    pool: Executor, cfg: SynthConfig, taken: list[str], out_dir: Path, data: DataConfig, bar: tqdm
) -> dict[str, Any] | None:
    """The OOD test set (``synth.ood``): its zip and targets, ids unlike any in ``taken``;
    its summary (None, and stale files removed, when ``synth.ood.n_test`` is 0)."""
    zip_path, labels_path = ood_outputs(out_dir, data)
    if cfg.ood.n_test <= 0:
        for p in (zip_path, labels_path, truth_path(zip_path)):
            if p.exists():
                log.info("synth.ood.n_test is 0: removing the stale %s", p)
                p.unlink()
        return None
    ood = ood_config(cfg)
    ids = make_sample_ids(ood.seed, int(cfg.ood.n_test), exclude=frozenset(taken))
    tally = _Tally()
    info = _write_split(pool, ood, OOD_SPLIT_INDEX, ids, zip_path, tally, bar, labelled=False)
    _save_labels(labels_path, tally.labels)
    priors = {k: list(getattr(ood, k)) for k in PRIOR_KEYS}
    return {"zip": zip_path.name, **info, "seed": ood.seed, "priors": priors, **tally.stats()}


def generate(
    cfg: SynthConfig,
    out_dir: Path,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """Write the four zips, the test labels, the OOD test set (``data`` names its files) and
    the metadata; returns the summary."""
    from speedstructure.physics.simulate import check_sim

    out_dir.mkdir(parents=True, exist_ok=True)
    _check_outputs(out_dir, force)
    sizes = split_sizes(cfg)
    total = sum(sizes.values())
    ids = make_sample_ids(int(cfg.seed), total)
    workers = int(workers or cfg.workers or 1)
    sim = check_sim(cfg.sim)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"digest": config_digest(cfg), "seed": int(cfg.seed), "splits": {}}
    tally = _Tally()
    n_all = total + max(int(cfg.ood.n_test), 0)
    bar = tqdm(total=n_all, desc="synth", unit="sample", disable=not progress)
    start = 0
    with ProcessPoolExecutor(
        max_workers=workers, initializer=_init_worker, initargs=(sim,)
    ) as pool:
        for split_index, name in enumerate(SPLITS):
            split_ids = ids[start : start + sizes[name]]
            start += sizes[name]
            summary["splits"][name] = _write_split(
                pool,
                cfg,
                split_index,
                split_ids,
                out_dir / f"{name}.zip",
                tally,
                bar,
                labelled=name != UNLABELLED,
            )
        ood = _write_ood(pool, cfg, ids, out_dir, data or DataConfig(), bar)
    bar.close()
    _save_labels(out_dir / LABELS_NAME, tally.labels)
    summary.update(samples=total, **tally.stats())
    if ood is not None:
        summary["ood"] = ood
    atomic_write_json(out_dir / META_NAME, summary)  # no timings: data.dvc's hash is stable
    seconds = round(time.perf_counter() - t0, 2)
    rate = round(n_all / max(seconds, 1e-9), 3)
    return {**summary, "seconds": seconds, "samples_per_second": rate}


def format_summary(summary: dict[str, Any], out_dir: Path) -> str:
    lines = [f"Synthetic Speed & Structure dataset in {out_dir}:"]
    for name, info in summary["splits"].items():
        fam = ", ".join(f"{k} {v}" for k, v in info["families"].items())
        lines.append(f"  {name + '.zip':<24} {info['samples']:>5} samples  ({fam})")
    lines.append(f"  {LABELS_NAME:<24} test targets for scoring")
    lines.append(f"  {'*' + TRUTH_SUFFIX:<24} beside each zip: family, floor, h(x), body, trend")
    ood = summary.get("ood")
    if ood:
        fam = ", ".join(f"{k} {v}" for k, v in ood["families"].items())
        lines.append(f"  {ood['zip']:<24} {ood['samples']:>5} samples  ({fam})")
        shifts = "; ".join(f"{k} {v}" for k, v in ood["priors"].items())
        lines.append(
            f"    out of distribution (seed {ood['seed']}, targets beside it): {shifts}; "
            f"velocity mean {ood['velocity_mean']} km/s"
        )
    lines.append(
        f"  velocity mean {summary['velocity_mean']} km/s, range [{summary['velocity_min']}, "
        f"{summary['velocity_max']}]; median gather std {summary['gather_std_median']}"
    )
    if "seconds" in summary:  # this run's timing (printed, never written into paths.data)
        lines.append(
            f"  generated in {summary['seconds']} s ({summary['samples_per_second']} samples/s)"
        )
    return "\n".join(lines)


OVERRIDES = ("seed", *SIZE_KEYS.values())  # synth keys the command line may override


def _cmd(args: argparse.Namespace) -> int:
    params = load_params(args.params) if args.params else load_params()
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    cfg = dataclasses.replace(params.synth, **overrides)
    out_dir = Path(args.output) if args.output else params.path("data")
    if args.truth_only:
        return _truth_only(cfg, out_dir, params.data)
    if not args.force and up_to_date(cfg, out_dir, params.data):
        summary = json.loads((out_dir / META_NAME).read_text())
        print(format_summary(summary, out_dir))
        if missing_truths(cfg, out_dir, params.data):  # generated before the truth files existed
            return _truth_only(cfg, out_dir, params.data)
        print("  (up to date with params.yaml: nothing regenerated; --force to redo)")
        return 0
    summary = generate(
        cfg,
        out_dir,
        workers=args.workers,
        force=args.force,
        progress=not args.quiet,
        data=params.data,
    )
    print(format_summary(summary, out_dir))
    return 0


def _truth_only(cfg: SynthConfig, out_dir: Path, data: DataConfig) -> int:
    t0 = time.perf_counter()
    written = write_truth_only(cfg, out_dir, data)
    seconds = time.perf_counter() - t0
    print(
        f"  truth files written ({', '.join(p.name for p in written)}): every velocity "
        f"regenerated and equal to its zip's target ({seconds:.1f} s, nothing simulated)"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from speedstructure.cli import add_quiet_option

    p = subparsers.add_parser(
        "synth", description="Generate the synthetic dataset (the challenge's four zips)."
    )
    p.add_argument("--output", help="output folder (default: params paths.data)")
    p.add_argument("--params", help="parameter file (default: params.yaml at the project root)")
    p.add_argument("--workers", type=int, help="processes (default: params synth.workers)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-train", dest="n_train", type=int)
    p.add_argument("--n-extended-1", dest="n_extended_1", type=int)
    p.add_argument("--n-extended-2", dest="n_extended_2", type=int)
    p.add_argument("--n-test", dest="n_test", type=int)
    p.add_argument(
        "--force",
        action="store_true",
        help="regenerate even if up to date / overwrite foreign zips",
    )
    p.add_argument(
        "--truth-only",
        action="store_true",
        help="write only the truth files (<zip stem>_truth.npz) of the existing zips, after "
        "checking that the regenerated velocities equal their targets (no simulation)",
    )
    add_quiet_option(p)
    p.set_defaults(func=_cmd)
