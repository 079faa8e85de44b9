"""Exceptions that the command line reports as one line (:func:`speedstructure.cli.main`).

* :class:`UserError` (and :class:`DataError`, :class:`WriteError`): bad input, configuration
  or environment; one line naming the file and the problem, exit code 2.
* :class:`Terminated`: SIGTERM turned into an interrupt, so that it unwinds like Ctrl-C
  (MLflow runs end KILLED, temporaries are removed); exit code 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class UserError(Exception):
    """Bad input or configuration: the message names the file and the problem."""


class DataError(UserError, ValueError):
    """A zip, member or array that does not match the challenge's format."""


class WriteError(UserError, OSError):
    """An output that could not be written (disk full, read-only folder, ...).

    Keeps the ``errno`` of the :class:`OSError` it replaces; the message names the
    output and says that its previous version, if any, is unchanged.
    """

    def __init__(self, path: str | os.PathLike, exc: OSError):
        super().__init__(exc.errno, exc.strerror or str(exc))
        self.path = str(path)
        other = exc.filename  # named when it is neither the output nor its temporary
        tmp_prefix = f".{os.path.basename(self.path)}.tmp"
        if other and str(other) != self.path and not os.path.basename(other).startswith(tmp_prefix):
            self.detail = f": {other}"
        else:
            self.detail = ""

    def __str__(self) -> str:
        return (
            f"{self.path}: not written ({self.strerror}{self.detail}); "
            "its previous version is unchanged"
        )


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds like Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (the
    previous handler is restored after; in other threads this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
