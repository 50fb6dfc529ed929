"""Every GPU figure the docs promise, measured by one command in one process tree.

    python benchmarks/gpu_check.py --out gpu-check                # on a GPU machine (≤ 8 min)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-smoke   # every part on the CPU, tiny, < 1 min

Parts, each in its own child process with its own time cap (the run stops itself before --limit
and keeps what it measured; a part that ran out of time is reported as such):

  train      training speed at 384², batch 64, fp32 and bf16: a bare optimiser step on tensors
             already on the device vs the real data pipeline (`train` on a forward folder);
             goal: pipeline ≥ 90 % of bare.
  predict    a 4096² micrograph: model-only vs end to end (read → normalise → tiles → write) for
             fp32, bf16 and --compile, beside Topaz-Denoise's tiling scheme and the original
             CryoDDM's scheme of the same network in the same process tree; goals: model-only
             ≥ 2.5× the Topaz scheme, end to end ≥ 80 % of model-only, ≥ 10 micrographs/s stretch.
  reference  the reference training at GPU scale (1.5 Å/px, W = 256, ≥ 400 crops, 20+ epochs)
             scored on held-out sample micrographs (scripts/train_reference.py).
  ddp        a 2-GPU torchrun smoke run when two GPUs are present.
  cpu        CPU prediction: ours vs the original's scheme end to end at 2048² and 4096², and the
             peak RSS of an 8192² micrograph (must stay ≤ 2 GB).

Writes OUT/gpu_check.json and OUT/gpu_check.md (the table docs/benchmarks.md includes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PARTS = ("train", "predict", "reference", "ddp", "cpu")
# seconds each part may take (full run / smoke run); the whole run stops itself at --limit
CAPS = {"train": (120, 20), "predict": (100, 25), "reference": (150, 40), "ddp": (30, 20), "cpu": (120, 25)}


# ----------------------------------------------------------------------------- the parts


def part_train(args: argparse.Namespace) -> dict[str, Any]:
    from bench_train import _bare, _child, _forward_folder, _pipeline

    window, batch, steps = (64, 2, 1) if args.smoke else (384, 64, 10)
    precisions = ("fp32",) if args.smoke else ("fp32", "bf16")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        # one S2 pair per crop: the pipeline reads only steps + 1 batches, and 3.6 GB of pairs at
        # 384² took the whole cap to write
        folder = _forward_folder(Path(tmp), window, max(batch * (steps + 2), 8), pairs=1)
        for precision in precisions:
            bare = _child(_bare, window, batch, steps, args.device, precision)
            pipe = _child(
                _pipeline, str(folder), str(Path(tmp) / f"out-{precision}"), batch, steps, args.device, precision, None
            )
            rows[precision] = {
                "bare_samples_s": bare["samples_s"],
                "pipeline_samples_s": pipe["samples_s"],
                "pipeline_over_bare": pipe["samples_s"] / bare["samples_s"],
                "peak_gpu_mb": bare.get("peak_gpu_mb"),
            }
    return {"window": window, "batch": batch, "steps": steps, "rows": rows}


def _checkpoint_and_micrograph(work: Path, size: int) -> tuple[Path, Path]:
    import torch

    from napari_cryoddm.checkpoint import save_checkpoint
    from napari_cryoddm.io.mrc import write_mrc
    from napari_cryoddm.model import UDenoiseNet
    from napari_cryoddm.normalise import Normalisation

    torch.manual_seed(0)
    ckpt = save_checkpoint(
        work / "weights.pt", UDenoiseNet(), {"normalisation": Normalisation().to_dict(), "bin_factor": 1}
    )
    src = work / f"mic_{size}.mrc"
    write_mrc(src, np.random.default_rng(0).normal(100, 10, (size, size)).astype(np.float32), voxel_size=1.0)
    return ckpt, src


def _scheme(args: argparse.Namespace, name: str, ckpt: Path, src: Path, work: Path, **kw: Any) -> dict[str, Any]:
    """One prediction scheme: in its own process (its own peak RSS) or, for --smoke, in this one."""
    from bench_predict import SCHEMES, peak_rss_mb, run_child

    if not args.smoke:
        return run_child(name, ckpt, src, work, os.cpu_count() or 1, device=args.device, **kw)
    dst = work / name / (src.stem + ".mrc")
    dst.parent.mkdir(parents=True, exist_ok=True)
    res = SCHEMES[name](str(ckpt), str(src), str(dst), device=args.device, **kw)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def part_predict(args: argparse.Namespace) -> dict[str, Any]:
    size = 256 if args.smoke else 4096
    variants = [("topaz", "fp32", False, 0), ("original", "fp32", False, 0), ("ours", "fp32", False, 0)]
    if not args.smoke:
        variants += [("ours", "bf16", False, 0), ("ours", "bf16", True, 0)]
    # larger GPU tiles: fewer pixels pushed through the network per output pixel
    variants += [("ours", p, False, t) for t in args.predict_tiles for p in ("fp32", "bf16")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, src = _checkpoint_and_micrograph(work, size)
        for name, precision, compiled, tile in variants:
            label = (
                name
                + ("" if name != "ours" else f" {precision}")
                + (" compile" if compiled else "")
                + (f" tile {tile}" if tile else "")
            )
            rows[label] = _scheme(
                args, name, ckpt, src, work / label.replace(" ", "_"), precision=precision, compile=compiled, tile=tile
            )
    topaz = rows["topaz"]["model_s"]
    for label, r in rows.items():
        if label.startswith("ours"):
            r["model_speedup_vs_topaz"] = topaz / r["model_s"]
            r["e2e_over_model"] = r["model_s"] / r["e2e_s"]
            r["micrographs_per_s"] = 1.0 / r["e2e_s"]
    return {"size": size, "rows": rows}


def part_reference(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / "reference"
    if args.smoke:
        sizes = [
            "--micrographs",
            "2",
            "--particles",
            "3",
            "--size",
            "384",
            "--epochs",
            "1",
            "--test-micrographs",
            "1",
            "--max-noise",
            "4",
            "--held-out",
            "sample",
        ]
    else:
        sizes = [
            "--micrographs",
            "40",
            "--particles",
            "12",
            "--pixel-size",
            "1.5",
            "--epochs",
            "25",
            "--minutes",
            "2.2",
            "--batch",
            "32",
            "--held-out",
            "full",
            "--test-micrographs",
            "4",
        ]
    cmd = [
        sys.executable,
        str(HERE.parent / "scripts" / "train_reference.py"),
        "--out",
        str(out),
        "--device",
        args.device,
        "--no-tta",
        "--no-export",
        *sizes,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    report = json.loads((out / "report.json").read_text())
    return {
        "seconds": time.perf_counter() - t0,
        "data": report["data"],
        "train": {k: report["train"][k] for k in ("seconds", "epochs", "stopped")},
        "scores": report["scores"],
    }


def part_ddp(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu < 2 and not args.smoke:
        return {"skipped": f"{n_gpu} GPU(s) here; the torchrun check needs 2"}
    from bench_train import _forward_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = _forward_folder(Path(tmp), 64 if args.smoke else 256, 16)
        device = "cpu" if args.smoke else "cuda"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "napari_cryoddm",
            "train",
            str(folder),
            "-o",
            str(Path(tmp) / "ddp"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--device",
            device,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok = proc.returncode == 0 and (Path(tmp) / "ddp" / "last.pt").is_file()
        return {
            "processes": 2,
            "device": device,
            "ok": ok,
            "seconds": time.perf_counter() - t0,
            "stderr_tail": "" if ok else proc.stderr[-1500:],
        }


def part_cpu(args: argparse.Namespace) -> dict[str, Any]:
    sizes = (256,) if args.smoke else (2048, 4096)
    big, big_tiles = (512, 1) if args.smoke else (8192, 4)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in sizes:
            ckpt, src = _checkpoint_and_micrograph(work / str(size), size)
            orig = _scheme(args, "original", ckpt, src, work / str(size) / "original")
            ours = _scheme(args, "ours", ckpt, src, work / str(size) / "ours")
            rows[str(size)] = {
                "original_e2e_s": orig["e2e_s"],
                "ours_e2e_s": ours["e2e_s"],
                "speedup": orig["e2e_s"] / ours["e2e_s"],
            }
        ckpt, src = _checkpoint_and_micrograph(work / "big", big)
        r = _scheme(args, "ours", ckpt, src, work / "big" / "ours", max_tiles=big_tiles)
        rows["peak_rss"] = {"size": big, "peak_rss_mb": r["peak_rss_mb"], "tiles_run": r.get("tiles_run")}
    return {"rows": rows}


RUNNERS = {"train": part_train, "predict": part_predict, "reference": part_reference, "ddp": part_ddp, "cpu": part_cpu}


# ----------------------------------------------------------------------------- the table


def markdown(results: dict[str, Any]) -> str:
    """The tables docs/benchmarks.md includes; a part that did not run says why."""
    head = results["machine"]
    cmd = results["command"]
    lines = [f"Measured by `{cmd}` on {head}.", ""]

    def missing(part: str) -> str | None:
        r = results["parts"].get(part)
        if r is None:
            return "not run"
        if "error" in r:
            return f"failed: {r['error'].splitlines()[-1][:120] if r['error'] else 'error'}"
        if "skipped" in r:
            return r["skipped"]
        return None

    lines += [
        "**Training speed** (samples/s)",
        "",
        "| precision | bare step | data pipeline | pipeline / bare (goal ≥ 0.90) |",
        "|---|---|---|---|",
    ]
    why = missing("train")
    if why:
        lines.append(f"| — | {why} | | |")
    else:
        t = results["parts"]["train"]
        for prec, r in t["rows"].items():
            lines.append(
                f"| {prec} (W {t['window']}, batch {t['batch']}) | {r['bare_samples_s']:.1f} | "
                f"{r['pipeline_samples_s']:.1f} | {r['pipeline_over_bare']:.2f} |"
            )
    lines += [
        "",
        "**Prediction of one micrograph** (seconds)",
        "",
        "| scheme | model-only | end to end | model-only vs Topaz scheme (goal ≥ 2.5×) | "
        "end to end / model-only (goal ≥ 0.80) | micrographs/s |",
        "|---|---|---|---|---|---|",
    ]
    why = missing("predict")
    if why:
        lines.append(f"| — | {why} | | | | |")
    else:
        p = results["parts"]["predict"]
        for label, r in p["rows"].items():
            extra = (
                f"{r['model_speedup_vs_topaz']:.2f}× | {r['e2e_over_model']:.2f} | {r['micrographs_per_s']:.2f}"
                if "model_speedup_vs_topaz" in r
                else "— | — | —"
            )
            lines.append(f"| {label} ({p['size']}²) | {r['model_s']:.2f} | {r['e2e_s']:.2f} | {extra} |")
    lines += [
        "",
        "**Reference training at GPU scale** (held-out r)",
        "",
        "| data | epochs | train s | input | gaussian σ=1.5 px | model (chain) | model (direct) |",
        "|---|---|---|---|---|---|---|",
    ]
    why = missing("reference")
    if why:
        lines.append(f"| {why} | | | | | | |")
    else:
        ref = results["parts"]["reference"]
        for setting, rows in ref["scores"].items():
            d = ref["data"]
            lines.append(
                f"| {d['crops']} crops, W {d['window']} ({setting}) | {ref['train']['epochs']} | "
                f"{ref['train']['seconds']:.0f} | {rows['input']['r']:.3f} | "
                f"{rows['gaussian σ=1.5 px']['r']:.3f} | {rows['model, chain']['r']:.3f} | "
                f"{rows['model, direct']['r']:.3f} |"
            )
    why = missing("ddp")
    d = results["parts"].get("ddp", {})
    lines += [
        "",
        "**torchrun, 2 processes**: "
        + (why or (f"{'passed' if d['ok'] else 'FAILED'} on {d['device']} in {d['seconds']:.0f} s")),
    ]
    lines += [
        "",
        "**CPU prediction, ours vs the original's scheme, end to end**",
        "",
        "| micrograph | original (s) | ours (s) | ours faster by |",
        "|---|---|---|---|",
    ]
    why = missing("cpu")
    if why:
        lines.append(f"| {why} | | | |")
    else:
        c = results["parts"]["cpu"]["rows"]
        for size, r in c.items():
            if size != "peak_rss":
                lines.append(f"| {size}² | {r['original_e2e_s']:.2f} | {r['ours_e2e_s']:.2f} | {r['speedup']:.2f}× |")
        pr = c["peak_rss"]
        lines += [
            "",
            f"Peak RSS predicting a {pr['size']}² micrograph ({pr['tiles_run']} tiles run): "
            f"{pr['peak_rss_mb']:.0f} MB (goal ≤ 2048 MB).",
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- orchestration


def run_part(name: str, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """One part in a child process, killed at its cap; returns its result or why it has none
    (--smoke runs the parts in this process: it checks the code paths, not the caps)."""
    if args.smoke:
        import traceback

        t0 = time.perf_counter()
        try:
            res = RUNNERS[name](args)
        except Exception:  # noqa: BLE001 - reported in the table, and the run fails
            return {"error": traceback.format_exc()[-1500:]}
        res["part_seconds"] = time.perf_counter() - t0
        return res
    out = Path(args.out) / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", name, "--out", str(args.out), "--device", args.device]
    if args.smoke:
        cmd.append("--smoke")
    if args.predict_tiles:
        cmd += ["--predict-tiles", *map(str, args.predict_tiles)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"error": f"ran out of its {budget:.0f} s"}
    if proc.returncode or not out.is_file():
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    res = json.loads(out.read_text())
    res["part_seconds"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (< 1 min)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--limit", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument(
        "--predict-tiles",
        type=int,
        nargs="*",
        default=[],
        help="also predict with these tile sizes (ours, fp32 and bf16)",
    )
    ap.add_argument(
        "--cap", type=float, default=None, help="seconds each part may take (default: the budgeted caps of the GPU run)"
    )
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:  # a child: run one part, write its JSON
        if args.device == "cpu":
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        res = RUNNERS[args.part](args)
        (args.out / f"{args.part}.json").write_text(json.dumps(res, indent=1, default=float))
        return 0

    from _machine import machine

    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(),
        "smoke": args.smoke,
        "device": args.device,
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "parts": {},
    }
    for name in args.parts:
        left = args.limit - (time.perf_counter() - t_start) - 5
        cap = args.cap or CAPS[name][1 if args.smoke else 0]
        if left < 5:
            results["parts"][name] = {"error": "not started: the run's time limit was reached"}
            continue
        print(f"gpu_check: {name} (cap {min(cap, left):.0f} s)", flush=True)
        results["parts"][name] = run_part(name, args, min(cap, left))
        status = "error" if "error" in results["parts"][name] else "ok"
        print(f"gpu_check: {name} {status}", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=float))
    md = markdown(results)
    (args.out / "gpu_check.md").write_text(md)
    print(md)
    failed = [n for n, r in results["parts"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
