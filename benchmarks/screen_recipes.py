"""Screen training recipes on sample data with a known clean truth, all in one process.

sample micrographs → noise picker (away from the true particles) → forward → train (one run per
recipe, same forward folder when the data settings agree) → predict held-out micrographs →
`quality.score` (r after the ice-band fit, FRC and signal transfer per band;
docs/quality.md), beside raw and the Gaussian low-passes of the same run.

Before any model is scored, the evaluation chain is checked: the robust-normalised raw data must
score the raw data's r (scale/offset invariance of the metric, and the normalisation predict uses),
and each model's output must correlate best with the clean truth at zero shift (prediction geometry).

    python benchmarks/screen_recipes.py --recipes default s1w0 original --epochs 4
    python benchmarks/screen_recipes.py --recipes s1w0 --seeds 0 1 2 --epochs 6

Recipes (name → TrainConfig overrides, plus data overrides marked `data:`) are listed in RECIPES.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _machine import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from napari_cryoddm.d4 import d4, d4_inverse  # noqa: E402
from napari_cryoddm.jobs import collect  # noqa: E402

# name → (TrainConfig overrides, data overrides)
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "original": ({"recipe": "original"}, {}),
    "default": ({}, {}),
    "s1w0.1": ({"s1_weight": 0.1}, {}),
    "s1w0": ({"s1_weight": 0.0}, {}),
    "s1w0 s3w0": ({"s1_weight": 0.0, "s3_weight": 0.0}, {}),
    "s1w0 lr3e-3": ({"s1_weight": 0.0, "lr": 3e-3}, {}),
    "s1w0 lr3e-4": ({"s1_weight": 0.0, "lr": 3e-4}, {}),
    "s1w0 b4": ({"s1_weight": 0.0, "batch_size": 4}, {}),
    "s1w0 fresh": ({"s1_weight": 0.0, "fresh_noise": True}, {}),
    "fresh": ({"fresh_noise": True}, {}),
    "s1w0 overlap0.5": ({"s1_weight": 0.0}, {"overlap": 0.5}),
    "s1w0 fresh overlap0.5": ({"s1_weight": 0.0, "fresh_noise": True}, {"overlap": 0.5}),
    "s1w0 no-augment": ({"s1_weight": 0.0, "augment": False}, {}),
    "s1w0 s3w0.1": ({"s1_weight": 0.0, "s3_weight": 0.1}, {}),
    "s1w0 start4": ({"s1_weight": 0.0}, {"preset": "custom", "beta": 0.1288, "steps": 5, "start": 4}),
    "s1w0 s3w0.1 start4": (
        {"s1_weight": 0.0, "s3_weight": 0.1},
        {"preset": "custom", "beta": 0.1288, "steps": 5, "start": 4},
    ),
    "s1w0 T7 start5": ({"s1_weight": 0.0}, {"preset": "custom", "beta": 0.1288, "steps": 7, "start": 5}),
    "default start4": ({}, {"preset": "custom", "beta": 0.1288, "steps": 5, "start": 4}),
    "s1w0.1 s3w0.1": ({"s1_weight": 0.1, "s3_weight": 0.1}, {}),
    "s1w0 s3w0.1 lr3e-3": ({"s1_weight": 0.0, "s3_weight": 0.1, "lr": 3e-3}, {}),
}


def drain(job: Any, label: str = "", echo: bool = False) -> Any:
    """Run a job to its result, printing epoch summaries."""

    def show(ev: Any) -> None:
        if echo and ev.payload.get("epoch_end"):
            print(f"    {label}: {ev.message}", flush=True)

    return collect(job, show)


def prepare(root: Path, args: argparse.Namespace, data: dict[str, Any]) -> Path:
    """sample → pick → forward, once per data setting; returns the forward folder."""
    from napari_cryoddm.box_files import write_boxes
    from napari_cryoddm.forward import ForwardConfig, run_forward
    from napari_cryoddm.io.star import read_coordinates
    from napari_cryoddm.picking import PickConfig, pick_noise
    from napari_cryoddm.simulation.sample import generate_sample
    from napari_cryoddm.simulation.sample_config import SampleConfig

    key = "data_" + "_".join(f"{k}{v}" for k, v in sorted(data.items())) if data else "data"
    out = root / f"n{data.get('micrographs', args.micrographs)}_{args.size}_p{args.particles}_snr{args.snr}" / key
    if (out / "forward" / "forward.json").is_file():
        return out / "forward"
    scfg = SampleConfig(
        n_micrographs=data.get("micrographs", args.micrographs),
        width=args.size,
        height=args.size,
        particles=args.particles,
        snr=args.snr,
        seed=1000,
    )
    sample = drain(generate_sample(out / "sample", scfg, overwrite=True))
    d_px = float(scfg.diameter_px)
    pick = drain(
        pick_noise(
            sample.micrographs,
            PickConfig(
                diameter=d_px,
                max_per_micrograph=data.get("max_noise", args.max_noise),
                overlap=data.get("overlap", 0.0),
                seed=0,
            ),
            particles=read_coordinates(sample.particles_star),
            particles_source=str(sample.particles_star),
        )
    )
    noise_txt = write_boxes(out / "noise.txt", pick.boxes, overwrite=True)
    fwd = drain(
        run_forward(
            sample.micrographs,
            sample.particles_star,
            noise_txt,
            out / "forward",
            ForwardConfig(
                diameter=d_px,
                seed=0,
                overwrite=True,
                **{k: data[k] for k in ("preset", "beta", "steps", "start") if k in data},
            ),
        )
    )
    return fwd.out


def best_shift(d: np.ndarray, c: np.ndarray, r: int = 2) -> tuple[int, int]:
    """The (dy, dx) within ±r px at which the denoised image correlates best with the truth."""
    from napari_cryoddm.simulation import quality as q

    dd, cc = q.remove_ice(d), q.remove_ice(c)
    m = r + 1
    core = cc[m:-m, m:-m]
    scores = {
        (dy, dx): q._pearson(dd[m + dy : d.shape[0] - m + dy, m + dx : d.shape[1] - m + dx], core)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
    }
    return max(scores, key=scores.get)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["original", "default", "s1w0"], choices=list(RECIPES))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (data fixed)")
    ap.add_argument("--micrographs", type=int, default=4, help="training micrographs")
    ap.add_argument("--test-micrographs", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--particles", type=int, default=7)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--max-noise", type=int, default=40)
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=("fp32", "bf16"),
        help="training precision on the CPU (bf16 autocast is ~1.6× faster here)",
    )
    ap.add_argument("--checkpoint", default="last", choices=("last", "best"))
    ap.add_argument("--tta", action="store_true", help="also score the 8 flips/rotations averaged")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/screen-recipes")
    ap.add_argument("--json", default=None, help="append the results to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from napari_cryoddm.normalise import Normalisation, normalisation_stats, normalise
    from napari_cryoddm.predict import PredictConfig, PredictModel, denoise_array, make_runtime
    from napari_cryoddm.simulation import quality as q
    from napari_cryoddm.simulation.sample import iter_micrographs, molecule_for
    from napari_cryoddm.simulation.sample_config import SampleConfig
    from napari_cryoddm.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    test = SampleConfig(
        n_micrographs=args.test_micrographs,
        width=args.size,
        height=args.size,
        particles=args.particles,
        snr=args.snr,
        seed=2000,
    )
    clean, raw = [], []
    for sim in iter_micrographs(test, molecule_for(test)):
        clean.append(sim.clean.astype(np.float32))
        raw.append(sim.noisy.astype(np.float32))
    rows: dict[str, dict[str, Any]] = {}
    rows["raw"] = q.score(raw, clean).as_row()
    for name, fn in q.PEERS.items():
        rows[name] = q.score([fn(im) for im in raw], clean).as_row()
    # chain check 1: the metric ignores the affine normalisation predict applies
    spec = Normalisation()
    normed = [normalise(im, spec, normalisation_stats(im, spec)) for im in raw]
    r_norm = q.score(normed, clean).as_row()["r"]
    assert abs(r_norm - rows["raw"]["r"]) < 2e-3, (r_norm, rows["raw"]["r"])
    print(
        f"{machine()}\nheld-out: {args.test_micrographs} × {args.size}², SNR {args.snr}; raw r "
        f"{rows['raw']['r']:.4f} (normalised raw {r_norm:.4f})",
        flush=True,
    )

    meta: dict[str, Any] = {}
    for name in args.recipes:
        overrides, data = RECIPES[name]
        fw = prepare(root, args, data)
        fwm = json.loads((fw / "forward.json").read_text())
        for seed in args.seeds:
            label = f"{name} (seed {seed})" if len(args.seeds) > 1 else name
            tcfg = TrainConfig(
                **{
                    "epochs": args.epochs,
                    "batch_size": args.batch,
                    "device": "cpu",
                    "precision": args.precision,
                    "seed": seed,
                    "overwrite": True,
                    **overrides,
                }
            )
            run = root / "runs" / f"{name.replace(' ', '_')}_s{seed}_e{args.epochs}"
            t0 = time.perf_counter()
            res = drain(train(fw, run, tcfg), label, echo=True)
            secs = time.perf_counter() - t0
            ck = res.last if args.checkpoint == "last" else (res.best or res.last)
            pm = PredictModel.from_checkpoint(ck)
            pc = PredictConfig(device="cpu")
            rt = make_runtime(pm.model, pc)
            t1 = time.perf_counter()
            den = [np.asarray(denoise_array(pm, im, pc, rt), np.float32) for im in raw]
            psecs = time.perf_counter() - t1
            assert den[0].shape == clean[0].shape, (den[0].shape, clean[0].shape)
            shift = best_shift(den[0], clean[0])
            row = q.score(den, clean).as_row()
            h = res.history[-1]
            row.update(
                train_s=secs, predict_s=psecs, shift=str(shift), val=h["val"], s1=h["s1"], s2=h["s2"], s3=h["s3"]
            )
            rows[label] = row
            # Noisier2Noise-style extrapolation D + λ(D − x): does the net remove only part of the noise?
            for lam in (1.0,):
                ext = [d + lam * (d - x) for d, x in zip(den, normed)]
                rows[f"{label} extrapolated λ={lam:g}"] = q.score(ext, clean).as_row()
            if args.tta:
                acc = [np.zeros_like(d) for d in den]
                for code in range(8):
                    for i, im in enumerate(raw):
                        t = np.ascontiguousarray(d4(im, code))
                        acc[i] += d4_inverse(np.asarray(denoise_array(pm, t, pc, rt), np.float32), code)
                rows[f"{label} + 8× flip/rot TTA"] = q.score([a / 8 for a in acc], clean).as_row()
            meta[label] = {"forward": {"crops": fwm.get("counts")}, "config": overrides, "data": data}
            print(
                f"  {label}: r {row['r']:.4f} T_high {row['T_high']:.2f} shift {shift} "
                f"train {secs:.0f} s (val {h['val']:.4f}; s1 {h['s1']:.3f} s2 {h['s2']:.3f} "
                f"s3 {h['s3']:.3f}); counts {fwm.get('counts')}",
                flush=True,
            )

    print(
        f"\n{machine()}; train {args.micrographs} × {args.size}² (seed 1000), held-out "
        f"{args.test_micrographs} (seed 2000), SNR {args.snr}, {args.particles} particles/micrograph; "
        f"{args.epochs} epochs, batch {args.batch}, {args.precision}, {args.checkpoint}.pt\n"
    )
    print("| method | r | r − raw | FRC mid | FRC high | T_high | train s | final S2 / val |")
    print("|---|---|---|---|---|---|---|---|")
    r0 = rows["raw"]["r"]
    for k, r in rows.items():
        extra = f"{r['train_s']:.0f} | {r['s2']:.3f} / {r['val']:.3f}" if "train_s" in r else " | "
        print(
            f"| {k} | {r['r']:.3f} | {r['r'] - r0:+.3f} | {r['frc_mid']:.3f} | {r['frc_high']:.3f} | "
            f"{r['T_high']:.2f} | {extra} |"
        )
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        old.append({"args": vars(args), "machine": machine(), "rows": rows, "meta": meta})
        path.write_text(json.dumps(old, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
