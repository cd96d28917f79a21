"""The ``uhc-fast`` command line: each command module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``register(subparsers)``, adding subcommands with ``set_defaults(func=...)``.
COMMAND_MODULES = ("uhc_fast.commands", "uhc_fast.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uhc-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
