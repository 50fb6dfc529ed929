"""Tiny forward folders with known x_0, noise and chains, for the training and checkpoint tests;
the original program's model source; the DDP tests' rank functions.

Built by hand in exactly the forward step's layout (s1/particles, s2/input (x_{k−1}), s2/label
(x_k), val/input, val/label, s3/noise, forward.json, pairs.npz), from micrographs written to disk,
so `--fresh-noise` can re-cut noise from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_cryoddm.forward import pair_noise, schedule_coefficients
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.normalise import Normalisation
from napari_cryoddm.preprocess import read_prepared

# The original CryoDDM program's unet2d.py (BIT-FuweiLi/CryoDDM), rebuilt (module name `unet2d`).
UNET2D_SOURCE = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class UDenoiseNet(nn.Module):
    def __init__(self, nf=48, base_width=11, top_width=3):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, nf, base_width, padding=base_width // 2),
                                  nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.enc2 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.enc3 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.enc4 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.enc5 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.enc6 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.1))
        self.dec5 = nn.Sequential(nn.Conv2d(2 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(2 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1))
        self.dec4 = nn.Sequential(nn.Conv2d(3 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(2 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1))
        self.dec3 = nn.Sequential(nn.Conv2d(3 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(2 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1))
        self.dec2 = nn.Sequential(nn.Conv2d(3 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(2 * nf, 2 * nf, 3, padding=1), nn.LeakyReLU(0.1))
        self.dec1 = nn.Sequential(nn.Conv2d(2 * nf + 1, 64, top_width, padding=top_width // 2),
                                  nn.LeakyReLU(0.1),
                                  nn.Conv2d(64, 32, top_width, padding=top_width // 2), nn.LeakyReLU(0.1),
                                  nn.Conv2d(32, 1, top_width, padding=top_width // 2))

    def forward(self, x):
        p1 = self.enc1(x); p2 = self.enc2(p1); p3 = self.enc3(p2); p4 = self.enc4(p3)
        p5 = self.enc5(p4); h = self.enc6(p5)
        h = self.dec5(torch.cat([F.interpolate(h, size=p4.size()[2:], mode="nearest"), p4], 1))
        h = self.dec4(torch.cat([F.interpolate(h, size=p3.size()[2:], mode="nearest"), p3], 1))
        h = self.dec3(torch.cat([F.interpolate(h, size=p2.size()[2:], mode="nearest"), p2], 1))
        h = self.dec2(torch.cat([F.interpolate(h, size=p1.size()[2:], mode="nearest"), p1], 1))
        return self.dec1(torch.cat([F.interpolate(h, size=x.size()[2:], mode="nearest"), x], 1))
"""


def _micrograph(
    rng: np.random.Generator,
    size: int,
    particles: np.ndarray,
    d: float,
    noise_boxes: np.ndarray,
    window: int,
    constant_noise: float | None,
) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    img = rng.normal(0.0, 1.0, (size, size))
    for y, x in particles:
        img += 3.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (d / 4) ** 2))
    if constant_noise is not None:
        h = window // 2
        for y, x in noise_boxes:  # a generous flat region around each noise centre
            img[max(0, y - h - 16) : y + h + 16, max(0, x - h - 16) : x + h + 16] = constant_noise
    return img.astype(np.float32)


def make_forward(
    root: Path,
    n: int = 6,
    window: int = 64,
    m: int = 4,
    beta: float = 0.1288,
    steps: int = 5,
    start: int = 2,
    seed: int = 0,
    manifest: bool = True,
    constant_noise: float | None = None,
) -> dict[str, Any]:
    """Write a forward folder under `root`/fw and its micrographs under `root`/mics.

    Returns x0 (n, W, W), noise (m, W, W), chains (n, T+1, W, W), the noise index (n, T) and paths.
    """
    rng = np.random.default_rng(seed)
    w, h = window, window // 2
    size = 4 * window
    mic_dir = root / "mics"
    mic_dir.mkdir(parents=True, exist_ok=True)
    # particles in the left half, noise centres in the right half of two micrographs
    d = window / 3
    crops: list[dict[str, Any]] = []
    noise_entries: list[dict[str, Any]] = []
    mic_entries: list[dict[str, Any]] = []
    x0, noise = [], []
    spec = Normalisation("robust")
    per_mic_p = int(np.ceil(n / 2))
    per_mic_n = int(np.ceil(m / 2))
    for mi in range(2):
        ps = np.array([[h + 8 + (i % 2) * (w + 8), h + 8 + (i // 2) * (w // 2)] for i in range(per_mic_p)])
        ps[:, 1] = np.minimum(ps[:, 1], size // 2 - h)
        nb = np.array([[h + 20 + (i % 2) * (w + 20), size - h - 20 - (i // 2) * (w // 2)] for i in range(per_mic_n)])
        img = _micrograph(rng, size, ps, d, nb, w, constant_noise)
        path = write_mrc(mic_dir / f"mic_{mi}.mrc", img, voxel_size=2.0, overwrite=True)
        norm = read_prepared(path, 1.0, spec).image
        mic_entries.append({"path": str(path.resolve()), "name": path.name, "shape": [size, size]})
        for y, x in ps:
            if len(crops) < n:
                crops.append(
                    {"micrograph": mi, "x": int(x), "y": int(y), "particle_x": float(x), "particle_y": float(y)}
                )
                x0.append(norm[y - h : y + h, x - h : x + h].copy())
        for y, x in nb:
            if len(noise_entries) < m:
                noise_entries.append({"micrograph": mi, "x": int(x), "y": int(y)})
                noise.append(norm[y - h : y + h, x - h : x + h].copy())
    x0a = np.stack(x0).astype(np.float32)
    na = np.stack(noise).astype(np.float32)
    coef = schedule_coefficients(beta, steps)
    idx = pair_noise(n, m, steps, np.random.default_rng(seed + 1))
    chains = np.empty((n, steps + 1, w, w), dtype=np.float32)
    chains[:, 0] = x0a
    for k in range(1, steps + 1):
        chains[:, k] = (
            np.float32(coef["x_coef"][k - 1]) * chains[:, k - 1]
            + np.float32(coef["noise_coef"][k - 1]) * na[idx[:, k - 1]]
        ).astype(np.float32)
    fw = root / "fw"
    s2_in = np.concatenate([chains[:, k - 1] for k in range(start, steps)])
    s2_lab = np.concatenate([chains[:, k] for k in range(start, steps)])
    write_mrc(fw / "s1/particles.mrcs", x0a, voxel_size=2.0)
    write_mrc(fw / "s2/input.mrcs", s2_in, voxel_size=2.0)
    write_mrc(fw / "s2/label.mrcs", s2_lab, voxel_size=2.0)
    write_mrc(fw / "val/input.mrcs", chains[:, steps - 1], voxel_size=2.0)
    write_mrc(fw / "val/label.mrcs", chains[:, steps], voxel_size=2.0)
    write_mrc(fw / "s3/noise.mrcs", na, voxel_size=2.0)
    if manifest:
        man = {
            "format": "napari-cryoddm-forward",
            "version": 1,
            "window": w,
            "diameter_px": d,
            "bin_factor": 1.0,
            "voxel_size": 2.0,
            "schedule": {"beta": beta, "steps": steps, "start": start},
            "normalisation": spec.to_dict(),
            "jitter": 0.0,
            "seed": seed,
            "noisier_member": "label",
            "counts": {"crops": n, "noise": m, "s2_pairs": (steps - start) * n, "val_pairs": n},
            "micrographs": mic_entries,
            "crops": crops,
            "noise": noise_entries,
            "package_version": "test",
            "complete": True,
        }
        (fw / "forward.json").write_text(json.dumps(man))
        ks = np.arange(start, steps + 1)
        np.savez(
            fw / "pairs.npz",
            crop=np.tile(np.arange(n), len(ks)),
            k=np.repeat(ks, n),
            noise=idx[np.tile(np.arange(n), len(ks))],
        )
    return {
        "folder": fw,
        "x0": x0a,
        "noise": na,
        "chains": chains,
        "index": idx,
        "coef": coef,
        "start": start,
        "steps": steps,
        "micrographs": mic_dir,
    }


def ddp_worker(rank: int, world: int, store: str, folder: str, out: str) -> None:
    """One rank of the DDP test: gloo on CPU, the real `train` job, batch 4 over 2 ranks."""
    import torch
    import torch.distributed as dist

    from napari_cryoddm.jobs import collect
    from napari_cryoddm.train import TrainConfig, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        collect(
            train(folder, out, TrainConfig(epochs=1, batch_size=4, device="cpu", workers=0, recipe="original", lr=0.05))
        )
    finally:
        dist.destroy_process_group()


def ddp_stop_worker(rank: int, world: int, store: str, folder: str, out: str) -> None:
    """A DDP rank where only rank 0 is told to stop (after its 2nd batch): both must stop there."""
    import torch
    import torch.distributed as dist

    from napari_cryoddm.jobs import CancelToken
    from napari_cryoddm.train import TrainConfig, train

    from .jobs import stop_when

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cancel = CancelToken()
        job = train(folder, out, TrainConfig(epochs=1, batch_size=4, device="cpu", workers=0), cancel)
        result = stop_when(job, cancel, lambda ev: rank == 0 and ev.payload.get("batch") == 2)
        assert result.stopped, f"rank {rank} did not stop"
    finally:
        dist.destroy_process_group()
