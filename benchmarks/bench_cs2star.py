"""cs2star: particles per second for a refinement-sized particle set, and the pose step against a
per-particle baseline.

A synthetic refinement output (`J9_004_particles.cs` with blob/ctf/alignments3D, plus
`J9_passthrough_particles.cs` with location/*, uids shuffled so the join does real work) is
converted end to end (read → join → map → write RELION 3.1 STAR) at each size. The baseline, run
in the same process on the same poses, converts rotation vectors to RELION Euler angles one
particle at a time (Rodrigues matrix, transpose, Euler decomposition per row), as a direct port of
a per-row script would; the vectorised path must give the same rotations.

Usage:  python benchmarks/bench_cs2star.py [--sizes 100000 300000] [--baseline-size 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_cryoddm.cs2star import Cs2StarConfig, build_tables, convert
from napari_cryoddm.cs2star.rotations import matrix_to_relion_euler, relion_euler_to_matrix, rotvec_to_relion_matrix
from napari_cryoddm.io.cryosparc import load_cs
from napari_cryoddm.io.star import write_particles_star
from napari_cryoddm.jobs import collect

N_MICS = 2000


def make_pair(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    uid = rng.permutation(np.arange(1, n + 1, dtype=np.uint64) * np.uint64(7919))
    mic = rng.integers(0, N_MICS, n)
    stems = np.array([f"{10**20 + k:021d}_FoilHole_{k:06d}_Data_fractions" for k in range(N_MICS)])
    p = np.zeros(
        n,
        dtype=[
            ("uid", "<u8"),
            ("blob/path", "S90"),
            ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"),
            ("ctf/exp_group_id", "<u4"),
            ("ctf/accel_kv", "<f4"),
            ("ctf/cs_mm", "<f4"),
            ("ctf/amp_contrast", "<f4"),
            ("ctf/df1_A", "<f4"),
            ("ctf/df2_A", "<f4"),
            ("ctf/df_angle_rad", "<f4"),
            ("ctf/phase_shift_rad", "<f4"),
            ("ctf/bfactor", "<f4"),
            ("alignments3D/split", "<u4"),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/psize_A", "<f4"),
            ("alignments3D/class_posterior", "<f4"),
            ("alignments3D/class", "<u4"),
        ],
    )
    p["uid"] = uid
    p["blob/path"] = np.char.add(np.char.add("J9/extract/", stems[mic]), "_particles.mrc").astype("S90")
    p["blob/idx"] = rng.integers(0, 400, n)
    p["blob/shape"] = 256
    p["blob/psize_A"] = 1.06
    p["ctf/accel_kv"], p["ctf/cs_mm"], p["ctf/amp_contrast"] = 300, 2.7, 0.1
    p["ctf/df1_A"] = rng.uniform(8000, 25000, n)
    p["ctf/df2_A"] = p["ctf/df1_A"] - 150
    p["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    p["alignments3D/split"] = rng.integers(0, 2, n)
    p["alignments3D/shift"] = rng.normal(0, 3, (n, 2))
    p["alignments3D/pose"] = rng.normal(0, 1.5, (n, 3))
    p["alignments3D/psize_A"] = 1.06
    p["alignments3D/class_posterior"] = 1
    t = np.zeros(
        n,
        dtype=[
            ("uid", "<u8"),
            ("location/micrograph_path", "S90"),
            ("location/micrograph_shape", "<u4", (2,)),
            ("location/center_x_frac", "<f4"),
            ("location/center_y_frac", "<f4"),
        ],
    )
    order = rng.permutation(n)
    t["uid"] = uid[order]
    t["location/micrograph_path"] = np.char.add(np.char.add("J1/imported/", stems[mic[order]]), ".mrc").astype("S90")
    t["location/micrograph_shape"] = (5760, 4092)
    t["location/center_x_frac"] = rng.uniform(0, 1, n)
    t["location/center_y_frac"] = rng.uniform(0, 1, n)
    pp, tp = folder / "J9_004_particles.cs", folder / "J9_passthrough_particles.cs"
    for path, arr in ((pp, p), (tp, t)):
        with open(path, "wb") as fh:
            np.save(fh, arr)
    return pp, tp


def per_row_baseline(pose: np.ndarray) -> np.ndarray:
    """One particle at a time: Rodrigues matrix → transpose → RELION Euler decomposition."""
    out = np.empty((len(pose), 3))
    eye = np.eye(3)
    for i, v in enumerate(pose.astype(np.float64)):
        theta = np.linalg.norm(v)
        if theta < 1e-12:
            r = eye
        else:
            k = v / theta
            km = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
            r = (eye + np.sin(theta) * km + (1 - np.cos(theta)) * km @ km).T
        sb = np.hypot(r[0, 2], r[1, 2])
        if sb > 16 * np.finfo(float).eps:
            out[i] = np.arctan2(r[2, 1], r[2, 0]), np.arctan2(sb, r[2, 2]), np.arctan2(r[1, 2], -r[0, 2])
        elif r[2, 2] > 0:
            out[i] = 0.0, 0.0, np.arctan2(-r[1, 0], r[0, 0])
        else:
            out[i] = 0.0, np.pi, np.arctan2(r[1, 0], -r[0, 0])
    return np.rad2deg(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--baseline-size", type=int, default=20_000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            pp, tp = make_pair(folder, n)
            t0 = time.perf_counter()
            res = collect(convert(pp, [tp], folder / "out.star", Cs2StarConfig(keep_image_names=True)))
            dt = time.perf_counter() - t0
            assert res.n_particles == n
            size_mb = (folder / "out.star").stat().st_size / 1e6
            t0 = time.perf_counter()
            tables_in = load_cs(pp), load_cs(tp)
            t1 = time.perf_counter()
            tables = build_tables(tables_in[0], [tables_in[1]], Cs2StarConfig(keep_image_names=True))
            t2 = time.perf_counter()
            write_particles_star(folder / "again.star", tables.particles, tables.optics)
            t3 = time.perf_counter()
            rows.append((n, dt, n / dt, size_mb, t1 - t0, t2 - t1, t3 - t2))
        rng = np.random.default_rng(1)
        pose = rng.normal(0, 1.5, (args.baseline_size, 3)).astype(np.float32)
        t0 = time.perf_counter()
        base = per_row_baseline(pose)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = np.column_stack(matrix_to_relion_euler(rotvec_to_relion_matrix(pose)))
        t_ours = time.perf_counter() - t0
        err = np.abs(relion_euler_to_matrix(*ours.T) - relion_euler_to_matrix(*base.T)).max()
    print(
        "| particles | end-to-end (s) | particles/s | STAR size (MB) | read .cs (s) | join + map (s) | write STAR (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, dt, rate, mb, tr, tm, tw in rows:
        print(f"| {n:,} | {dt:.2f} | {rate:,.0f} | {mb:.0f} | {tr:.2f} | {tm:.2f} | {tw:.2f} |")
    print()
    print(f"| pose step, {args.baseline_size:,} particles | time (s) | ratio |")
    print("|---|---:|---:|")
    print(f"| per-particle loop (baseline) | {t_base:.3f} | 1.0 |")
    print(f"| vectorised (ours) | {t_ours:.4f} | {t_base / t_ours:.0f}× faster |")
    print(f"\nmax |ΔR| between the two: {err:.1e}")


if __name__ == "__main__":
    main()
