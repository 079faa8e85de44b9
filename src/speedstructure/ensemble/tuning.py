"""Ensemble weights on the simplex, tuned with Optuna: the core of the ``tune`` stage (no files).

The ensemble of a fold is ``sum_m w_m * pred_m`` with ``w`` on the simplex.
Weights are fitted on the fold's validation predictions by minimising the
challenge metric, MAPE (:mod:`speedstructure.metrics`), with Optuna's TPE
sampler; the simplex is parameterised as in Optuna's FAQ (Dirichlet):
``u_i ~ U(0, 1)``, ``x_i = -log(u_i)``, ``w = x / sum(x)``.  Equal weights are
the first trial, so the tuned weights are never worse than equal weights on
the data they were tuned on.  The Optuna parameters are named by member
(``u_<member>``, e.g. ``u_tiny_dual42``) and every trial records its weights as user
attributes ``w_<member>``, so optuna-dashboard shows which member each value belongs to.

Because tuning on the validation set overfits it, :func:`split_half_report`
judges a fold by splitting its samples into halves A and B: weights are tuned
on A and scored on B and vice versa.  The held-out MAPE of four strategies is
reported: the best single member (chosen on the tuning half), equal weights,
the seed's hand-set weights and the tuned weights.  The fold then uses the weighting
``tune.weights`` names; ``auto`` (the default) keeps equal weights unless another weighting
beats them held out by more than one standard error of the per-sample difference
(:func:`choose_weighting`): on a few dozen validation samples a smaller gap is noise, and
equal weights, fitted to nothing, are the ones that noise cannot mislead.  The fold's
cross-validated figure is the chosen weighting's held-out MAPE.

Names: :class:`Scorer`, :func:`weighted_mape`, :func:`dirichlet_weights`,
:func:`fit_weights`, :func:`normalise_hand`, :func:`split_half_report`,
:func:`gain_over_equal`, :func:`choose_weighting`, :class:`TuneError`, :data:`STRATEGIES`.

"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config.schema import Params, TuneConfig
from speedstructure.config.typed import resolve_path
from speedstructure.ensemble.members import SPEC_FORMAT
from speedstructure.ensemble.runs import load_fold
from speedstructure.ensemble.scoring import Scorer, TuneError, as_scorer
from speedstructure.tracking.store import OPTUNA_STORAGE_ENV

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("best_single", "equal", "hand", "tuned")


# --------------------------------------------------------------------------- Optuna


def optuna_storage_setting(params: Params) -> str:
    """Where the studies go, as configured: ``SPEEDSTRUCTURE_OPTUNA_STORAGE`` when set (the
    PostgreSQL URL ``speedstructure server`` prints), else ``paths.optuna_db``."""
    return os.environ.get(OPTUNA_STORAGE_ENV, "").strip() or params.paths.optuna_db


def optuna_storage(params: Params) -> str | Path:
    """:func:`optuna_storage_setting`: a database URL as given, or a SQLite file (relative to
    the root)."""
    db = optuna_storage_setting(params)
    return db if "://" in db else resolve_path(db, params.root)


def dirichlet_weights(u: Sequence[float]) -> np.ndarray:
    """Optuna's simplex parameterisation: ``x = -log(u)``, ``w = x / sum(x)``."""
    u = np.clip(np.asarray(u, dtype=np.float64), np.finfo(np.float64).tiny, 1.0)
    x = -np.log(u)
    total = x.sum()
    return np.full(x.size, 1.0 / x.size) if total <= 0 else x / total


def _param(name: str) -> str:
    """The Optuna parameter of a member: ``u_<member name>``."""
    return f"u_{name}"


@contextlib.contextmanager
def _quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _storage(storage):
    """``None`` (in memory), an RDBStorage, a URL, or a path of a SQLite file."""
    if storage is None or storage == "":
        return None
    import optuna

    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    s = str(storage)
    if "://" not in s:
        path = Path(s).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        s = f"sqlite:///{path.as_posix()}"
    kwargs = {"connect_args": {"timeout": 60}} if s.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(s, engine_kwargs=kwargs)


def complete_trials(study) -> list:
    """The study's completed trials (none for ``None``)."""
    if study is None:
        return []
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _open_study(storage, study_name, fingerprint, names, n_rows, restart_stale):
    import optuna
    from optuna.study import StudyDirection

    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="minimize", load_if_exists=True
    )
    if study.direction != StudyDirection.MINIMIZE:
        raise TuneError(
            f"study '{study.study_name}' in the Optuna storage is not a minimisation study"
        )
    stored = study.user_attrs.get("fingerprint")
    if study.trials and stored != fingerprint:
        where = f"study '{study.study_name}' in the Optuna storage"
        if not restart_stale:
            raise TuneError(
                f"{where} was tuned on other members or predictions; "
                "delete it or use another study name"
            )
        log.warning("tune: %s was tuned on other members or predictions: starting it afresh", where)
        optuna.delete_study(study_name=study.study_name, storage=storage)
        study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize")
    if not study.trials:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("members", list(names))
        study.set_user_attr("n_samples", int(n_rows))
    return study


def _study(scorer: Scorer, rows, names, *, seed, storage, study_name, restart_stale):
    """``(study, trials already stored)``: in memory, or opened (resumed) in ``storage``."""
    import optuna

    store = _storage(storage)
    if store is None:
        sampler = optuna.samplers.TPESampler(seed=int(seed))
        return optuna.create_study(study_name=study_name, direction="minimize", sampler=sampler), 0
    if not study_name:
        raise TuneError("a stored study needs a study_name")
    fingerprint = scorer.fingerprint(rows, [_param(n) for n in names])  # names as parameters
    study = _open_study(store, study_name, fingerprint, names, rows.size, restart_stale)
    n_existing = len(study.trials)
    study = optuna.load_study(
        study_name=study.study_name,
        storage=store,
        sampler=optuna.samplers.TPESampler(seed=int(seed) + n_existing),
    )
    return study, n_existing


def fit_weights(
    preds,
    targets=None,
    *,
    n_trials: int,
    seed: int,
    storage=None,
    study_name: str | None = None,
    names: Sequence[str] | None = None,
    idx=None,
    restart_stale: bool = False,
):
    """Tune simplex weights minimising MAPE; returns ``(weights (M,), study)``.

    ``preds`` (M, N, *S) with ``targets`` (N, *S), or a :class:`Scorer` with
    ``targets=None``; ``idx`` restricts tuning to those samples.  TPE sampler
    seeded with ``seed`` (plus the number of trials already stored, so resumed
    runs do not repeat the random start-up points).  ``storage`` (an Optuna
    storage, a URL or a SQLite file path) keeps the study under ``study_name``;
    calling again resumes it: only ``n_trials`` minus its completed trials
    run.  A stored study whose data differ (fingerprint of the objective) raises
    :class:`TuneError`, or is deleted and restarted with ``restart_stale``.
    With one member: ``([1.0], None)``.
    """
    scorer = as_scorer(preds, targets)
    m = scorer.n_members
    names = list(names) if names is not None else [f"m{k}" for k in range(m)]
    if len(names) != m or len(set(names)) != m:
        raise TuneError(f"{len(names)} member names for {m} members (unique): {names}")
    if m == 1:
        return np.ones(1), None
    if int(n_trials) < 1:
        raise TuneError(f"n_trials must be >= 1, got {n_trials}")
    rows = scorer.rows(idx)

    def objective(trial) -> float:
        w = dirichlet_weights([trial.suggest_float(_param(n), 0.0, 1.0) for n in names])
        trial.set_user_attr("weights", w.tolist())
        for n, wk in zip(names, w, strict=True):
            trial.set_user_attr(f"w_{n}", float(wk))
        return scorer(w, rows)

    with _quiet_optuna():
        study, n_existing = _study(
            scorer,
            rows,
            names,
            seed=seed,
            storage=storage,
            study_name=study_name,
            restart_stale=restart_stale,
        )
        if n_existing == 0:
            study.enqueue_trial({_param(n): 0.5 for n in names})  # equal weights
        todo = int(n_trials) - len(complete_trials(study))
        if todo > 0:
            study.optimize(objective, n_trials=todo)
    best = study.best_trial
    w = best.user_attrs.get("weights") or dirichlet_weights([best.params[_param(n)] for n in names])
    return np.asarray(w, dtype=np.float64), study


# --------------------------------------------------------------------------- split-half report


def normalise_hand(
    hand_weights: Mapping[str, float] | None, member_names: Sequence[str]
) -> np.ndarray | None:
    """Hand weights of the members (missing = 0), normalised; ``None`` when none applies."""
    if not hand_weights:
        return None
    w = np.array([float(hand_weights.get(n, 0.0)) for n in member_names], dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise TuneError(f"hand weights must be finite and non-negative, got {dict(hand_weights)}")
    return w / w.sum() if w.sum() > 0 else None


def split_half_report(
    preds,
    targets,
    member_names: Sequence[str],
    hand_weights: Mapping[str, float] | None,
    *,
    n_trials: int,
    seed: int,
    split_seed: int,
) -> dict[str, Any]:
    """Held-out MAPE of the weighting strategies, tuning and scoring on disjoint halves.

    Samples are shuffled (``split_seed``) into halves A and B; everything is
    chosen on one half and scored on the other, both ways.  Returns
    ``{"heldout": {strategy: MAPE averaged over both held-out halves, weighted
    by half size}, "halves": [...], ...}``; each half entry holds
    ``tune_idx`` / ``heldout_idx`` (disjoint, together every sample once), the
    chosen best single member, the tuned weights and per-strategy MAPEs.
    Strategies: best_single, equal, hand (when ``hand_weights`` cover a member),
    tuned.
    """
    scorer = as_scorer(preds, targets)
    m, n = scorer.n_members, scorer.n_samples
    names = list(member_names)
    if len(names) != m:
        raise TuneError(f"{len(names)} member names for {m} members")
    if n < 2:
        raise TuneError(f"the split-half report needs at least 2 validation samples, got {n}")
    perm = np.random.default_rng(int(split_seed)).permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    hand = normalise_hand(hand_weights, names)
    strategies = [s for s in STRATEGIES if s != "hand" or hand is not None]
    halves = [
        _half(scorer, names, hand, strategies, label, tune_idx, held_idx, n_trials, seed)
        for label, tune_idx, held_idx in (("A->B", half_a, half_b), ("B->A", half_b, half_a))
    ]
    per_sample = {s: np.empty(n) for s in strategies}  # each sample is held out once
    for h in halves:
        errors = h.pop("heldout_per_sample")
        for s in strategies:
            per_sample[s][h["heldout_idx"]] = errors[s]
    return {
        "heldout": {s: float(per_sample[s].mean()) for s in strategies},
        "heldout_per_sample": per_sample,
        "halves": halves,
        "strategies": strategies,
        "n_samples": n,
        "split_seed": int(split_seed),
        "members": names,
    }


def gain_over_equal(per_sample: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per strategy, how much lower its held-out MAPE is than equal weights' (``gain``, the
    mean of the per-sample differences) and that mean's standard error (``se``); at least two
    samples each (:func:`split_half_report` holds out every sample of a fold of two or more)."""
    equal = np.asarray(per_sample["equal"], dtype=np.float64)
    out = {}
    for s, errors in per_sample.items():
        d = equal - np.asarray(errors, dtype=np.float64)
        out[s] = {"gain": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(d.size))}
    return out


def choose_weighting(
    heldout: Mapping[str, float], setting: str, gains: Mapping[str, Mapping[str, float]]
) -> str:
    """The weighting a fold uses: ``setting`` (``tune.weights``) or, with ``auto``, equal
    weights unless a strategy's held-out MAPE is lower by more than one standard error
    (``gains``: :func:`gain_over_equal`); of those that are, the lowest ``heldout`` MAPE."""
    if setting != "auto":
        if setting not in heldout:
            raise TuneError(
                f"tune.weights: {setting}: not available for this fold "
                f"(ensemble.hand_weights name none of its members)"
            )
        return setting
    clear = [s for s in heldout if gains[s]["gain"] > gains[s]["se"]]
    return min(clear, key=lambda k: (heldout[k], STRATEGIES.index(k))) if clear else "equal"


def strategy_weights(
    strategy: str, scorer: Scorer, tuned: np.ndarray, hand, idx=None
) -> np.ndarray:
    """The weights (M,) of ``strategy``: the best member on the samples ``idx`` (all when
    None) alone, equal, the normalised ``hand`` weights or the ``tuned`` ones."""
    m = scorer.n_members
    if strategy == "best_single":
        return np.eye(m)[int(np.argmin(scorer.member_mapes(idx)))]
    if strategy == "equal":
        return np.full(m, 1.0 / m)
    if strategy == "hand":
        return np.asarray(hand, dtype=np.float64)
    return np.asarray(tuned, dtype=np.float64)


def _half(scorer, names, hand, strategies, label, tune_idx, held_idx, n_trials, seed) -> dict:
    """One direction of the split-half report: choose on ``tune_idx``, score on ``held_idx``."""
    if np.intersect1d(tune_idx, held_idx).size or tune_idx.size + held_idx.size != scorer.n_samples:
        raise RuntimeError("split-half halves overlap or miss samples")  # never score on tuned ones
    tune_member = scorer.member_mapes(tune_idx)
    best = int(np.argmin(tune_member))
    tuned, _ = fit_weights(scorer, n_trials=n_trials, seed=seed, names=names, idx=tune_idx)
    weights = {s: strategy_weights(s, scorer, tuned, hand, tune_idx) for s in strategies}
    per_sample = {s: scorer.per_sample(weights[s], held_idx) for s in strategies}
    return {
        "name": label,
        "tune_idx": tune_idx.tolist(),
        "heldout_idx": held_idx.tolist(),
        "best_single": names[best],
        "tuned_weights": dict(zip(names, map(float, tuned), strict=True)),
        "tune_mape": {
            "tuned": scorer(tuned, tune_idx),
            **dict(zip(names, map(float, tune_member), strict=True)),
        },
        "heldout": {s: float(e.mean()) for s, e in per_sample.items()},
        "heldout_per_sample": per_sample,
    }


# --------------------------------------------------------------------------- tuning


def _trial_history(study) -> list[tuple[int, float, int]]:
    """``[(trial number, value, completion time in ms)]`` of the completed trials."""
    out = []
    for t in complete_trials(study):
        ts = int(t.datetime_complete.timestamp() * 1000) if t.datetime_complete else 0
        out.append((t.number, float(t.value), ts))
    return out


def tune_fold(params: Params, cfg: TuneConfig, fold: int, members: list[tuple[str, str]]):
    """Split-half report and whole-fold weights of one fold: ``(fold entry, trial history)``."""
    names = [v for v, _ in members]
    ids, preds, targets, checkpoints = load_fold(params, fold, members)
    scorer = Scorer(preds, targets)
    del preds, targets
    if scorer.n_samples < 2:
        raise TuneError(
            f"fold {fold} of {params.path('folds_table')} has {scorer.n_samples} "
            "validation sample(s); tuning needs >= 2"
        )
    hand = dict(params.ensemble.hand_weights)
    report = split_half_report(
        scorer,
        None,
        names,
        hand,
        n_trials=cfg.n_trials,
        seed=cfg.seed,
        split_seed=cfg.split_seed,
    )
    tuned, study = fit_weights(
        scorer,
        n_trials=cfg.n_trials,
        seed=cfg.seed,
        storage=optuna_storage(params),
        study_name=f"{cfg.study_prefix}-fold{fold}",
        names=names,
        restart_stale=True,
    )
    gains = gain_over_equal(report["heldout_per_sample"])
    strategy = choose_weighting(report["heldout"], cfg.weights, gains)
    weights = strategy_weights(strategy, scorer, tuned, normalise_hand(hand, names))
    member_mape = scorer.member_mapes()
    entry = {
        "fold": fold,
        "strategy": strategy,
        "members": [
            {"variant": v, "checkpoint": c, "weight": float(w), "val_mape": float(mm)}
            for v, c, w, mm in zip(names, checkpoints, weights, member_mape, strict=True)
        ],
        "val_mape": scorer(weights),
        "tuned_weights": dict(zip(names, map(float, tuned), strict=True)),
        "heldout": report["heldout"],
        "gain_over_equal": gains,
        "n_val": scorer.n_samples,
        "split_half": [_half_summary(h) for h in report["halves"]],
    }
    return entry, _trial_history(study)


def _half_summary(half: dict[str, Any]) -> dict[str, Any]:
    return {
        "tuned_on": len(half["tune_idx"]),
        "scored_on": len(half["heldout_idx"]),
        "best_single": half["best_single"],
        "tuned_weights": half["tuned_weights"],
    }


def summarise(params: Params, cfg: TuneConfig, fold_entries: list[dict]) -> tuple[dict, dict]:
    """The ensemble file's content and the stage's metrics; ``cv_mape`` is the mean over
    folds of the held-out MAPE of each fold's chosen weighting."""
    cv_mape = float(np.mean([f["heldout"][f["strategy"]] for f in fold_entries]))
    ensemble = {
        "format": SPEC_FORMAT,
        "folds": fold_entries,
        "cv_mape": cv_mape,
        "weights": cfg.weights,
        "variants": list(params.ensemble.variants),
    }
    strategies = [s for s in STRATEGIES if all(s in f["heldout"] for f in fold_entries)]
    metrics = {
        "cv_mape": cv_mape,
        "heldout": {s: float(np.mean([f["heldout"][s] for f in fold_entries])) for s in strategies},
        "folds": {
            f"fold{f['fold']}": {
                **f["heldout"],
                "strategy": f["strategy"],
                "val_mape": f["val_mape"],
                "n_val": f["n_val"],
            }
            for f in fold_entries
        },
        "n_trials": cfg.n_trials,
    }
    return ensemble, metrics
