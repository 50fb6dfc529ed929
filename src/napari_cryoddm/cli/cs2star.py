"""`cryoddm cs2star`: cryoSPARC `.cs` particle sets → RELION STAR for the raw micrographs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import add_config_arguments, config_from_args
from ..cs2star import Cs2StarConfig, convert, convert_job_dirs
from ..errors import CryoDDMError
from ..jobs import CancelToken, run_job
from . import wrap

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  # one refinement: particles + passthrough (pyem's conversion; image names dropped)
  cryoddm cs2star J102/J102_008_particles.cs J102/J102_passthrough_particles.cs -o particles.star

  # back to the raw micrographs: cryoSPARC saw 2x-binned denoised micrographs
  cryoddm cs2star J102/J102_008_particles.cs J102/J102_passthrough_particles.cs -o raw.star \\
      --scale 2 --raw-micrographs CtfFind/job004/micrographs_ctf.star

  # the original CryoDDM batch: 3 consecutive jobs J102 J103 J104 -> OUT/class0..class2
  cryoddm cs2star --job-dir /data/CS-proj/J102 --jobs 3 -o cs2star_out

Coordinates: X = x_frac x nx, Y = (1 - y_frac) x ny (cryoSPARC fractions start at the
bottom-left; RELION's first row is the top of the image), rounded as pyem rounds them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cs2star",
        help="convert cryoSPARC .cs particles to RELION STAR (pyem's mapping) for the raw micrographs",
        description=wrap(
            "Convert cryoSPARC particle files (.cs, numpy or compressed) to RELION 3.1 STAR, "
            "field by field as pyem's csparc2star.py, and carry the particles back to the "
            "raw micrographs (binning scale, raw names, raw CTF and optics)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="FILE.cs",
        help="the particle file (e.g. J102_008_particles.cs), then passthrough files "
        "(e.g. J102_passthrough_particles.cs) joined on uid",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="output .star (or, with --job-dir, the output folder for class0 …)",
    )
    p.add_argument(
        "--job-dir",
        type=Path,
        default=None,
        help="a cryoSPARC job folder J<N>: its highest J<N>_NNN_particles.cs and J<N>_passthrough_particles.cs",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --job-dir: convert K consecutive jobs J<N> … J<N+K-1> into class0 … class{K-1} (default: 1)",
    )
    add_config_arguments(p, Cs2StarConfig)
    p.add_argument("--noswapxy", dest="swap_xy", action="store_false", help="pyem's spelling of --no-swap-xy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(Cs2StarConfig, args)
    cancel = CancelToken()
    if args.job_dir is not None:
        if args.inputs:
            raise CryoDDMError("give .cs files or --job-dir, not both")
        results = run_job(
            convert_job_dirs(args.job_dir, args.output, args.jobs, config, cancel), desc="cs2star", cancel=cancel
        )
        for res in results:
            _print_notes(res.notes)
            print(
                f"{res.outputs[0].parent}: {res.n_particles} particles on {res.n_micrographs} "
                f"micrographs → {', '.join(o.name for o in res.outputs)}"
            )
        return 0
    if not args.inputs:
        raise CryoDDMError("give a particle .cs file (and passthrough files), or --job-dir J<N>")
    if args.jobs != 1:
        raise CryoDDMError("--jobs needs --job-dir")
    result = run_job(
        convert(args.inputs[0], args.inputs[1:], args.output, config, cancel), desc="cs2star", cancel=cancel
    )
    _print_notes(result.notes)
    scale = f" (coordinates × {result.scale:g})" if result.scale != 1 else ""
    print(
        f"{', '.join(str(o) for o in result.outputs)}: {result.n_particles} particles on "
        f"{result.n_micrographs} micrographs{scale}"
    )
    return 0


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        log.warning(note)
