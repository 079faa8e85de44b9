"""The labelled test sets ``evaluate`` scores: the test targets beside the submission's
predictions (:func:`load_test_set`), and the out-of-distribution set's targets and gathers
(:func:`load_ood_set`, absent on real data).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from speedstructure.config.schema import Params
from speedstructure.data.submission_check import VelocityArchive
from speedstructure.errors import DataError, UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


def load_test_set(params: Params) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, targets, submission)``: the test targets and the submitted predictions, float32."""
    labels_path, sub_path = params.test_labels_path(), params.path("submission")
    for p, what in (
        (labels_path, "test targets"),
        (sub_path, "submission (run the predict stage)"),
    ):
        if not p.is_file():
            raise UserError(f"{p}: {what} not found")
    with VelocityArchive(labels_path) as lab, VelocityArchive(sub_path) as sub:
        ids = sorted(lab.files)
        missing = sorted(set(ids) - set(sub.files))
        if missing:
            raise UserError(
                f"{sub_path}: no prediction for {len(missing)} test sample(s), e.g. '{missing[0]}'"
            )
        truths = np.stack([lab[k].astype(np.float32) for k in ids])
        ens = np.stack([sub[k].astype(np.float32) for k in ids])
    return ids, truths, ens


# --------------------------------------------------------------------------- out of distribution


def load_ood_set(params: Params) -> tuple[Path, list[str], np.ndarray] | None:
    """``(zip, ids, targets)`` of the out-of-distribution test set (``data.ood_zip``,
    ``data.ood_labels``); None, with a logged note, when either file is absent."""
    from speedstructure.data.samples import list_sample_ids

    zip_path, labels_path = params.ood_paths()
    absent = [str(p) for p in (zip_path, labels_path) if not p.is_file()]
    if absent:
        log.info("no out-of-distribution test set (%s absent): skipped", ", ".join(absent))
        return None
    with VelocityArchive(labels_path) as lab:
        ids = sorted(lab.files)
        truths = np.stack([lab[k].astype(np.float32) for k in ids])
    missing = sorted(set(ids) - set(list_sample_ids(zip_path)))
    if missing:
        raise DataError(f"{zip_path}: no gathers for {len(missing)} target(s), e.g. '{missing[0]}'")
    return zip_path, ids, truths


def load_predictions(sub_path: Path) -> tuple[list[str], np.ndarray]:
    """``(ids, predictions)`` of a submission, float32, ids sorted (no targets to score)."""
    if not sub_path.is_file():
        raise UserError(f"{sub_path}: submission (run the predict stage) not found")
    with VelocityArchive(sub_path) as sub:
        ids = sorted(sub.files)
        if not ids:
            raise DataError(f"{sub_path}: the submission holds no predictions")
        return ids, np.stack([sub[k].astype(np.float32) for k in ids])
