"""The ``speedstructure`` command line.

Each pipeline module that offers a subcommand defines ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed arguments and
returning an exit code).  Modules are listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "speedstructure.synth",
    "speedstructure.ingest",
    "speedstructure.folds",
    "speedstructure.plots",
    "speedstructure.bench",
    "speedstructure.train",
    "speedstructure.model",
    "speedstructure.tune",
    "speedstructure.registry",
    "speedstructure.ensemble",
    "speedstructure.submission",
    "speedstructure.evaluate",
    "speedstructure.profiles",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speedstructure",
        description="Seismic velocity inversion pipeline (Speed & Structure).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from speedstructure.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"speedstructure {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
