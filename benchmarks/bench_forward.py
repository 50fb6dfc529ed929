"""Forward step: crops per second and peak memory (RSS) for 500, 2,000 and 4,000 crops at W = 384.

The streamed `run_forward` is compared with a baseline that reproduces the original program's
memory pattern (every crop, every noise patch and every step held in
Python lists, `np.vstack` copies, whole stacks written at the end) at the smallest size — both in
this script, on the same data, each measurement in a fresh child process so that its peak RSS
(`ru_maxrss`) is its own.

Usage:  python benchmarks/bench_forward.py [--sizes 500 2000 4000] [--baseline-size 500]
                                           [--workdir DIR]

Needs about 5.3 GB of free disk per 1,000 crops (the outputs; each is deleted after its run).
The micrographs are one 2048² synthetic image linked under many names (reads hit the page cache,
so the numbers measure the forward pipeline and the disk writes, not micrograph I/O).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

W = 384
PER_MIC = 100  # crops per micrograph (a 10 × 10 grid on a 2048² micrograph)
NOISE_PER_MIC = 10
SHAPE = (2048, 2048)


def make_data(folder: Path, n_crops: int) -> tuple[list[Path], Path, Path]:
    """Micrograph links, a particle STAR and a noise text for `n_crops` crops."""
    import pandas as pd

    from napari_cryoddm.io.mrc import write_mrc
    from napari_cryoddm.io.noise import write_noise_txt
    from napari_cryoddm.io.star import write_coordinates_star

    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.mrc"
    if not base.exists():
        rng = np.random.default_rng(0)
        write_mrc(base, (1000 + 20 * rng.normal(size=SHAPE)).astype(np.float32), voxel_size=1.0)
    n_mics = math.ceil(n_crops / PER_MIC)
    grid = np.linspace(300, SHAPE[0] - 300, 10)
    mics, rows, noise = [], [], []
    for m in range(n_mics):
        p = folder / f"mic_{m:04d}.mrc"
        if not p.exists():
            os.symlink(base, p)
        mics.append(p)
        rows += [(p.name, float(x), float(y)) for y in grid for x in grid]
        noise += [(p.name, 250 + 150 * k, 1850) for k in range(NOISE_PER_MIC)]
    star = folder / f"particles_{n_crops}.star"
    write_coordinates_star(star, pd.DataFrame(rows[:n_crops], columns=["micrograph", "x", "y"]), overwrite=True)
    txt = folder / f"noise_{n_crops}.txt"
    write_noise_txt(txt, pd.DataFrame(noise, columns=["micrograph", "x", "y"]))
    return mics, star, txt


def streamed(mics, star, txt, out: Path) -> int:
    from napari_cryoddm.forward import ForwardConfig, run_forward
    from napari_cryoddm.jobs import collect

    res = collect(
        run_forward(
            mics, star, txt, out, ForwardConfig(diameter=200, window=W, per_micrograph=PER_MIC, max_crops=10**6, seed=0)
        )
    )
    return res.counts["crops"]


def baseline(mics, star, txt, out: Path) -> int:
    """The original's pattern (same crops, same normalisation, same chain; float32)."""
    import mrcfile

    from napari_cryoddm.forward import ForwardConfig, pair_noise, plan_forward, schedule_coefficients
    from napari_cryoddm.preprocess import read_prepared

    config = ForwardConfig(diameter=200, window=W, per_micrograph=PER_MIC, max_crops=10**6, seed=0)
    plan = plan_forward(mics, star, txt, config)
    h = W // 2
    crops, noises = [], []
    for mi, mic in enumerate(plan.micrographs):
        image = read_prepared(mic.path, 1.0, config.normalisation).image
        for r in plan.noise[plan.noise.micrograph == mi].itertuples():
            noises.append(image[r.y - h : r.y + h, r.x - h : r.x + h].copy())
        for r in plan.crops[plan.crops.micrograph == mi].itertuples():
            crops.append(image[r.y - h : r.y + h, r.x - h : r.x + h].copy())
    beta, steps, start = config.schedule
    x = np.array(crops)
    noise = np.array(noises)
    idx = pair_noise(len(x), len(noise), steps, np.random.default_rng(0))
    coef = schedule_coefficients(beta, steps)
    inputs, labels = [], []
    for k in range(1, steps + 1):
        n_k = noise[idx[:, k - 1]]
        x_new = np.float32(coef["x_coef"][k - 1]) * x + np.float32(coef["noise_coef"][k - 1]) * n_k
        if k >= start:
            inputs.append(x)
            labels.append(x_new)
        x = x_new
    for sub in ("s1", "s2", "val", "s3"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    mrcfile.write(out / "s1/particles.mrcs", np.array(crops), overwrite=True)
    mrcfile.write(out / "s2/input.mrcs", np.vstack(inputs[:-1]), overwrite=True)
    mrcfile.write(out / "s2/label.mrcs", np.vstack(labels[:-1]), overwrite=True)
    mrcfile.write(out / "val/input.mrcs", inputs[-1], overwrite=True)
    mrcfile.write(out / "val/label.mrcs", labels[-1], overwrite=True)
    mrcfile.write(out / "s3/noise.mrcs", noise, overwrite=True)
    return len(crops)


def child(mode: str, n: int, workdir: Path) -> None:
    mics, star, txt = make_data(workdir / "data", n)
    out = workdir / f"out_{mode}_{n}"
    shutil.rmtree(out, ignore_errors=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    crops = (streamed if mode == "streamed" else baseline)(mics, star, txt, out)
    wall = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "mode": mode,
                "n": crops,
                "seconds": wall,
                "crops_per_s": crops / wall,
                "peak_rss_mb": peak / 1024,
                "rss_before_mb": rss0 / 1024,
                "written_gb": written / 1e9,
            }
        )
    )


def measure(mode: str, n: int, workdir: Path) -> dict:
    # build the inputs first (outside the measured child) so every child measures only forward
    subprocess.run([sys.executable, __file__, "--prepare", str(n), "--workdir", str(workdir)], check=True)
    r = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(n), "--workdir", str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 4000])
    ap.add_argument("--baseline-size", type=int, default=500)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        make_data(args.workdir / "data", args.prepare)
        return
    if args.child:
        child(args.child[0], int(args.child[1]), args.workdir)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_forward_"))
    rows = []
    try:
        if args.baseline_size:
            rows.append(measure("baseline", args.baseline_size, workdir))
            print(json.dumps(rows[-1]), flush=True)
        for n in args.sizes:
            rows.append(measure("streamed", n, workdir))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nW = {W}, Config 1 (T 5, start 2), {PER_MIC} crops per 2048² micrograph, {NOISE_PER_MIC} noise boxes each\n"
    )
    print("| run | crops | seconds | crops/s | written (GB) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['n']} | {r['seconds']:.1f} | {r['crops_per_s']:.0f} | "
            f"{r['written_gb']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    base = next((r for r in rows if r["mode"] == "baseline"), None)
    same = next((r for r in rows if r["mode"] == "streamed" and base and r["n"] == base["n"]), None)
    if base and same:
        print(
            f"\nat {base['n']} crops: streamed/baseline peak RSS = "
            f"{same['peak_rss_mb'] / base['peak_rss_mb']:.2f}, speed = "
            f"{same['crops_per_s'] / base['crops_per_s']:.2f}×"
        )
    streamed_rows = [r for r in rows if r["mode"] == "streamed"]
    if len(streamed_rows) > 1:
        print(
            f"peak RSS from {streamed_rows[0]['n']} to {streamed_rows[-1]['n']} crops: "
            f"×{streamed_rows[-1]['peak_rss_mb'] / streamed_rows[0]['peak_rss_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
