"""Prediction speed and memory: Topaz-Denoise's tiling, the original CryoDDM's, and ours.

One run, same weights, same machine; each scheme runs in its own child process so its peak RSS
(ru_maxrss) is its own. Seconds per micrograph, model-only (tiling + network + stitching on an
in-memory normalised image) and end to end (read the MRC, normalise, predict, write the MRC).

  (a) Topaz-Denoise: 1024 px tiles + 500 px padding, one tile at a time, per-tile z-score, fp32
  (b) original CryoDDM: 384 px tiles (256 core + 64 margin, zero fill outside), batch 16,
      min–max normalised, fp32
  (c) ours: `predict_files` defaults on this device (balanced tiles with 192 px margins covering
      the 161 px receptive field, lean full-resolution stages, read-ahead/write-behind)
  (d) ours on an 8192² micrograph (peak RSS; `--tiles-8k N` stops after N tiles to save time)

    python benchmarks/bench_predict.py                 # 4096² (the real EPU 4k if present)
    python benchmarks/bench_predict.py --size 2048 --tiles-8k 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REAL_4K = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "full_size" / "epu2.9_example.mrc"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read(path: str) -> np.ndarray:
    from napari_cryoddm.io.mrc import read_micrograph

    return read_micrograph(path)[0]


def _write(path: str, data: np.ndarray) -> None:
    import mrcfile

    mrcfile.write(path, data.astype(np.float32), overwrite=True)


def _model(ckpt: str, device: str = "cpu"):
    from napari_cryoddm.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).model.eval().to(device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def scheme_topaz(ckpt: str, src: str, dst: str, device: str = "cpu", **_kw) -> dict:
    """Topaz-Denoise's `denoise` with patch_size 1024, padding 500: one tile per forward pass."""
    import torch

    model = _model(ckpt, device)
    t0 = time.perf_counter()
    x = _read(src)
    t1 = time.perf_counter()
    h, w = x.shape
    out = np.empty_like(x)
    core, pad = 1024, 500
    with torch.inference_mode():
        for i in range(0, h, core):
            for j in range(0, w, core):
                a, b = max(0, i - pad), min(h, i + core + pad)
                c, d = max(0, j - pad), min(w, j + core + pad)
                tile = x[a:b, c:d]
                mu, sd = float(tile.mean()), float(tile.std()) or 1.0
                t = (tile - mu) / sd
                ph, pw = (-t.shape[0]) % 32, (-t.shape[1]) % 32
                t = np.pad(t, ((0, ph), (0, pw)), mode="reflect")
                y = model(torch.from_numpy(np.ascontiguousarray(t))[None, None].to(device))[0, 0].cpu().numpy()
                y = y[: b - a, : d - c] * sd + mu
                out[i : min(h, i + core), j : min(w, j + core)] = y[
                    i - a : i - a + min(core, h - i), j - c : j - c + min(core, w - j)
                ]
    _sync(device)
    t2 = time.perf_counter()
    _write(dst, out)
    t3 = time.perf_counter()
    return {"model_s": t2 - t1, "e2e_s": t3 - t0}


def scheme_original(ckpt: str, src: str, dst: str, device: str = "cpu", **_kw) -> dict:
    """The original CryoDDM predict.py: min–max, 384 tiles with 64 px zero-filled margins, batch
    16 (the original used 128 on its GPU; 16 keeps a CPU's memory in bounds)."""
    import torch

    model = _model(ckpt, device)
    t0 = time.perf_counter()
    x = _read(src)
    x = (x - x.min()) / ((x.max() - x.min()) or 1)
    t1 = time.perf_counter()
    h, w = x.shape
    core, m = 256, 64
    ny, nx = -(-h // core), -(-w // core)
    big = np.zeros((ny * core + 2 * m, nx * core + 2 * m), np.float32)  # zero fill outside
    big[m : m + h, m : m + w] = x
    out = np.zeros((ny * core, nx * core), np.float32)
    origins = [(i * core, j * core) for i in range(ny) for j in range(nx)]
    with torch.inference_mode():
        for k in range(0, len(origins), 16):
            chunk = origins[k : k + 16]
            batch = np.stack([big[i : i + core + 2 * m, j : j + core + 2 * m] for i, j in chunk])
            y = model(torch.from_numpy(batch)[:, None].to(device))[:, 0].cpu().numpy()
            for (i, j), t in zip(chunk, y):
                out[i : i + core, j : j + core] = t[m : m + core, m : m + core]
    out = out[:h, :w]
    out = (out - out.min()) / ((out.max() - out.min()) or 1)
    _sync(device)
    t2 = time.perf_counter()
    _write(dst, out)
    t3 = time.perf_counter()
    return {"model_s": t2 - t1, "e2e_s": t3 - t0}


def scheme_ours(
    ckpt: str,
    src: str,
    dst: str,
    max_tiles: int = 0,
    precision: str = "fp32",
    tile: int = 0,
    device: str = "cpu",
    compile: bool = False,
    **_kw,
) -> dict:
    """`predict_files` as the CLI runs it; model-only time is the time inside `estimate_job` (tiles, network, stitching)."""
    from napari_cryoddm import predict as P
    from napari_cryoddm.jobs import Cancelled, CancelToken, collect
    from napari_cryoddm.tiling import plan_tiles

    inner = P.estimate_job
    spent = {"s": 0.0, "tiles": 0, "shape": None}
    cancel = CancelToken()

    def timed(rt, image, cancel=None):
        """The estimate of one micrograph (tiles + network + stitching), timed; stops after
        `max_tiles` tiles when asked."""
        t = time.perf_counter()
        try:
            job = inner(rt, image, cancel)
            while True:
                try:
                    ev = next(job)
                except StopIteration as stop:
                    return stop.value
                spent["tiles"] = ev.done * rt.batch_size
                if max_tiles and spent["tiles"] >= max_tiles:
                    raise Cancelled("benchmark tile limit")
                yield ev
        finally:
            spent["s"] += time.perf_counter() - t
            spent["shape"] = plan_tiles(image.shape, rt.tile, rt.overlap)  # the tile used

    P.estimate_job = timed
    out_dir = Path(dst).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = P.PredictConfig(device=device, precision=precision, tile=tile, compile=compile)
    t0 = time.perf_counter()
    try:
        collect(P.predict_files(ckpt, src, out_dir, cfg, cancel=cancel))
    except Cancelled:
        pass
    finally:
        P.estimate_job = inner
    e2e = time.perf_counter() - t0
    g = spent["shape"]
    info = {
        "model_s": spent["s"],
        "e2e_s": e2e,
        "tiles_run": spent["tiles"],
        "tiles_total": g.n_tiles if g else None,
        "tile": list(g.tile_shape) if g else None,
        "redundancy": round(g.redundancy, 3) if g else None,
    }
    if max_tiles and g and spent["tiles"] < g.n_tiles:
        info["partial"] = True
    return info


SCHEMES = {"topaz": scheme_topaz, "original": scheme_original, "ours": scheme_ours}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    res = SCHEMES[args.child](
        args.ckpt,
        args.input,
        args.output,
        max_tiles=args.max_tiles,
        precision=args.precision,
        tile=args.tile,
        device=args.device,
        compile=args.compile,
    )
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res), flush=True)


def run_child(
    name: str,
    ckpt: Path,
    src: Path,
    work: Path,
    threads: int,
    max_tiles: int = 0,
    precision: str = "fp32",
    tile: int = 0,
    device: str = "cpu",
    compile: bool = False,
    timeout: float | None = None,
) -> dict:
    out = work / name / (src.stem + ".mrc")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--ckpt",
        str(ckpt),
        "--input",
        str(src),
        "--output",
        str(out),
        "--threads",
        str(threads),
        "--max-tiles",
        str(max_tiles),
        "--precision",
        precision,
        "--tile",
        str(tile),
        "--device",
        device,
    ] + (["--compile"] if compile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(line[7:])
    print(f"{name:>10}: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tiles-8k", type=int, default=0, help="stop the 8k run after N tiles (0: all; -1: skip)")
    ap.add_argument("--schemes", default="topaz,original,ours")
    ap.add_argument("--bf16", action="store_true", help="also run ours with bf16 autocast (CPU)")
    ap.add_argument("--child")
    ap.add_argument("--ckpt")
    ap.add_argument("--input")
    ap.add_argument("--output")
    ap.add_argument("--max-tiles", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tile", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from napari_cryoddm.checkpoint import save_checkpoint
    from napari_cryoddm.io.mrc import read_micrograph, write_mrc
    from napari_cryoddm.model import UDenoiseNet
    from napari_cryoddm.normalise import Normalisation

    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        work / "weights.pt", UDenoiseNet(), {"normalisation": Normalisation().to_dict(), "bin_factor": 1}
    )
    if args.size == 4096 and REAL_4K.exists():
        src = REAL_4K
    else:
        rng = np.random.default_rng(0)
        src = work / f"mic_{args.size}.mrc"
        write_mrc(src, rng.normal(100, 10, (args.size, args.size)).astype(np.float32), voxel_size=1.0)
    print(f"input {src} ({args.size}²), {args.threads} threads, torch {torch.__version__}", flush=True)
    results = {}
    for name in [n for n in args.schemes.split(",") if n]:
        results[name] = run_child(name, ckpt, src, work, args.threads)
    if args.bf16:
        results["ours-bf16"] = run_child("ours", ckpt, src, work / "bf16", args.threads, precision="bf16")
        a = read_micrograph(work / "ours" / (src.stem + ".mrc"))[0]
        b = read_micrograph(work / "bf16" / "ours" / (src.stem + ".mrc"))[0]
        results["ours-bf16"]["max_err_rel_std"] = float(np.abs(a - b).max() / a.std())
        results["ours-bf16"]["rms_err_rel_std"] = float(np.sqrt(np.mean((a - b) ** 2)) / a.std())
    if args.tiles_8k >= 0:
        big = work / "mic_8192.mrc"
        img = read_micrograph(src)[0]
        reps = -(-8192 // img.shape[0])
        write_mrc(big, np.tile(img, (reps, reps))[:8192, :8192], voxel_size=1.0)
        del img
        results["ours-8k"] = run_child("ours", ckpt, big, work / "8k", args.threads, max_tiles=args.tiles_8k)
        big.unlink()
    print("\n| scheme | model-only s | end-to-end s | peak RSS MB | notes |\n|---|---|---|---|---|")
    base = results.get("original", {}).get("e2e_s")
    for name, r in results.items():
        note = ""
        if base and name.startswith("ours") and "8k" not in name:
            note = f"{base / r['e2e_s']:.2f}× faster than (b) end to end"
        if r.get("tile"):
            note += f"; tiles {r['tile'][0]}² ×{r['tiles_total']}, redundancy {r['redundancy']}"
        if r.get("partial"):
            frac = r["tiles_run"] / r["tiles_total"]
            note += f"; stopped after {r['tiles_run']}/{r['tiles_total']} tiles (full ≈ {r['model_s'] / frac:.0f} s)"
        if "max_err_rel_std" in r:
            note += f"; bf16 vs fp32: max |Δ| {r['max_err_rel_std']:.3g}·σ, rms {r['rms_err_rel_std']:.3g}·σ"
        print(f"| {name} | {r['model_s']:.1f} | {r['e2e_s']:.1f} | {r['peak_rss_mb']:.0f} | {note.strip('; ')} |")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
