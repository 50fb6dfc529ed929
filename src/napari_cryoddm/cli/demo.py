"""`cryoddm demo [--out DIR] [--quick]`: the whole workflow on sample data, then a quality report."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..config import add_config_arguments, config_from_args
from ..jobs import CancelToken, run_job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run every step on sample micrographs with a known clean signal and write a report",
        description="Makes sample micrographs (particles, STAR, cryoSPARC .cs pair), picks noise, runs "
        "forward, trains, predicts, converts the .cs back with cs2star and writes "
        "DIR/report/ (montage, power spectra, FRC, metrics against the truth). "
        "--quick took 3 min 13 s on 2 idle CPU cores (training dominates; longer on a shared machine).",
    )
    p.add_argument("--out", type=Path, default=Path("cryoddm-demo"), help="output folder (default: ./cryoddm-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from ..simulation.demo import DemoConfig

    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..simulation.demo import DemoConfig, run_demo

    config = config_from_args(DemoConfig, args)
    # matplotlib (the report) builds its font cache on first import and says so: before the bar
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401

    cancel = CancelToken()
    result = run_job(run_demo(args.out, config, cancel), desc="demo", cancel=cancel, quiet=args.quiet)
    print(f"report: {result.files['report']}")
    print((result.report_dir / "metrics.md").read_text(encoding="utf-8"))
    print(f"denoised micrographs: {result.denoised[0].parent}")
    print(f"cs2star: {result.star} (within {result.cs2star_max_error_px:.2f} px of the true positions)")
    print("step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()))
    print(
        "open raw and denoised side by side in napari:\n"
        f"  cryoddm view {shlex.quote(str(result.sample_dir / 'micrographs'))} "
        f"{shlex.quote(str(result.denoised[0].parent))}"
    )
    return 0
