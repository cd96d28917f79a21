"""The ``demo`` subcommand of ``uhc-fast`` (``register``) and ``python -m uhc_fast.demo`` (``main``)."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import replace
from pathlib import Path

from .config import DemoConfig
from .experiment import run
from .report import format_report, plot, write_json

DESCRIPTION = "``uhc-fast demo``: the paper's claim end to end on real data (scikit-learn's handwritten digits)."


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--quick", action="store_true", help="2 splits, shorter training: under a minute")
    parser.add_argument("--splits", type=int, help=f"random splits to average over (default {d.splits})")
    parser.add_argument("--teachers", type=int, help=f"number of sources (default {d.teachers})")
    parser.add_argument("--epochs", type=int, help=f"student training epochs (default {d.student_epochs})")
    parser.add_argument("--methods", help="comma-separated methods (default: all)")
    parser.add_argument(
        "--balance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="class-balancing weights in the students' loss (default off)",
    )
    parser.add_argument("--eps", type=float, help="probability floor before logs in mf-lf/mf-lu (default: estimate's)")
    parser.add_argument("--backend", help=f"uhc_fast backend (default {d.backend})")
    parser.add_argument("--seed", type=int, help=f"base random seed (default {d.seed})")
    parser.add_argument("--threads", type=int, help=f"torch/BLAS threads (default {d.threads}: reproducible)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the plot and JSON (default: .)")
    parser.add_argument("--plot", type=Path, help="plot path (default OUT/uhc_demo.png)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here (default OUT/uhc_demo.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    parser.add_argument("-q", "--no-progress", action="store_true", help="no progress display")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    base = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {
        "splits": args.splits,
        "teachers": args.teachers,
        "student_epochs": args.epochs,
        "balance": args.balance,
        "eps": args.eps,
        "backend": args.backend,
        "seed": args.seed,
        "threads": args.threads,
        "methods": tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
    }
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _command(args: argparse.Namespace) -> int:
    for name in ("sklearn",) if args.no_plot else ("sklearn", "matplotlib"):
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"uhc-fast demo needs the demo extra ({name} is missing): pip install 'uhc_fast[demo]'")
    config = config_from_args(args)
    result = run(config, progress=not args.no_progress)
    print(format_report(result))
    print(f"numbers written to {write_json(result, args.json or args.out / 'uhc_demo.json')}")
    if not args.no_plot:
        print(f"plot written to {plot(result, args.plot or args.out / 'uhc_demo.png')}")
    return 0


def register(subparsers) -> None:
    """Add the ``demo`` subcommand to the ``uhc-fast`` CLI."""
    parser = subparsers.add_parser(
        "demo",
        help="reproduce the paper's claim on scikit-learn's digits",
        description=DESCRIPTION,
    )
    _add_arguments(parser)
    parser.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    """``python -m uhc_fast.demo``: the demo without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="uhc-fast demo", description=DESCRIPTION)
    _add_arguments(parser)
    return _command(parser.parse_args(argv))
