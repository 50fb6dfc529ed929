"""Noise picker: (1) speed of `cryoddm pick-noise` on many 4k micrographs reading only headers,
against the original program's rule run in the same process; (2) the coordinate-free statistic,
measured against alternatives on sample data with known particles.

(1) N header-only 4096² float32 MRC files (sparse: the pixel block is a hole, so the headers are
real and `read_header`'s size check passes) and a STAR file with P particles per micrograph. Timed:
reading the headers alone (the floor), the whole CLI (STAR parse, name matching, picking, atomic
write), and — the baseline — the original's algorithm (pure-Python greedy: each shuffled grid
point tested against every particle square and every accepted square) on a subset, extrapolated.

(2) On sample micrographs (1024², 45 px particles, W = 128, SNR 0.05), each statistic proposes
its emptiest boxes, as many per micrograph as the default produces; the table gives the fraction
of boxes a true particle disc reaches into, and its ratio to uniformly random boxes.

Usage:  python benchmarks/bench_picker.py [--n 1000] [--particles 300] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
from scipy import ndimage

from napari_cryoddm import box_placement, box_ranking, picking
from napari_cryoddm.binning import fourier_bin
from napari_cryoddm.cli import build_parser, main
from napari_cryoddm.io.mrc import read_header
from napari_cryoddm.normalise import Normalisation, normalise
from napari_cryoddm.params import window_for_diameter


def sparse_mrc(path: Path, ny: int, nx: int) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((1, 1), np.float32))
        m.header.nx, m.header.ny, m.header.nz = nx, ny, 1
        m.header.mx, m.header.my, m.header.mz = nx, ny, 1
        m.header.cella = (nx * 1.0, ny * 1.0, 1.0)
    with open(path, "r+b") as f:
        f.truncate(1024 + ny * nx * 4)


def original_rule(nx: int, ny: int, particles: np.ndarray, box: int, rng) -> list[tuple[int, int]]:
    """The original find_noisy_txt: 200 px margin, step box//8, shuffled, squares of `box` vs
    particle squares and accepted squares (strict), ≤ 100 per micrograph — pure Python."""
    pts = [(int(x), int(y)) for x, y in particles]
    grid = [
        (x, y)
        for x in range(box // 2 + 200, nx - box // 2 - 200, box // 8)
        for y in range(box // 2 + 200, ny - box // 2 - 200, box // 8)
    ]
    rng.shuffle(grid)
    out: list[tuple[int, int]] = []
    for x, y in grid:
        if any(abs(x - px) < box and abs(y - py) < box for px, py in pts):
            continue
        if any(abs(x - ax) < box and abs(y - ay) < box for ax, ay in out):
            continue
        out.append((x, y))
        if len(out) >= 100:
            break
    return out


def speed(n: int, n_particles: int, diameter: float = 150.0) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i in range(n):
            p = tmp / f"mic_{i:05d}.mrc"
            sparse_mrc(p, 4096, 4096)
            paths.append(p)
        coords = rng.uniform(0, 4096, (n, n_particles, 2))
        lines = [f"{p.name} {x:.2f} {y:.2f}" for p, c in zip(paths, coords) for x, y in c]
        star = tmp / "particles.star"
        star.write_text(
            "data_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n"
            "_rlnCoordinateY #3\n" + "\n".join(lines) + "\n"
        )
        t = time.perf_counter()
        for p in paths:
            read_header(p)
        t_headers = time.perf_counter() - t
        out = tmp / "noise.txt"
        t = time.perf_counter()
        build_parser()  # imports every subcommand once (a fresh process pays this too)
        t_imports = time.perf_counter() - t
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(
                [
                    "pick-noise",
                    str(tmp),
                    "--particles",
                    str(star),
                    "--diameter",
                    str(diameter),
                    "--quiet",
                    "-o",
                    str(out),
                ]
            )
        t_cli = time.perf_counter() - t
        assert rc == 0
        n_boxes = sum(1 for _ in out.open())
        sub = max(1, min(n, 20))
        box = window_for_diameter(diameter)
        t = time.perf_counter()
        orig = [original_rule(4096, 4096, coords[i], box, np.random.default_rng(42)) for i in range(sub)]
        t_orig = (time.perf_counter() - t) * n / sub
    print(f"\n(1) {n} micrographs 4096², {n_particles} particles each, d = {diameter:.0f} px, W = {box} px")
    print("| what | time (s) | per micrograph (ms) | vs this CLI |")
    print("|---|---:|---:|---:|")
    print(f"| read headers only (floor) | {t_headers:.2f} | {1e3 * t_headers / n:.2f} | {t_headers / t_cli:.2f}× |")
    print(f"| `cryoddm pick-noise` (all of it) | {t_cli:.2f} | {1e3 * t_cli / n:.2f} | 1.00× |")
    print(f"| imports of a fresh `cryoddm` process (all subcommands) | {t_imports:.2f} | – | – |")
    print(
        f"| original rule, pure Python (from {sub} micrographs) | {t_orig:.2f} | "
        f"{1e3 * t_orig / n:.2f} | {t_orig / t_cli:.1f}× |"
    )
    print(
        f"boxes written: {n_boxes} ({n_boxes / n:.1f} per micrograph; the original rule found "
        f"{np.mean([len(o) for o in orig]):.1f} per micrograph: particle squares of W instead of "
        f"discs, a 200 px margin)"
    )


def _alt_scores(image: np.ndarray, d: float, w: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alternative statistics on the same grid (for the comparison only)."""
    ys, xs = box_placement.candidate_grid(image.shape, w)
    f = max(1.0, d / box_ranking.STRUCTURE_DIAMETER_PX)
    small = fourier_bin(normalise(image, Normalisation()), f)
    db, wb = d / f, int(round(w / f))
    if kind == "box variance of a low-passed image":
        lp = ndimage.gaussian_filter(small, db / 4)
        m = ndimage.uniform_filter(lp * lp, wb) - ndimage.uniform_filter(lp, wb) ** 2
    else:  # box mean of the band-passed energy
        band = ndimage.gaussian_filter(small, 1.0) - ndimage.gaussian_filter(small, 0.5 * db)
        m = ndimage.uniform_filter(band * band, wb, mode="nearest")
    cy = np.round((ys - w // 2 + (w - 1) / 2) / f).astype(int)
    cx = np.round((xs - w // 2 + (w - 1) / 2) / f).astype(int)
    return ys, xs, m[np.ix_(cy, cx)]


def statistics(seeds: list[int]) -> None:
    from napari_cryoddm.simulation.sample import sample_arrays
    from napari_cryoddm.simulation.sample_config import SampleConfig

    sets = [sample_arrays(SampleConfig(n_micrographs=4, seed=s)) for s in seeds]
    cfg = sets[0].config
    d, w = cfg.diameter_px, cfg.window
    lo, hi = box_placement.centre_range(cfg.width, w)

    def hits(xy, truth):
        if not len(xy):
            return 0
        return int(
            (
                box_placement.particle_box_distance(xy[:, 0], xy[:, 1], w, truth[:, 0], truth[:, 1]).min(axis=1) < d / 2
            ).sum()
        )

    rows: dict[str, list[int]] = {}
    counts: list[int] = []
    rand_hit = rand_n = 0
    rng = np.random.default_rng(0)
    variants = {
        "default: max local energy, box + d/2, background σ d/2": dict(),
        "max local energy, box only (no reach)": dict(REACH=0.0),
        "max local energy, background σ d": dict(BACKGROUND_SIGMA=1.0),
    }
    saved = {k: getattr(picking, k) for k in ("REACH", "BACKGROUND_SIGMA")}
    for s in sets:
        for i in range(cfg.n_micrographs):
            truth = s.table[s.table["index"] == i][["x", "y"]].to_numpy(np.float64)
            xy, _ = box_ranking.rank_empty_boxes(s.noisy[i], d, w)
            n_i = max(len(xy), 1)
            counts.append(len(xy))
            for name, patch in variants.items():
                for k, v in patch.items():
                    setattr(picking, k, v)
                smap = box_ranking.structure_map(s.noisy[i], d, w)
                for k, v in saved.items():
                    setattr(picking, k, v)
                order = np.argsort(smap.score.reshape(-1), kind="stable")
                sel = np.array(
                    box_placement.greedy_place(
                        order, smap.ys, smap.xs, w, max(1, w // 8), 0.0, smap.outlier.copy(), n_i
                    )
                ).reshape(-1, 2)
                rows.setdefault(name, [0, 0])
                rows[name][0] += hits(sel, truth)
                rows[name][1] += len(sel)
            for name in ("box mean of the band-passed energy", "box variance of a low-passed image"):
                ys, xs, sc = _alt_scores(s.noisy[i], d, w, name)
                order = np.argsort(sc.reshape(-1), kind="stable")
                sel = np.array(
                    box_placement.greedy_place(order, ys, xs, w, max(1, w // 8), 0.0, np.zeros(sc.shape, bool), n_i)
                ).reshape(-1, 2)
                rows.setdefault(name, [0, 0])
                rows[name][0] += hits(sel, truth)
                rows[name][1] += len(sel)
            r = rng.integers(lo, hi + 1, (200 * n_i, 2))
            rand_hit += hits(r, truth)
            rand_n += len(r)
    rand = rand_hit / rand_n
    print(
        f"\n(2) sample data: seeds {seeds}, {len(counts)} micrographs 1024², d = {d:.0f} px, "
        f"W = {w}; default threshold {picking.PickConfig().empty_threshold} gave "
        f"{sum(counts)} boxes ({np.mean(counts):.1f} per micrograph); each statistic takes as many"
    )
    print("| statistic | boxes | a particle reaches in | ratio to random |")
    print("|---|---:|---:|---:|")
    for name, (h, n) in rows.items():
        print(f"| {name} | {n} | {h / max(n, 1):.3f} | {h / max(n, 1) / rand:.2f} |")
    print(f"| uniformly random boxes | {rand_n} | {rand:.3f} | 1.00 |")


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="micrographs for the speed run")
    ap.add_argument("--particles", type=int, default=100, help="particles per micrograph")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-statistics", action="store_true")
    args = ap.parse_args()
    print("machine: 2-core x86-64 CPU, no GPU, 24 GB")
    if not args.skip_speed:
        speed(args.n, args.particles)
    if not args.skip_statistics:
        statistics(args.seeds)


if __name__ == "__main__":
    main_()
