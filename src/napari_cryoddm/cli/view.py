"""`cryoddm view PATH…`: raw and denoised micrographs in napari, side by side, with this plugin's
reader (no "Choose reader" dialog, robust contrast, lazy pyramids for 4k files)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import CryoDDMError, InputError
from ..io.mrc import MRC_PATTERNS, is_mrc_name
from . import wrap


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="open micrographs in napari, side by side (e.g. raw and denoised)",
        description=wrap(
            "Open each PATH (an MRC file or a folder of them) as one layer in napari with this "
            "plugin's reader and show the layers side by side in napari's grid, fitted to the "
            "window; the slider steps through the micrographs of every layer at once. The "
            "plugin's dock widgets are under Plugins ▸ CryoDDM. Needs a screen; on a node without "
            "one, copy the folders or use ssh -X."
        ),
        epilog="examples:\n"
        "  cryoddm view demo-out/sample/micrographs demo-out/denoised\n"
        "  cryoddm view Micrographs/ denoised/ --overlay\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", type=Path, help="MRC files or folders; each becomes one layer")
    p.add_argument("--overlay", action="store_true", help="one canvas, the last PATH on top, instead of side by side")
    p.set_defaults(func=run)


def check_paths(paths: list[Path]) -> None:
    """Name the path that cannot open before a window appears."""
    for path in paths:
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_file() and not is_mrc_name(path):
            raise InputError(path, f"not an MRC file ({' '.join(MRC_PATTERNS)})")


def has_screen() -> bool:
    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM"))


def run(args: argparse.Namespace) -> int:
    check_paths(args.paths)
    if not has_screen():
        raise CryoDDMError("no screen to open napari on (DISPLAY is not set); use ssh -X or a workstation")
    from .._napari.view import show  # napari and Qt load only for this command

    show(args.paths, overlay=args.overlay)
    return 0
