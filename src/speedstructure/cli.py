"""The ``speedstructure`` command line.

Every subcommand lives in the module named in :data:`COMMANDS`; that module defines
``add_commands(subparsers)``, which adds its parser(s) and sets ``func`` (called with
the parsed arguments, returning an exit code).  Only the module of the command being
run is imported, so ``speedstructure --help`` answers without loading torch.

Flags mean the same everywhere: ``--output`` names what a command writes,
``--json FILE`` writes the command's result as JSON to FILE (``-`` for standard
output), ``--mlflow/--no-mlflow`` switches tracking (on by default for pipeline
stages), ``--quiet`` hides progress bars.  Diagnostics go through :mod:`logging`
(``-v`` for debug messages).

One top-level handler (:func:`main`) turns what a user must act on into one line on
standard error: a :class:`~speedstructure.errors.UserError` (bad input or configuration, an
output that could not be written) exits 2; Ctrl-C and SIGTERM exit 130 with ``interrupted:
resume with the same command`` (SIGTERM is raised as
:class:`~speedstructure.errors.Terminated`, so runs end KILLED and temporaries are removed).
When standard error is not a terminal (a log file, ``dvc repro``'s capture), ANSI colour
codes (MLflow's coloured warnings, for instance) are stripped from it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from speedstructure import __version__

# command -> (module, one-line help); the order is the order of `--help`
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": (
        "speedstructure.synth.dataset",
        "generate the synthetic dataset (the challenge's four zips)",
    ),
    "ingest": (
        "speedstructure.stages.ingest",
        "validate the four zips and pack them into the sample store",
    ),
    "folds": (
        "speedstructure.stages.folds",
        "K-Means groups of the velocity models and stratified folds",
    ),
    "train": ("speedstructure.stages.train", "train one model variant on one fold"),
    "tune": ("speedstructure.stages.tune", "tune ensemble weights per fold with Optuna"),
    "register": (
        "speedstructure.stages.register",
        "log the tuned ensemble to the MLflow model registry",
    ),
    "predict": (
        "speedstructure.stages.predict",
        "predict a zip or folder of samples into a submission .npz",
    ),
    "evaluate": ("speedstructure.stages.evaluate", "score the submission against the test targets"),
    "qc": (
        "speedstructure.stages.qc",
        "re-simulate every prediction and compare with its gathers (physics consistency)",
    ),
    "refine": (
        "speedstructure.stages.refine",
        "refine predictions by full-waveform inversion (optional, slow)",
    ),
    "report": (
        "speedstructure.stages.evaluate",
        "print the test MAPE table of the last evaluation",
    ),
    "relocate-mlruns": (
        "speedstructure.tracking.store",
        "point a moved or copied checkout's MLflow store at its own artifacts",
    ),
    "validate-submission": (
        "speedstructure.data.submission_check",
        "check a submission .npz against a test zip",
    ),
    "profile": (
        "speedstructure.config.profiles",
        "show or switch the configuration profile (default | competition)",
    ),
    "model-summary": (
        "speedstructure.models.build",
        "parameter counts, shapes and FLOPs of a model variant",
    ),
    "plot-sample": (
        "speedstructure.reports.plots",
        "draw one sample's five shot gathers and its velocity model",
    ),
    "bench": (
        "speedstructure.tools.bench",
        "benchmarks: data generation, store reads, model speed, GPU training check",
    ),
    "fetch-weights": (
        "speedstructure.models.pretrained",
        "download pretrained backbone weights once into a DVC-tracked file (online)",
    ),
    "doctor": (
        "speedstructure.tools.doctor",
        "this machine, the project's state and the active profile's projected cost",
    ),
    "train-parallel": (
        "speedstructure.tools.parallel",
        "run the pending training stages concurrently, one GPU each",
    ),
    "server": (
        "speedstructure.tools.server",
        "the team's MLflow tracking server on PostgreSQL (Ctrl-C stops it)",
    ),
    "plots-template": (
        "speedstructure.reports.dvcplots",
        "write the page `dvc plots show` fills, with the vega libraries inlined (offline)",
    ),
}


def _listing() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of ``command`` (if any) is imported and registered."""
    parser = argparse.ArgumentParser(
        prog="speedstructure",
        description="Seismic velocity inversion pipeline (Speed & Structure).",
        epilog=_listing() + "\n\n`speedstructure COMMAND --help` describes one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"speedstructure {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_commands(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The first argument that names a command (options before it are global)."""
    return next((a for a in argv if not a.startswith("-")), None)


# Offline by default: no telemetry from MLflow, DVC or anything honouring DO_NOT_TRACK, set
# before any of them is imported (a value the user exported wins)
OFFLINE_ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
}


def main(argv: list[str] | None = None) -> int:
    from speedstructure.errors import UserError, sigterm_as_interrupt

    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    if command is not None and command not in COMMANDS:
        _unknown(command)
    where = f"speedstructure {command}"
    with _plain_stderr(), sigterm_as_interrupt():
        try:
            # no command: --help, --version or a usage error (SystemExit)
            args = build_parser(command).parse_args(argv)
            logging.basicConfig(
                level=logging.DEBUG if args.verbose else logging.INFO,
                format="%(message)s",
                stream=sys.stderr,
                force=True,
            )
            rc = args.func(args)
        except UserError as exc:
            print(f"{where}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
            print(f"{where}: interrupted: resume with the same command", file=sys.stderr)
            return 130
    return int(rc or 0)


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class _NoAnsi:
    """A text stream that drops ANSI escape sequences on their way to ``stream``."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(_ANSI.sub("", text))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _plain_stderr() -> Iterator[None]:
    """Standard error without ANSI codes while the command runs, unless it is a terminal."""
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    if stream is None or (callable(isatty) and isatty()):
        yield
        return
    sys.stderr = _NoAnsi(stream)
    try:
        yield
    finally:
        sys.stderr = stream


def _unknown(command: str) -> None:
    print(f"speedstructure: error: unknown command '{command}'\n{_listing()}", file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------- shared options


def add_mlflow_option(parser: argparse.ArgumentParser, default: bool = True) -> None:
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=default,
        help=f"log the run to MLflow (default: {'on' if default else 'off'})",
    )


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="also write the result as JSON to FILE ('-': standard output)",
    )


def write_json_output(dest: str | None, obj: Any) -> None:
    """The ``--json`` result: to standard output for ``-``, else atomically to the file."""
    if dest is None:
        return
    if dest == "-":
        print(json.dumps(obj, indent=2))
        return
    from speedstructure.fsutil import atomic_write_json

    atomic_write_json(dest, obj)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
