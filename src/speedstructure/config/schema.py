"""The one typed configuration: ``params.yaml``'s sections as frozen dataclasses.

``params.yaml`` is the single source of configuration. :func:`~speedstructure.config.load.
load_params` reads it once per command and returns a :class:`Params`: one frozen dataclass per
section (``paths``, ``data``, ``folds``, ``mlflow``, ``synth``, ``train``, ``variants``,
``runs``, ``ensemble``, ``tune``, ``predict``, ``evaluate``, ...), validated on load with
errors that name the key (``params.yaml: train.lr must be a number, got 'x'``).  The defaults
below are the default profile's values (a test proves they agree with ``params.yaml`` for both
profiles), so a key left out of ``params.yaml`` means what the shipped file says.

Every file the pipeline reads or writes is spelled once, in ``paths``; the
code resolves it with :meth:`Params.path` and ``dvc.yaml`` reads it through
templating (``${paths.folds_table}``).  Paths are resolved against the project root,
so commands work from any working directory inside the checkout and inside the
temporary copies that ``dvc exp run --queue`` makes.

A model variant is an :class:`EvaFusionVariant`, :class:`InversionNetVariant`,
:class:`DepthTrendVariant` or :class:`ColumnVariant` (key ``arch``); its ``train`` mapping
overrides keys of the ``train`` section for that variant (:meth:`Params.train_for`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speedstructure.config.typed import (
    PARAMS_FILE,
    ConfigError,
    as_plain,
    replace_checked,
    resolve_path,
)

V_MIN, V_MAX = (
    1.5,
    4.5,
)  # km/s: the challenge's velocity range (output bounds, clipping, colour scales)


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
    pml_width: int = 20
    freq: float = 15.0
    record_dt: float = 0.0001
    n_time: int = 10001


PRIOR_KEYS = ("v_top", "v_bottom", "trend_power", "water_depth")  # ranges drawn per model


@dataclass(frozen=True)
class SynthOodConfig:
    """The out-of-distribution test set (``synth.ood``): its own seed and size, and prior
    ranges (:data:`PRIOR_KEYS`) shifted against the training ones (``n_test: 0``: none)."""

    n_test: int = 48
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
    n_test: int = 48
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
    lateral_weight: float = 0.0  # x metrics.lateral_loss added to the MAPE loss
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


ARCHS = ("eva_fusion", "inversionnet", "depth_trend", "column")
FUSIONS = ("mean", "single", "dual")
FLIP_MODES = ("consistent", "receivers")
TUNE_WEIGHTS = ("auto", "best_single", "equal", "hand", "tuned")  # ensemble.tuning.STRATEGIES
POOL_QUERIES = ("shared", "per_token")
HEAD_RESIZES = ("area", "linear")
LAYOUTS = ("fold", "time_receiver")
AMPLITUDES = ("linear", "signlog")
HEADS = ("rows", "grid")
FLOORS = ("learned", "picked", "relative")  # the water floor: see Variant.floor
NORMS = ("batch", "group", "none")
PRIORS = ("none", "depth_trend")
AMPS = ("none", "auto", "bf16", "fp16")
MUON_PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """Keys every model variant accepts (``variants.<name>``)."""

    arch: str
    profile: str | None = None  # whose runs use it (documentation; the profile switch sets runs)
    description: str = ""
    v_min: float = V_MIN
    v_max: float = V_MAX
    tta_flip: str = "consistent"
    # learned: as predicted | picked: predict() moves each column to the floor picked from the
    # gathers (seafloor.py) | relative: the network predicts below the picked floor (column)
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


@dataclass(frozen=True, kw_only=True)
class ColumnVariant(Variant):
    """The column network (models/column.py): midpoint-binned, offset-banded gathers, a
    velocity column per x below the picked water floor."""

    arch: str = "column"
    floor: str = "relative"
    prior: str = "depth_trend"
    width: int = 32  # encoder channels (x1, x2, x4 over five stride-2 stages in time)
    hidden: int = 256  # channels of the network over x
    knots: int = 64  # velocities per column between the water floor and the bottom
    time_samples: int = 500  # the 1 s record area-averaged to this many samples (2 ms)
    midpoint_bins: int = 30  # bins of source-receiver midpoints over the 300 m (10 m)
    offset_edges: tuple[float, ...] = (0.0, 50.0, 100.0, 175.0, 301.0)  # offset bands (m)
    gain: float = 1.0  # reflections multiplied by t ** gain (spherical spreading)
    seafloor_velocity: bool = False  # the velocity read from the sea-floor reflection as input
    level_read: bool = False  # the level read from the reflections (ridge), blended in at eval
    level_blend: float = 0.75  # its share of the level below the floor (the rest: the network's)
    level_bands: tuple[float, ...] = (300.0, 600.0, 900.0)  # inner edges (m) of its depth bands


VARIANT_TYPES: dict[str, type[Variant]] = {
    "eva_fusion": EvaFusionVariant,
    "inversionnet": InversionNetVariant,
    "depth_trend": DepthTrendVariant,
    "column": ColumnVariant,
}


@dataclass(frozen=True)
class RunConfig:
    """One training run: a variant trained with one fold held out (``runs.<key>``)."""

    variant: str
    fold: int


@dataclass(frozen=True)
class EnsembleConfig:
    """The ensemble's member variants and the seed's hand-set weights, for comparison."""

    variants: tuple[str, ...] = ("tiny_dual42", "column")
    hand_weights: dict[str, float] = field(
        default_factory=lambda: {"tiny_dual42": 0.5, "column": 0.5}
    )


@dataclass(frozen=True)
class TuneConfig:
    """Optuna's search for the ensemble weights of each fold (``tune:``)."""

    n_trials: int = 60
    seed: int = 42
    study_prefix: str = "speedstructure-weights"
    split_seed: int = 0
    weights: str = "auto"  # a fold's weighting: auto (equal unless clearly beaten held out) or one


@dataclass(frozen=True)
class PredictConfig:
    """The predict stage (``predict:``)."""

    batch_size: int = 4


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate stage (``evaluate:``): the baseline variant, the depth bands (m), the
    velocity (km/s) above which a cell counts as intrusion body (``body_iou``)."""

    baseline: str = "baseline_depth_trend"
    batch_size: int = 4
    depth_bands: tuple[int, ...] = (0, 150, 300, 450, 600, 800, 1000, 1259)
    focus_band: tuple[int, int] = (300, 900)
    body_threshold: float = 4.0


@dataclass(frozen=True)
class UncertaintyConfig:
    """The calibrated intervals (``uncertainty:``, :mod:`speedstructure.ensemble.calibration`):
    nominal
    coverage, bands (m below the predicted water floor), score scale, histogram resolution."""

    coverage: float = 0.9
    bands: tuple[int, ...] = (0, 50, 150, 300, 500, 750, 1259)
    scale: str = "relative"
    resolution: float = 1.0e-4


@dataclass(frozen=True)
class QcConfig:
    """The physics check (``qc:``, :mod:`speedstructure.physics`): the mute after the direct
    arrival and its taper (s), the low-pass (Hz), the AGC window (s), figure rows, processes."""

    mute_after: float = 0.1
    taper: float = 0.05
    lowpass_hz: float = 12.0
    rolloff_hz: float = 4.0
    agc_window: float = 0.2
    worst_samples: int = 3
    threads: int | None = 1
    workers: int | None = None  # simulation processes; None: usable cores / training processes


@dataclass(frozen=True)
class RefineConfig:
    """The optional FWI refinement (``refine:``, :mod:`speedstructure.physics.fwi`)."""

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
