"""The ``register`` stage: the tuned ensemble into the MLflow model registry.

The whole ensemble (ensemble file, every member checkpoint, the package code)
is logged as one pyfunc model from code (:mod:`speedstructure.pyfunc_model`)
with a tensor signature, gathers ``(-1, 5, 10001, 31)`` float32 in and
velocities ``(-1, 300, 1259)`` float32 out, and registered as a new version of
``mlflow.registered_model`` (``speedstructure-ensemble``).  Every version
stays; the alias ``champion`` moves to the new version only if its
cross-validated MAPE (the held-out tuned MAPE of the ``tune`` stage, tag
``cv_mape``) is lower than the current champion's.

The stage writes ``registry/registered.json`` (the new version, its URI, whether
it became champion), which the ``predict`` stage reads so that what it predicts
is exactly what was registered.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from speedstructure.config import load_params, project_root, resolve_path
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_bytes

CHAMPION = "champion"
CV_TAG = "cv_mape"
DEFAULTS = {"ensemble_file": "ensemble/ensemble.json", "output": "registry/registered.json"}


def registry_config(params: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **(params.get("register") or {})}


def _signature():
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from speedstructure.model import INPUT_SHAPE, OUTPUT_SHAPE

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *INPUT_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *OUTPUT_SHAPE))]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "timm", "numpy", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            pass
    return reqs


def champion_version(client, name: str):
    """The version holding the ``champion`` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _cv(version) -> float:
    try:
        return float((version.tags or {}).get(CV_TAG, "nan"))
    except (TypeError, ValueError):
        return math.nan


def register_ensemble(spec_path: Path, *, params: dict[str, Any], root: Path,
                      run_name: str = "register") -> dict[str, Any]:
    """Log the ensemble as a pyfunc model, register a version, move ``champion`` if better."""
    import mlflow

    from speedstructure import pyfunc_model, tracking
    from speedstructure.ensemble import member_key, read_spec

    spec = read_spec(spec_path)
    cv = float(spec.get("cv_mape", math.nan))
    if not math.isfinite(cv):
        raise UserError(f"{spec_path}: no finite cv_mape (the tune stage writes it)")
    artifacts = {pyfunc_model.ENSEMBLE_ARTIFACT: str(spec_path)}
    for f in spec["folds"]:
        for m in f["members"]:
            ck = resolve_path(m["checkpoint"], root)
            if not ck.is_file():
                raise UserError(f"{spec_path}: member checkpoint {ck} not found (run its training stage)")
            artifacts[member_key(f["fold"], m["variant"])] = str(ck)
    name = tracking.settings(params, root)["registered_model"]
    with tracking.start_run(run_name, tags={"stage": "register", "dvc_stage": "register"},
                            project_params=params, root=root) as run:
        tracking.log_metrics({"cv_mape": cv, "n_folds": len(spec["folds"]),
                              "n_members": sum(len(f["members"]) for f in spec["folds"])})
        info = mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=str(Path(pyfunc_model.__file__)),
            artifacts=artifacts,
            signature=_signature(),
            code_paths=[str(Path(pyfunc_model.__file__).parent)],
            pip_requirements=_requirements(),
        )
        mv = mlflow.register_model(info.model_uri, name, tags={CV_TAG: repr(cv)})
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, mv.version, "source_run", run.info.run_id)
        current = champion_version(client, name)
        best_before = _cv(current) if current is not None else math.inf
        promoted = current is None or not math.isfinite(best_before) or cv < best_before
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, mv.version)
        mlflow.set_tags({"registered_version": mv.version, "promoted": str(promoted)})
    result = {
        "name": name,
        "version": int(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "cv_mape": cv,
        "champion": promoted,
        "champion_version": int(mv.version) if promoted else int(current.version),
        "champion_cv_mape": cv if promoted else best_before,
        "run_id": run.info.run_id,
    }
    return result


def run_register(params: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    root = Path(root or project_root())
    cfg = registry_config(params)
    spec_path = resolve_path(cfg["ensemble_file"], root)
    result = register_ensemble(spec_path, params=params, root=root)
    out = resolve_path(cfg["output"], root)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _cmd(args: argparse.Namespace) -> int:
    r = run_register(load_params())
    verdict = ("is the new champion" if r["champion"] else
               f"did not beat champion v{r['champion_version']} (cv MAPE {r['champion_cv_mape']:.5f})")
    print(f"register: {r['name']} version {r['version']} (cv MAPE {r['cv_mape']:.5f}) {verdict}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="log the tuned ensemble to the MLflow model registry",
                       description="Log the ensemble as one pyfunc model, register a new version and move "
                                   "the 'champion' alias if its cross-validated MAPE is better.")
    p.set_defaults(func=_cmd)
