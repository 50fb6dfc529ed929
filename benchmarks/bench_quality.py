"""The quality harness (issue 11): every denoiser against the clean truth, in one process.

Data: sample micrographs (`napari_cryoddm.simulation.sample`) with two conformations, 1.5 Å/px, 90-px
particles, at SNR 0.05 (hinge 12°) and SNR 0.01 (hinge 6°). Metrics: `napari_cryoddm.simulation.quality`
(definitions: docs/quality.md) — r after the ice-band fit, the plain r, FRC and
signal transfer per band, and conformation accuracy paired against the raw data.

Peers in the same run: raw, Gaussian σ = 1.5 and 3 px, the radial Wiener-like low-pass,
Topaz-Denoise's pretrained `unet` when `topaz-em` is importable, and our models, trained here
through the real workflow (sample → pick noise → forward → train, `demo.train_on_sample`) or
loaded with `--checkpoint SNR=PATH`.

    python benchmarks/bench_quality.py --out bench-quality            # CPU-sized defaults
    python benchmarks/bench_quality.py --quick --out /tmp/bq          # a smoke run (minutes)
    python benchmarks/bench_quality.py --window 256 --train-epochs 20 --recipes default,original \\
        --conf-particles 3000 --device cuda                           # a GPU run

Writes OUT/results.json and OUT/results.md (one table per SNR, with the machine, the sizes and
the training time of each model).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _machine import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from napari_cryoddm.jobs import Progress, collect
from napari_cryoddm.simulation import quality as q
from napari_cryoddm.simulation.sample import iter_micrographs, molecule_for
from napari_cryoddm.simulation.sample_config import SampleConfig

SETTINGS = {"0.05": (0.05, 12.0), "0.01": (0.01, 6.0)}
PIXEL_SIZE = 1.5  # Å/px: with the 135 Å molecule, 90-px particles
ROW_ORDER = ("clean (truth)", "raw", "gaussian σ=1.5 px", "gaussian σ=3 px", "wiener (radial)")


def drain(job, label: str, verbose: bool) -> Any:
    """Run a job, printing a line whenever its step changes (benchmarks log, they do not animate)."""
    last = None

    def show(ev: Progress) -> None:
        nonlocal last
        head = ev.message.split("]")[0]
        if verbose and head != last:
            print(f"  {label}: {ev.message[:90]}", flush=True)
            last = head

    return collect(job, show)


# ----------------------------------------------------------------------------------------------
# methods


def model_denoiser(checkpoint: Path, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """Our trained model as users run it: `predict.denoise_array` (normalise as trained, tiles)."""
    from napari_cryoddm.predict import PredictConfig, PredictModel, denoise_array, make_runtime

    pm = PredictModel.from_checkpoint(checkpoint)
    config = PredictConfig(device=device)
    runtime = make_runtime(pm.model, config)

    def run(image: np.ndarray) -> np.ndarray:
        return np.asarray(denoise_array(pm, image, config, runtime), dtype=np.float32)

    return run


def topaz_denoiser() -> Callable[[np.ndarray], np.ndarray] | None:
    """Topaz-Denoise's pretrained `unet` through its command line (when `topaz-em` is installed)."""
    if not q.topaz_available():
        return None
    import mrcfile

    def run(image: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "in.mrc"
            with mrcfile.new(src) as m:
                m.set_data(image.astype(np.float32))
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "topaz.commands.denoise",
                    "-d",
                    "-1",
                    "--arch",
                    "unet",
                    "-o",
                    str(Path(tmp) / "out"),
                    str(src),
                ],
                check=True,
                capture_output=True,
            )
            with mrcfile.open(Path(tmp) / "out" / "in.mrc") as m:
                return np.array(m.data, dtype=np.float32)

    return run


def peers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {"raw": lambda im: im, **q.PEERS}


# ----------------------------------------------------------------------------------------------
# one SNR setting


def train_model(out: Path, snr: float, hinge: float, args: argparse.Namespace, recipe: str) -> tuple[Path, float]:
    from napari_cryoddm.simulation.demo import train_on_sample
    from napari_cryoddm.train import TrainConfig

    scfg = SampleConfig(
        n_micrographs=args.train_micrographs,
        width=args.size,
        height=args.size,
        pixel_size=PIXEL_SIZE,
        particles=args.train_particles,
        snr=snr,
        hinge_angle=hinge,
        seed=1000,
    )
    tcfg = TrainConfig(
        epochs=args.train_epochs,
        batch_size=args.batch_size,
        recipe=recipe,
        seed=args.seed,
        device=args.device,
        overwrite=True,
    )
    timings: dict[str, float] = {}
    trained = drain(
        train_on_sample(
            out,
            scfg,
            tcfg,
            window=args.window,
            max_noise=args.max_noise,
            seed=args.seed,
            overwrite=True,
            timings=timings,
        ),
        f"train {recipe} SNR {snr}",
        args.verbose,
    )
    return trained.checkpoint, timings.get("train", float("nan"))


def run_setting(key: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    snr, hinge = SETTINGS[key]
    print(f"SNR {snr}, hinge {hinge}°", flush=True)
    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = peers()
    info: dict[str, dict[str, Any]] = {name: {} for name in ("clean (truth)", *methods)}
    topaz = topaz_denoiser()
    if topaz is not None:
        methods["Topaz-Denoise unet"] = topaz
        info["Topaz-Denoise unet"] = {}
    else:
        info["Topaz-Denoise unet"] = {"note": "topaz-em is not installed (not importable): not run"}
    given = dict(c.split("=", 1) for c in args.checkpoint)
    if key in given:
        name = f"CryoDDM ({Path(given[key]).name})"
        methods[name] = model_denoiser(Path(given[key]), args.device)
        info[name] = {"checkpoint": given[key], "train_s": None}
    elif args.train_epochs > 0:
        for recipe in args.recipes:
            ckpt, seconds = train_model(out / f"snr{key}" / recipe, snr, hinge, args, recipe)
            name = f"CryoDDM {recipe}, {args.train_epochs} ep, W {args.window or 'rule'}"
            methods[name] = model_denoiser(ckpt, args.device)
            info[name] = {"checkpoint": str(ckpt), "train_s": seconds}

    # image metrics on a held-out test set
    tcfg = SampleConfig(
        n_micrographs=args.test_micrographs,
        width=args.size,
        height=args.size,
        pixel_size=PIXEL_SIZE,
        particles=args.test_particles,
        snr=snr,
        hinge_angle=hinge,
        seed=2000,
    )
    molecule = molecule_for(tcfg)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    clean: list[np.ndarray] = []
    seconds = {name: 0.0 for name in methods}
    for sim in iter_micrographs(tcfg, molecule):
        clean.append(sim.clean.astype(np.float32))
        raw = sim.noisy.astype(np.float32)
        for name, fn in methods.items():
            t0 = time.perf_counter()
            outputs[name].append(fn(raw))
            seconds[name] += time.perf_counter() - t0
    rows: dict[str, dict[str, Any]] = {"clean (truth)": q.score(clean, clean).as_row()}
    for name in methods:
        rows[name] = q.score(outputs[name], clean).as_row()
        rows[name]["s_per_micrograph"] = seconds[name] / len(clean)
    del outputs

    # conformation evidence: ≥ conf_particles on dense micrographs, streamed
    n_mic = max(1, math.ceil(args.conf_particles / args.conf_density))
    ccfg = SampleConfig(
        n_micrographs=n_mic,
        width=args.size,
        height=args.size,
        pixel_size=PIXEL_SIZE,
        particles=args.conf_density,
        snr=snr,
        hinge_angle=hinge,
        seed=3000,
    )
    box = q.box_size_for(ccfg.diameter_px)
    right: dict[str, list[np.ndarray]] = {name: [] for name in ("clean (truth)", *methods)}
    t0 = time.perf_counter()
    for i, sim in enumerate(iter_micrographs(ccfg, molecule)):
        table = sim.particles.assign(index=0)
        refs = q.sample_references(table, molecule, ccfg, box)
        c = [sim.clean]
        right["clean (truth)"].append(q.conformation_correct(c, c, table, refs, box))
        raw = sim.noisy.astype(np.float32)
        for name, fn in methods.items():
            right[name].append(q.conformation_correct([fn(raw)], c, table, refs, box))
        if args.verbose and (i + 1) % max(1, n_mic // 5) == 0:
            print(f"  conformation test: {i + 1}/{n_mic} micrographs ({time.perf_counter() - t0:.0f} s)", flush=True)
    raw_right = np.concatenate(right["raw"])
    for name, parts in right.items():
        acc = q.conformation_accuracy(np.concatenate(parts), raw_right)
        rows.setdefault(name, {}).update(acc.as_row())
    for name, extra in info.items():
        rows.setdefault(name, {}).update(extra)
    return {
        "snr": snr,
        "hinge_deg": hinge,
        "rows": rows,
        "test": {
            "micrographs": args.test_micrographs,
            "size": args.size,
            "particles_per_micrograph": args.test_particles,
        },
        "conformation": {"micrographs": n_mic, "particles": int(raw_right.size), "box": box},
    }


COLUMNS = (
    "r",
    "r_plain",
    "frc_low",
    "frc_mid",
    "frc_high",
    "T_mid",
    "T_high",
    "acc",
    "acc_se",
    "acc_diff",
    "acc_diff_se",
    "train_s",
    "s_per_micrograph",
)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}. Sizes: {results['args_summary']}.", ""]
    for res in results["settings"].values():
        lines += [
            f"### SNR {res['snr']} (hinge {res['hinge_deg']:g}°): "
            f"{res['test']['micrographs']} test micrographs {res['test']['size']}², "
            f"conformation test on {res['conformation']['particles']} particles",
            "",
        ]
        rows = {k: v for k, v in res["rows"].items() if "note" not in v}
        lines.append(q.markdown_table(rows, COLUMNS, digits=3))
        for k, v in res["rows"].items():
            if "note" in v:
                lines.append(f"\n{k}: {v['note']}.")
        lines.append("")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-quality"))
    p.add_argument(
        "--snr",
        nargs="+",
        default=list(SETTINGS),
        choices=list(SETTINGS),
        help="settings to run: 0.05 (hinge 12°) and/or 0.01 (hinge 6°)",
    )
    p.add_argument("--size", type=int, default=1024, help="micrograph side (px)")
    p.add_argument("--test-micrographs", type=int, default=4)
    p.add_argument("--test-particles", type=int, default=12, help="particles per test micrograph")
    p.add_argument(
        "--conf-particles",
        type=int,
        default=3000,
        help="particles in the conformation test (docs/quality.md asks for ≥ 3,000)",
    )
    p.add_argument("--conf-density", type=int, default=30, help="particles per conformation micrograph")
    p.add_argument("--train-micrographs", type=int, default=8)
    p.add_argument("--train-particles", type=int, default=12)
    p.add_argument("--train-epochs", type=int, default=3, help="0: no model trained")
    p.add_argument(
        "--recipes",
        type=lambda s: s.split(","),
        default=["default"],
        help="training recipes to compare, comma-separated (default,original)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=128,
        help="training window W (CPU screening: 128; the rule gives 256 for 90-px particles)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-noise", type=int, default=40, help="noise boxes per training micrograph")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="SNR=PATH: score this checkpoint instead of training (e.g. 0.05=best.pt)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 768² micrographs, 2 test micrographs, 300 conformation "
        "particles, 1 epoch on 4 training micrographs",
    )
    p.add_argument("--quiet", dest="verbose", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.test_micrographs, args.test_particles = 768, 2, 6
        args.conf_particles, args.conf_density = 300, 10
        args.train_micrographs, args.train_particles, args.train_epochs = 4, 6, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(),
        "args_summary": (
            f"{PIXEL_SIZE} Å/px, 90-px particles, {args.size}² micrographs; models "
            f"trained on {args.train_micrographs} micrographs × {args.train_particles} "
            f"particles, W {args.window}, {args.train_epochs} epochs, batch "
            f"{args.batch_size}"
        ),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "settings": {},
    }
    for key in args.snr:
        results["settings"][key] = run_setting(key, args, args.out)
    results["wall_s"] = time.perf_counter() - t0
    clean = json.loads(json.dumps(results, default=float).replace("NaN", "null"))
    (args.out / "results.json").write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    text = markdown(results)
    (args.out / "results.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {args.out / 'results.json'} and results.md in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
