"""The synthetic dataset's truth files (format: :mod:`speedstructure.data.truth`).

:func:`~speedstructure.synth.dataset.generate` writes one beside every zip it writes
(:func:`truth_of` the facts :func:`~speedstructure.synth.velocity.generate_model` drew).
For a dataset generated before the truth files existed, :func:`write_truth_only`
(``speedstructure synth --truth-only``) writes them without simulating anything: it
regenerates every velocity model from the ``synth`` params (seconds), checks each against
the target in the zip (or in the labels beside it) byte for byte, and writes the truth
files only when all of them agree; a mismatch is a one-line error naming the zip, and
nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speedstructure.config.schema import SPLITS, DataConfig, SynthConfig
from speedstructure.data.truth import Truth, make_truth, pack_body, save_truth, truth_path
from speedstructure.errors import UserError
from speedstructure.synth.velocity import ModelFacts


def truth_of(zip_path: Path, ids: Sequence[str], facts: Sequence[ModelFacts]) -> Truth:
    """The truth file of ``zip_path`` for samples ``ids`` drawn with ``facts``."""
    rows = {
        "family": [f.family for f in facts],
        "v_top": [f.v_top for f in facts],
        "v_bottom": [f.v_bottom for f in facts],
        "trend_power": [f.trend_power for f in facts],
        "floor": [f.floor for f in facts],
        "h": [f.h for f in facts],
        "body": [pack_body(f.body) for f in facts],
    }
    return make_truth(truth_path(zip_path), list(ids), rows)


@dataclass(frozen=True)
class ZipPlan:
    """One zip the generator writes: its samples' ids, stream and targets' home."""

    zip_path: Path
    labels: Path | None  # the targets beside the zip (test sets), None: inside it
    cfg: SynthConfig  # the priors it is drawn with (the OOD set's are shifted)
    split_index: int
    ids: list[str]


def zip_plans(cfg: SynthConfig, out_dir: Path, data: DataConfig) -> list[ZipPlan]:
    """Every zip :func:`~speedstructure.synth.dataset.generate` writes for ``cfg``, with the
    same ids and random streams."""
    from speedstructure.synth import dataset as ds

    sizes = ds.split_sizes(cfg)
    ids = ds.make_sample_ids(int(cfg.seed), sum(sizes.values()))
    plans, start = [], 0
    for split_index, name in enumerate(SPLITS):
        labels = out_dir / ds.LABELS_NAME if name == ds.UNLABELLED else None
        split_ids = ids[start : start + sizes[name]]
        plans.append(ZipPlan(out_dir / f"{name}.zip", labels, cfg, split_index, split_ids))
        start += sizes[name]
    if cfg.ood.n_test > 0:
        ood = ds.ood_config(cfg)
        zip_path, labels = ds.ood_outputs(out_dir, data)
        ood_ids = ds.make_sample_ids(ood.seed, int(cfg.ood.n_test), exclude=frozenset(ids))
        plans.append(ZipPlan(zip_path, labels, ood, ds.OOD_SPLIT_INDEX, ood_ids))
    return plans


def _targets(plan: ZipPlan):
    """``(sample_id, target)`` of every sample the zip holds, in ``plan.ids``' order."""
    from speedstructure.data.samples import ZipSamples

    if not plan.zip_path.is_file():
        raise UserError(f"{plan.zip_path}: not found (generate the data: speedstructure synth)")
    with ZipSamples(plan.zip_path) as z:
        if sorted(z.sample_ids) != sorted(plan.ids):
            n, want = len(z.sample_ids), len(plan.ids)
            what = (
                f"{n} samples where the synth params generate {want}"
                if n != want
                else "other sample ids than the synth params generate"
            )
            raise UserError(f"{plan.zip_path}: {what}: not their data (no truth file written)")
        if plan.labels is None:
            for sid in plan.ids:
                yield sid, z.read_target(sid)
            return
    if not plan.labels.is_file():
        raise UserError(f"{plan.labels}: the targets of {plan.zip_path.name} not found")
    with np.load(plan.labels, allow_pickle=False) as lab:
        for sid in plan.ids:
            if sid not in lab.files:
                raise UserError(f"{plan.labels}: no target for sample '{sid}'")
            yield sid, lab[sid]


def verified_truth(plan: ZipPlan) -> Truth:
    """The zip's truth, its velocities regenerated and checked against its targets."""
    from speedstructure.synth.dataset import make_model

    facts = []
    for i, (sid, target) in enumerate(_targets(plan)):
        v, f = make_model(plan.cfg, plan.split_index, i)
        if target.dtype != v.dtype or target.shape != v.shape or not np.array_equal(target, v):
            raise UserError(
                f"{plan.zip_path}: sample '{sid}' is not the velocity model the synth params "
                "generate (other params, or not this generator's data): no truth file written"
            )
        facts.append(f)
    return truth_of(plan.zip_path, plan.ids, facts)


def write_truth_only(cfg: SynthConfig, out_dir: Path, data: DataConfig) -> list[Path]:
    """The truth file of every zip of an existing dataset, without simulating: all of them
    checked first (:func:`verified_truth`), then written atomically."""
    truths = [verified_truth(plan) for plan in zip_plans(cfg, out_dir, data)]
    return [save_truth(t) for t in truths]


def missing_truths(cfg: SynthConfig, out_dir: Path, data: DataConfig) -> list[Path]:
    """The truth files of ``cfg``'s zips that are not in ``out_dir``."""
    paths = [truth_path(p.zip_path) for p in zip_plans(cfg, out_dir, data)]
    return [p for p in paths if not p.is_file()]
