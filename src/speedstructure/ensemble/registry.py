"""Logging the ensemble to MLflow: its pyfunc model, its members' checkpoints, its figures.

:func:`log_model` logs :mod:`speedstructure.ensemble.pyfunc` as a model from code, with the
ensemble file and every member's checkpoint as artifacts (:func:`artifacts_of`), the tensor
signature and pinned requirements; :func:`log_ensemble` logs the members, weights and
cross-validation figures of the ensemble file to the active run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from speedstructure.config.typed import resolve_path
from speedstructure.ensemble.members import ENSEMBLE_ARTIFACT, member_key
from speedstructure.errors import UserError
from speedstructure.tracking.runs import log_metrics, log_params


def signature():
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from speedstructure.models.inputs import INPUT_SHAPE, OUTPUT_SHAPE

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *INPUT_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *OUTPUT_SHAPE))]),
    )


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "timm", "numpy", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):  # pragma: no cover - all are deps
            reqs.append(f"{pkg}=={version(pkg)}")
    return reqs


def artifacts_of(spec_path: Path, spec: dict[str, Any], root: Path) -> dict[str, str]:
    """The pyfunc model's artifacts: the ensemble file and each member's checkpoint."""
    artifacts = {ENSEMBLE_ARTIFACT: str(spec_path)}
    for f in spec["folds"]:
        for m in f["members"]:
            ck = resolve_path(m["checkpoint"], root)
            if not ck.is_file():
                raise UserError(
                    f"{spec_path}: member checkpoint {ck} not found (run its training stage)"
                )
            artifacts[member_key(f["fold"], m["variant"])] = str(ck)
    return artifacts


def log_model(artifacts: dict[str, str]):
    """Log the ensemble as a pyfunc model from code in the active run; its model info."""
    import mlflow

    import speedstructure
    from speedstructure.ensemble import pyfunc as pyfunc_model

    return mlflow.pyfunc.log_model(
        name="ensemble",
        python_model=str(Path(pyfunc_model.__file__)),
        artifacts=artifacts,
        signature=signature(),
        code_paths=[str(Path(speedstructure.__file__).parent)],  # the whole package
        pip_requirements=requirements(),
    )


def log_ensemble(spec_path: Path, spec: dict[str, Any], name: str) -> None:
    """The active run's params (members per fold), metrics (weights, CV figures) and the
    ensemble file."""
    import mlflow

    folds = spec["folds"]
    members = sorted({m["variant"] for f in folds for m in f["members"]})
    log_params(
        {
            "registered_model": name,
            "members": ",".join(members),
            "n_folds": len(folds),
            **{
                f"fold{f['fold']}.members": ",".join(m["variant"] for m in f["members"])
                for f in folds
            },
        }
    )
    metrics = {
        "cv_mape": spec["cv_mape"],
        "n_folds": len(folds),
        "n_members": sum(len(f["members"]) for f in folds),
    }
    for s in {s for f in folds for s in f.get("heldout", {})}:
        if all(s in f["heldout"] for f in folds):
            metrics[f"heldout_{s}"] = sum(f["heldout"][s] for f in folds) / len(folds)
    for f in folds:
        k = f["fold"]
        metrics.update({f"fold{k}/weight_{m['variant']}": m["weight"] for m in f["members"]})
        metrics.update({f"fold{k}/{key}": f.get(key) for key in ("val_mape", "n_val")})
        metrics[f"fold{k}/heldout_tuned"] = f.get("heldout", {}).get("tuned")
    log_metrics(metrics)
    mlflow.log_artifact(str(spec_path), artifact_path="register")
