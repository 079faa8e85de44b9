"""Ensemble weights per fold, tuned with Optuna, and the ``tune`` subcommand.

The ensemble of a fold is ``sum_m w_m * pred_m`` with ``w`` on the simplex.
Weights are fitted on the fold's validation predictions (``val_preds.npz`` of
each member run) by minimising the challenge metric, MAPE, with Optuna's TPE
sampler; the simplex is parameterised as in Optuna's FAQ (Dirichlet):
``u_i ~ U(0, 1)``, ``x_i = -log(u_i)``, ``w = x / sum(x)``.  Equal weights are
the first trial, so the tuned weights are never worse than equal weights on
the data they were tuned on.

Because tuning on the validation set overfits it, each fold is also judged by a
split-half report: the validation samples are shuffled into halves A and B;
weights are tuned on A and scored on B and vice versa.  The held-out MAPE of
four strategies is reported: the best single member (chosen on the tuning
half), equal weights, the seed's hand-set weights and the tuned weights.

Core (no files): :class:`Scorer`, :func:`weighted_mape`, :func:`fit_weights`,
:func:`split_half_report`.  Stage: :func:`run_tune`.  Subcommand::

    speedstructure tune [--n-trials N] [--no-mlflow]

Files written (relative to the project root)::

    ensemble/ensemble.json     members, checkpoints and weights per fold
    metrics/tune.json          held-out MAPE per strategy, per fold and overall
    plots/tune_weights.csv     fold, variant, weight
    plots/tune_heldout.png     held-out MAPE per strategy and fold
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speedstructure.config import ConfigError, project_root, resolve_path
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import atomic_write_bytes

EPS = 1e-8  # the metric's denominator guard: |g - p| / (|g| + EPS)
CHUNK_CELLS = 4_000_000  # cells per working buffer (float32: 16 MB)
STRATEGIES: tuple[str, ...] = ("best_single", "equal", "hand", "tuned")
FORMAT = 1

ENSEMBLE_FILE = "ensemble/ensemble.json"
METRICS_FILE = "metrics/tune.json"
WEIGHTS_CSV = "plots/tune_weights.csv"
HELDOUT_PNG = "plots/tune_heldout.png"

TUNE_DEFAULTS: dict[str, Any] = {
    "n_trials": 100,
    "seed": 42,
    "storage": "mlruns/optuna.db",
    "study_prefix": "speedstructure-weights",
    "split_seed": 0,
}


class TuneError(UserError, ValueError):
    """Bad input to the tuning core (shapes, weights, too few samples, stale study)."""


# --------------------------------------------------------------------------- scoring


class Scorer:
    """MAPE of weighted ensembles of fixed predictions, cheap to evaluate repeatedly.

    ``preds`` (M, N, *S) of any float dtype, ``targets`` (N, *S).  The signed
    relative errors ``d_m = (p_m - g) / (|g| + EPS)`` are computed once in
    float32 (chunk by chunk, no float64 copies); for weights summing to 1,
    ``|g - sum_m w_m p_m| / (|g| + EPS) = |sum_m w_m d_m|``, so a trial costs M
    multiply-adds per cell.
    """

    def __init__(self, preds: np.ndarray, targets: np.ndarray, *, chunk_cells: int = CHUNK_CELLS):
        preds, targets = np.asarray(preds), np.asarray(targets)
        if preds.ndim < 2 or preds.shape[1:] != targets.shape:
            raise TuneError(f"predictions {preds.shape} do not match targets {targets.shape}: expected (M, *targets.shape)")
        m, n = preds.shape[:2]
        if m < 1 or n < 1:
            raise TuneError(f"need at least one member and one sample, got predictions {preds.shape}")
        cells = int(np.prod(targets.shape[1:], dtype=np.int64))
        if cells < 1:
            raise TuneError(f"targets {targets.shape} have no cells")
        self.n_members, self.n_samples, self.n_cells = m, n, cells
        self._chunk = max(1, int(chunk_cells) // cells)
        self._rel = np.empty((m, n, cells), np.float32)
        self._fingerprints: dict[bytes, str] = {}
        p, g = preds.reshape(m, n, cells), targets.reshape(n, cells)
        for s in range(0, n, self._chunk):
            e = min(n, s + self._chunk)
            t = g[s:e].astype(np.float32, copy=False)
            inv = np.abs(t)
            inv += np.float32(EPS)
            np.reciprocal(inv, out=inv)
            for k in range(m):
                out = self._rel[k, s:e]
                np.subtract(p[k, s:e], t, out=out, dtype=np.float32, casting="same_kind")
                out *= inv
                if not np.isfinite(out).all():
                    raise TuneError(f"member {k}: predictions or targets of samples {s}..{e - 1} are not finite")

    # -- helpers
    def rows(self, idx: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``idx`` as a checked 1-D index array (all samples when ``None``)."""
        if idx is None:
            return np.arange(self.n_samples, dtype=np.intp)
        rows = np.asarray(idx, dtype=np.intp).reshape(-1)
        if rows.size == 0:
            raise TuneError("empty sample selection")
        if rows.min() < 0 or rows.max() >= self.n_samples:
            raise TuneError(f"sample index out of range 0..{self.n_samples - 1}")
        return rows

    def check_weights(self, weights) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != (self.n_members,):
            raise TuneError(f"{w.size} weights for {self.n_members} members")
        if not np.isfinite(w).all() or (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
            raise TuneError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
        return w

    # -- metric
    def per_sample(self, weights, idx=None) -> np.ndarray:
        """MAPE of the weighted ensemble for each selected sample (float64 (n,))."""
        w = self.check_weights(weights)
        rows = self.rows(idx)
        active = [(k, np.float32(w[k])) for k in range(self.n_members) if w[k] > 0]
        out = np.empty(rows.size, np.float64)
        ch = min(self._chunk, rows.size)
        buf = np.empty((ch, self.n_cells), np.float32)
        tmp = np.empty_like(buf) if len(active) > 1 else None
        for s in range(0, rows.size, ch):
            sel = rows[s:s + ch]
            b = buf[: sel.size]
            contiguous = _is_range(sel)
            for j, (k, wk) in enumerate(active):
                dst = b if j == 0 else tmp[: sel.size]
                if contiguous:
                    np.multiply(self._rel[k, sel[0]: sel[0] + sel.size], wk, out=dst)
                else:
                    np.take(self._rel[k], sel, axis=0, out=dst)
                    dst *= wk
                if j:
                    b += dst
            np.abs(b, out=b)
            out[s:s + sel.size] = b.sum(axis=1, dtype=np.float64) / self.n_cells
        return out

    def __call__(self, weights, idx=None) -> float:
        """Mean per-sample MAPE of the weighted ensemble over the selected samples."""
        return float(self.per_sample(weights, idx).mean())

    def member_mapes(self, idx=None) -> np.ndarray:
        """MAPE of each member alone, float64 (M,)."""
        eye = np.eye(self.n_members)
        return np.array([self(eye[k], idx) for k in range(self.n_members)])

    def fingerprint(self, idx=None, names: Sequence[str] = ()) -> str:
        """Hash of the objective (relative errors of the selected samples, member names)."""
        rows = self.rows(idx)
        key = rows.tobytes() + "\0".join(names).encode()
        if key not in self._fingerprints:
            h = hashlib.blake2b(digest_size=16)
            h.update(key)
            for k in range(self.n_members):
                for s in range(0, rows.size, self._chunk):
                    h.update(np.ascontiguousarray(self._rel[k, rows[s:s + self._chunk]]).data)
            self._fingerprints[key] = h.hexdigest()
        return self._fingerprints[key]


def _is_range(rows: np.ndarray) -> bool:
    return rows.size > 0 and int(rows[-1]) - int(rows[0]) == rows.size - 1 and bool((np.diff(rows) == 1).all())


def _as_scorer(preds, targets) -> Scorer:
    if isinstance(preds, Scorer):
        if targets is not None:
            raise TuneError("pass targets=None together with a prepared Scorer")
        return preds
    if targets is None:
        raise TuneError("targets are required")
    return Scorer(preds, targets)


def weighted_mape(preds: np.ndarray, targets: np.ndarray, weights) -> float:
    """Mean per-sample MAPE of ``sum_m weights[m] * preds[m]`` against ``targets``.

    ``preds`` (M, N, *S), ``targets`` (N, *S), ``weights`` (M,) on the simplex.
    For repeated evaluation on the same data build a :class:`Scorer` once.
    """
    return _as_scorer(preds, targets)(weights)


# --------------------------------------------------------------------------- Optuna


def dirichlet_weights(u: Sequence[float]) -> np.ndarray:
    """Optuna's simplex parameterisation: ``x = -log(u)``, ``w = x / sum(x)``."""
    u = np.clip(np.asarray(u, dtype=np.float64), np.finfo(np.float64).tiny, 1.0)
    x = -np.log(u)
    total = x.sum()
    return np.full(x.size, 1.0 / x.size) if total <= 0 else x / total


def _param(i: int) -> str:
    return f"u_{i}"


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


def _complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _open_study(storage, study_name, fingerprint, names, n_rows, restart_stale):
    import optuna
    from optuna.study import StudyDirection

    study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize", load_if_exists=True)
    if study.direction != StudyDirection.MINIMIZE:
        raise TuneError(f"study '{study.study_name}' in the Optuna storage is not a minimisation study")
    stored = study.user_attrs.get("fingerprint")
    if study.trials and stored != fingerprint:
        where = f"study '{study.study_name}' in the Optuna storage"
        if not restart_stale:
            raise TuneError(f"{where} was tuned on other members or predictions; delete it or use another study name")
        print(f"tune: {where} was tuned on other members or predictions: starting it afresh", file=sys.stderr)
        optuna.delete_study(study_name=study.study_name, storage=storage)
        study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize")
    if not study.trials:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("members", list(names))
        study.set_user_attr("n_samples", int(n_rows))
    return study


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
    import optuna

    scorer = _as_scorer(preds, targets)
    m = scorer.n_members
    names = list(names) if names is not None else [f"m{k}" for k in range(m)]
    if len(names) != m:
        raise TuneError(f"{len(names)} member names for {m} members")
    if m == 1:
        return np.ones(1), None
    if int(n_trials) < 1:
        raise TuneError(f"n_trials must be >= 1, got {n_trials}")
    rows = scorer.rows(idx)
    store = _storage(storage)

    def objective(trial) -> float:
        w = dirichlet_weights([trial.suggest_float(_param(k), 0.0, 1.0) for k in range(m)])
        trial.set_user_attr("weights", w.tolist())
        return scorer(w, rows)

    with _quiet_optuna():
        if store is None:
            n_existing = 0
            study = optuna.create_study(study_name=study_name, direction="minimize",
                                        sampler=optuna.samplers.TPESampler(seed=int(seed)))
        else:
            if not study_name:
                raise TuneError("a stored study needs a study_name")
            study = _open_study(store, study_name, scorer.fingerprint(rows, names), names, rows.size, restart_stale)
            n_existing = len(study.trials)
            study = optuna.load_study(study_name=study.study_name, storage=store,
                                      sampler=optuna.samplers.TPESampler(seed=int(seed) + n_existing))
        if n_existing == 0:
            study.enqueue_trial({_param(k): 0.5 for k in range(m)})  # equal weights
        todo = int(n_trials) - len(_complete(study))
        if todo > 0:
            study.optimize(objective, n_trials=todo)
    best = study.best_trial
    w = best.user_attrs.get("weights") or dirichlet_weights([best.params[_param(k)] for k in range(m)])
    return np.asarray(w, dtype=np.float64), study


# --------------------------------------------------------------------------- split-half report


def normalise_hand(hand_weights: Mapping[str, float] | None, member_names: Sequence[str]) -> np.ndarray | None:
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
    scorer = _as_scorer(preds, targets)
    m, n = scorer.n_members, scorer.n_samples
    names = list(member_names)
    if len(names) != m:
        raise TuneError(f"{len(names)} member names for {m} members")
    if n < 2:
        raise TuneError(f"the split-half report needs at least 2 validation samples, got {n}")
    perm = np.random.default_rng(int(split_seed)).permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
    hand = normalise_hand(hand_weights, names)
    strategies = [s for s in STRATEGIES if s != "hand" or hand is not None]
    halves = []
    for label, tune_idx, held_idx in (("A->B", half_a, half_b), ("B->A", half_b, half_a)):
        if np.intersect1d(tune_idx, held_idx).size or tune_idx.size + held_idx.size != n:
            raise RuntimeError("split-half halves overlap or miss samples")  # never score on tuned samples
        tune_member = scorer.member_mapes(tune_idx)
        best = int(np.argmin(tune_member))
        tuned, _ = fit_weights(scorer, n_trials=n_trials, seed=seed, names=names, idx=tune_idx)
        weights = {
            "best_single": np.eye(m)[best],
            "equal": np.full(m, 1.0 / m),
            "hand": hand,
            "tuned": tuned,
        }
        halves.append({
            "name": label,
            "tune_idx": tune_idx.tolist(),
            "heldout_idx": held_idx.tolist(),
            "best_single": names[best],
            "tuned_weights": dict(zip(names, map(float, tuned))),
            "tune_mape": {"tuned": scorer(tuned, tune_idx), **dict(zip(names, map(float, tune_member)))},
            "heldout": {s: scorer(weights[s], held_idx) for s in strategies},
        })
    heldout = {
        s: sum(h["heldout"][s] * len(h["heldout_idx"]) for h in halves) / n for s in strategies
    }
    return {"heldout": heldout, "halves": halves, "strategies": strategies, "n_samples": n,
            "split_seed": int(split_seed), "members": names}


# --------------------------------------------------------------------------- stage


def _cfg(params: dict) -> dict[str, Any]:
    tune = params.get("tune") or {}
    if not isinstance(tune, dict):
        raise ConfigError("params.yaml: section 'tune' must be a mapping")
    cfg = {**TUNE_DEFAULTS, **tune}
    for key in ("n_trials", "seed", "split_seed"):
        try:
            cfg[key] = int(cfg[key])
        except (TypeError, ValueError):
            raise ConfigError(f"params.yaml: tune.{key} must be an integer, got {cfg[key]!r}") from None
    if cfg["n_trials"] < 1:
        raise ConfigError(f"params.yaml: tune.n_trials must be >= 1, got {cfg['n_trials']}")
    return cfg


def _ensemble_cfg(params: dict) -> tuple[list[str], dict[str, float]]:
    ens = params.get("ensemble")
    if not isinstance(ens, dict) or not ens.get("variants"):
        raise ConfigError("params.yaml: missing section 'ensemble' with a non-empty list 'variants'")
    variants = ens["variants"]
    if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
        raise ConfigError("params.yaml: ensemble.variants must be a list of variant names")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"params.yaml: ensemble.variants lists a variant twice: {variants}")
    hand = ens.get("hand_weights") or {}
    if not isinstance(hand, dict):
        raise ConfigError("params.yaml: ensemble.hand_weights must map variant names to weights")
    try:
        hand = {str(k): float(v) for k, v in hand.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"params.yaml: ensemble.hand_weights must hold numbers, got {hand}") from None
    if any(not np.isfinite(v) or v < 0 for v in hand.values()):
        raise ConfigError(f"params.yaml: ensemble.hand_weights must be non-negative, got {hand}")
    return variants, hand


def _member_runs(params: dict, variants: list[str]) -> dict[int, list[tuple[str, str]]]:
    """``{fold: [(variant, run key), ...]}`` in ``ensemble.variants`` order."""
    runs = params.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("params.yaml: missing section 'runs' (one entry per training run)")
    defined = params.get("variants")
    for v in variants:
        if isinstance(defined, dict) and v not in defined:
            raise ConfigError(f"params.yaml: ensemble.variants names unknown variant '{v}' (not under 'variants:')")
    found: dict[int, dict[str, str]] = {}
    for key, run in runs.items():
        if not isinstance(run, dict) or "variant" not in run or "fold" not in run:
            raise ConfigError(f"params.yaml: runs.{key} must be a mapping with 'variant' and 'fold'")
        try:
            fold = int(run["fold"])
        except (TypeError, ValueError):
            raise ConfigError(f"params.yaml: runs.{key}.fold must be an integer, got {run['fold']!r}") from None
        if run["variant"] in variants:
            found.setdefault(fold, {})[run["variant"]] = str(key)
    for v in variants:
        if not any(v in f for f in found.values()):
            raise ConfigError(f"params.yaml: ensemble.variants names unknown variant '{v}' (no training run in 'runs:')")
    return {k: [(v, found[k][v]) for v in variants if v in found[k]] for k in sorted(found)}


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _load_fold(fold: int, members: list[tuple[str, str]], models_dir: Path, table: Path, root: Path):
    """``(ids, preds (M, N, 300, 1259) float16, targets (N, 300, 1259) float32, checkpoints)``."""
    from speedstructure.dataio import VP_SHAPE, ZipSamples
    from speedstructure.train import BEST_NAME, VAL_PREDS_NAME, load_val_preds, read_folds_table

    _, val_rows = read_folds_table(table, fold, root)
    ids = [sid for sid, _ in val_rows]
    targets = np.empty((len(ids), *VP_SHAPE), np.float32)
    by_zip: dict[str, list[int]] = {}
    for i, (_, z) in enumerate(val_rows):
        by_zip.setdefault(z, []).append(i)
    for z, rows in by_zip.items():
        with ZipSamples(z) as zs:
            for i in rows:
                targets[i] = zs.read_target(ids[i])
    preds = np.empty((len(members), *targets.shape), np.float16)
    checkpoints = []
    first: tuple[Path, set[str]] | None = None
    for k, (variant, key) in enumerate(members):
        run_dir = models_dir / variant / f"fold_{fold}"
        path, ckpt = run_dir / VAL_PREDS_NAME, run_dir / BEST_NAME
        made_by = (f"it is written by the training run '{key}' in params.yaml runs: "
                   f"(speedstructure train --variant {variant} --fold {fold})")
        for f in (path, ckpt):
            if not f.is_file():
                raise UserError(f"{f}: not found; {made_by}")
        try:
            got_ids, arr = load_val_preds(path)
        except Exception as exc:  # numpy raises several types for bad archives
            raise DataError(f"{path}: not a readable val_preds archive ({exc})") from exc
        got = set(got_ids)
        if first is not None and got != first[1]:
            raise DataError(f"{path}: holds other sample ids than {first[0]} "
                            f"({len(got - first[1])} extra, {len(first[1] - got)} missing)")
        first = first or (path, got)
        if got != set(ids) or len(got_ids) != len(ids):
            missing, extra = sorted(set(ids) - got), sorted(got - set(ids))
            raise DataError(f"{path}: sample ids differ from the validation ids of fold {fold} in {table} "
                            f"(missing: {', '.join(missing[:3]) or '-'}; extra: {', '.join(extra[:3]) or '-'})")
        if arr.shape[1:] != targets.shape[1:]:
            raise DataError(f"{path}: predictions of shape {arr.shape[1:]}, targets {targets.shape[1:]}")
        pos = {sid: i for i, sid in enumerate(got_ids)}
        preds[k] = arr[[pos[sid] for sid in ids]]
        if not np.isfinite(preds[k]).all():
            raise DataError(f"{path}: predictions contain non-finite values")
        checkpoints.append(_rel(ckpt, root))
    return ids, preds, targets, checkpoints


def _trial_history(study) -> list[tuple[int, float, int]]:
    """``[(trial number, value, completion time in ms)]`` of the completed trials."""
    if study is None:
        return []
    out = []
    for t in _complete(study):
        ts = int(t.datetime_complete.timestamp() * 1000) if t.datetime_complete else 0
        out.append((t.number, float(t.value), ts))
    return out


def run_tune(params: dict, root: Path | None = None, *, track: bool = True, n_trials: int | None = None) -> dict:
    """Tune the ensemble weights of every fold; writes the stage's files (see module doc).

    Returns ``{"ensemble": ..., "metrics": ..., "files": {...}}``.  ``track``
    logs to MLflow through :mod:`speedstructure.tracking`; ``n_trials``
    overrides ``tune.n_trials``.
    """
    root = Path(root) if root is not None else project_root()
    cfg = _cfg(params)
    if n_trials is not None:
        if int(n_trials) < 1:
            raise UserError(f"--n-trials must be >= 1, got {n_trials}")
        cfg["n_trials"] = int(n_trials)
    variants, hand = _ensemble_cfg(params)
    folds = _member_runs(params, variants)
    train = params.get("train") or {}
    folds_cfg = params.get("folds") or {}
    table = resolve_path(folds_cfg.get("table") or train.get("folds_table") or "folds/folds.csv", root)
    models_dir = resolve_path(train.get("models_dir") or "models", root)
    storage = cfg["storage"]
    if storage and "://" not in str(storage):
        storage = resolve_path(storage, root)

    fold_entries, fold_metrics, histories = [], {}, {}
    for fold, members in folds.items():
        names = [v for v, _ in members]
        ids, preds, targets, checkpoints = _load_fold(fold, members, models_dir, table, root)
        scorer = Scorer(preds, targets)
        del preds, targets
        if scorer.n_samples < 2:
            raise TuneError(f"fold {fold} of {table} has {scorer.n_samples} validation sample(s); tuning needs >= 2")
        report = split_half_report(scorer, None, names, hand, n_trials=cfg["n_trials"], seed=cfg["seed"],
                                   split_seed=cfg["split_seed"])
        weights, study = fit_weights(scorer, n_trials=cfg["n_trials"], seed=cfg["seed"], storage=storage,
                                     study_name=f"{cfg['study_prefix']}-fold{fold}", names=names, restart_stale=True)
        member_mape = scorer.member_mapes()
        val_mape = scorer(weights)
        histories[fold] = _trial_history(study)
        fold_entries.append({
            "fold": fold,
            "members": [{"variant": v, "checkpoint": c, "weight": float(w), "val_mape": float(mm)}
                        for v, c, w, mm in zip(names, checkpoints, weights, member_mape)],
            "val_mape": val_mape,
            "heldout": report["heldout"],
            "n_val": scorer.n_samples,
            "split_half": [{"tuned_on": len(h["tune_idx"]), "scored_on": len(h["heldout_idx"]),
                            "best_single": h["best_single"], "tuned_weights": h["tuned_weights"]}
                           for h in report["halves"]],
        })
        fold_metrics[f"fold{fold}"] = {**report["heldout"], "val_mape": val_mape, "n_val": scorer.n_samples}
        del scorer

    cv_mape = float(np.mean([f["heldout"]["tuned"] for f in fold_entries]))
    ensemble = {"format": FORMAT, "folds": fold_entries, "cv_mape": cv_mape, "variants": list(variants)}
    strategies = [s for s in STRATEGIES if all(s in f["heldout"] for f in fold_entries)]
    metrics = {
        "cv_mape": cv_mape,
        "heldout": {s: float(np.mean([f["heldout"][s] for f in fold_entries])) for s in strategies},
        "folds": fold_metrics,
        "n_trials": cfg["n_trials"],
    }
    files = {name: root / rel for name, rel in (("ensemble", ENSEMBLE_FILE), ("metrics", METRICS_FILE),
                                                  ("weights_csv", WEIGHTS_CSV), ("heldout_png", HELDOUT_PNG))}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(files["ensemble"], (json.dumps(ensemble, indent=2) + "\n").encode())
    atomic_write_bytes(files["metrics"], (json.dumps(metrics, indent=2) + "\n").encode())
    rows = ["fold,variant,weight"] + [f"{f['fold']},{m['variant']},{m['weight']:.6f}"
                                      for f in fold_entries for m in f["members"]]
    atomic_write_bytes(files["weights_csv"], ("\n".join(rows) + "\n").encode())
    _plot_heldout(fold_entries, strategies, files["heldout_png"])
    if track:
        _log_mlflow(ensemble, metrics, histories, files, cfg, params, root)
    return {"ensemble": ensemble, "metrics": metrics, "files": files}


# --------------------------------------------------------------------------- outputs


def _plot_heldout(fold_entries: list[dict], strategies: list[str], path: Path) -> None:
    """Grouped bars: held-out MAPE of each strategy, per fold and the mean over folds."""
    from matplotlib.figure import Figure

    from speedstructure.plots import save_figure

    groups = [f"fold {f['fold']}" for f in fold_entries] + ["mean"]
    values = {s: [f["heldout"][s] for f in fold_entries] for s in strategies}
    for s in strategies:
        values[s].append(float(np.mean(values[s])))
    fig = Figure(figsize=(1.6 + 1.4 * len(groups), 4.2), layout="tight")
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(strategies))
    for i, s in enumerate(strategies):
        bars = ax.bar(x + (i - (len(strategies) - 1) / 2) * width, values[s], width, label=s)
        ax.bar_label(bars, fmt="%.4f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, groups)
    ax.set_ylabel("held-out MAPE (split-half)")
    ax.set_title("Ensemble weighting strategies")
    top = max(max(v) for v in values.values())
    ax.set_ylim(0, 1.35 * top if top > 0 else 1)
    ax.legend(fontsize=8, loc="upper center", ncols=len(strategies), frameon=False)
    save_figure(fig, path)


def _log_mlflow(ensemble: dict, metrics: dict, histories: dict[int, list], files: dict[str, Path],
                cfg: dict[str, Any], params: dict[str, Any], root: Path) -> None:
    """Parent run ``tune`` (artifacts, cv_mape) with one nested run ``tune-fold<k>`` per fold."""
    import mlflow

    from speedstructure import tracking
    from mlflow.entities import Metric

    n_trials = cfg["n_trials"]
    run_params = {"variants": ",".join(ensemble["variants"]), **{k: cfg[k] for k in TUNE_DEFAULTS}}
    with tracking.start_run("tune", tags={"stage": "tune", "dvc_stage": "tune"}, params=run_params,
                            project_params=params, root=root):
        for f in ensemble["folds"]:
            k = f["fold"]
            members = [m["variant"] for m in f["members"]]
            with tracking.start_run(f"tune-fold{k}", tags={"stage": "tune", "fold": str(k)}, nested=True,
                                    params={"members": ",".join(members), "n_trials": n_trials, "fold": k}):
                run_id = mlflow.active_run().info.run_id
                trial_metrics = [Metric("trial_mape", v, ts, n) for n, v, ts in histories.get(k, [])]
                client = mlflow.MlflowClient()
                for s in range(0, len(trial_metrics), 1000):
                    client.log_batch(run_id, metrics=trial_metrics[s:s + 1000])
                mlflow.log_metrics({f"weight_{m['variant']}": m["weight"] for m in f["members"]})
                mlflow.log_metrics({f"heldout_{s}": v for s, v in f["heldout"].items()})
                mlflow.log_metrics({"val_mape": f["val_mape"], "n_val": f["n_val"]})
        mlflow.log_metrics({"cv_mape": ensemble["cv_mape"],
                            **{f"heldout_{s}": v for s, v in metrics["heldout"].items()}})
        for key in ("ensemble", "metrics", "weights_csv", "heldout_png"):
            mlflow.log_artifact(str(files[key]), artifact_path="tune")


# --------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="tune ensemble weights per fold with Optuna",
        description="Tune the weights of the ensemble members (params.yaml ensemble.variants) on each fold's "
                    "validation predictions; report split-half held-out MAPE; write ensemble/ensemble.json.",
    )
    p.add_argument("--n-trials", type=int, default=None, help="override tune.n_trials")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from speedstructure.config import load_params

    root = project_root()
    res = run_tune(load_params(), root, track=not args.no_mlflow, n_trials=args.n_trials)
    ens = res["ensemble"]
    for f in ens["folds"]:
        weights = ", ".join(f"{m['variant']}={m['weight']:.3f}" for m in f["members"])
        held = ", ".join(f"{s} {v:.5f}" for s, v in f["heldout"].items())
        print(f"fold {f['fold']} ({f['n_val']} val): {weights}; held-out MAPE: {held}")
    print(f"cv MAPE (held-out, tuned): {ens['cv_mape']:.5f}; wrote {_rel(res['files']['ensemble'], root)}, "
          f"{_rel(res['files']['metrics'], root)}")
    return 0
