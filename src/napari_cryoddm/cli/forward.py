"""`cryoddm forward MICROGRAPHS… --particles STAR --noise NOISE --diameter D -o OUT`: training pairs."""

from __future__ import annotations

import argparse
import logging
import warnings

from ..config import add_config_arguments, config_from_args
from ..errors import CryoDDMError
from ..forward import PRESETS, ForwardConfig, plan_forward, run_forward
from ..jobs import CancelToken, run_job

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "forward",
        help="diffuse real particle crops with real noise patches into training pairs",
        description="Cut particle crops and noise patches from micrographs (each read once, binned "
        "first when asked, normalised) and run the CryoDDM forward chain "
        "x_k = [√α_k + √(1−α_k)(√α_k − 1)]·x_{k−1} + (1−α_k)·n_k, α_k = 1 − β·k. "
        "Writes OUT/s1/particles.mrcs, s2/{input,label}.mrcs, val/{input,label}.mrcs, "
        "s3/noise.mrcs, forward.json and pairs.npz (label = the noisier member).",
        epilog="example: cryoddm forward mics/*.mrc --particles autopick.star --noise noise.txt "
        "--diameter 200 -o forward_out",
    )
    p.add_argument("micrographs", nargs="+", help="micrograph files, folders or globs")
    p.add_argument(
        "--particles",
        nargs="+",
        required=True,
        metavar="STAR",
        help="particle coordinates: one STAR file, or RELION's per-micrograph files "
        "(x = column, y = row, pixels of the raw micrographs)",
    )
    p.add_argument(
        "--noise",
        nargs="+",
        required=True,
        metavar="NOISE",
        help="noise boxes: the `name x y` text from `cryoddm pick-noise` (or the original program), or a STAR file",
    )
    p.add_argument("-o", "--out", required=True, help="output folder (written as OUT.partial/, renamed when complete)")
    p.add_argument(
        "--preset",
        choices=(*PRESETS, "custom"),
        default=None,
        help="noise schedule: config1 (β 0.1288, T 5, start 2; the default), config2 "
        "(β 0.1, T 6, start 2); giving --beta/--steps/--start means custom",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the inputs and print what would be written (crops, noise patches, "
        "W, warnings) without reading pixels or writing anything",
    )
    add_config_arguments(p, ForwardConfig)
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> ForwardConfig:
    """The preset is config1 unless β, T or start are given (then custom, the rest from Config 1)."""
    custom = any(getattr(args, n, None) is not None for n in ("beta", "steps", "start"))
    preset = args.preset or ("custom" if custom else "config1")
    if custom and preset != "custom":
        raise CryoDDMError(
            f"--preset {preset} fixes the schedule; drop it to use --beta/--steps/--start (or say --preset custom)"
        )
    return config_from_args(ForwardConfig, args, preset=preset)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.dry_run:
        plan = plan_forward(args.micrographs, args.particles, args.noise, config, args.out)
        c = plan.counts
        beta, steps, start = plan.schedule
        gb = (c["crops"] * (1 + 2 * (steps - start) + 2) + c["noise"]) * plan.window**2 * 4 / 1e9
        print(
            f"{args.out}: would write {c['crops']} crops from {len(set(plan.crops.micrograph))} of "
            f"{len(plan.micrographs)} micrographs ({c['skipped_outside']} leave the image, "
            f"{c['skipped_limit']} over the limits, {c['unmatched_particles']} match no micrograph), "
            f"{c['noise']} noise patches, W = {plan.window} px, d = {plan.diameter_px:.1f} px, "
            f"bin ×{plan.factor:g}, β {beta}, T {steps}, start {start}: {c['s2_pairs']} s2 pairs, "
            f"{c['val_pairs']} val pairs, about {gb:.2f} GB"
        )
        for msg in plan.warnings:
            print(f"warning: {msg}")
        return 0
    cancel = CancelToken()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # shown once through logging instead
        result = run_job(
            run_forward(args.micrographs, args.particles, args.noise, args.out, config, cancel),
            desc="forward",
            cancel=cancel,
        )
    c = result.counts
    beta, steps, start = config.schedule
    print(
        f"{result.out}: {c['crops']} crops ({c['skipped_outside']} left the image, "
        f"{c['skipped_limit']} over the limits), {c['noise']} noise patches, W = {result.window} px, "
        f"β {beta}, T {steps}, start {start}: {c['s2_pairs']} s2 pairs, {c['val_pairs']} val pairs"
    )
    if c["unmatched_particles"] or c["unmatched_noise"]:
        print(
            f"note: {c['unmatched_particles']} particles and {c['unmatched_noise']} noise boxes name "
            f"micrographs that were not given (left out)"
        )
    return 0  # warnings went to the log (stderr) as they arose
