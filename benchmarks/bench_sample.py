"""How fast the sample generator is, against the floor of writing pure noise (same process).

    python benchmarks/bench_sample.py [--repeats 3] [--n 8]

Rows: the baseline (draw 1024² Gaussian noise and write it as float32 MRC, twice per micrograph
like the generator's noisy + clean files), `generate_sample` at the defaults (1024², 3 Å/px,
7 particles of 45 px) with one and two simulation threads, the quality benchmark's regime
(1.5 Å/px, 90 px particles, 15 per micrograph), and napari's sample menu (first use, cached).
Medians of `--repeats` runs; the ratio is against the baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.jobs import collect
from napari_cryoddm.simulation import sample as S


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds (CPU time, all threads, is robust to a busy machine)."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=8, help="micrographs per run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sample-"))
    n = args.n

    def fresh(name: str) -> Path:
        p = work / name
        shutil.rmtree(p, ignore_errors=True)
        return p

    def baseline() -> None:
        out = fresh("noise")
        out.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            img = rng.standard_normal((1024, 1024))
            write_mrc(out / f"a{i}.mrc", img, voxel_size=3.0)
            write_mrc(out / f"b{i}.mrc", img, voxel_size=3.0)

    rows: list[tuple[str, tuple[float, float]]] = [
        ("baseline: noise + 2 MRC writes per micrograph", timed(baseline, args.repeats))
    ]
    defaults = S.SampleConfig(n_micrographs=n)
    original = S.default_workers
    for workers in (1, 2):
        S.default_workers = lambda w=workers: w
        rows.append(
            (
                f"generate_sample, defaults (1024², 3 Å/px, 7 × 45 px), {workers} thread(s)",
                timed(lambda: collect(S.generate_sample(fresh("d"), defaults)), args.repeats),
            )
        )
    S.default_workers = original
    bench = S.SampleConfig(n_micrographs=n, pixel_size=1.5, particles=15, snr=0.01, hinge_angle=6.0)
    rows.append(
        (
            "generate_sample, benchmark regime (1.5 Å/px, 15 × 90 px, W 256)",
            timed(lambda: collect(S.generate_sample(fresh("b"), bench)), args.repeats),
        )
    )
    rows.append(("sample_arrays (in memory), defaults", timed(lambda: S.sample_arrays(defaults), args.repeats)))

    os.environ["CRYODDM_CACHE_DIR"] = str(work / "cache")
    from napari_cryoddm._napari import sample_data

    def first_use(fn):
        shutil.rmtree(work / "cache", ignore_errors=True)
        fn()

    napari_rows = [
        ("napari sample micrograph, first use", timed(lambda: first_use(sample_data.sample_micrograph), args.repeats)),
        ("napari sample micrograph, cached", timed(sample_data.sample_micrograph, args.repeats)),
        ("napari sample stack (4), first use", timed(lambda: first_use(sample_data.sample_stack), args.repeats)),
        ("napari sample stack (4), cached", timed(sample_data.sample_stack, args.repeats)),
    ]
    base = rows[0][1][0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{n} micrographs of 1024² per run, median of {args.repeats}; load average {load:.1f}"
    )
    print()
    print("| what | wall s | CPU s | wall per micrograph | wall × baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / n:.3f} | {wall / base:.1f} |")
    for name, (wall, cpu) in napari_rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | – | – |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
