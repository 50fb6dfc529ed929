"""`cryoddm pick-noise MICROGRAPHS… --particles STAR … -o noise_coordinates.txt`.

Reads only MRC headers when particle coordinates are given (1,000 micrographs in seconds);
`--no-particles` ranks boxes by emptiness instead, reading each micrograph's pixels.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from ..box_files import check_boxes_output, write_boxes
from ..config import add_config_arguments, config_from_args
from ..io.mrc import list_micrographs
from ..io.star import read_coordinates
from ..jobs import CancelToken, run_job
from ..picking import PickConfig, pick_noise

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pick-noise",
        help="pick pure-background boxes (noise) away from particles, or the emptiest boxes",
        description="Pick noise boxes of the forward window W on micrographs. With --particles, "
        "boxes avoid every particle disc and, unless --no-screen, contamination. With --no-particles, "
        "boxes are ranked by how little structure they hold; review them in napari. "
        "One of --diameter (px) or --diameter-A (Å) is required.",
    )
    p.add_argument("micrographs", nargs="+", help="MRC files, folders or globs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--particles",
        nargs="+",
        type=Path,
        metavar="STAR",
        help="particle coordinates: one STAR file, or RELION per-micrograph files",
    )
    src.add_argument(
        "--no-particles", action="store_true", help="no coordinates: propose the emptiest boxes (reads pixels)"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="noise coordinates: .txt (the original `name x y` format) or .star",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="keep the boxes already in OUTPUT and add the new ones")
    mode.add_argument("--overwrite", action="store_true", help="replace OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-micrograph table")
    add_config_arguments(p, PickConfig)
    p.set_defaults(func=run)


def read_particles(paths: list[Path]) -> pd.DataFrame:
    tables = [read_coordinates(p) for p in paths]
    return pd.concat([t.loc[:, ["micrograph", "x", "y"]] for t in tables], ignore_index=True)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(PickConfig, args)
    out: Path = args.output
    existing = check_boxes_output(out, [args.micrographs, args.particles or []], args.merge, args.overwrite)
    paths = list_micrographs(args.micrographs)
    particles = None
    source = "particle coordinates"
    if args.particles:
        particles = read_particles(args.particles)
        source = str(args.particles[0]) if len(args.particles) == 1 else f"{len(args.particles)} STAR files"
    cancel = CancelToken()
    result = run_job(
        pick_noise(paths, config, particles, existing, cancel, source),
        desc="pick-noise",
        cancel=cancel,
        quiet=args.quiet,
    )
    write_boxes(out, result.boxes, overwrite=True)
    if args.quiet:
        for w in result.warnings:
            print(f"warning: {w}")
    else:
        print(result.report())
    print(f"wrote {len(result.boxes)} boxes to {out}")
    return 0
