"""The ``ingest`` stage: the four challenge zips -> a packed, memory-mapped sample store.

Every member of every zip is read through the validating loader
(:class:`speedstructure.data.samples.ZipSamples`: shape, dtype, finiteness, positive
velocities); the first bad member stops the stage with an error naming the zip
and the member, and nothing is left behind.  The zips are ``data.zips`` in
``paths.data``; the store goes to ``paths.store`` (or ``--output``).  It holds, per
split::

    store/<split>/gathers.npy    float32 (N, 5, 10001, 31)   memory-mapped on read
    store/<split>/targets.npy    float32 (N, 300, 1259)      (not for the test split)
    store/index.csv              sample_id, zip, split, row, has_target
    store/manifest.json          sizes and the digest of each source zip (no timings: the same
                                 zips give the same bytes, so the store is cached and shared once)

Training reads samples from it with :class:`speedstructure.data.store.StoreSamples`
(:data:`~speedstructure.data.store.INDEX_NAME`, :data:`~speedstructure.data.store.MANIFEST_NAME`
and the reader live in :mod:`speedstructure.data.samples`), which has the same
``read`` / ``read_gathers`` / ``read_target`` interface as ``ZipSamples`` but
costs one ``memcpy`` per array instead of a zip member lookup and a ``.npy``
parse (``speedstructure bench store`` measures both).  The whole store is built
in a temporary folder (:func:`speedstructure.fsutil.atomic_output`) and renamed into
place at the end: a failed run leaves the previous store untouched, and the temporary
folder of a killed run (``.store.tmp<pid>``) is removed by the next run.  The arrays'
disk space is reserved before they are filled (:func:`reserve`), so a full disk is a
one-line error naming the store, not a crash in the middle of a memory-mapped write.
"""

from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from speedstructure.config.load import load_params
from speedstructure.config.schema import SPLITS
from speedstructure.config.typed import project_root, resolve_path
from speedstructure.data.format import GATHER_SHAPE, SOURCES, VP_SHAPE, gather_scale_note
from speedstructure.data.samples import ZipSamples
from speedstructure.data.store import INDEX_NAME, MANIFEST_NAME
from speedstructure.errors import DataError
from speedstructure.fsutil import atomic_output, file_md5, relative_path

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("sample_id", "zip", "split", "row", "has_target")
STORE_FORMAT = 2  # 2: the manifest holds the index's SHA-256
COMMAND_HELP = (
    "Read every member of data.zips (in paths.data) through the validating loader and write "
    "the memory-mapped sample store (paths.store)."
)


def _check_zips(handles: dict[str, ZipSamples]) -> None:
    """Targets in every zip but the test one, and no sample id in two zips."""
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


def reserve(path: Path) -> None:
    """Allocate the disk blocks of the whole file ``path`` now (``posix_fallocate``): a full
    disk raises ``OSError(ENOSPC)`` here instead of a SIGBUS when a page of its memory map
    is written later.  Filesystems that cannot allocate ahead are left as they are."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not POSIX
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _pack_split(folder: Path, z: ZipSamples, bar: tqdm) -> None:
    """Every sample of ``z``, validated, into ``folder/gathers.npy`` (and ``targets.npy``)."""
    n = len(z)
    folder.mkdir()
    g = np.lib.format.open_memmap(
        folder / "gathers.npy", mode="w+", dtype=np.float32, shape=(n, len(SOURCES), *GATHER_SHAPE)
    )
    reserve(folder / "gathers.npy")
    t = None
    if z.has_targets:
        t = np.lib.format.open_memmap(
            folder / "targets.npy", mode="w+", dtype=np.float32, shape=(n, *VP_SHAPE)
        )
        reserve(folder / "targets.npy")
    for i, sid in enumerate(z.sample_ids):
        g[i] = z.read_gathers(sid)
        note = gather_scale_note(g[i], f"{z.path}: sample '{sid}'")
        if note:
            log.warning(note)
        if t is not None:
            t[i] = z.read_target(sid)
        bar.update(1)
    g.flush()
    del g
    if t is not None:
        t.flush()
        del t


def _index_csv(handles: dict[str, ZipSamples], root: Path) -> str:
    """``index.csv``: one row per sample, in the order the arrays hold them."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(INDEX_COLUMNS)
    for split, z in handles.items():
        zip_name = relative_path(z.path, root)
        w.writerows(
            (sid, zip_name, split, i, int(z.has_targets)) for i, sid in enumerate(z.sample_ids)
        )
    return buf.getvalue()


def _manifest(handles: dict[str, ZipSamples], root: Path, index: str) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT,
        "index_sha256": hashlib.sha256(index.encode()).hexdigest(),  # the reader checks it
        "splits": {
            s: {
                "zip": relative_path(z.path, root),
                "samples": len(z),
                "md5": file_md5(z.path),
                "has_targets": z.has_targets,
            }
            for s, z in handles.items()
        },
        "samples": sum(len(z) for z in handles.values()),
    }


def _write_store(
    handles: dict[str, ZipSamples], out: Path, root: Path, progress: bool
) -> dict[str, Any]:
    with atomic_output(out) as tmp:
        tmp.mkdir()
        total = sum(len(z) for z in handles.values())
        with tqdm(total=total, desc="ingest", unit="sample", disable=not progress) as bar:
            for split, z in handles.items():
                _pack_split(tmp / split, z, bar)
        index = _index_csv(handles, root)
        (tmp / INDEX_NAME).write_text(index)
        manifest = _manifest(handles, root, index)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_store(
    zips: dict[str, Path], out: Path, *, root: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Validate every sample of ``zips`` (split -> path) and write the store to ``out``.

    Zip paths in the index and manifest are relative to ``root`` (default: the project
    root).  Returns the manifest, with this run's ``seconds`` (not written into the store).
    """
    root = Path(root or project_root())
    t0 = time.perf_counter()
    handles: dict[str, ZipSamples] = {}
    try:
        for split, path in zips.items():
            handles[split] = ZipSamples(path)  # checks the layout (names, completeness)
        _check_zips(handles)
        manifest = _write_store(handles, out, root, progress)
        return {**manifest, "seconds": round(time.perf_counter() - t0, 2)}  # not in the store
    finally:
        for z in handles.values():
            z.close()


def _cmd(args: argparse.Namespace) -> int:
    params = load_params()
    zips = {s: params.zip_path(s) for s in SPLITS}
    out = resolve_path(args.output, params.root) if args.output else params.path("store")
    manifest = build_store(zips, out, root=params.root, progress=not args.quiet)
    gb = sum(f.stat().st_size for f in out.rglob("*.npy")) / 1e9
    print(
        f"ingest: {manifest['samples']} samples from {len(zips)} zips validated and packed "
        f"into {out} ({gb:.2f} GB) in {manifest['seconds']} s"
    )
    for s, info in manifest["splits"].items():
        print(f"  {s:<18} {info['samples']:>6} samples  ({info['zip']})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from speedstructure.cli import add_quiet_option

    p = subparsers.add_parser("ingest", description=COMMAND_HELP)
    p.add_argument(
        "--output", help="store folder (default: params paths.store; relative: to the root)"
    )
    add_quiet_option(p)
    p.set_defaults(func=_cmd)
