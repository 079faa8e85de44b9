"""The ``ingest`` stage: the four challenge zips -> a packed, memory-mapped sample store.

Every member of every zip is read through the validating loader
(:class:`speedstructure.dataio.ZipSamples`: shape, dtype, finiteness, positive
velocities); the first bad member stops the stage with an error naming the zip
and the member, and nothing is left behind.  The store holds, per split::

    store/<split>/gathers.npy    float32 (N, 5, 10001, 31)   memory-mapped on read
    store/<split>/targets.npy    float32 (N, 300, 1259)      (not for the test split)
    store/index.csv              sample_id, zip, split, row, has_target
    store/manifest.json          sizes, the digest of each source zip, timings

Training reads samples from it with :class:`StoreSamples`, which has the same
``read`` / ``read_gathers`` / ``read_target`` interface as ``ZipSamples`` but
costs one ``memcpy`` per array instead of a zip member lookup and a ``.npy``
parse (``speedstructure bench store`` measures both).  The whole store is built
in a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from speedstructure.config import load_params, project_root, resolve_path
from speedstructure.dataio import GATHER_SHAPE, SOURCES, VP_SHAPE, ZipSamples
from speedstructure.errors import DataError, UserError
from speedstructure.fsutil import atomic_write_bytes

SPLITS = ("train", "train_extended_1", "train_extended_2", "test")
INDEX_NAME = "index.csv"
MANIFEST_NAME = "manifest.json"
INDEX_COLUMNS = ("sample_id", "zip", "split", "row", "has_target")

DEFAULTS: dict[str, Any] = {
    "dir": "data",
    "zips": {s: f"{s}.zip" for s in SPLITS},
    "test_labels": "test_labels.npz",
    "store": "store",
}


def data_config(params: dict[str, Any]) -> dict[str, Any]:
    """The ``data:`` section with defaults filled in."""
    cfg = {**DEFAULTS, **(params.get("data") or {})}
    cfg["zips"] = {**DEFAULTS["zips"], **(cfg.get("zips") or {})}
    unknown = set(cfg["zips"]) - set(SPLITS)
    if unknown:
        raise UserError(f"params.yaml: data.zips has unknown split(s) {sorted(unknown)}; expected {list(SPLITS)}")
    return cfg


def zip_paths(params: dict[str, Any], root: Path | None = None) -> dict[str, Path]:
    """Absolute path of each split's zip."""
    cfg = data_config(params)
    base = resolve_path(cfg["dir"], root)
    return {s: (base / cfg["zips"][s]) for s in SPLITS}


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p.resolve())


def _digest(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build_store(zips: dict[str, Path], out: Path, *, root: Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Validate every sample of ``zips`` (split -> path) and write the store to ``out``."""
    root = Path(root or project_root())
    t0 = time.perf_counter()
    handles: dict[str, ZipSamples] = {}
    try:
        for split, path in zips.items():
            handles[split] = ZipSamples(path)  # checks the layout (names, completeness)
        seen: dict[str, str] = {}
        for split, z in handles.items():
            want_targets = split != "test"
            if z.has_targets != want_targets:
                what = "has" if z.has_targets else "lacks"
                raise DataError(f"{z.path}: the {split} zip {what} vp_model.npy members")
            for sid in z.sample_ids:
                if sid in seen:
                    raise DataError(f"{z.path}: sample '{sid}' also appears in {seen[sid]}")
                seen[sid] = str(z.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            rows: list[tuple] = []
            total = sum(len(z) for z in handles.values())
            bar = tqdm(total=total, desc="ingest", unit="sample", disable=not progress)
            for split, z in handles.items():
                n = len(z)
                (tmp / split).mkdir()
                g = np.lib.format.open_memmap(tmp / split / "gathers.npy", mode="w+", dtype=np.float32,
                                              shape=(n, len(SOURCES), *GATHER_SHAPE))
                t = None
                if z.has_targets:
                    t = np.lib.format.open_memmap(tmp / split / "targets.npy", mode="w+", dtype=np.float32,
                                                  shape=(n, *VP_SHAPE))
                for i, sid in enumerate(z.sample_ids):
                    g[i] = z.read_gathers(sid)
                    if t is not None:
                        t[i] = z.read_target(sid)
                    rows.append((sid, _rel(z.path, root), split, i, int(t is not None)))
                    bar.update(1)
                g.flush()
                del g
                if t is not None:
                    t.flush()
                    del t
            bar.close()
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(INDEX_COLUMNS)
            w.writerows(rows)
            (tmp / INDEX_NAME).write_text(buf.getvalue())
            manifest = {
                "format": 1,
                "splits": {s: {"zip": _rel(z.path, root), "samples": len(z), "md5": _digest(z.path),
                               "has_targets": z.has_targets} for s, z in handles.items()},
                "samples": total,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for z in handles.values():
            z.close()
    return manifest


class StoreSamples:
    """Read access to an ingested store, with the interface of ``ZipSamples``.

    ``store = StoreSamples("store"); x, y = store.read(sample_id)``.  Arrays are
    memory-mapped; every read returns an owned copy.  ``split`` limits the
    samples to one split.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if not index.is_file():
            raise DataError(f"{self.path}: not a sample store (no {INDEX_NAME}; run the ingest stage)")
        self._where: dict[str, tuple[str, int, bool]] = {}
        with open(index, newline="") as fh:
            for r in csv.DictReader(fh):
                if split is None or r["split"] == split:
                    self._where[r["sample_id"]] = (r["split"], int(r["row"]), r["has_target"] == "1")
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self.sample_ids = sorted(self._where)
        self.has_targets = bool(self._where) and all(t for _, _, t in self._where.values())

    def _array(self, split: str, name: str) -> np.ndarray:
        key = (split, name)
        if key not in self._arrays:
            p = self.path / split / name
            try:
                self._arrays[key] = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"{p}: cannot be read ({exc}); rebuild the store (dvc repro ingest)") from exc
        return self._arrays[key]

    def _locate(self, sample_id: str) -> tuple[str, int, bool]:
        try:
            return self._where[sample_id]
        except KeyError:
            raise DataError(f"{self.path}: no sample '{sample_id}'") from None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._where

    def split_of(self, sample_id: str) -> str:
        return self._locate(sample_id)[0]

    def read_gathers(self, sample_id: str) -> np.ndarray:
        split, row, _ = self._locate(sample_id)
        return np.array(self._array(split, "gathers.npy")[row])

    def read_target(self, sample_id: str) -> np.ndarray:
        split, row, has = self._locate(sample_id)
        if not has:
            raise DataError(f"{self.path}: sample '{sample_id}' ({split}) has no target")
        return np.array(self._array(split, "targets.npy")[row])

    def read(self, sample_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        has = self._locate(sample_id)[2]
        return self.read_gathers(sample_id), (self.read_target(sample_id) if has else None)

    def close(self) -> None:
        self._arrays.clear()

    def __enter__(self) -> "StoreSamples":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


def open_samples(path: str | os.PathLike):
    """A reader for ``path``: a store folder (``StoreSamples``) or a challenge zip (``ZipSamples``)."""
    p = Path(path)
    return StoreSamples(p) if p.is_dir() else ZipSamples(p)


def _cmd(args: argparse.Namespace) -> int:
    root = project_root()
    params = load_params()
    zips = zip_paths(params, root)
    out = resolve_path(args.out or data_config(params)["store"], root)
    manifest = build_store(zips, out, root=root, progress=not args.quiet)
    gb = sum(f.stat().st_size for f in out.rglob("*.npy")) / 1e9
    print(f"ingest: {manifest['samples']} samples from {len(zips)} zips validated and packed into {out} "
          f"({gb:.2f} GB) in {manifest['seconds']} s")
    for s, info in manifest["splits"].items():
        print(f"  {s:<18} {info['samples']:>6} samples  ({info['zip']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="validate the four zips and pack them into the sample store",
                       description="Read every member of data.zips through the validating loader and write "
                                   "the memory-mapped sample store (data.store).")
    p.add_argument("--out", help="store folder (default: params data.store)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
