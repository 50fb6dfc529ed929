"""`cryoddm sample OUT`: synthetic micrographs with known particles, clean signal, STAR and .cs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_config_arguments, config_from_args
from ..jobs import CancelToken, run_job
from ..simulation.sample import SampleConfig, generate_sample
from . import wrap


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="write synthetic micrographs with ground truth (particles, clean signal)",
        description=wrap(
            "Write a seeded set of synthetic single-particle micrographs whose truth is "
            "known: OUT/micrographs/*.mrc (noisy), OUT/clean/*.mrc (CTF-modulated signal), "
            "OUT/particles.star (RELION 3.1: coordinates, angles, defocus, class = "
            "conformation), OUT/truth.json, and a cryoSPARC pair OUT/particles.cs + "
            "OUT/passthrough.cs. The same seed gives byte-identical files."
        ),
        epilog="examples:\n"
        "  cryoddm sample sample_data\n"
        "  cryoddm sample bench --pixel-size 1.5 --particles 15 --snr 0.01 --hinge-angle 6 -n 200\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, SampleConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(SampleConfig, args)
    cancel = CancelToken()
    result = run_job(
        generate_sample(args.out, config, cancel=cancel, overwrite=args.overwrite),
        desc="sample",
        cancel=cancel,
        quiet=args.quiet,
    )
    n = len(result.micrographs)
    print(
        f"wrote {n} micrograph{'s' if n != 1 else ''} ({config.width}×{config.height} px, "
        f"{config.pixel_size:g} Å/px) with {result.n_particles} particles of {config.diameter:g} Å "
        f"({config.diameter_px:.0f} px, window {config.window}) to {result.out_dir}/: "
        f"micrographs/, clean/, particles.star, particles.cs, passthrough.cs, truth.json"
    )
    return 0
