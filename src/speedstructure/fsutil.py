"""Atomic outputs: every file or folder the project writes appears whole or not at all.

:func:`atomic_output` yields a temporary path beside the target (same folder, so the
final :func:`os.replace` is a rename on one filesystem); the caller writes there, and
the temporary is renamed onto the target when the block ends without an exception, or
removed when it raises.  Readers never see a half-written file, and a failed write
leaves the previous good file in place (an :class:`OSError` such as a full disk becomes a
one-line :class:`~speedstructure.errors.WriteError` naming the output).

Temporaries are named ``.<name>.tmp<pid>...`` (git-ignored).  A process killed with
SIGKILL (or by the OOM killer) cannot remove its temporary, so every write first removes
the temporaries of the same output left by processes that are no longer alive
(:func:`remove_stale_temporaries`): the next run of a killed stage cleans up after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speedstructure.errors import WriteError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` (``.<name>.tmp<pid>...``) whose process is gone;
    returns what was removed.  Those of live processes (a concurrent writer) are kept."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp(\d+)")
    removed = []
    with contextlib.suppress(OSError):
        for cand in path.parent.iterdir():
            m = pattern.match(cand.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                _remove(cand)
                removed.append(cand)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path for ``path``: renamed onto it on success, removed on failure.

    ``suffix`` is appended to the temporary's name, for writers that insist on an
    extension (``np.savez`` adds ``.npz`` to any other name).  The temporary may be a
    file or a folder; a folder replaces an existing folder at ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # two renames: a folder is never half replaced
            old = path.with_name(f"{tmp.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:  # disk full, read-only, ...: one line naming the output
        raise WriteError(path, exc) from exc
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


def file_md5(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The MD5 of a file's content: what DVC records for it in ``dvc.lock`` / ``.dvc`` files."""
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def relative_path(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form (the absolute path when it lies outside)."""
    full = Path(path).resolve()
    try:
        return full.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return full.as_posix()
