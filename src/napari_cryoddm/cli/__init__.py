"""The `cryoddm` command: one subcommand module per workflow step, each a thin face over a job.

A subcommand module `cli/<module>.py` defines `register(subparsers)`, which adds its parser and
sets `func(args) -> int`. Only the module of the command being run is imported (training and
prediction pull in torch; `cryoddm --help` and `cryoddm info` should not wait for it).
User errors (`CryoDDMError`) and file-system errors print one line and exit 2, never a traceback;
a run stopped by Ctrl-C or SIGTERM exits 128 + the signal (130, 143).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import CryoDDMError

# command → (module in this package, one-line help shown by `cryoddm --help`), in workflow order
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "show shape, mode, voxel size and extended header of MRC files"),
    "sample": ("sample", "write synthetic micrographs with ground truth (particles, clean signal)"),
    "pick-noise": ("pick_noise", "pick pure-background boxes (noise) away from particles"),
    "forward": ("forward", "diffuse real particle crops with real noise patches into training pairs"),
    "train": ("train", "train the CryoDDM U-Net on a forward folder"),
    "predict": ("predict", "denoise micrographs with a trained model (tiled, seam-free)"),
    "cs2star": ("cs2star", "convert cryoSPARC .cs particles to RELION STAR for the raw micrographs"),
    "demo": ("demo", "run every step on sample micrographs and write a quality report"),
    "view": ("view", "open micrographs in napari, side by side (e.g. raw and denoised)"),
}


def wrap(text: str, width: int = 79) -> str:
    """A description pre-wrapped for `RawDescriptionHelpFormatter` (which keeps lines as given,
    so a long single-line description would run off the terminal); blank lines split paragraphs."""
    import textwrap

    return "\n\n".join(textwrap.fill(" ".join(par.split()), width) for par in text.split("\n\n"))


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the full options of a subcommand are built only when it is the one chosen
    (`argv` None builds them all, e.g. for documentation)."""
    parser = argparse.ArgumentParser(
        prog="cryoddm", description="CryoDDM cryo-EM denoising: pick noise, forward, train, predict, cs2star."
    )
    parser.add_argument("--version", action="version", version=f"napari-cryoddm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else _chosen(argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if argv is None or name == chosen:
            importlib.import_module(f"{__name__}.{module_name}").register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from ..jobs import Cancelled

    try:
        return int(args.func(args) or 0)
    except CryoDDMError as exc:
        if args.verbose:
            raise
        print(f"cryoddm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled as exc:  # Ctrl-C or SIGTERM reached a step that cannot save a partial result
        token = getattr(exc, "token", None)
        print(f"cryoddm {args.command}: stopped (outputs are written whole or not at all)", file=sys.stderr)
        return token.exit_code if token is not None else 130
    except KeyboardInterrupt:
        print(f"cryoddm {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file-system failure no step translated: still one line, no traceback
        if args.verbose:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cryoddm {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
