"""Training engine and the ``train`` subcommand.

One model variant is trained on one fold:

* loss = MAPE (mean ``|y - p| / |y|``, the challenge metric);
* one optimizer object (:class:`MuonAdamW`): ``torch.optim.Muon`` on the 2-D
  weight matrices of the transformer blocks (``model.muon_param_names``) and
  ``AdamW`` on every other parameter;
* learning rate: cosine annealing with warm restarts (period ``T_0`` optimizer
  steps, floor ``min_lr``) for ``cosine_epochs`` epochs, then constant at
  ``const_factor x lr``; stepped once per optimizer step;
* gradient clipping, real gradient accumulation, mixed precision
  (``amp: none | bf16 | fp16``), EMA of the weights (timm ``ModelEmaV3``);
  the EMA model is what is validated and saved;
* physically consistent horizontal flip as augmentation;
* validation each epoch, early stopping and best checkpoint on validation MAPE;
* resumable: ``last.pt`` holds everything needed to continue (written
  atomically at each epoch end); running the same command again continues;
* distributed data parallel under ``torchrun`` (gloo on CPU, nccl on CUDA).

The ``depth_trend`` baseline has no gradient-trained parameters: it is fitted
on the training targets, validated and saved, without an optimizer.

Files written into the output directory (rank 0 only)::

    best.pt          {"model": EMA state_dict, "variant": variant cfg, "epoch", "val_mape", ...}
    last.pt          full training state for resuming
    val_preds.npz    float16 (300, 1259) prediction of the best model per validation sample id
    metrics.json     best_val_mape, best_epoch, epochs, seconds, ...
    history.csv      one row per epoch: epoch, train_loss, val_mape, lr, seconds
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from speedstructure.config import deep_merge, project_root, resolve_path
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_write_bytes

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
VAL_PREDS_NAME = "val_preds.npz"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.csv"
CHECKPOINT_FORMAT = 1

# Built-in defaults, overridden by params.yaml's `train:` section and then by the
# variant's own `train:` sub-dict.
DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 2,
    "val_batch_size": 2,
    "lr": 1e-4,
    "muon_lr": None,
    "muon_adjust_lr": "match_rms_adamw",
    "weight_decay": 0.01,
    "momentum": 0.95,
    "nesterov": True,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "clip": 3.0,
    "accum_steps": 1,
    "amp": "none",
    "ema_decay": 0.99,
    "T_0": 100,
    "min_lr": 5e-5,
    "cosine_epochs": 25,
    "const_factor": 0.02,
    "flip_prob": 0.5,
    "patience": 5,
    "seed": 42,
    "num_workers": 0,
    "tta_val": False,
    "device": "auto",
    "progress": True,
    "ddp_find_unused": False,
    "grad_checkpointing": False,
    "folds_table": "folds/folds.csv",
    "models_dir": "models",
}

# Keys that may change between a run and its resumption without invalidating it.
_RESUME_FREE_KEYS = {
    "epochs", "num_workers", "device", "progress", "val_batch_size", "patience", "tta_val",
    "folds_table", "models_dir", "grad_checkpointing",
}


# --------------------------------------------------------------------------- data


class SampleDataset(Dataset):
    """Samples named by ``(sample_id, source)`` rows, read from a challenge zip or the
    ingested sample store (:func:`speedstructure.ingest.open_samples`).

    ``ds[i]`` is ``(x, y, i)``: gathers float32 ``(5, 10001, 31)``, target float32
    ``(300, 1259)`` and the index (``ds.sample_id(i)`` gives the id).  Zip
    handles are opened lazily, one per zip and per process (DataLoader workers
    each open their own).
    """

    def __init__(self, rows: Iterable[tuple[str, str | os.PathLike]]):
        self.rows: list[tuple[str, str]] = [(str(sid), str(z)) for sid, z in rows]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_ids(self) -> list[str]:
        return [sid for sid, _ in self.rows]

    def sample_id(self, index: int) -> str:
        return self.rows[int(index)][0]

    def _zip(self, path: str):
        from speedstructure.ingest import open_samples

        if self._pid != os.getpid():  # forked into a worker: never share handles
            self._handles = {}
            self._pid = os.getpid()
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = open_samples(path)
        return h

    def target(self, index: int) -> np.ndarray:
        """The target alone (no gathers read): float32 (300, 1259)."""
        sid, path = self.rows[int(index)]
        return self._zip(path).read_target(sid)

    def __getitem__(self, index: int):
        from speedstructure.errors import DataError

        sid, path = self.rows[int(index)]
        x, y = self._zip(path).read(sid)
        if y is None:
            raise DataError(f"{path}: sample '{sid}' has no target (a test zip cannot be used for training)")
        return torch.from_numpy(x), torch.from_numpy(y), int(index)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def read_folds_table(path: str | os.PathLike, fold: int, root: Path | None = None):
    """``(train_rows, val_rows)`` of ``(sample_id, zip_path)`` for validation fold ``fold``.

    Training = rows whose fold differs from ``fold`` (extended samples, fold -1,
    are always trained on); validation = rows with fold == ``fold``.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: fold table not found (run the folds stage first)")
    try:
        df = pd.read_csv(path, dtype={"sample_id": str, "zip": str})
    except Exception as exc:  # pandas raises many types
        raise UserError(f"{path}: not a readable CSV fold table ({exc})") from exc
    missing = [c for c in ("sample_id", "zip", "fold") if c not in df.columns]
    if missing:
        raise UserError(f"{path}: fold table lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
    if df.empty:
        raise UserError(f"{path}: fold table has no rows")
    if df[["sample_id", "zip", "fold"]].isna().any().any():
        raise UserError(f"{path}: fold table has empty cells")
    folds = pd.to_numeric(df["fold"], errors="coerce")
    if folds.isna().any() or (folds != folds.round()).any():
        raise UserError(f"{path}: column 'fold' must hold integers")
    df["fold"] = folds.astype(int)
    if (df["fold"] < -1).any():
        raise UserError(f"{path}: fold values must be >= -1 (-1 = extended sample)")
    dup = df["sample_id"][df["sample_id"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: sample id '{dup.iloc[0]}' appears more than once")
    known = sorted(int(f) for f in df["fold"].unique() if f >= 0)
    if int(fold) not in known:
        raise UserError(f"{path}: unknown fold {fold}; the table has folds {known}")
    root = root or project_root()
    zips = {z: str(resolve_path(z, root)) for z in df["zip"].unique()}
    for z, full in zips.items():
        if not Path(full).is_file():
            raise UserError(f"{path}: zip '{z}' not found ({full})")
    rows = [(sid, zips[z], f) for sid, z, f in zip(df["sample_id"], df["zip"], df["fold"])]
    train_rows = [(s, z) for s, z, f in rows if f != fold]
    val_rows = [(s, z) for s, z, f in rows if f == fold]
    if not train_rows:
        raise UserError(f"{path}: fold {fold} leaves no training samples")
    return train_rows, val_rows


def _rows_in_store(store: Path, table: Path, *row_lists):
    """The rows re-pointed at the sample store; an error names the first missing sample."""
    from speedstructure.ingest import StoreSamples

    known = set(StoreSamples(store).sample_ids)
    out = []
    for rows in row_lists:
        for sid, _ in rows:
            if sid not in known:
                raise UserError(f"{table}: sample '{sid}' is not in the store {store} (rerun the ingest stage)")
        out.append([(sid, str(store)) for sid, _ in rows])
    return out


# --------------------------------------------------------------------------- optimizer


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some parameters and ``AdamW`` on the rest, as one optimizer.

    ``param_groups`` and ``state`` are shared with the two inner optimizers, so
    LR schedulers, ``GradScaler``, ``zero_grad`` and ``state_dict`` /
    ``load_state_dict`` treat it as one.  Group ``"kind"`` tells which is which.
    """

    def __init__(
        self,
        muon_params: Sequence[nn.Parameter],
        adamw_params: Sequence[nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: Sequence[float] = (0.9, 0.95),
        eps: float = 1e-8,
        muon_lr: float | None = None,
        muon_adjust_lr: str | None = "match_rms_adamw",
    ):
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        self.muon: torch.optim.Optimizer | None = None
        self.adamw: torch.optim.Optimizer | None = None
        groups: list[dict] = []
        if muon_params:
            self.muon = torch.optim.Muon(
                muon_params,
                lr=float(muon_lr if muon_lr is not None else lr),
                weight_decay=float(weight_decay),
                momentum=float(momentum),
                nesterov=bool(nesterov),
                adjust_lr_fn=muon_adjust_lr,
            )
            self.muon.param_groups[0]["kind"] = "muon"
            groups += self.muon.param_groups
        if adamw_params:
            self.adamw = torch.optim.AdamW(
                adamw_params, lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps),
                weight_decay=float(weight_decay),
            )
            self.adamw.param_groups[0]["kind"] = "adamw"
            groups += self.adamw.param_groups
        if not groups:
            raise ValueError("MuonAdamW: no parameters to optimize")
        # The group dicts are added by identity: the inner optimizers see every change.
        super().__init__(groups, {})
        self._link()

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    def _link(self) -> None:
        i = 0
        for opt in self._inner():
            n = len(opt.param_groups)
            opt.param_groups = self.param_groups[i : i + n]
            opt.state = self.state  # parameters are disjoint: one shared state mapping
            i += n

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner():
            opt.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # the base class rebuilt param_groups and state


def build_optimizer(model: nn.Module, cfg: dict, muon_names: set[str] | None = None) -> MuonAdamW:
    """:class:`MuonAdamW` with Muon on ``muon_names`` (default: ``model.muon_param_names``)."""
    if muon_names is None:
        muon_names = _muon_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = set(muon_names) - {n for n, _ in named}
    if unknown:
        raise ValueError(f"muon_param_names lists unknown parameters: {sorted(unknown)[:5]}")
    muon = [p for n, p in named if n in muon_names]
    rest = [p for n, p in named if n not in muon_names]
    return MuonAdamW(
        muon, rest, lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=cfg["momentum"],
        nesterov=cfg.get("nesterov", True), betas=cfg["betas"], eps=cfg.get("eps", 1e-8),
        muon_lr=cfg.get("muon_lr"), muon_adjust_lr=cfg.get("muon_adjust_lr", "match_rms_adamw"),
    )


def _muon_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "muon_param_names", None)
    if callable(fn):  # a stand-in model may carry its own
        return set(fn())
    try:
        from speedstructure.model import muon_param_names
    except ImportError:
        return set()
    return set(muon_param_names(model))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int):
    """Cosine annealing with warm restarts (period ``T_0`` steps, floor ``min_lr``; ``T_0: null``
    = one period over the whole cosine phase) for ``cosine_epochs`` epochs, then constant
    ``const_factor x lr``.  Step once per optimizer step."""
    from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, SequentialLR

    factor = float(cfg["const_factor"])
    constant = LambdaLR(optimizer, lambda _step: factor)
    cos_steps = int(cfg["cosine_epochs"]) * int(steps_per_epoch)
    if cos_steps <= 0:
        return constant
    period = int(cfg["T_0"]) if cfg.get("T_0") else cos_steps  # null: one half-cosine over the phase
    cosine = CosineAnnealingWarmRestarts(optimizer, T_0=max(1, period), eta_min=float(cfg["min_lr"]))
    return SequentialLR(optimizer, [cosine, constant], milestones=[cos_steps])


# --------------------------------------------------------------------------- helpers


def mape_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute percentage error over all cells and samples (the metric)."""
    return per_sample_mape(pred, target).mean()


def per_sample_mape(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    err = (target - pred).abs() / (target.abs() + 1e-8)
    return err.flatten(1).mean(1)


@dataclass
class TrainResult:
    history: list[dict]
    best_val_mape: float
    best_epoch: int
    epochs_run: int
    seconds: float
    best_path: Path
    last_path: Path
    val_pred: np.ndarray | None = None  # float16 (N, 300, 1259), best EMA model on val_ds
    val_ids: list[str] = field(default_factory=list)
    stop_reason: str = ""


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _setup_distributed(device_req: str | None) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device_req, local if world > 1 else None)
    d = _Dist(rank=rank, world=world, local_rank=local)
    if world > 1 and "RANK" in os.environ:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            d.owns_group = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    else:
        d.world, d.rank = 1, 0
    return d, dev


def _pick_device(req: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    req = "auto" if req is None else str(req)
    if req == "auto":
        req = "cuda" if torch.cuda.is_available() else "cpu"
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but CUDA is not available")
        if req == "cuda" and local_rank is not None:
            req = f"cuda:{local_rank}"
    elif req != "cpu":
        raise UserError(f"unknown device '{req}' (use cpu, cuda or auto)")
    return torch.device(req)


def _amp(cfg: dict, device: torch.device):
    amp = str(cfg.get("amp", "none") or "none").lower()
    if amp not in ("none", "bf16", "fp16"):
        raise UserError(f"train.amp must be none, bf16 or fp16, got '{amp}'")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp fp16 needs CUDA (use bf16 or none on CPU)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return amp, dtype


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_val_preds(path: Path, ids: Sequence[str], preds: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{sid: p.astype(np.float16) for sid, p in zip(ids, preds)})
    atomic_write_bytes(path, buf.getvalue())


def load_val_preds(path: Path) -> tuple[list[str], np.ndarray]:
    with np.load(path) as z:
        ids = list(z.files)
        arr = np.stack([z[k] for k in ids]) if ids else np.zeros((0, 300, 1259), np.float16)
    return ids, arr


def _write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    cols = ["epoch", "train_loss", "val_mape", "lr", "seconds"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


def _fingerprint(cfg: dict, variant_cfg: dict | None, train_ds, world: int) -> dict:
    """What a saved state must match to be resumed: settings, training samples, world size."""
    import hashlib

    t = {k: v for k, v in cfg.items() if k not in _RESUME_FREE_KEYS}
    v = {k: val for k, val in (variant_cfg or {}).items() if k != "train"}
    ids = getattr(train_ds, "sample_ids", None)
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16] if ids is not None else ""
    return {"train": t, "variant": v, "n_train": len(train_ds), "train_ids": digest, "world_size": int(world)}


def _load_state(last_path: Path, fp: dict, out_dir: Path, restart_on_change: bool, dd) -> dict | None:
    """The saved state of ``last_path`` if it matches ``fp``; None if there is none.

    A state written with other settings or data is an error, or, with
    ``restart_on_change`` (how the DVC stages run), is discarded with the outputs
    derived from it, and training starts afresh.
    """
    if not last_path.is_file():
        return None
    st = torch.load(last_path, map_location="cpu", weights_only=True)
    diff = _diff_keys(st.get("fingerprint", {}), fp)
    if not diff:
        return st
    if not restart_on_change:
        raise UserError(
            f"{last_path}: written with different settings ({', '.join(diff[:8])}); "
            f"remove {out_dir} or choose another output directory"
        )
    _log(dd, f"{last_path}: settings or data changed ({', '.join(diff[:8])}); starting afresh")
    if dd.main:
        for name in (LAST_NAME, BEST_NAME, VAL_PREDS_NAME, METRICS_NAME, HISTORY_NAME):
            (out_dir / name).unlink(missing_ok=True)
    if dd.active:
        dist.barrier()
    return None


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
            out.append(f"{prefix}{k}")
    return out


def _flip_batch(x: torch.Tensor, y: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistent flip (receivers mirrored, source order reversed; target mirrored in x)
    of each sample with probability ``prob``."""
    if prob <= 0:
        return x, y
    mask = torch.rand(x.shape[0]) < prob
    if not bool(mask.any()):
        return x, y
    from speedstructure.model import flip_inputs, flip_target

    idx = mask.nonzero().flatten().to(x.device)
    x, y = x.clone(), y.clone()
    x[idx] = flip_inputs(x[idx], mode="consistent")
    y[idx] = flip_target(y[idx])
    return x, y


def _predict(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    pred_fn = getattr(model, "predict", None)
    if callable(pred_fn):
        return pred_fn(x, tta=tta)
    return model(x)


def is_baseline(model: nn.Module) -> bool:
    """A model fitted in closed form (``fit(targets)``) with no trainable parameters."""
    if getattr(model, "requires_training", True) is False:
        return True
    return callable(getattr(model, "fit", None)) and not any(p.requires_grad for p in model.parameters())


def _loader(ds, batch_size: int, *, sampler=None, num_workers: int = 0, device: torch.device) -> DataLoader:
    return DataLoader(
        ds, batch_size=int(batch_size), sampler=sampler, shuffle=False, num_workers=int(num_workers),
        pin_memory=device.type == "cuda", drop_last=False,
        persistent_workers=False,
    )


@torch.no_grad()
def _validate(model, val_ds, cfg, device, amp_dtype, dd: _Dist, progress: bool = False) -> float:
    """Mean per-sample MAPE of ``model`` over ``val_ds`` (sharded across ranks, then reduced)."""
    if val_ds is None or len(val_ds) == 0:
        return float("nan")
    model.eval()
    idx = list(range(dd.rank, len(val_ds), dd.world))
    loader = _loader(Subset(val_ds, idx), cfg["val_batch_size"], num_workers=cfg["num_workers"], device=device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in _tqdm(loader, "val", enabled=progress and dd.main, leave=False):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            p = _predict(model, x, bool(cfg.get("tta_val", False)))
        m = per_sample_mape(p, y)
        total[0] += m.double().sum()
        total[1] += m.numel()
    if dd.active:
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def predict_dataset(model, ds, cfg, device, amp_dtype=None, progress: bool = False) -> np.ndarray:
    """float16 ``(N, 300, 1259)`` predictions of ``model`` on every sample of ``ds``."""
    model.eval()
    out = []
    loader = _loader(ds, cfg["val_batch_size"], num_workers=cfg["num_workers"], device=device)
    for batch in _tqdm(loader, "predict val", enabled=progress, leave=False):
        with _autocast(device, amp_dtype):
            p = _predict(model, batch[0].to(device), bool(cfg.get("tta_val", False)))
        out.append(p.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out) if out else np.zeros((0, 300, 1259), np.float16)


def _tqdm(it, desc: str, *, enabled: bool, leave: bool = True, total: int | None = None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=leave, total=total, dynamic_ncols=True, file=sys.stderr)


def _log(dd: _Dist, msg: str) -> None:
    if dd.main:
        print(msg, file=sys.stderr, flush=True)


def _to_plain(obj):
    """YAML-ish config made safe for ``torch.load(weights_only=True)`` (tuples -> lists)."""
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- engine


def train_config(params: dict, variant_cfg: dict | None = None) -> dict:
    """Built-in defaults <- params['train'] <- variant['train']."""
    cfg = deep_merge(DEFAULTS, params.get("train") or {})
    return deep_merge(cfg, (variant_cfg or {}).get("train") or {})


def train_model(
    model: nn.Module,
    train_ds,
    val_ds,
    cfg: dict,
    out_dir: Path,
    *,
    on_epoch_end: Callable[[dict], None] | None = None,
    device: str | torch.device | None = None,
    variant_cfg: dict | None = None,
    meta: dict | None = None,
    restart_on_change: bool = False,
) -> TrainResult:
    """Train ``model`` on ``train_ds``, validate on ``val_ds``; write checkpoints into ``out_dir``.

    A ``last.pt`` written with other settings or training samples is an error,
    or with ``restart_on_change`` is discarded and training starts afresh.

    ``cfg`` is the merged training configuration (see :func:`train_config`);
    ``variant_cfg`` is stored in ``best.pt`` so the model can be rebuilt.
    Resumes from ``out_dir/last.pt`` when present.  Under ``torchrun`` the
    data is sharded across ranks and only rank 0 writes files; the returned
    ``val_pred`` is ``None`` on other ranks.
    """
    cfg = deep_merge(DEFAULTS, cfg)
    if variant_cfg is None:  # build_model records the resolved variant on the model
        variant_cfg = getattr(model, "variant_cfg", None)
    out_dir = Path(out_dir)
    dd, dev = _setup_distributed(device if device is not None else cfg.get("device"))
    try:
        if dd.main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if is_baseline(model):
            return _fit_baseline(model, train_ds, val_ds, cfg, out_dir, dd, dev, on_epoch_end, variant_cfg, meta,
                                 restart_on_change)
        return _train_loop(model, train_ds, val_ds, cfg, out_dir, dd, dev, on_epoch_end, variant_cfg, meta,
                           restart_on_change)
    finally:
        if dd.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _best_ckpt(state_dict, variant_cfg, cfg, epoch, val_mape, meta) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "variant": _to_plain(variant_cfg or {}),
        "train": _to_plain(cfg),
        "epoch": int(epoch),
        "val_mape": float(val_mape),
        "meta": _to_plain(meta or {}),
    }


def _finish(model_for_preds, val_ds, cfg, out_dir, dd, dev, amp_dtype, history, best, best_epoch,
            epochs_run, seconds, stop_reason) -> TrainResult:
    best_path, last_path = out_dir / BEST_NAME, out_dir / LAST_NAME
    res = TrainResult(history=history, best_val_mape=best, best_epoch=best_epoch, epochs_run=epochs_run,
                      seconds=seconds, best_path=best_path, last_path=last_path, stop_reason=stop_reason)
    if not dd.main:
        return res
    preds_path = out_dir / VAL_PREDS_NAME
    ids = list(val_ds.sample_ids) if val_ds is not None else []
    if preds_path.is_file():
        pids, arr = load_val_preds(preds_path)
        if pids == ids:
            res.val_ids, res.val_pred = pids, arr
    if res.val_pred is None:
        if best_path.is_file() and val_ds is not None and len(val_ds):
            ck = torch.load(best_path, map_location="cpu", weights_only=True)
            model_for_preds.load_state_dict(ck["model"])
            model_for_preds.to(dev)
            res.val_pred = predict_dataset(model_for_preds, val_ds, cfg, dev, amp_dtype, progress=bool(cfg["progress"]))
        else:
            res.val_pred = np.zeros((0, 300, 1259), np.float16)
        res.val_ids = ids
        save_val_preds(preds_path, ids, res.val_pred)
    _write_history(out_dir / HISTORY_NAME, history)
    metrics = {
        "best_val_mape": best, "best_epoch": best_epoch, "epochs": epochs_run,
        "seconds": round(seconds, 3), "stop_reason": stop_reason, "n_val": len(ids),
    }
    atomic_write_bytes(out_dir / METRICS_NAME, (json.dumps(metrics, indent=2) + "\n").encode())
    return res


def _targets(ds):
    """The training targets one by one (without reading the gathers where the dataset can)."""
    return (ds.target(i) if hasattr(ds, "target") else ds[i][1] for i in range(len(ds)))


def _fit_baseline(model, train_ds, val_ds, cfg, out_dir, dd, dev, on_epoch_end, variant_cfg, meta,
                  restart_on_change=False) -> TrainResult:
    last_path = out_dir / LAST_NAME
    fp = _to_plain(_fingerprint(cfg, variant_cfg, train_ds, dd.world))
    st = _load_state(last_path, fp, out_dir, restart_on_change, dd)
    if st is not None:
        if st.get("finished"):
            _log(dd, f"{out_dir}: already fitted (val MAPE {st['best_val_mape']:.5f}); nothing to do")
            model.load_state_dict(st["model"])
            return _finish(model, val_ds, cfg, out_dir, dd, dev, None, st["history"], st["best_val_mape"],
                           st["best_epoch"], st["epoch"], st["seconds"], st.get("stop_reason", "fitted"))
    t0 = time.time()
    seed_everything(int(cfg["seed"]))
    model.fit(_tqdm(_targets(train_ds), "fit", enabled=bool(cfg["progress"]) and dd.main, total=len(train_ds)))
    model.to(dev)
    val = _validate(model, val_ds, cfg, dev, None, dd, progress=bool(cfg["progress"]))
    secs = time.time() - t0
    row = {"epoch": 1, "train_loss": float("nan"), "val_mape": val, "lr": 0.0, "seconds": secs}
    history = [row]
    if dd.main:
        if on_epoch_end is not None:
            on_epoch_end(dict(row))
        _atomic_torch_save(_best_ckpt(model.state_dict(), variant_cfg, cfg, 1, val, meta), out_dir / BEST_NAME)
        _atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "epoch": 1, "best_val_mape": val, "best_epoch": 1, "history": history, "seconds": secs,
            "finished": True, "stop_reason": "fitted", "fingerprint": fp,
        }, last_path)
        _log(dd, f"depth_trend fitted on {len(train_ds)} targets: val MAPE {val:.5f}")
    return _finish(model, val_ds, cfg, out_dir, dd, dev, None, history, val, 1, 1, secs, "fitted")


def _train_loop(model, train_ds, val_ds, cfg, out_dir, dd, dev, on_epoch_end, variant_cfg, meta,
                restart_on_change=False) -> TrainResult:
    from timm.utils import ModelEmaV3

    epochs = int(cfg["epochs"])
    accum = max(1, int(cfg["accum_steps"]))
    amp, amp_dtype = _amp(cfg, dev)
    progress = bool(cfg["progress"]) and dd.main
    seed = int(cfg["seed"])
    seed_everything(seed + dd.rank)

    if getattr(model, "needs_prior", False):  # before the EMA copy and DDP: every copy gets it
        model.fit_prior(_targets(train_ds))
    if cfg.get("grad_checkpointing"):
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError("train.grad_checkpointing: this model has no transformer blocks to checkpoint")
        model.set_grad_checkpointing(True)
    model.to(dev)
    train_model_ = model
    if dd.active:  # wrapping broadcasts rank 0's weights: every rank (and its EMA) starts equal
        train_model_ = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=bool(cfg["ddp_find_unused"]),
        )
    muon_names = _muon_names(model)
    optimizer = build_optimizer(model, cfg, muon_names)
    sampler = DistributedSampler(train_ds, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=seed, drop_last=False)
    loader = _loader(train_ds, cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"], device=dev)
    n_batches = len(loader)
    steps_per_epoch = math.ceil(n_batches / accum)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    ema = ModelEmaV3(model, decay=float(cfg["ema_decay"]))
    fp = _to_plain(_fingerprint(cfg, variant_cfg, train_ds, dd.world))

    start_epoch, best, best_epoch, bad, history, seconds = 0, float("inf"), 0, 0, [], 0.0
    finished, stop_reason, opt_steps = False, "", 0
    last_path = out_dir / LAST_NAME
    st = _load_state(last_path, fp, out_dir, restart_on_change, dd)
    if st is not None:
        model.load_state_dict(st["model"])
        ema.module.load_state_dict(st["ema"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, best, best_epoch, bad = st["epoch"], st["best_val_mape"], st["best_epoch"], st["bad_epochs"]
        history, seconds, opt_steps = list(st["history"]), float(st["seconds"]), int(st["opt_steps"])
        finished, stop_reason = bool(st.get("finished")), st.get("stop_reason", "")
        rngs = st.get("rng") or []
        if dd.rank < len(rngs):
            _set_rng_state(rngs[dd.rank])
        if finished and stop_reason == "epochs" and epochs > start_epoch:
            finished = False  # more epochs requested than the finished run had
        if finished or start_epoch >= epochs:
            _log(dd, f"{out_dir}: training finished ({stop_reason or 'epochs'}, {start_epoch} epochs, "
                     f"best val MAPE {best:.5f} at epoch {best_epoch}); nothing to do")
            return _finish(ema.module, val_ds, cfg, out_dir, dd, dev, amp_dtype, history, best, best_epoch,
                           start_epoch, seconds, stop_reason or "epochs")
        _log(dd, f"{out_dir}: resuming after epoch {start_epoch}")

    if dd.main:  # predictions of an earlier best model are stale once training goes on
        (out_dir / VAL_PREDS_NAME).unlink(missing_ok=True)
    clip = float(cfg["clip"] or 0)
    flip_prob = float(cfg["flip_prob"] or 0)
    patience = int(cfg["patience"] or 0)

    epoch = start_epoch
    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.time()
        train_model_.train()
        sampler.set_epoch(epoch)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=dev)
        bar = _tqdm(loader, f"epoch {epoch}/{epochs}", enabled=progress, total=n_batches)
        for i, batch in enumerate(bar):
            x = batch[0].to(dev, non_blocking=True)
            y = batch[1].to(dev, non_blocking=True)
            x, y = _flip_batch(x, y, flip_prob)
            group_start = (i // accum) * accum
            group_size = min(accum, n_batches - group_start)
            last_micro = i == group_start + group_size - 1
            sync = contextlib.nullcontext() if (last_micro or not dd.active) else train_model_.no_sync()
            with sync:
                with _autocast(dev, amp_dtype):
                    pred = train_model_(x)
                loss = mape_loss(pred, y)
                if amp != "fp16" and not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss at epoch {epoch}, batch {i}")
                scaler.scale(loss / group_size).backward()
            loss_sum[0] += loss.detach().double() * x.shape[0]
            loss_sum[1] += x.shape[0]
            if last_micro:
                if clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                opt_steps += 1
                ema.update(model, step=opt_steps)
            if progress:
                bar.set_postfix(loss=f"{float(loss_sum[0] / loss_sum[1]):.5f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if dd.active:
            dist.all_reduce(loss_sum)
        train_loss = float(loss_sum[0] / loss_sum[1])
        val = _validate(ema.module, val_ds, cfg, dev, amp_dtype, dd, progress=progress)
        secs = time.time() - t0
        seconds += secs
        row = {"epoch": epoch, "train_loss": train_loss, "val_mape": val,
               "lr": float(optimizer.param_groups[0]["lr"]), "seconds": secs}
        history.append(row)
        improved = math.isfinite(val) and val < best
        if improved:
            best, best_epoch, bad = val, epoch, 0
        elif math.isfinite(val):
            bad += 1
        if not math.isfinite(val) and not (val_ds is not None and len(val_ds)):
            # no validation set: the latest EMA weights are the best we have
            best_epoch = epoch
            improved = True
        if patience > 0 and bad >= patience:
            finished, stop_reason = True, "early_stop"
        elif epoch >= epochs:
            finished, stop_reason = True, "epochs"
        rngs = [_rng_state()]
        if dd.active:
            gathered: list = [None] * dd.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if dd.main:
            if improved:
                _atomic_torch_save(_best_ckpt(ema.module.state_dict(), variant_cfg, cfg, epoch, val, meta),
                                   out_dir / BEST_NAME)
            _atomic_torch_save({
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch, "opt_steps": opt_steps,
                "best_val_mape": best, "best_epoch": best_epoch, "bad_epochs": bad,
                "history": history, "seconds": seconds, "rng": rngs,
                "finished": finished, "stop_reason": stop_reason,
                "fingerprint": fp, "variant": _to_plain(variant_cfg or {}),
            }, last_path)
            _write_history(out_dir / HISTORY_NAME, history)
            _log(dd, f"epoch {epoch}: train MAPE {train_loss:.5f}  val MAPE {val:.5f}  "
                     f"lr {row['lr']:.3g}  {secs:.1f}s" + ("  *best*" if improved else ""))
            if on_epoch_end is not None:
                on_epoch_end(dict(row))
        if dd.active:
            dist.barrier()
        if finished:
            if stop_reason == "early_stop":
                _log(dd, f"early stop: no improvement for {bad} epochs")
            break
    if not finished:
        stop_reason = "epochs"
    return _finish(ema.module, val_ds, cfg, out_dir, dd, dev, amp_dtype, history, best, best_epoch,
                   epoch, seconds, stop_reason)


# --------------------------------------------------------------------------- run / CLI


def run_training(
    variant: str,
    fold: int,
    params: dict,
    folds_table: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    epochs: int | None = None,
    device: str | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    root: Path | None = None,
    store: str | os.PathLike | None = None,
    restart_on_change: bool = False,
) -> TrainResult:
    """Train variant ``variant`` (``params['variants'][variant]``) on fold ``fold``.

    Samples are read from the zips named in the fold table, or, with ``store``,
    from the ingested sample store (which must hold every sample of the table).
    """
    root = root or project_root()
    variants = params.get("variants") or {}
    if variant not in variants:
        known = ", ".join(sorted(variants)) or "(none defined)"
        raise UserError(f"params.yaml: unknown variant '{variant}'; known variants: {known}")
    variant_cfg = variants[variant] or {}
    cfg = train_config(params, variant_cfg)
    if epochs is not None:
        cfg["epochs"] = int(epochs)
    table = resolve_path(folds_table or cfg.get("folds_table") or "folds/folds.csv", root)
    out = resolve_path(out_dir or Path(cfg.get("models_dir") or "models") / variant / f"fold_{fold}", root)
    train_rows, val_rows = read_folds_table(table, int(fold), root)
    if store is not None:
        train_rows, val_rows = _rows_in_store(resolve_path(store, root), table, train_rows, val_rows)
    from speedstructure.model import build_model

    dev_req = device if device is not None else cfg.get("device")
    seed_everything(int(cfg["seed"]))  # identical initial weights on every rank
    model = build_model(variant_cfg, device=_pick_device(dev_req, int(os.environ.get("LOCAL_RANK", "0"))
                                                         if "RANK" in os.environ else None))
    train_ds, val_ds = SampleDataset(train_rows), SampleDataset(val_rows)
    try:
        return train_model(model, train_ds, val_ds, cfg, out, on_epoch_end=on_epoch_end, device=dev_req,
                           variant_cfg=variant_cfg, meta={"variant_name": variant, "fold": int(fold)},
                           restart_on_change=restart_on_change)
    finally:
        train_ds.close()
        val_ds.close()


CURVES_NAME = "curves.png"


def run_training_stage(variant: str, fold: int, params: dict, *, track: bool = True, root: Path | None = None,
                       **kw) -> TrainResult:
    """:func:`run_training` as a pipeline stage: an MLflow run (rank 0) with the flattened
    params, per-epoch train loss / validation MAPE / learning rate, the best checkpoint,
    history and the training-curve plot; tags variant, fold, git commit and DVC stage."""
    from speedstructure.plots import plot_training_curves

    root = Path(root or project_root())
    main = int(os.environ.get("RANK", "0")) == 0
    if not (track and main):
        res = run_training(variant, fold, params, root=root, **kw)
        if main:
            plot_training_curves(res.history, res.best_path.parent / CURVES_NAME, f"{variant} fold {fold}")
        return res
    from speedstructure import tracking

    variant_cfg = (params.get("variants") or {}).get(variant) or {}
    logged = {"variant": {k: v for k, v in variant_cfg.items() if k != "train"},
              "train": train_config(params, variant_cfg)}
    stage = f"train@{variant}-f{int(fold)}"
    with tracking.start_run(f"{variant}-f{int(fold)}", params=logged, project_params=params, root=root,
                            tags={"stage": "train", "variant": variant, "fold": int(fold), "dvc_stage": stage}):
        import mlflow

        def log_epoch(row: dict) -> None:
            tracking.log_metrics({"train_loss": row["train_loss"], "val_mape": row["val_mape"],
                                  "lr": row["lr"], "epoch_seconds": row["seconds"]}, step=int(row["epoch"]))

        res = run_training(variant, fold, params, root=root, on_epoch_end=log_epoch, **kw)
        out = res.best_path.parent
        curves = plot_training_curves(res.history, out / CURVES_NAME, f"{variant} fold {fold}")
        tracking.log_metrics({"best_val_mape": res.best_val_mape, "best_epoch": res.best_epoch,
                              "epochs_run": res.epochs_run, "train_seconds": res.seconds})
        mlflow.set_tag("stop_reason", res.stop_reason)
        for name in (BEST_NAME, METRICS_NAME, HISTORY_NAME):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name), artifact_path="model" if name == BEST_NAME else "training")
        mlflow.log_artifact(str(curves), artifact_path="training")
    return res


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one model variant on one fold",
        description="Train a variant (params.yaml variants:) on fold K; resumes from DIR/last.pt.",
    )
    p.add_argument("--variant", required=True, help="variant name in params.yaml 'variants:'")
    p.add_argument("--fold", required=True, type=int, help="validation fold K")
    p.add_argument("--folds", default=None, help="fold table CSV (default: train.folds_table)")
    p.add_argument("--out", default=None, help="output directory (default: models/VARIANT/fold_K)")
    p.add_argument("--epochs", default=None, type=int, help="override train.epochs")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"], help="override train.device")
    p.add_argument("--store", default=None, help="read samples from this ingested store instead of the zips")
    p.add_argument("--mlflow", action="store_true", help="log the run to MLflow (what the DVC stages do)")
    p.add_argument("--restart-on-change", action="store_true",
                   help="discard a last.pt written with other settings or data instead of failing")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from speedstructure.config import load_params

    params = load_params()
    res = run_training_stage(args.variant, args.fold, params, track=args.mlflow, folds_table=args.folds,
                             out_dir=args.out, epochs=args.epochs, device=args.device, store=args.store,
                             restart_on_change=args.restart_on_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.variant} fold {args.fold}: best val MAPE {res.best_val_mape:.5f} at epoch {res.best_epoch} "
              f"({res.epochs_run} epochs, {res.seconds:.1f} s, {res.stop_reason}); {res.best_path}")
    return 0
