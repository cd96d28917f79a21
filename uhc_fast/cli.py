"""The ``uhc-fast`` command line: each command module registers its own subcommands."""

from __future__ import annotations

import argparse
import sys

from . import commands
from .demo import cli as demo_cli

# Each module exposes ``register(subparsers)``, adding subcommands with ``set_defaults(func=...)``.
COMMAND_MODULES = (commands, demo_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uhc-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
