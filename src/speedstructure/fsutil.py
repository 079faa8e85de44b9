"""Atomic outputs: every file or folder the project writes appears whole or not at all.

:func:`atomic_output` yields a temporary path beside the target (same folder, so the
final :func:`os.replace` is a rename on one filesystem); the caller writes there, and
the temporary is renamed onto the target when the block ends without an exception, or
removed when it raises.  Readers never see a half-written file, and a failed write
leaves the previous good file in place.  Temporaries are named ``.<name>.tmp<pid>...``
(git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path for ``path``: renamed onto it on success, removed on failure.

    ``suffix`` is appended to the temporary's name, for writers that insist on an
    extension (``np.savez`` adds ``.npz`` to any other name).  The temporary may be a
    file or a folder; a folder replaces an existing folder at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON with a final newline, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
