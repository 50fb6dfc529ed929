"""Training benchmarks: throughput and memory (`speed`), and recipe quality on sample data (`recipes`).

speed — samples/s and peak memory at W×W tiles (default 384², batch 4): the full data pipeline
(`train.train` on a forward folder: memory-mapped stacks, augmentation, DataLoader, loss, optimiser,
per-batch bookkeeping) against a bare training step on tensors already in memory, each in its own
child process (so peak RSS is per configuration), fp32 and bf16 autocast.

    python benchmarks/bench_train.py speed                        # this CPU: 384², batch 4
    python benchmarks/bench_train.py speed --device cuda --batch 64 --steps 30   # a GPU

recipes — the default recipe (Adam + cosine per epoch), the original's (SGD 1e-3, StepLR per batch)
and the default with --fresh-noise, each trained through the real workflow on sample data with a
known clean truth (`demo.train_on_sample`: sample → pick noise → forward → train), then scored on
held-out micrographs with the correlation r of docs/quality.md beside raw and the
Gaussian low-passes.

    python benchmarks/bench_train.py recipes --epochs 6 --out /tmp/bench-train
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _machine import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from napari_cryoddm.jobs import collect  # noqa: E402

# ----------------------------------------------------------------------------- speed


def _forward_folder(root: Path, window: int, n: int, pairs: int = 3) -> Path:
    """A forward folder of n crops at W×W with `pairs` S2 pairs per crop (random-normal pixels:
    speed does not depend on them)."""
    from napari_cryoddm.io.mrc import write_mrc

    rng = np.random.default_rng(0)
    fw = root / "fw"
    for rel, count in (
        ("s1/particles", n),
        ("s2/input", pairs * n),
        ("s2/label", pairs * n),
        ("val/input", 2),
        ("val/label", 2),
        ("s3/noise", n),
    ):
        write_mrc(fw / f"{rel}.mrcs", rng.standard_normal((count, window, window), dtype=np.float32))
    return fw


def _bare(window: int, batch: int, steps: int, device: str, precision: str, q: Any) -> None:
    import contextlib

    import torch
    import torch.nn.functional as F

    from napari_cryoddm.devices import autocast_dtype, resolve_device
    from napari_cryoddm.model import UDenoiseNet

    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    torch.manual_seed(0)
    model = UDenoiseNet().to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 1, window, window, device=dev)
    y = torch.randn(batch, 1, window, window, device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext():
            out = model(x)
        F.mse_loss(out.float(), y).backward()
        opt.step()

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    q.put(
        {
            "samples_s": steps * batch / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        }
    )


def _pipeline(
    folder: str, out: str, batch: int, steps: int, device: str, precision: str, workers: int | None, q: Any
) -> None:
    import torch

    from napari_cryoddm.train import TrainConfig, train

    cfg = TrainConfig(epochs=1, batch_size=batch, device=device, precision=precision, workers=workers, overwrite=True)
    job = train(folder, out, cfg)
    times: list[float] = []
    for ev in job:
        if "loss" in ev.payload:
            times.append(time.perf_counter())
            if len(times) == steps + 1:  # the first batch is warm-up
                break
    job.close()
    dt = times[-1] - times[0]
    q.put(
        {
            "samples_s": (len(times) - 1) * batch / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }
    )


def _child(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def speed(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = max(args.batch * (args.steps + 2), 8)
        folder = _forward_folder(Path(tmp), args.window, n)
        for precision in args.precisions:
            bare = _child(_bare, args.window, args.batch, args.steps, args.device, precision)
            pipe = _child(
                _pipeline,
                str(folder),
                str(Path(tmp) / f"out-{precision}"),
                args.batch,
                args.steps,
                args.device,
                precision,
                args.workers,
            )
            rows.append((precision, bare, pipe))
            print(
                f"{precision}: bare {bare['samples_s']:.3f} samples/s, pipeline {pipe['samples_s']:.3f} "
                f"samples/s ({pipe['samples_s'] / bare['samples_s']:.2f}×), peak RSS bare "
                f"{bare['peak_rss_mb']:.0f} MB / pipeline {pipe['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    print(f"\n{machine()}; W = {args.window}, batch {args.batch}, {args.steps} timed steps after one warm-up\n")
    print(
        "| precision | bare step (samples/s) | data pipeline (samples/s) | pipeline / bare | peak RSS bare / pipeline (MB) | peak GPU (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for precision, bare, pipe in rows:
        gpu = "—" if bare["peak_gpu_mb"] is None else f"{bare['peak_gpu_mb']:.0f} / {pipe['peak_gpu_mb']:.0f}"
        print(
            f"| {precision} | {bare['samples_s']:.3f} | {pipe['samples_s']:.3f} | "
            f"{pipe['samples_s'] / bare['samples_s']:.2f} | {bare['peak_rss_mb']:.0f} / {pipe['peak_rss_mb']:.0f} | {gpu} |"
        )


# ----------------------------------------------------------------------------- recipes


def _denoise(pm: Any, pc: Any, rt: Any, im: np.ndarray) -> np.ndarray:
    """A trained model as a quality-table method (`predict.denoise_array` with its runtime)."""
    from napari_cryoddm.predict import denoise_array

    return np.asarray(denoise_array(pm, im, pc, rt))


def recipes(args: argparse.Namespace) -> None:
    import torch

    from napari_cryoddm.predict import PredictConfig, PredictModel, make_runtime
    from napari_cryoddm.simulation import quality as q
    from napari_cryoddm.simulation.demo import train_on_sample
    from napari_cryoddm.simulation.sample import iter_micrographs, molecule_for
    from napari_cryoddm.simulation.sample_config import SampleConfig
    from napari_cryoddm.train import TrainConfig

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    variants = {"default": {}, "original": {"recipe": "original"}, "default + fresh-noise": {"fresh_noise": True}}
    scfg = SampleConfig(
        n_micrographs=args.micrographs,
        width=args.size,
        height=args.size,
        particles=args.particles,
        snr=args.snr,
        seed=1000,
    )
    results: dict[str, Any] = {"machine": machine(), "sample": vars(args), "variants": {}}
    methods = {}
    for name, extra in variants.items():
        tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, device="cpu", seed=0, overwrite=True, **extra)
        t0 = time.perf_counter()
        job = train_on_sample(
            out / name.replace(" ", "").replace("+", "_"), scfg, tcfg, max_noise=args.max_noise, seed=0, overwrite=True
        )

        def show(ev: Any, name: str = name) -> None:
            if ev.payload.get("epoch_end"):
                print(f"  {name}: {ev.message}", flush=True)

        trained = collect(job, show)
        seconds = time.perf_counter() - t0
        history = trained.train.history
        ckpt = trained.checkpoint
        pm = PredictModel.from_checkpoint(ckpt)
        pc = PredictConfig(device="cpu")
        rt = make_runtime(pm.model, pc)
        methods[f"CryoDDM {name}"] = functools.partial(_denoise, pm, pc, rt)
        results["variants"][name] = {
            "history": history,
            "seconds": seconds,
            "best_epoch": min(history, key=lambda h: h["val"])["epoch"],
        }
    test = SampleConfig(
        n_micrographs=args.test_micrographs,
        width=args.size,
        height=args.size,
        particles=args.particles,
        snr=args.snr,
        seed=2000,
    )
    allm = {"raw": lambda im: im, **q.PEERS, **methods}
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in allm}
    clean = []
    for sim in iter_micrographs(test, molecule_for(test)):
        clean.append(sim.clean.astype(np.float32))
        for k, fn in allm.items():
            outputs[k].append(fn(sim.noisy.astype(np.float32)))
    rows = {k: q.score(v, clean).as_row() for k, v in outputs.items()}
    results["scores"] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(
        f"\n{results['machine']}; sample: {args.micrographs} × {args.size}² train, "
        f"{args.test_micrographs} held-out, SNR {args.snr}; {args.epochs} epochs, batch {args.batch}\n"
    )
    print("| method | r | r_plain | FRC mid | FRC high | T_high | final val MSE | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        v = results["variants"].get(k.replace("CryoDDM ", ""), {})
        val = f"{v['history'][-1]['val']:.4f}" if v else ""
        secs = f"{v['seconds']:.0f}" if v else ""
        print(
            f"| {k} | {r['r']:.3f} | {r['r_plain']:.3f} | {r['frc_mid']:.3f} | {r['frc_high']:.3f} | "
            f"{r['T_high']:.2f} | {val} | {secs} |"
        )


def score(args: argparse.Namespace) -> None:
    """Score trained checkpoints (NAME=PATH) on held-out sample micrographs beside raw and the
    Gaussian low-passes (the same test set as `recipes`)."""
    import torch

    from napari_cryoddm.predict import PredictConfig, PredictModel, make_runtime
    from napari_cryoddm.simulation import quality as q
    from napari_cryoddm.simulation.sample import iter_micrographs, molecule_for
    from napari_cryoddm.simulation.sample_config import SampleConfig

    torch.set_num_threads(args.threads)
    methods: dict[str, Any] = {"raw": lambda im: im, **q.PEERS}
    for spec in args.checkpoints:
        name, path = spec.split("=", 1)
        pm = PredictModel.from_checkpoint(path)
        pc = PredictConfig(device="cpu")
        rt = make_runtime(pm.model, pc)
        methods[name] = functools.partial(_denoise, pm, pc, rt)
    test = SampleConfig(
        n_micrographs=args.test_micrographs,
        width=args.size,
        height=args.size,
        particles=args.particles,
        snr=args.snr,
        seed=2000,
    )
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    clean = []
    for sim in iter_micrographs(test, molecule_for(test)):
        clean.append(sim.clean.astype(np.float32))
        for k, fn in methods.items():
            outputs[k].append(fn(sim.noisy.astype(np.float32)))
    print(f"{machine()}; {args.test_micrographs} held-out {args.size}² sample micrographs, SNR {args.snr}\n")
    print("| method | r | r_plain | FRC mid | FRC high | T_high |")
    print("|---|---|---|---|---|---|")
    for k, v in outputs.items():
        r = q.score(v, clean).as_row()
        print(
            f"| {k} | {r['r']:.3f} | {r['r_plain']:.3f} | {r['frc_mid']:.3f} | {r['frc_high']:.3f} | {r['T_high']:.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--window", type=int, default=384)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--device", default="cpu")
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    r = sub.add_parser("recipes")
    r.add_argument("--out", default="bench-train")
    r.add_argument("--epochs", type=int, default=6)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--micrographs", type=int, default=4)
    r.add_argument("--test-micrographs", type=int, default=2)
    r.add_argument("--size", type=int, default=768)
    r.add_argument("--particles", type=int, default=7)
    r.add_argument("--max-noise", type=int, default=8)
    r.add_argument("--snr", type=float, default=0.05)
    r.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("score")
    c.add_argument("checkpoints", nargs="+", help="NAME=PATH of trained checkpoints")
    c.add_argument("--test-micrographs", type=int, default=2)
    c.add_argument("--size", type=int, default=768)
    c.add_argument("--particles", type=int, default=7)
    c.add_argument("--snr", type=float, default=0.05)
    c.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    {"speed": speed, "recipes": recipes, "score": score}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
