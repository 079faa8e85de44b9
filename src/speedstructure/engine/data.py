"""Training data: the samples of a fold, their dataset, loaders and the flip augmentation.

* :func:`read_folds_table`: the fold table (``paths.folds_table``) split into the
  training and validation rows ``(sample_id, source)`` of one fold; extended samples
  (fold -1) are always trained on.
* :func:`rows_in_store`: the same rows read from the ingested sample store instead.
* :class:`SampleDataset`: ``(x, y, index)`` per row, read lazily from a zip or the store.
* :func:`make_loader`: the one way the engine builds a ``DataLoader`` (order from the
  sampler, never shuffled by the loader itself).
* :func:`flip_batch`: the physically consistent horizontal flip (receivers mirrored and
  source order reversed; the target mirrored in x), drawn per sample.
* :class:`PreparedInputs` (``train.cache_inputs``): a training set whose model-ready images
  are computed once, before the first epoch, instead of reading and resampling 6.2 MB of
  gathers per sample every epoch; :func:`flip_prepared_batch` is its flip, with the same
  random draw and the same result as :func:`flip_batch` followed by the model's own
  preparation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from speedstructure.config.typed import project_root, resolve_path
from speedstructure.errors import DataError, UserError

log = logging.getLogger("speedstructure.engine")

Rows = list[tuple[str, str]]  # (sample_id, zip or store path)


class SampleDataset(Dataset):
    """Samples named by ``(sample_id, source)`` rows, read from a challenge zip or the
    ingested sample store (:func:`speedstructure.data.store.open_samples`).

    ``ds[i]`` is ``(x, y, i)``: gathers float32 ``(5, 10001, 31)``, target float32
    ``(300, 1259)`` and the index (``ds.sample_id(i)`` gives the id).  Readers are
    opened lazily, one per source and per process (DataLoader workers each open their own).
    """

    def __init__(self, rows: Iterable[tuple[str, str | os.PathLike]]):
        self.rows: Rows = [(str(sid), str(z)) for sid, z in rows]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_ids(self) -> list[str]:
        return [sid for sid, _ in self.rows]

    def sample_id(self, index: int) -> str:
        return self.rows[int(index)][0]

    def _reader(self, path: str):
        from speedstructure.data.store import open_samples

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
        return self._reader(path).read_target(sid)

    def __getitem__(self, index: int):
        sid, path = self.rows[int(index)]
        x, y = self._reader(path).read(sid)
        if y is None:
            raise DataError(
                f"{path}: sample '{sid}' has no target (a test zip cannot be used for training)"
            )
        return torch.from_numpy(x), torch.from_numpy(y), int(index)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def targets(ds: Dataset) -> Iterator[Any]:
    """The targets one by one (without reading the gathers where the dataset can)."""
    return (ds.target(i) if hasattr(ds, "target") else ds[i][1] for i in range(len(ds)))


# --------------------------------------------------------------------------- fold table


def read_folds_table(
    path: str | os.PathLike, fold: int, root: Path | None = None
) -> tuple[Rows, Rows]:
    """``(train_rows, val_rows)`` of ``(sample_id, zip_path)`` for validation fold ``fold``.

    Training = rows whose fold differs from ``fold`` (extended samples, fold -1,
    are always trained on); validation = rows with fold == ``fold``.  Zip paths in
    the table are relative to ``root`` (default: the project root).
    """
    path = Path(path)
    df = _read_table(path)
    known = sorted(int(f) for f in df["fold"].unique() if f >= 0)
    if int(fold) not in known:
        raise UserError(f"{path}: unknown fold {fold}; the table has folds {known}")
    root = root or project_root()
    zips = {z: str(resolve_path(z, root)) for z in df["zip"].unique()}
    for z, full in zips.items():
        if not Path(full).is_file():
            raise UserError(f"{path}: zip '{z}' not found ({full})")
    columns = zip(df["sample_id"], df["zip"], df["fold"], strict=True)
    rows = [(sid, zips[z], f) for sid, z, f in columns]
    train_rows = [(s, z) for s, z, f in rows if f != fold]
    val_rows = [(s, z) for s, z, f in rows if f == fold]
    if not train_rows:
        raise UserError(f"{path}: fold {fold} leaves no training samples")
    return train_rows, val_rows


def _read_table(path: Path):
    """The fold table as a DataFrame, checked: columns, no empty cells, integer folds >= -1,
    unique sample ids."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path}: fold table not found (run the folds stage first)")
    try:
        df = pd.read_csv(path, dtype={"sample_id": str, "zip": str})
    except Exception as exc:  # pandas raises many types
        raise UserError(f"{path}: not a readable CSV fold table ({exc})") from exc
    missing = [c for c in ("sample_id", "zip", "fold") if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: fold table lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, df.columns))})"
        )
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
    return df


def rows_in_store(store: Path, table: Path, *row_lists: Rows) -> list[Rows]:
    """The rows re-pointed at the sample store; an error names the first missing sample."""
    from speedstructure.data.store import StoreSamples

    known = set(StoreSamples(store).sample_ids)
    out = []
    for rows in row_lists:
        for sid, _ in rows:
            if sid not in known:
                raise UserError(
                    f"{table}: sample '{sid}' is not in the store {store} (rerun the ingest stage)"
                )
        out.append([(sid, str(store)) for sid, _ in rows])
    return out


# --------------------------------------------------------------------------- loading, augmentation


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    device: torch.device,
    sampler: Sampler | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of ``ds`` in the sampler's order (or in order), pinned for CUDA."""
    return DataLoader(
        ds,
        batch_size=int(batch_size),
        sampler=sampler,
        shuffle=False,
        num_workers=int(num_workers),
        pin_memory=device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )


def flip_draw(n: int, prob: float, device: torch.device) -> torch.Tensor | None:
    """The indices of the batch's samples to flip, each with probability ``prob`` (one
    ``torch.rand`` draw per batch, none when ``prob`` is 0); None when there are none."""
    if prob <= 0:
        return None
    mask = torch.rand(n) < prob
    return mask.nonzero().flatten().to(device) if bool(mask.any()) else None


def flip_batch(x: torch.Tensor, y: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistent flip (receivers mirrored, source order reversed; target mirrored in x)
    of each sample with probability ``prob`` (:func:`flip_draw`)."""
    idx = flip_draw(x.shape[0], prob, x.device)
    if idx is None:
        return x, y
    from speedstructure.data.flips import flip_inputs, flip_target

    x, y = x.clone(), y.clone()
    x[idx] = flip_inputs(x[idx], mode="consistent")
    y[idx] = flip_target(y[idx])
    return x, y


# --------------------------------------------------------------------------- prepared inputs

Prepare = Callable[[torch.Tensor], torch.Tensor]  # gathers (B, 5, T, R) -> images (B, 5, H, W)


class PreparedInputs(Dataset):
    """The samples of ``ds`` with their model-ready inputs computed once.

    ``ds[i]`` is ``(prepared, y, i)``: ``prepared`` float32 ``(2, ...)`` holds ``prepare`` of
    the gathers and of the gathers flipped consistently (receivers mirrored and the source
    order reversed: what :func:`flip_prepared_batch` trains a flipped sample on); the target
    is read from ``ds`` each time (it is 1.5 MB a sample, the two EVA images 0.5 MB at
    112 x 112).
    Sample ids, targets and length are those of ``ds``, so fingerprints and the depth-trend
    prior see the same training set.
    """

    def __init__(self, ds: Dataset, prepare: Prepare, *, progress: bool = False):
        from speedstructure.data.flips import flip_inputs
        from speedstructure.engine.runtime import progress_bar

        self.ds = ds
        self.images: torch.Tensor | None = None
        rows = progress_bar(range(len(ds)), "prepare inputs", enabled=progress, leave=False)
        with torch.no_grad():
            for i in rows:
                x = ds[i][0].unsqueeze(0)
                pair = torch.cat([prepare(x), prepare(flip_inputs(x, "consistent"))])
                if self.images is None:
                    self.images = torch.empty((len(ds), *pair.shape), dtype=pair.dtype)
                self.images[i] = pair

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def sample_ids(self) -> list[str]:
        return list(self.ds.sample_ids)

    def target(self, index: int) -> np.ndarray:
        return self.ds.target(index)

    def __getitem__(self, index: int):
        return self.images[int(index)], torch.from_numpy(self.ds.target(index)), int(index)

    @staticmethod
    def nbytes(n_samples: int, numel: int) -> int:
        """The cache's size for ``n_samples`` samples of ``numel`` prepared numbers each."""
        return int(n_samples) * 2 * int(numel) * 4


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None


def cached_training_set(
    ds: Dataset, model: torch.nn.Module, enabled: bool, *, progress: bool = False
) -> Dataset:
    """``ds`` as :class:`PreparedInputs` when ``enabled``, the model can prepare its inputs
    and the cache takes at most a quarter of the machine's memory; else ``ds`` itself (with a
    warning when the cache was asked for and is too large)."""
    prepare = getattr(model, "prepare", None)
    if not enabled or not callable(prepare) or len(ds) == 0:
        return ds
    need = PreparedInputs.nbytes(len(ds), model.prepared_numel)
    have = memory_bytes()
    if have is not None and need > have // 4:
        log.warning(
            "train.cache_inputs: the cache would take %.1f GB of %.1f GB memory; "
            "the gathers are read and prepared every epoch instead",
            need / 1e9,
            have / 1e9,
        )
        return ds
    return PreparedInputs(ds, prepare, progress=progress)


def flip_prepared_batch(
    x: torch.Tensor, y: torch.Tensor, prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flip_batch` for a batch of :class:`PreparedInputs` ``(B, 2, ...)``: the same
    draw, and inputs equal to preparing the flipped gathers; returns the ``(B, ...)`` inputs
    to train on and the targets."""
    prepared = x[:, 0]
    idx = flip_draw(x.shape[0], prob, x.device)
    if idx is None:
        return prepared, y
    from speedstructure.data.flips import flip_target

    prepared, y = prepared.clone(), y.clone()
    prepared[idx] = x[idx, 1]  # prepared from the consistently flipped gathers
    y[idx] = flip_target(y[idx])
    return prepared, y
