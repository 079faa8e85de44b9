"""The one typed configuration: ``params.yaml`` read once into frozen dataclasses.

``params.yaml`` is the single source of configuration.  :func:`load_params`
reads it once per command and returns a :class:`Params`: one frozen dataclass
per section (``paths``, ``data``, ``folds``, ``mlflow``, ``synth``, ``train``,
``variants``, ``runs``, ``ensemble``, ``tune``, ``predict``, ``evaluate``),
validated on load with errors that name the key (``params.yaml: train.lr must
be a number, got 'x'``).  The defaults below are the default profile's values
(a test proves they agree with ``params.yaml`` for both profiles), so a key
left out of ``params.yaml`` means what the shipped file says.

Every file the pipeline reads or writes is spelled once, in ``paths``; the
code resolves it with :meth:`Params.path` and ``dvc.yaml`` reads it through
templating (``${paths.folds_table}``).  Paths are resolved against
:func:`project_root`, so commands work from any working directory inside the
checkout and inside the temporary copies that ``dvc exp run --queue`` makes.

A model variant is one of :class:`EvaFusionVariant`, :class:`InversionNetVariant`
or :class:`DepthTrendVariant` (key ``arch``); its ``train`` mapping overrides
keys of the ``train`` section for that variant (:meth:`Params.train_for`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from speedstructure.errors import UserError

PARAMS_FILE = "params.yaml"
V_MIN, V_MAX = (
    1.5,
    4.5,
)  # km/s: the challenge's velocity range (output bounds, clipping, colour scales)


class ConfigError(UserError, ValueError):
    """A problem with ``params.yaml`` (names the file and the key)."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class PathsConfig:
    """Every file and folder the pipeline reads or writes, relative to the project root."""

    data: str = "data"
    store: str = "store"
    folds_table: str = "folds/folds.csv"
    kmeans: str = "folds/kmeans.npz"
    folds_summary: str = "folds/summary.json"
    group_counts: str = "folds/group_counts.csv"
    folds_plots: str = "plots/folds"
    models: str = "models"
    weights: str = "weights"
    parallel_logs: str = "logs/train-parallel"
    ensemble: str = "ensemble/ensemble.json"
    tune_metrics: str = "metrics/tune.json"
    tune_report: str = "reports/tune.json"
    tune_weights: str = "plots/tune_weights.csv"
    tune_plot: str = "plots/tune_heldout.png"
    optuna_db: str = "mlruns/optuna.db"
    registered: str = "registry/registered.json"
    submission: str = "submission/submission.npz"
    evaluate_metrics: str = "metrics/evaluate.json"
    evaluate_report: str = "reports/evaluate.json"
    training_curves: str = "plots/training.csv"
    evaluate_per_sample: str = "plots/evaluate/per_sample.csv"
    evaluate_figure: str = "plots/evaluate/best_median_worst.png"
    uncertainty: str = "submission/uncertainty.npz"
    calibration_metrics: str = "metrics/calibration.json"
    calibration_report: str = "reports/calibration.json"
    uncertainty_metrics: str = "metrics/uncertainty.json"
    uncertainty_report: str = "reports/uncertainty.json"
    uncertainty_figure: str = "plots/evaluate/uncertainty.png"
    qc_metrics: str = "metrics/qc.json"
    qc_table: str = "plots/qc/per_sample.csv"
    qc_figure: str = "plots/qc/worst_gathers.png"
    refined: str = "submission/refined"
    refine_metrics: str = "metrics/refine.json"


SPLITS: tuple[str, ...] = ("train", "train_extended_1", "train_extended_2", "test")


@dataclass(frozen=True)
class DataConfig:
    """The four challenge zips (in ``paths.data``), the test targets, if any, and the
    out-of-distribution test set, if any (``ood_zip``: gathers only, ``ood_labels``: targets)."""

    zips: dict[str, str] = field(default_factory=lambda: {s: f"{s}.zip" for s in SPLITS})
    test_labels: str = "test_labels.npz"
    ood_zip: str = "test_ood.zip"
    ood_labels: str = "test_ood_labels.npz"


@dataclass(frozen=True)
class FoldsConfig:
    """K-Means groups of the training velocity models and the stratified folds (``folds:``):
    ``k_groups`` clusters, ``n_folds`` folds, their seeds, example models drawn per group."""

    k_groups: int = 6
    n_folds: int = 5
    seed: int = 42
    kmeans_seed: int = 42
    examples_per_group: int = 4


@dataclass(frozen=True)
class MlflowConfig:
    """Experiment tracking (``mlflow:``); MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME override."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    retry_seconds: float = 600.0  # how long a finished training retries an unreachable server
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "speedstructure"
    registered_model: str = "speedstructure-ensemble"


@dataclass(frozen=True)
class SimParams:
    """Simulation settings of the synthetic data (``synth.sim``): grid spacing ``dx`` (m),
    output interval ``dt`` (s), finite-difference order, absorbing cells, Ricker peak
    frequency (Hz), and the delivered sampling (``record_dt`` s, ``n_time`` samples)."""

    dx: float = 5.0
    dt: float = 0.0005
    accuracy: int = 4
    pml_width: int = 40
    freq: float = 15.0
    record_dt: float = 0.0001
    n_time: int = 10001


PRIOR_KEYS = ("v_top", "v_bottom", "trend_power", "water_depth")  # ranges drawn per model


@dataclass(frozen=True)
class SynthOodConfig:
    """The out-of-distribution test set (``synth.ood``): its own seed and size, and prior
    ranges (:data:`PRIOR_KEYS`) shifted against the training ones (``n_test: 0``: none)."""

    n_test: int = 24
    seed: int = 7919
    v_top: tuple[float, float] = (2.2, 2.8)
    v_bottom: tuple[float, float] = (3.3, 4.0)
    trend_power: tuple[float, float] = (0.35, 0.7)
    water_depth: tuple[int, int] = (200, 480)


@dataclass(frozen=True)
class SynthConfig:
    """The physics-based generator of the embedded default data (``synth:``).

    The priors are uniform ranges ``[low, high]`` drawn once per model: ``v_top`` (km/s,
    the velocity trend just under the water floor), ``v_bottom`` (km/s, at the bottom),
    ``trend_power`` (shape of the trend between them, ``t ** power`` of the relative
    depth ``t``) and ``water_depth`` (cells of 1 m, where the water floor may lie)."""

    seed: int = 2025
    n_train: int = 240
    n_extended_1: int = 60
    n_extended_2: int = 60
    n_test: int = 24
    families: tuple[str, ...] = (
        "flat",
        "dipping",
        "gentle_fold",
        "strong_fold",
        "faulted",
        "intrusion",
    )
    workers: int = 2
    water_depth: tuple[int, int] = (100, 450)
    v_top: tuple[float, float] = (1.6, 2.6)
    v_bottom: tuple[float, float] = (3.5, 4.5)
    trend_power: tuple[float, float] = (0.5, 1.5)
    water_velocity: float = 1.5
    v_min: float = V_MIN
    v_max: float = V_MAX
    sim: SimParams = field(default_factory=SimParams)
    ood: SynthOodConfig = field(default_factory=SynthOodConfig)


@dataclass(frozen=True)
class TrainConfig:
    """The training engine's settings (``train:``; a variant's ``train:`` overrides them)."""

    epochs: int = 8
    batch_size: int = 4
    val_batch_size: int = 4
    accum_steps: int = 1
    lr: float = 3.0e-3
    muon_lr: float | None = None
    muon_adjust_lr: str = "match_rms_adamw"
    weight_decay: float = 0.01
    momentum: float = 0.95
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    clip: float = 3.0
    amp: str = "none"
    muon_precision: str = (
        "auto"  # Muon's orthogonalisation: auto (CUDA bf16, CPU fp32) | bf16 | fp32
    )
    ema_decay: float = 0.99
    T_0: int | None = None
    min_lr: float = 1.0e-5
    cosine_epochs: int = 8
    const_factor: float = 0.02
    flip_prob: float = 0.5
    patience: int = 3
    tta_val: bool = False
    device: str = "auto"
    seed: int = 42
    num_workers: int = 0
    cache_inputs: bool = True  # training images prepared once (engine.data.PreparedInputs)
    threads: int | None = None  # torch CPU threads; None: cores / training processes
    progress: bool = True
    ddp_find_unused: bool = False
    grad_checkpointing: bool = False


ARCHS = ("eva_fusion", "inversionnet", "depth_trend")
FUSIONS = ("mean", "single", "dual")
FLIP_MODES = ("consistent", "receivers")
POOL_QUERIES = ("shared", "per_token")
HEAD_RESIZES = ("area", "linear")
LAYOUTS = ("fold", "time_receiver")
AMPLITUDES = ("linear", "signlog")
HEADS = ("rows", "grid")
FLOORS = ("learned", "picked")  # the water floor: see Variant.floor
NORMS = ("batch", "group", "none")
PRIORS = ("none", "depth_trend")
AMPS = ("none", "bf16", "fp16")
MUON_PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """Keys every model variant accepts (``variants.<name>``)."""

    arch: str
    profile: str | None = (
        None  # the profile whose runs use it (documentation; the profile switch sets runs)
    )
    description: str = ""
    v_min: float = V_MIN
    v_max: float = V_MAX
    tta_flip: str = "consistent"
    # learned: as predicted | picked: predict() moves each column to the floor picked from the
    # gathers (seafloor.py)
    floor: str = "learned"
    input_scale: float = 1.0e3
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the train section

    def model_dict(self) -> dict[str, Any]:
        """The keys that define the network (what a checkpoint records to rebuild it)."""
        skip = ("profile", "description", "train")
        return {k: v for k, v in as_plain(self).items() if k not in skip}


@dataclass(frozen=True, kw_only=True)
class EvaFusionVariant(Variant):
    arch: str = "eva_fusion"
    backbone: str
    split_at: int
    prior: str = "none"
    pretrained: str = "none"
    img_size: int = 224
    depth: int | None = None
    fusion: str = "dual"
    channel_heads: int | None = 4
    fusion_heads: int | None = 2
    pool_query: str = "shared"
    head_resize: str = "area"
    drop_path_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    layout: str = "fold"  # fold (the seed's) | time_receiver
    img_width: int | None = None  # image width; None: img_size (square)
    amplitude: str = "linear"  # linear (the seed's) | signlog: sign(a) log(1 + |a|)
    head: str = "rows"  # rows (the seed's) | grid


@dataclass(frozen=True, kw_only=True)
class InversionNetVariant(Variant):
    arch: str = "inversionnet"
    prior: str = "none"
    width: int = 32
    time_samples: int = 1000
    norm: str = "batch"


@dataclass(frozen=True, kw_only=True)
class DepthTrendVariant(Variant):
    arch: str = "depth_trend"


VARIANT_TYPES: dict[str, type[Variant]] = {
    "eva_fusion": EvaFusionVariant,
    "inversionnet": InversionNetVariant,
    "depth_trend": DepthTrendVariant,
}


@dataclass(frozen=True)
class RunConfig:
    """One training run: a variant trained with one fold held out (``runs.<key>``)."""

    variant: str
    fold: int


@dataclass(frozen=True)
class EnsembleConfig:
    """The ensemble's member variants and the seed's hand-set weights, for comparison."""

    variants: tuple[str, ...] = ("tiny_dual42", "tiny_single4")
    hand_weights: dict[str, float] = field(
        default_factory=lambda: {"tiny_dual42": 0.8, "tiny_single4": 0.3}
    )


@dataclass(frozen=True)
class TuneConfig:
    """Optuna's search for the ensemble weights of each fold (``tune:``)."""

    n_trials: int = 60
    seed: int = 42
    study_prefix: str = "speedstructure-weights"
    split_seed: int = 0


@dataclass(frozen=True)
class PredictConfig:
    """The predict stage (``predict:``)."""

    batch_size: int = 4


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate stage (``evaluate:``): the baseline variant and the depth bands (m)."""

    baseline: str = "baseline_depth_trend"
    batch_size: int = 4
    depth_bands: tuple[int, ...] = (0, 150, 300, 450, 600, 800, 1000, 1259)
    focus_band: tuple[int, int] = (300, 900)


@dataclass(frozen=True)
class UncertaintyConfig:
    """The calibrated intervals (``uncertainty:``, :mod:`speedstructure.uncertainty`): nominal
    coverage, bands (m below the predicted water floor), score scale, histogram resolution."""

    coverage: float = 0.9
    bands: tuple[int, ...] = (0, 50, 150, 300, 500, 750, 1259)
    scale: str = "relative"
    resolution: float = 1.0e-4


@dataclass(frozen=True)
class QcConfig:
    """The physics check (``qc:``, :mod:`speedstructure.physics`): the mute after the direct
    arrival and its taper (s), the low-pass (Hz), the AGC window (s), figure rows."""

    mute_after: float = 0.1
    taper: float = 0.05
    lowpass_hz: float = 12.0
    rolloff_hz: float = 4.0
    agc_window: float = 0.2
    worst_samples: int = 3
    threads: int | None = 1


@dataclass(frozen=True)
class RefineConfig:
    """The optional FWI refinement (``refine:``, :mod:`speedstructure.fwi`)."""

    enabled: bool = False
    samples: int | None = None  # the first N test samples (None: all)
    iterations: int = 4
    grid_m: int = 20
    step: float = 0.05
    max_halvings: int = 3
    threads: int | None = 1


SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "data": DataConfig,
    "folds": FoldsConfig,
    "mlflow": MlflowConfig,
    "synth": SynthConfig,
    "train": TrainConfig,
    "ensemble": EnsembleConfig,
    "tune": TuneConfig,
    "predict": PredictConfig,
    "evaluate": EvaluateConfig,
    "uncertainty": UncertaintyConfig,
    "qc": QcConfig,
    "refine": RefineConfig,
}


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``, typed; ``root`` is the project root paths resolve against."""

    root: Path
    profile: str = "default"
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: dict[str, Variant] = field(default_factory=dict)
    runs: dict[str, RunConfig] = field(default_factory=dict)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = PARAMS_FILE

    def path(self, key: str) -> Path:
        """The absolute path of ``paths.<key>``."""
        if key not in PATH_KEYS:
            raise ConfigError(f"{self.source}: no key paths.{key}")
        return resolve_path(getattr(self.paths, key), self.root)

    def zip_path(self, split: str) -> Path:
        """The absolute path of one split's challenge zip."""
        return self.path("data") / self.data.zips[split]

    def test_labels_path(self) -> Path:
        return self.path("data") / self.data.test_labels

    def ood_paths(self) -> tuple[Path, Path]:
        """The out-of-distribution test set: ``(zip of gathers, targets)`` in ``paths.data``."""
        return self.path("data") / self.data.ood_zip, self.path("data") / self.data.ood_labels

    def run_dir(self, variant: str, fold: int) -> Path:
        """Where a training run writes its checkpoints: ``paths.models/<variant>/fold_<k>``."""
        return self.path("models") / variant / f"fold_{int(fold)}"

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            known = ", ".join(sorted(self.variants)) or "(none defined)"
            raise ConfigError(f"{self.source}: unknown variant '{name}'; known variants: {known}")
        return self.variants[name]

    def train_for(self, variant: str | Variant) -> TrainConfig:
        """The ``train`` section with the variant's own ``train`` overrides applied."""
        v = self.variant(variant) if isinstance(variant, str) else variant
        return replace_checked(
            self.train, v.train, f"{self.source}: variants.{_name_of(self, v)}.train"
        )


PATH_KEYS = frozenset(f.name for f in dataclasses.fields(PathsConfig))


def _name_of(params: Params, v: Variant) -> str:
    return next((k for k, x in params.variants.items() if x is v), "?")


# --------------------------------------------------------------------------- loading


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``params.yaml``.

    ``SPEEDSTRUCTURE_ROOT`` overrides the search.
    """
    env = os.environ.get("SPEEDSTRUCTURE_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(start or os.getcwd()).resolve()
    for cand in (here, *here.parents):
        if (cand / PARAMS_FILE).is_file():
            return cand
    return here


def resolve_path(p: str | os.PathLike, root: Path | None = None) -> Path:
    """``p`` made absolute against the project root (absolute paths pass through)."""
    p = Path(p)
    return p if p.is_absolute() else (root or project_root()) / p


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """``params.yaml`` (or ``path``) as a plain mapping, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: parameter file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_params(path: str | os.PathLike | None = None, *, root: Path | None = None) -> Params:
    """Read and validate ``params.yaml`` (default: the one at the project root)."""
    p = Path(path) if path is not None else project_root() / PARAMS_FILE
    raw = read_yaml(p)
    return parse_params(
        raw,
        root=root or (p.resolve().parent if path is not None else project_root()),
        source=str(path) if path is not None else PARAMS_FILE,
    )


def parse_params(
    raw: dict[str, Any], *, root: Path | None = None, source: str = PARAMS_FILE
) -> Params:
    """A :class:`Params` from a plain mapping (what ``params.yaml`` holds)."""
    known = {"profile", "variants", "runs", "profiles", *SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        known_keys = ", ".join(sorted(known))
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)}; known: {known_keys}"
        )
    sections = {
        name: build(cls, raw.get(name), f"{source}: {name}") for name, cls in SECTIONS.items()
    }
    variants = {
        str(k): parse_variant(v, f"{source}: variants.{k}")
        for k, v in _mapping(raw, "variants", source).items()
    }
    runs = {
        str(k): build(RunConfig, v, f"{source}: runs.{k}")
        for k, v in _mapping(raw, "runs", source).items()
    }
    params = Params(
        root=Path(root or project_root()),
        profile=str(raw.get("profile", "default")),
        variants=variants,
        runs=runs,
        profiles=_mapping(raw, "profiles", source),
        source=source,
        **sections,
    )
    _check_references(params)
    return params


def _mapping(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
    return value


def parse_variant(raw: Any, where: str = "variant") -> Variant:
    """A typed variant from its mapping (a ``variants:`` entry or a checkpoint's record)."""
    if isinstance(raw, Variant):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    arch = raw.get("arch")
    if arch not in VARIANT_TYPES:
        raise ConfigError(f"{where}.arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    variant = build(VARIANT_TYPES[arch], raw, where)
    _check_variant(variant, where)
    replace_checked(TrainConfig(), variant.train, f"{where}.train")  # overrides name real keys
    return variant


def _check_variant(v: Variant, where: str) -> None:
    if not float(v.v_min) < float(v.v_max):
        raise ConfigError(f"{where}: v_min must be below v_max")
    choices: list[tuple[str, tuple[str, ...]]] = [("tta_flip", FLIP_MODES), ("floor", FLOORS)]
    if isinstance(v, EvaFusionVariant):
        choices += [
            ("layout", LAYOUTS),
            ("amplitude", AMPLITUDES),
            ("head", HEADS),
            ("fusion", FUSIONS),
            ("pool_query", POOL_QUERIES),
            ("head_resize", HEAD_RESIZES),
            ("prior", PRIORS),
        ]
    if isinstance(v, InversionNetVariant):
        choices += [("norm", NORMS), ("prior", PRIORS)]
    for key, allowed in choices:
        _check_choice(getattr(v, key), allowed, f"{where}.{key}")


def _check_choice(value: Any, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")


def _check_references(p: Params) -> None:
    """Cross-section checks: runs name variants, the ensemble names variants with runs."""
    src = p.source
    _check_choice(p.train.amp, AMPS, f"{src}: train.amp")
    _check_choice(p.train.muon_precision, MUON_PRECISIONS, f"{src}: train.muon_precision")
    _check_choice(p.train.device, DEVICES, f"{src}: train.device")
    _check_choice(p.uncertainty.scale, ("relative", "absolute"), f"{src}: uncertainty.scale")
    if not 0 < p.uncertainty.coverage < 1:
        raise ConfigError(f"{src}: uncertainty.coverage must be in (0, 1)")
    for name in p.variants:
        t = p.train_for(name)
        _check_choice(t.amp, AMPS, f"{src}: variants.{name}.train.amp")
        _check_choice(
            t.muon_precision, MUON_PRECISIONS, f"{src}: variants.{name}.train.muon_precision"
        )
    unknown_splits = sorted(set(p.data.zips) - set(SPLITS))
    missing_splits = sorted(set(SPLITS) - set(p.data.zips))
    if unknown_splits or missing_splits:
        raise ConfigError(
            f"{src}: data.zips must name the splits {', '.join(SPLITS)} "
            f"(unknown: {unknown_splits or '-'}, missing: {missing_splits or '-'})"
        )
    _check_priors(p.synth, f"{src}: synth")
    _check_priors(p.synth.ood, f"{src}: synth.ood")
    for key, run in p.runs.items():
        if run.variant not in p.variants:
            raise ConfigError(f"{src}: runs.{key}.variant names unknown variant '{run.variant}'")
    if len(set(p.ensemble.variants)) != len(p.ensemble.variants):
        raise ConfigError(
            f"{src}: ensemble.variants lists a variant twice: {list(p.ensemble.variants)}"
        )
    for name in p.ensemble.variants:
        if name not in p.variants:
            raise ConfigError(
                f"{src}: ensemble.variants names unknown variant '{name}' (not under 'variants:')"
            )
    for name, w in p.ensemble.hand_weights.items():
        if not w >= 0:
            raise ConfigError(f"{src}: ensemble.hand_weights.{name} must be non-negative, got {w}")
    if p.tune.n_trials < 1:
        raise ConfigError(f"{src}: tune.n_trials must be >= 1, got {p.tune.n_trials}")


def _check_priors(cfg: SynthConfig | SynthOodConfig, where: str) -> None:
    """The prior ranges of ``synth`` or ``synth.ood``: ``[low, high]`` with low <= high."""
    for key in PRIOR_KEYS:
        lo, hi = getattr(cfg, key)
        if not lo <= hi:
            raise ConfigError(f"{where}.{key} must be [low, high] with low <= high, got {[lo, hi]}")
    if cfg.trend_power[0] <= 0:
        raise ConfigError(f"{where}.trend_power must be positive, got {list(cfg.trend_power)}")
    if isinstance(cfg, SynthOodConfig) and cfg.n_test < 0:
        raise ConfigError(f"{where}.n_test must be >= 0, got {cfg.n_test}")


# --------------------------------------------------------------------------- typed building


def build(cls: type, raw: Any, where: str):
    """An instance of dataclass ``cls`` from mapping ``raw`` (None: all defaults).

    Unknown keys, missing required keys and values of the wrong type raise
    :class:`ConfigError` naming ``where`` and the key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = coerce(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{name}'")
    return cls(**values)


def replace_checked(obj, overrides: dict[str, Any] | None, where: str):
    """``dataclasses.replace(obj, **overrides)`` with the overrides validated like :func:`build`."""
    if not overrides:
        return obj
    merged = {**as_plain(obj), **overrides}
    return build(type(obj), merged, where)


# scalar type -> (what the error says it must be, the check); bools are not numbers here
_SCALARS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against type ``hint`` (ints pass as floats; lists become tuples)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, where)
    if hint is Any:
        return value
    if hint in _SCALARS:
        what, accepts = _SCALARS[hint]
        if not accepts(value):
            raise ConfigError(f"{where} must be {what}, got {value!r}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, args, where)
    if origin is dict:
        return _coerce_dict(value, args, where)
    raise TypeError(f"{where}: unsupported type {hint!r}")  # a schema error in this module


def _coerce_tuple(value: Any, args: tuple, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
    return tuple(
        coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


def _coerce_dict(value: Any, args: tuple, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    key_t, val_t = args
    return {
        coerce(k, key_t, f"{where}"): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()
    }


def as_plain(obj: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts and lists (JSON, MLflow, checkpoints)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: as_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name != "root"
        }
    if isinstance(obj, dict):
        return {str(k): as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for logging params to MLflow)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out
