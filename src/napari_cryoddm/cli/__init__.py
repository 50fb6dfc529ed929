"""The `cryoddm` command: one subcommand module per workflow step, each a thin face over a job.

A subcommand module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. User errors (`CryoDDMError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import CryoDDMError

# In workflow order; each is `napari_cryoddm.cli.<name>`.
SUBCOMMANDS = ("info", "sample", "pick_noise", "forward", "train", "predict", "cs2star", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoddm",
        description="CryoDDM cryo-EM denoising: pick noise, forward, train, predict, cs2star.",
    )
    parser.add_argument("--version", action="version", version=f"napari-cryoddm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # a subcommand still being written by the team
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except CryoDDMError as exc:
        if args.verbose:
            raise
        print(f"cryoddm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoddm {args.command}: interrupted", file=sys.stderr)
        return 130
