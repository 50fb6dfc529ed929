"""The ceiling for CryoDDM's targets at a given budget: the same U-Net trained with a target no
self-supervised method has (the clean signal) and with the best one a method could have (a
second, independent noise realisation: Noise2Noise).

The sample micrographs' noise is white N(0, 1) added to clean signal + ice, so both targets can
be made exactly. Everything else is the reference run's (`scripts/train_reference.py`):
training micrographs of seed 1000 at 3 Å/px with 14 particles per 1024², random W = 128 crops
(anywhere on the micrograph), robust normalisation per micrograph, UDenoiseNet, Adam, batch 8,
a time budget; the same held-out micrographs and scores (r after the ice-band fit, beside the
input and the Gaussian/Wiener filters at the same pixel size).

If the clean target beats the Gaussian at the CPU's budget, the budget is not what keeps the
CryoDDM targets below their input; if Noise2Noise does too, a self-supervised target can.

A third target, `chain-signal`, is CryoDDM's own signal target (`train --s2-target signal`) on
an ideal forward chain: the reference schedule (β 0.1288, T 5, pair x_4 → x_3) run on the same
random crops with fresh white noise as the noise patches. It separates the target from the
forward folder's data (crops around particles, picked background patches): if it learns, the
data are what fail; if not, the target is. It is scored through the chain estimator's input
scaling (√V_k·x), as `predict --estimator chain` does. `chain-step` is the original's step
target x_{k−1} on the same ideal chain, scored as the original predicts (one pass, `direct`).

    python benchmarks/oracle_targets.py --minutes 15 --targets clean noisy2 --out oracle.json
    python benchmarks/oracle_targets.py --minutes 15 --targets chain-signal chain-step --out chain.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_cryoddm.diffusion import schedule_coefficients
from napari_cryoddm.estimators import chain_statistics, estimator_of, signal_target
from napari_cryoddm.model import STRIDE, UDenoiseNet
from napari_cryoddm.normalise import Normalisation, normalisation_stats
from napari_cryoddm.simulation import quality as q
from napari_cryoddm.simulation.sample import iter_micrographs, molecule_for

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "scripts")]  # _machine; the reference run's held-out set
from _machine import machine  # noqa: E402
from train_reference import HELD_OUT, held_out, training_sample  # noqa: E402

ROBUST = Normalisation()
TARGETS = ("clean", "noisy2", "chain-signal", "chain-step")
REFERENCE_CHAIN = (0.1288, 5, 4)  # β, T, the pair x_k → x_{k−1} trained (forward --preset reference)


def chain_pair(
    x0: torch.Tensor, rng: np.random.Generator, target: str = "chain-signal"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_k, target of pair k) for crops x0, with fresh white noise at every step: the signal
    target, or the original's step target x_{k−1}."""
    beta, steps, k = REFERENCE_CHAIN
    coef = schedule_coefficients(beta, steps)
    xs = [x0]
    for j in range(k):
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        xs.append(float(coef["x_coef"][j]) * xs[-1] + float(coef["noise_coef"][j]) * noise)
    if target == "chain-step":
        return xs[k], xs[k - 1]
    lam, factor = signal_target(chain_statistics(beta, steps), k)
    return xs[k], factor * (xs[k - 1] - lam * xs[k])


def input_scale(target: str) -> float:
    """What the input is multiplied by at prediction: √V_k for the chain's signal target, else 1
    (the step target is scored as the original predicts: one pass on the micrograph)."""
    if target != "chain-signal":
        return 1.0
    beta, steps, k = REFERENCE_CHAIN
    return estimator_of(chain_statistics(beta, steps), k).scale


def training_set(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """Per micrograph: the normalised noisy input and the two targets on the same affine."""
    cfg = training_sample(args)
    rng = np.random.default_rng(args.seed + 1)
    out = []
    for sim in iter_micrographs(cfg, molecule_for(cfg)):
        _, _, offset, scale = normalisation_stats(sim.noisy, ROBUST)
        noisy2 = sim.clean + sim.ice + rng.standard_normal(sim.noisy.shape).astype(np.float32)
        out.append(
            {
                "input": (sim.noisy - offset) / scale,
                "clean": (sim.clean + sim.ice - offset) / scale,
                "noisy2": (noisy2 - offset) / scale,
            }
        )
    return out


def batches(data: list[dict[str, np.ndarray]], target: str, window: int, batch: int, rng: np.random.Generator):
    """Random crops anywhere, with a random flip/rotation (the 8 symmetries of the square)."""
    while True:
        xs, ys = [], []
        for _ in range(batch):
            d = data[rng.integers(len(data))]
            h, w = d["input"].shape
            y, x = rng.integers(0, h - window + 1), rng.integers(0, w - window + 1)
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            pair = []
            for key in ("input", "input" if target.startswith("chain") else target):
                c = np.rot90(d[key][y : y + window, x : x + window], k)
                pair.append(np.ascontiguousarray(c[:, ::-1] if flip else c))
            xs.append(pair[0])
            ys.append(pair[1])
        x, y = torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])
        yield chain_pair(x, rng, target) if target.startswith("chain") else (x, y)


def train(data: list[dict[str, np.ndarray]], target: str, args: argparse.Namespace) -> tuple[UDenoiseNet, dict]:
    torch.manual_seed(args.seed)
    model = UDenoiseNet()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    t0, n, losses = time.perf_counter(), 0, []
    model.train()
    for x, y in batches(data, target, args.window, args.batch, rng):
        if time.perf_counter() - t0 > args.minutes * 60:
            break
        warm = min(1.0, (len(losses) + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        n += len(x)
        if len(losses) % 200 == 0:
            print(f"  {target}: {n} samples, loss {np.mean(losses[-200:]):.4f}", flush=True)
    seconds = time.perf_counter() - t0
    return model, {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "losses": losses}


@torch.no_grad()
def denoise(model: UDenoiseNet, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The whole micrograph in one pass, normalised as in training (× `scale`), padded to the
    pooling stride."""
    _, _, offset, scale_ = normalisation_stats(image, ROBUST)
    h, w = image.shape
    ph, pw = -h % STRIDE, -w % STRIDE
    x = np.pad((image - offset) / scale_ * scale, ((0, ph), (0, pw)), mode="reflect").astype(np.float32)
    model.eval()
    return model(torch.from_numpy(x)[None, None])[0, 0, :h, :w].numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["clean", "noisy2"], choices=TARGETS)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per target")
    ap.add_argument("--micrographs", type=int, default=24)
    ap.add_argument("--particles", type=int, default=14)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--pixel-size", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--data-seed", type=int, default=1000)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-micrographs", type=int, default=4)
    ap.add_argument("--test-seed", type=int, default=2000)
    ap.add_argument("--held-out", nargs="+", default=["binned", "sample"], choices=list(HELD_OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(report["machine"], flush=True)
    data = training_set(args)
    tests = {s: held_out(args, s) for s in args.held_out}
    report["scores"] = {s: {"input": q.score(raw, clean).as_row()} for s, (clean, raw) in tests.items()}
    for s, (clean, raw) in tests.items():
        for name, fn in q.PEERS.items():
            report["scores"][s][name] = q.score([fn(im) for im in raw], clean).as_row()
    report["train"] = {}
    for target in args.targets:
        model, info = train(data, target, args)
        report["train"][target] = info
        for s, (clean, raw) in tests.items():
            report["scores"][s][f"U-Net, target {target}"] = q.score(
                [denoise(model, im, input_scale(target)) for im in raw], clean
            ).as_row()
    for s, rows in report["scores"].items():
        print(f"held-out '{s}' ({HELD_OUT[s]})")
        for name, row in rows.items():
            print(f"  {name:24s} r {row['r']:.4f}  FRC mid {row['frc_mid']:.3f} high {row['frc_high']:.3f}")
    for target, info in report["train"].items():
        print(f"{target}: {info['samples']} samples in {info['seconds']:.0f} s ({info['samples_per_s']:.1f}/s)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
