"""Reading ``params.yaml``: :func:`load_params` once per command, with checks across sections.

The sections parse by their dataclasses (:mod:`speedstructure.config.schema`); the checks here
are what one section cannot see alone: every run names a defined variant, choices are known,
prior ranges are ordered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from speedstructure.config.schema import (
    AMPLITUDES,
    AMPS,
    ARCHS,
    DEVICES,
    FLIP_MODES,
    FLOORS,
    FUSIONS,
    HEAD_RESIZES,
    HEADS,
    LAYOUTS,
    MUON_PRECISIONS,
    NORMS,
    POOL_QUERIES,
    PRIOR_KEYS,
    PRIORS,
    SECTIONS,
    SPLITS,
    TUNE_WEIGHTS,
    VARIANT_TYPES,
    ColumnVariant,
    EvaFusionVariant,
    InversionNetVariant,
    Params,
    RunConfig,
    SynthConfig,
    SynthOodConfig,
    TrainConfig,
    Variant,
)
from speedstructure.config.typed import (
    PARAMS_FILE,
    ConfigError,
    build,
    project_root,
    read_yaml,
    replace_checked,
)


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
    if isinstance(v, ColumnVariant):
        choices += [("prior", PRIORS)]
    for key, allowed in choices:
        _check_choice(getattr(v, key), allowed, f"{where}.{key}")
    if (v.floor == "relative") != isinstance(v, ColumnVariant):
        raise ConfigError(
            f"{where}.floor: relative is the column network's floor and its only one "
            f"(arch {v.arch!r}, floor {v.floor!r})"
        )


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
    _check_choice(p.tune.weights, TUNE_WEIGHTS, f"{src}: tune.weights")
    if not 0 < p.uncertainty.coverage < 1:
        raise ConfigError(f"{src}: uncertainty.coverage must be in (0, 1)")
    for name in p.variants:
        t = p.train_for(name)
        _check_choice(t.amp, AMPS, f"{src}: variants.{name}.train.amp")
        _check_choice(
            t.muon_precision, MUON_PRECISIONS, f"{src}: variants.{name}.train.muon_precision"
        )
        if not float(t.lateral_weight) >= 0:
            raise ConfigError(
                f"{src}: variants.{name}.train.lateral_weight must be >= 0, got {t.lateral_weight}"
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
