"""Reader: time and peak memory to open N micrographs and show one, lazy stack vs eager mrcfile.read.

N copies of a 4096² micrograph (by default the real EPU 2.9 file `full_size/epu2.9_example.mrc`,
uint16 with a 0.9 MB FEI2 extended header; `--synthetic` writes float32 noise instead) are made
in a temporary folder. Each method then runs in its own fresh Python process, so peak RSS
(`ru_maxrss`) belongs to that method alone:

- lazy: the plugin's reader work (`micrograph_layer_data`: headers, bounded contrast sample,
  dask stack + pyramid), then "show one slice": the overview level napari draws for a whole
  micrograph on a ~1000 px canvas, and the full-resolution slice (what zooming in needs);
- eager: `mrcfile.read` of every file (what a reader without laziness does), then index one.

Both read the same freshly written files (warm page cache for both). Usage:

    python benchmarks/bench_reader.py [--n 100] [--size 4096] [--synthetic] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REAL_4K = Path(__file__).resolve().parents[2] / "shared/data/real/full_size/epu2.9_example.mrc"


def make_files(folder: Path, n: int, size: int, synthetic: bool) -> int:
    import mrcfile

    folder.mkdir(parents=True, exist_ok=True)
    if not synthetic and size == 4096 and REAL_4K.exists():
        for k in range(n):
            shutil.copyfile(REAL_4K, folder / f"mic_{k:04d}.mrc")
    else:
        rng = np.random.default_rng(0)
        data = rng.normal(0, 1, size=(size, size)).astype(np.float32)
        for k in range(n):
            with mrcfile.new(folder / f"mic_{k:04d}.mrc", overwrite=True) as m:
                m.set_data(data + k)
                m.voxel_size = 1.0
    return sum(p.stat().st_size for p in folder.iterdir())


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase(method: str, folder: Path, index: int) -> dict:
    """Runs in a child process; prints one JSON line."""
    if method == "napari":
        import napari

        viewer = napari.Viewer(show=True)
        base = _rss_mb()
        t0 = time.perf_counter()
        (layer,) = viewer.open(folder, plugin="napari-cryoddm")
        viewer.screenshot(canvas_only=True, flash=False)  # forces the first draw
        t_first = time.perf_counter() - t0
        shown = int(viewer.dims.current_step[0])  # napari starts on the middle micrograph
        t1 = time.perf_counter()
        viewer.dims.set_point(0, (shown + 1) % layer.data[0].shape[0])
        viewer.screenshot(canvas_only=True, flash=False)
        t_next = time.perf_counter() - t1
        viewer.close()
        return {"open_and_draw_s": t_first, "draw_other_slice_s": t_next, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}
    if method == "lazy":
        from napari_cryoddm._napari.reader import micrograph_layer_data

        base = _rss_mb()
        t0 = time.perf_counter()
        data, kw, _ = micrograph_layer_data(folder)
        t_open = time.perf_counter() - t0
        levels = data if kw["multiscale"] else [data]
        t1 = time.perf_counter()
        overview = np.asarray(levels[-1][index])
        t_overview = time.perf_counter() - t1
        t2 = time.perf_counter()
        full = np.asarray(levels[0][index])
        t_full = time.perf_counter() - t2
        t3 = time.perf_counter()
        np.asarray(levels[-1][(index + 1) % levels[0].shape[0]])
        t_next = time.perf_counter() - t3
        return {
            "open_s": t_open,
            "show_overview_s": t_overview,
            "show_full_s": t_full,
            "show_next_s": t_next,
            "peak_rss_mb": _rss_mb(),
            "base_rss_mb": base,
            "shape": list(levels[0].shape),
            "levels": len(levels),
            "overview_shape": list(overview.shape),
            "checksum": float(full[::64, ::64].mean()),
        }
    import mrcfile

    base = _rss_mb()
    paths = sorted(folder.iterdir())
    t0 = time.perf_counter()
    arrays = [mrcfile.read(p) for p in paths]
    t_open = time.perf_counter() - t0
    t1 = time.perf_counter()
    full = np.asarray(arrays[index], dtype=np.float32)
    t_full = time.perf_counter() - t1
    t2 = time.perf_counter()
    np.asarray(arrays[(index + 1) % len(arrays)], dtype=np.float32)
    t_next = time.perf_counter() - t2
    return {
        "open_s": t_open,
        "show_overview_s": t_full,
        "show_full_s": t_full,
        "show_next_s": t_next,
        "peak_rss_mb": _rss_mb(),
        "base_rss_mb": base,
        "shape": [len(arrays), *arrays[0].shape],
        "levels": 1,
        "checksum": float(full[::64, ::64].mean()),
    }


def run_child(method: str, folder: Path, index: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", method, "--dir", str(folder), "--index", str(index)]
    if method == "napari" and not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{method} phase failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--synthetic", action="store_true", help="float32 noise instead of the real file")
    ap.add_argument("--dir", type=Path, help="folder for the files (default: a temporary one)")
    ap.add_argument("--index", type=int, default=None, help="the slice to show (default: the middle)")
    ap.add_argument(
        "--napari",
        action="store_true",
        help="also time napari itself: viewer.open + first draw, then another slice (needs a display or xvfb-run)",
    )
    ap.add_argument("--phase", choices=("lazy", "eager", "napari"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.dir, args.index)))
        return
    tmp = None
    folder = args.dir
    if folder is None:
        tmp = tempfile.mkdtemp(prefix="bench_reader_", dir=os.environ.get("TMPDIR"))
        folder = Path(tmp) / "mics"
    try:
        t0 = time.perf_counter()
        total = make_files(folder, args.n, args.size, args.synthetic)
        print(f"made {args.n} files, {total / 2**30:.2f} GiB, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        index = args.n // 2 if args.index is None else args.index
        lazy = run_child("lazy", folder, index)
        eager = run_child("eager", folder, index)
        assert abs(lazy["checksum"] - eager["checksum"]) < 1e-3 * (abs(eager["checksum"]) + 1), (
            "the lazy slice differs from mrcfile's"
        )
        print(
            f"\n{args.n} × {args.size}² micrographs ({total / 2**30:.2f} GiB on disk), "
            f"lazy stack {lazy['shape']} with {lazy['levels']} pyramid levels\n"
        )
        print("| | lazy (napari-cryoddm) | eager `mrcfile.read` | eager / lazy |")
        print("|---|---:|---:|---:|")
        rows = [
            ("open (s)", "open_s"),
            ("show one slice, overview level (s; lazy: first dask compute)", "show_overview_s"),
            ("show that slice at full resolution (s)", "show_full_s"),
            ("show the next slice, overview level (s)", "show_next_s"),
        ]
        for label, key in rows:
            a, b = lazy[key], eager[key]
            ratio = f"{b / a:.0f}×" if a > 0 and b / a >= 10 else (f"{b / a:.2f}×" if a > 0 else "–")
            print(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |")
        for label in ("open + show (s)",):
            a = lazy["open_s"] + lazy["show_overview_s"]
            b = eager["open_s"] + eager["show_full_s"]
            print(f"| {label} | {a:.3f} | {b:.3f} | {b / a:.0f}× |")
        la = lazy["peak_rss_mb"] - lazy["base_rss_mb"]
        ea = eager["peak_rss_mb"] - eager["base_rss_mb"]
        print(
            f"| peak RSS (MB) | {lazy['peak_rss_mb']:.0f} | {eager['peak_rss_mb']:.0f} | "
            f"{eager['peak_rss_mb'] / lazy['peak_rss_mb']:.1f}× |"
        )
        print(f"| peak RSS above the interpreter and imports (MB) | {la:.0f} | {ea:.0f} | {ea / max(la, 1):.0f}× |")
        if args.napari:
            nap = run_child("napari", folder, index)
            print(
                f"\nIn napari (Viewer shown, plugin reader): `viewer.open(folder)` + first draw "
                f"{nap['open_and_draw_s']:.2f} s; drawing another micrograph "
                f"{nap['draw_other_slice_s']:.2f} s; peak RSS {nap['peak_rss_mb']:.0f} MB "
                f"({nap['peak_rss_mb'] - nap['base_rss_mb']:.0f} MB above the viewer's own)."
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
