"""The model card: the markdown description of the registered model and of each version.

The ``register`` stage writes a version's card (:func:`version_card`: data, members and
weights, cross-validated MAPE, how to load it) as the version's description and the
registered model's description (:func:`model_description`); the ``evaluate`` stage
completes the version's card with its test MAPE and, when its metrics hold one, the
uncertainty calibration (:func:`with_section`, :func:`test_section`,
:func:`calibration_section`).  Sections are ``## <heading>`` blocks; a figure that is not
known is not written (the test section says the evaluation is pending).

A library (no command); no MLflow import: the stages hand the text to MLflow.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Mapping
from typing import Any

from speedstructure.config.schema import Params

SYNTH_META = "synth_meta.json"  # speedstructure.synth.dataset.META_NAME (a test keeps them equal)
TEST = "Test"
CALIBRATION = "Calibration"
LOAD = "How to load"
PENDING = "_Not evaluated yet: the `evaluate` stage fills this in._"
SHAPES = (
    "Input: shot gathers `(B, 5, 10001, 31)` float32; output: velocity models "
    "`(B, 300, 1259)` float32 in km/s."
)


# --------------------------------------------------------------------------- data


def data_summary(params: Params) -> dict[str, Any]:
    """Where the training data came from and, per fold, how many samples fitted and
    validated its members (from the fold table; empty when there is none)."""
    synthetic = (params.path("data") / SYNTH_META).is_file()
    source = "synthetic (`speedstructure synth`)" if synthetic else "the challenge's zips"
    folds: dict[int, dict[str, int]] = {}
    table = params.path("folds_table")
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    for k in sorted({int(r["fold"]) for r in rows if int(r["fold"]) >= 0}):
        fit = [r for r in rows if int(r["fold"]) != k]
        folds[k] = {
            "fit_train": sum(r["split"] == "train" for r in fit),
            "fit_extended": sum(r["split"] != "train" for r in fit),
            "val": sum(int(r["fold"]) == k for r in rows),
        }
    return {"source": source, "folds": folds}


def _data_section(spec: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    lines = [f"## Data\n\nSource: {data['source']}.", ""]
    counts = data.get("folds") or {}
    for f in spec["folds"]:
        c = counts.get(int(f["fold"]))
        if c:
            lines.append(
                f"- fold {f['fold']}: members trained on {c['fit_train'] + c['fit_extended']} "
                f"samples ({c['fit_train']} train + {c['fit_extended']} extended), "
                f"validated on {c['val']}"
            )
    return lines


# --------------------------------------------------------------------------- sections


def _fmt(v: Any) -> str:
    return f"{v:.5f}" if isinstance(v, float) else str(v)


def _members_section(spec: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Members and weights",
        "",
        "Per fold the weighted mean of its members (flip TTA each), then the mean over folds.",
        "",
        "| fold | member | weight | val MAPE |",
        "|---:|---|---:|---:|",
    ]
    for f in spec["folds"]:
        for m in f["members"]:
            val = m.get("val_mape")
            lines.append(
                f"| {f['fold']} | {m['variant']} | {m['weight']:.4f} | "
                f"{_fmt(float(val)) if val is not None else ''} |"
            )
    return lines


def _cv_section(spec: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Cross-validation",
        "",
        "- CV MAPE (held-out, split-half, each fold's chosen weighting): "
        f"{_fmt(float(spec['cv_mape']))}",
    ]
    folds = spec["folds"]
    strategies = [s for s in folds[0].get("heldout", {}) if all(s in f["heldout"] for f in folds)]
    for s in strategies:
        mean = sum(float(f["heldout"][s]) for f in folds) / len(folds)
        lines.append(f"- held-out MAPE, {s.replace('_', ' ')} weights: {_fmt(mean)}")
    if spec.get("weights") == "auto":
        lines.append(
            "- weighting (tune.weights auto): equal weights unless another is lower held out "
            "by more than one standard error of the per-sample difference"
        )
    for f in folds:
        if "val_mape" in f:
            weighting = str(f.get("strategy", "tuned")).replace("_", " ")
            lines.append(
                f"- fold {f['fold']}: {weighting} weights; whole-fold validation MAPE "
                f"{_fmt(float(f['val_mape']))} ({f.get('n_val', '?')} samples)"
            )
    return lines


def test_section(metrics: Mapping[str, Any] | None) -> str:
    """The test figures of the ``evaluate`` stage's metrics (pending when None)."""
    if not metrics:
        return PENDING
    if "ensemble_mape" not in metrics:
        return f"No test labels: {metrics.get('n_test', '?')} test predictions, not scored."
    lines = [f"- test MAPE: {_fmt(float(metrics['ensemble_mape']))} ({metrics['n_test']} samples)"]
    for key, label in (
        ("baseline_mape", "depth-trend baseline MAPE"),
        ("ratio_to_baseline", "ensemble / baseline"),
        ("best_single_mape", "best single member MAPE"),
        ("lateral_r2", "R2 of the lateral structure"),
    ):
        if isinstance(metrics.get(key), numbers.Real):
            lines.append(f"- {label}: {_fmt(float(metrics[key]))}")
    ood = metrics.get("ood")
    if isinstance(ood, Mapping) and "ensemble_mape" in ood:
        lines.append(f"- out-of-distribution test MAPE: {_fmt(float(ood['ensemble_mape']))}")
    return "\n".join(lines)


def calibration_section(figures: Mapping[str, Any] | None) -> str | None:
    """The uncertainty calibration's scalar figures as a list; None when none is given."""
    if not isinstance(figures, Mapping):
        return None
    items = [
        f"- {k.replace('_', ' ')}: {_fmt(v)}"
        for k, v in figures.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ]
    return "\n".join(items) or None


def load_section(params: Params, name: str, version: int | str | None = None) -> list[str]:
    """How to load the model: MLflow's pyfunc loader and ``speedstructure predict``."""
    ref = f"{name}/{version}" if version is not None else f"{name}@champion"
    champion = "" if version is None else f"`models:/{name}@champion` loads the champion. "
    test_zip = f"{params.paths.data}/{params.data.zips['test']}"
    return [
        f"## {LOAD}",
        "",
        "From the project root (the `speedstructure` package installed):",
        "",
        "```python",
        "import tempfile",
        "",
        "import mlflow",
        "",
        f'mlflow.set_tracking_uri("{params.mlflow.tracking_uri}")',
        f'model = mlflow.pyfunc.load_model("models:/{ref}", dst_path=tempfile.mkdtemp())',
        "velocities = model.predict(gathers)",
        "```",
        "",
        f"{champion}`dst_path` keeps MLflow from writing a `registered_model_meta` file into "
        "the tracking store; this loader runs the Python code stored with the model.  "
        "`speedstructure predict` reads the same model without running any stored code and "
        "writes a validated submission:",
        "",
        "```",
        f"speedstructure predict --model models:/{ref} --input {test_zip} --output submission.npz",
        "```",
    ]


# --------------------------------------------------------------------------- cards


def version_card(
    params: Params,
    name: str,
    version: int | str,
    spec: Mapping[str, Any],
    data: Mapping[str, Any],
    *,
    test: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> str:
    """A registered version's card (markdown) from its ensemble file and data summary."""
    lines = [
        f"# {name} version {version}",
        "",
        "Seismic velocity inversion: an ensemble of the `speedstructure` networks. " + SHAPES,
        "",
        *_data_section(spec, data),
        "",
        *_members_section(spec),
        "",
        *_cv_section(spec),
        "",
        f"## {TEST}",
        "",
        test_section(test),
        "",
    ]
    cal = calibration_section(calibration)
    if cal:
        lines += [f"## {CALIBRATION}", "", cal, ""]
    return "\n".join([*lines, *load_section(params, name, version)]) + "\n"


def model_description(params: Params, name: str, champion: Mapping[str, Any]) -> str:
    """The registered model's description: what it is, the champion, how to load it."""
    lines = [
        f"# {name}",
        "",
        "Seismic velocity inversion ensembles registered by the `speedstructure` pipeline "
        "(`dvc repro`). " + SHAPES,
        "",
        "Every version's description is its model card (data, members and weights, CV and "
        "test MAPE). The alias `champion` marks the version with the lowest cross-validated "
        f"MAPE: version {champion['champion_version']} "
        f"(CV MAPE {_fmt(float(champion['champion_cv_mape']))}).",
        "",
        *load_section(params, name),
    ]
    return "\n".join(lines) + "\n"


def with_section(card: str, heading: str, body: str) -> str:
    """``card`` with its ``## heading`` section holding ``body`` (added before the loading
    section when the card has none)."""
    blocks = card.split("\n## ")
    for i, block in enumerate(blocks[1:], start=1):
        if block.split("\n", 1)[0].strip() == heading:
            blocks[i] = f"{heading}\n\n{body.strip()}\n"
            return "\n## ".join(blocks)
    at = next((i for i, b in enumerate(blocks) if i and b.startswith(LOAD)), len(blocks))
    blocks.insert(at, f"{heading}\n\n{body.strip()}\n")
    return "\n## ".join(blocks)


def update_card(client, reg: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The registered version's model card (its description) with the test figures, and the
    uncertainty calibration's scalar figures when the metrics hold them (``calibration`` or
    ``uncertainty``: name -> figure, e.g. the test coverage and mean interval width)."""
    name, version = reg["name"], str(reg["version"])
    card = client.get_model_version(name, version).description or ""
    card = with_section(card, TEST, test_section(metrics))
    figures = metrics.get("calibration") or metrics.get("uncertainty")
    calibration = calibration_section(figures)
    if calibration:
        card = with_section(card, CALIBRATION, calibration)
    client.update_model_version(name, version, description=card)


def tag_registered_version(client, reg: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The registered version's test figures: tags ``test_mape`` (and ``ood_test_mape`` when
    the OOD set was scored) and the model card's test section (:func:`update_card`)."""
    name, version = reg["name"], str(reg["version"])
    client.set_model_version_tag(name, version, "test_mape", f"{metrics['ensemble_mape']:.6f}")
    if "ood" in metrics:
        mape = f"{metrics['ood']['ensemble_mape']:.6f}"
        client.set_model_version_tag(name, version, "ood_test_mape", mape)
    update_card(client, reg, metrics)
