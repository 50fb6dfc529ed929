"""Training: the CryoDDM U-Net on the forward pairs, on CPU, one GPU or several (DDP).

An epoch is the three phases of the original CryoDDM program, MSE each, one optimiser step
per batch:

* **S1** `s1/particles` → itself (keep the particle's structure);
* **S2** `s2/label` (the noisier x_k) → `s2/input` (the cleaner x_{k−1}): one reverse step;
* **S3** a noise patch → a *different* noise patch (noise2noise on pure background);

then validation, `val/label` (x_T) → `val/input` (x_{T−1}), the same direction as S2 (the
original validated backwards). Faults of the original that are fixed here: the learning-rate
schedule steps per epoch (the original's per-batch StepLR drives the rate to ~0 by epoch 30; it is
kept, literally, as `--recipe original`); seeds are set before the model is built; stacks are
memory-mapped, never loaded whole.

Every random choice of an epoch (order, S3 partners, augmentation, fresh noise) is drawn from
`(seed, epoch)` up front and carried by the sample keys, so the result does not depend on the number
of loader workers or GPUs, and a run stopped mid-epoch resumes exactly: the resume state records the
epoch, the next batch, the running loss sums, optimiser, scheduler and every RNG state.

`--fresh-noise` draws the forward chain in the loader instead of reading `s2`: each S2 sample is a
particle crop x_0 taken k−1 and k steps down the chain with noise patches re-cut around the recorded
noise centres (random shifts that keep the recorded particles out, flips, 90° rotations), a fresh
pairing every epoch, with the schedule coefficients of `forward.schedule_coefficients`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import __version__
from .atomic import atomic_write
from .checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .config import to_jsonable
from .forward_layout import ForwardData, open_forward
from .errors import CryoDDMError, InputError
from .jobs import CancelToken, Job, Progress
from .d4 import d4
from .devices import TRAIN_PRECISIONS, agreed, autocast_dtype, cpu_has_bf16, join_process_group, resolve_device
from .linear import LinearPlusNet, fit_transfer, zero_output_layer
from .model import ARCHITECTURE, UDenoiseNet
from .normalise import Normalisation

log = logging.getLogger(__name__)

PHASES = ("s1", "s2", "s3")
S1, S2, S3 = 0, 1, 2
RECIPES = ("default", "original")
HISTORY = "history.json"


# ----------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    """Every parameter of training; the CLI flags and the widget form are built from it."""

    epochs: int = field(default=60, metadata={"help": "number of epochs (S1 + S2 + S3 + validation each)"})
    batch_size: int = field(default=32, metadata={
        "help": "samples per optimiser step (all GPUs together; each of N ranks takes B/N)"})
    recipe: str = field(default="default", metadata={
        "help": "optimiser: default (Adam, cosine decay per epoch, chosen by measurement) or "
                "original (SGD 1e-3, StepLR(100, 0.9) stepped per batch, as CryoDDM did)",
        "choices": RECIPES})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate (default 1e-3 for both recipes)",
        "label": "learning rate"})
    warmup: int = field(default=200, metadata={
        "help": "batches over which the learning rate ramps up linearly from 0 (default recipe)"})
    clip: float = field(default=1.0, metadata={
        "help": "largest gradient norm per step, 0 = no clipping (default recipe)",
        "label": "gradient clip"})
    device: str = field(default="auto", metadata={
        "help": "auto, cpu, cuda, cuda:N or mps (auto: the GPU of this rank if any, else CPU)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16",
        "choices": TRAIN_PRECISIONS})
    augment: bool = field(default=True, metadata={
        "help": "random flips and 90° rotations (the same for input and target)"})
    fresh_noise: bool = field(default=False, metadata={
        "help": "draw the forward chain on the fly with noise re-cut around the recorded noise "
                "centres, a fresh pairing each epoch (ignores s2/)"})
    max_shift: int | None = field(default=None, metadata={
        "help": "--fresh-noise: largest shift of a re-cut noise patch (default W/8)", "unit": "px"})
    s1_weight: float = field(default=1.0, metadata={
        "help": "weight of the S1 (particle → itself) loss; 0 leaves the phase out (its optimum is "
                "the identity, which passes the noise through)", "label": "S1 weight"})
    s3_weight: float = field(default=1.0, metadata={
        "help": "weight of the S3 (noise → other noise) loss; 0 leaves the phase out",
        "label": "S3 weight"})
    s2_target: str = field(default="step", metadata={
        "help": "what S2 learns from x_k: signal (the part of x_{k-1} that estimates x_k's clean "
                "signal, derived from the chain's coefficients: a Noise2Noise target), step "
                "(x_{k-1} itself, as the original did) or auto (signal when the forward folder "
                "records its schedule, else step)", "choices": ("auto", "signal", "step"),
        "label": "S2 target"})
    linear_start: bool = field(default=False, metadata={
        "help": "start from the closed-form best linear filter for the training pairs (fitted "
                "once, kept in the checkpoint) and train the U-Net on what it leaves"})
    seed: int = field(default=42, metadata={"help": "random seed (set before the model is built)"})
    workers: int | None = field(default=None, metadata={
        "help": "data-loader processes (default: 0 on CPU, up to 8 per GPU)"})
    init: Path | None = field(default=None, metadata={
        "help": "start from these weights (ours, the original's N.pth / checkpoint.pth, or a "
                "built-in model's name: sample)",
        "label": "init checkpoint"})
    resume: bool = field(default=False, metadata={
        "help": "continue OUT/last.pt exactly where it stopped (mid-epoch too)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace checkpoints already in OUT", "widget": False})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise CryoDDMError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise CryoDDMError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.recipe not in RECIPES:
            raise CryoDDMError(f"unknown recipe {self.recipe!r} ({' or '.join(RECIPES)})")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise CryoDDMError(f"unknown precision {self.precision!r} (auto, fp32 or bf16)")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise CryoDDMError(f"--lr must be a positive number, got {self.lr}")
        if self.workers is not None and self.workers < 0:
            raise CryoDDMError(f"--workers must be 0 or more, got {self.workers}")
        for name in ("s1_weight", "s3_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise CryoDDMError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if self.s2_target not in ("auto", "signal", "step"):
            raise CryoDDMError(f"--s2-target {self.s2_target!r}: use auto, signal or step")
        if self.warmup < 0:
            raise CryoDDMError(f"--warmup must be 0 or more, got {self.warmup}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise CryoDDMError(f"--clip must be 0 or more, got {self.clip}")
        if self.max_shift is not None and self.max_shift < 0:
            raise CryoDDMError(f"--max-shift must be 0 or more, got {self.max_shift}")
        if self.seed < 0:  # numpy and torch take no negative seeds
            raise CryoDDMError(f"--seed must be 0 or more, got {self.seed}")
        if isinstance(self.init, str):
            self.init = Path(self.init) if self.init else None

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else 1e-3


# Fields that decide the sequence of batches: a resumed run keeps the stopped run's values.
_PLAN_FIELDS = ("batch_size", "recipe", "lr", "augment", "fresh_noise", "max_shift", "seed",
                "s1_weight", "s3_weight", "warmup", "clip", "s2_target", "linear_start")


# ----------------------------------------------------------------------------- devices


# ----------------------------------------------------------------------------- the forward folder


# ----------------------------------------------------------------------------- augmentation


# ----------------------------------------------------------------------------- fresh noise

@dataclass
class NoisePool:
    """Noise patches cut once with a margin, so re-cuts may shift; `lo/hi` bound each shift."""

    patches: np.ndarray  # (M, W + 2S, W + 2S) float32, memory-mapped
    lo: np.ndarray       # (M, 2) smallest allowed (dy, dx)
    hi: np.ndarray       # (M, 2) largest allowed (dy, dx)
    particles: list[np.ndarray]  # per noise patch: particle (y, x) relative to its centre
    clearance: float     # a shifted box must keep |Δ| ≥ W/2 + d/2 from every recorded particle
    window: int
    margin: int


def build_noise_pool(data: ForwardData, cache: Path, max_shift: int | None = None,
                     cancel: CancelToken | None = None) -> Job[NoisePool]:
    """Re-read the micrographs of the recorded noise centres (binned and normalised exactly as the
    forward step did) and cache W+2S patches around them as one float32 file."""
    from .preprocess import read_prepared

    m = data.manifest
    if not m or not m.get("noise") or not m.get("micrographs"):
        raise InputError(data.folder, "--fresh-noise needs forward.json with the micrographs and "
                                      "noise centres (the original's folders have none)")
    w = data.window
    s = int(w // 8 if max_shift is None else max_shift)
    size = w + 2 * s
    mics = m["micrographs"]
    noise = m["noise"]
    crops = m.get("crops") or []
    factor = float(m.get("bin_factor", 1) or 1)
    spec = Normalisation.from_dict(m.get("normalisation"))
    d = float(m.get("diameter_px") or 0)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"noise_pool_W{w}_S{s}.npy"
    patches = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(noise), size, size))
    lo = np.zeros((len(noise), 2), dtype=np.int64)
    hi = np.zeros((len(noise), 2), dtype=np.int64)
    rel: list[np.ndarray] = [np.zeros((0, 2))] * len(noise)
    by_mic: dict[int, list[int]] = {}
    for i, e in enumerate(noise):
        by_mic.setdefault(int(e["micrograph"]), []).append(i)
    parts: dict[int, np.ndarray] = {}
    for c in crops:
        mi = int(c["micrograph"])
        py, px = c.get("particle_y", c["y"]), c.get("particle_x", c["x"])
        parts.setdefault(mi, []).append((float(py), float(px)))  # type: ignore[arg-type]
    for done, (mi, idx) in enumerate(sorted(by_mic.items())):
        if cancel is not None:
            cancel.raise_if_cancelled()
        entry = mics[mi]
        mpath = Path(entry["path"])
        yield Progress(done, len(by_mic), f"re-cutting noise from {entry.get('name', mpath.name)}")
        if not mpath.exists():
            raise InputError(mpath, "micrograph named in forward.json is gone; --fresh-noise re-cuts "
                                    "noise from the micrographs (train without it, or restore the file)")
        image = read_prepared(mpath, factor, spec).image
        ny, nx = image.shape
        pts = np.asarray(parts.get(mi, []), dtype=np.float64).reshape(-1, 2)
        for i in idx:
            cx, cy = int(noise[i]["x"]), int(noise[i]["y"])
            y0, x0 = cy - w // 2 - s, cx - w // 2 - s
            ys0, xs0 = max(0, y0), max(0, x0)
            ys1, xs1 = min(ny, y0 + size), min(nx, x0 + size)
            patches[i] = 0
            patches[i, ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0] = image[ys0:ys1, xs0:xs1]
            # shifts keep the W×W box inside the micrograph
            lo[i] = (max(-s, -(cy - w // 2)), max(-s, -(cx - w // 2)))
            hi[i] = (min(s, ny - (cy - w // 2 + w)), min(s, nx - (cx - w // 2 + w)))
            rel[i] = pts - np.array([cy, cx], dtype=np.float64)
        del image
    patches.flush()
    pool = NoisePool(np.load(path, mmap_mode="r"), lo, hi, rel, w / 2 + d / 2, w, s)
    yield Progress(len(by_mic), len(by_mic), f"{len(noise)} noise patches ready for re-cutting")
    return pool


def recut(pool: NoisePool, index: int, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
    """Noise patch `index` shifted at random (keeping the recorded particles out), flipped/rotated."""
    w, s = pool.window, pool.margin
    dy = dx = 0
    lo, hi = pool.lo[index], pool.hi[index]
    near = pool.particles[index]
    for _ in range(8):
        cy = int(rng.integers(lo[0], hi[0] + 1)) if hi[0] > lo[0] else 0
        cx = int(rng.integers(lo[1], hi[1] + 1)) if hi[1] > lo[1] else 0
        if not len(near):
            dy, dx = cy, cx
            break
        ady = np.abs(near[:, 0] - cy)
        adx = np.abs(near[:, 1] - cx)
        # the shifted box overlaps no particle that the unshifted one did not already
        ok = (ady >= pool.clearance) | (adx >= pool.clearance)
        base = (np.abs(near[:, 0]) >= pool.clearance) | (np.abs(near[:, 1]) >= pool.clearance)
        if np.all(ok | ~base):
            dy, dx = cy, cx
            break
    patch = pool.patches[index, s + dy:s + dy + w, s + dx:s + dx + w]
    return d4(patch, int(rng.integers(8))) if augment else np.asarray(patch)


# ----------------------------------------------------------------------------- datasets

class PairDataset(Dataset):
    """Map-style dataset over memory-mapped stacks; a key is (phase, index, partner, seed, real).

    S1: particles[i] → particles[i]; S2: s2/label[i] (x_k) → s2/input[i] (x_{k−1}); S3:
    noise[i] → noise[partner]. The seed picks the flip/rotation (and, with a noise pool, the fresh
    chain), so a sample is the same whichever process loads it.
    """

    def __init__(self, data: ForwardData, augment: bool = True, pool: NoisePool | None = None,
                 coefficients: dict[str, np.ndarray] | None = None,
                 targets: dict[int, tuple[float, float]] | None = None, noise_scale: float = 1.0) -> None:
        self.data = data
        self.augment = augment
        self.pool = pool
        self.coef = coefficients
        self.targets = targets  # k → (λ_k, factor): S2 learns factor·(x_{k−1} − λ_k·x_k)
        self.noise_scale = noise_scale  # S3 input scale in the signal framing (`_signal_targets`)
        self._maps: dict[str, np.ndarray] | None = None
        if pool is not None:
            sched = data.schedule or {}
            self.start, self.steps = int(sched["start"]), int(sched["steps"])

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened in each worker
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def stack(self, key: str) -> np.ndarray:
        if self._maps is None:
            self._maps = {}
        if key not in self._maps:
            n, w = self.data.counts[key], self.data.window
            self._maps[key] = np.memmap(self.data.path(key), dtype="<f4", mode="r",
                                        offset=self.data.offsets[key], shape=(n, w, w))
        return self._maps[key]

    def __len__(self) -> int:  # keys come from the sampler; this is the largest phase
        return max(self.data.counts.values())

    def fresh_chain(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """(x_k, x_{k−1}, k) of particle crop i with freshly cut noise at every step."""
        assert self.pool is not None and self.coef is not None
        k = int(rng.integers(self.start, self.steps))  # s2 holds k = start … T−1
        x = np.array(self.stack("particles")[i], dtype=np.float32)
        m = len(self.pool.patches)
        picks = rng.choice(m, size=k, replace=k > m)
        prev = x
        for step in range(k):
            n = recut(self.pool, int(picks[step]), rng, augment=True)
            prev = x
            x = (np.float32(self.coef["x_coef"][step]) * x
                 + np.float32(self.coef["noise_coef"][step]) * n.astype(np.float32)).astype(np.float32)
        return x, prev, k

    def sample(self, phase: int, index: int, partner: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) as float32 arrays, before the shared flip/rotation."""
        rng = np.random.default_rng(seed)
        if phase == S1:
            x = self.stack("particles")[index]
            return x, x
        if phase == S2:
            if self.pool is not None:
                xk, xprev, k = self.fresh_chain(index, rng)
            else:
                xk, xprev = self.stack("s2_label")[index], self.stack("s2_input")[index]
                k = int((self.data.schedule or {}).get("start") or 0) + index // self.data.counts["particles"]
            return xk, self.target(xk, xprev, k)
        if phase == S3:
            if self.targets is not None:
                # the signal framing: pure background at the trained step's noise level, whose
                # clean part is 0 (the original's random partner patch has the same optimum,
                # its mean, but adds the partner's noise to every target)
                n = (recut(self.pool, index, rng, augment=False) if self.pool is not None
                     else self.stack("noise")[index])
                x = np.float32(self.noise_scale) * np.asarray(n, dtype=np.float32)
                return x, np.zeros_like(x)
            if self.pool is not None:
                return (recut(self.pool, index, rng, augment=False),
                        recut(self.pool, partner, rng, augment=False))
            noise = self.stack("noise")
            return noise[index], noise[partner]
        raise ValueError(f"unknown phase {phase}")

    def target(self, xk: np.ndarray, xprev: np.ndarray, k: int) -> np.ndarray:
        """x_{k−1} itself, or its `signal` part (see `estimators`)."""
        if self.targets is None:
            return xprev
        lam, factor = self.targets[k]
        out = np.asarray(xprev, dtype=np.float32) - np.float32(lam) * np.asarray(xk, dtype=np.float32)
        out *= np.float32(factor)
        return out

    def __getitem__(self, key: Sequence[int]) -> tuple[int, torch.Tensor, torch.Tensor, float]:
        phase, index, partner, seed, real = (int(v) for v in key)
        x, y = self.sample(phase, index, partner, seed)
        if self.augment:
            code = int(np.random.default_rng([seed, 8]).integers(8))
            x, y = d4(x, code), d4(y, code)
        xt = torch.from_numpy(np.array(x, dtype=np.float32, order="C"))[None]
        yt = torch.from_numpy(np.array(y, dtype=np.float32, order="C"))[None]
        return phase, xt, yt, float(real)


class ValDataset(Dataset):
    """Validation: `val/label` (x_T) → `val/input` (x_{T−1}), no augmentation."""

    def __init__(self, data: ForwardData, targets: dict[int, tuple[float, float]] | None = None) -> None:
        self.inner = PairDataset(data, augment=False, targets=targets)
        self.k = int((data.schedule or {}).get("steps") or 0)

    def __len__(self) -> int:
        return self.inner.data.counts["val_label"]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inner.stack("val_label")[i]
        y = self.inner.target(x, self.inner.stack("val_input")[i], self.k)
        return (torch.from_numpy(np.array(x, dtype=np.float32))[None],
                torch.from_numpy(np.array(y, dtype=np.float32))[None])


# ----------------------------------------------------------------------------- the epoch plan

def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (S3 pairs each noise patch with another one)."""
    perm = rng.permutation(n)
    fixed = np.flatnonzero(perm == np.arange(n))
    for i in fixed:  # swap each fixed point with a neighbour; stays a permutation
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def epoch_plan(counts: dict[str, int], batch_size: int, seed: int, epoch: int,
               fresh_s2: int | None = None, skip: Sequence[int] = (),
               interleave: bool = True) -> list[np.ndarray]:
    """The epoch's global batches, each an int64 array of keys (phase, index, partner, seed, 1)
    of one phase; the phases' batches shuffled together (`interleave`, so the optimiser is not
    dragged from one objective to the next) or in blocks S1, S2, S3 (the original's order).
    Drawn from (seed, epoch) alone; phases in `skip` (weight 0) are drawn too, so the other
    phases' keys do not change, and then left out."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    batches: list[np.ndarray] = []
    n1, n3 = counts["particles"], counts["noise"]
    s2_index = (np.arange(fresh_s2) % n1) if fresh_s2 is not None else np.arange(counts["s2_label"])
    for phase, idx, partners in (
        (S1, rng.permutation(n1), None),
        (S2, rng.permutation(s2_index), None),
        (S3, None, None),
    ):
        if phase == S3:
            idx = rng.permutation(n3)
            partners = derangement(n3, rng)[idx]
        seeds = rng.integers(0, 2**62, size=len(idx), dtype=np.int64)
        keys = np.stack([np.full(len(idx), phase), idx,
                         partners if partners is not None else np.full(len(idx), -1),
                         seeds, np.ones(len(idx), dtype=np.int64)], axis=1).astype(np.int64)
        for b in range(0, len(keys), batch_size):
            batches.append(keys[b:b + batch_size])
    if interleave:  # the order of every phase's batches, so leaving one out keeps the others'
        order = np.random.default_rng([int(seed), int(epoch), 0x1A7E]).permutation(len(batches))
        batches = [batches[i] for i in order]
    return [b for b in batches if int(b[0, 0]) not in skip]


def local_keys(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch, interleaved as DistributedSampler deals them; a rank
    left empty gets one zero-weight copy so every rank takes part in the gradient exchange."""
    if world == 1:
        return batch
    mine = batch[rank::world]
    if len(mine) == 0:
        mine = batch[:1].copy()
        mine[:, 4] = 0
    return mine


class PlanBatchSampler(Sampler[list[tuple[int, ...]]]):
    """Yields this rank's keys of each global batch of the current epoch from `start` on.

    The distributed counterpart of `torch.utils.data.DistributedSampler`: the same interleaved
    split, but the order comes from the epoch plan, so it can start mid-epoch.
    """

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.batches: list[np.ndarray] = []
        self.start = 0

    def set_epoch(self, batches: list[np.ndarray], start: int = 0) -> None:
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        for b in self.batches[self.start:]:
            yield [tuple(int(v) for v in k) for k in local_keys(b, self.rank, self.world)]


# ----------------------------------------------------------------------------- optimiser recipes

class CosineFactor:
    """lr factor of epoch e: cosine from 1 to `floor` over `epochs`, flat afterwards (closed form,
    so a resumed run that asks for more epochs stretches the curve instead of climbing it again)."""

    def __init__(self, epochs: int, floor: float = 0.01) -> None:
        self.epochs, self.floor = int(epochs), float(floor)

    def __call__(self, e: int) -> float:
        t = min(1.0, e / max(1, self.epochs))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimiser(model: nn.Module, config: TrainConfig, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    """default: Adam + cosine decay to lr/100 over the run, stepped per epoch (chosen by
    measurement, see docs/research/recipe-screens.md). original: SGD 1e-3 + StepLR(100, 0.9) stepped per batch."""
    lr = config.learning_rate
    if config.recipe == "original":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, CosineFactor(epochs))


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the job

@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val: float | None
    stopped: bool = False
    last: Path | None = None
    best: Path | None = None


def _is_our_checkpoint(path: Path) -> bool:
    """A napari-cryoddm checkpoint, told from its pickle's bytes without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and b"napari-cryoddm-checkpoint" in zf.read(name)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return False


def _check_out(out: Path, config: TrainConfig, inputs: Sequence[Any] = ()) -> None:
    """Before any work: OUT holds no input and can be written in; --overwrite replaces only this
    tool's checkpoints and history, never files it did not write."""
    from .safety import check_location, check_writable

    check_location(out, inputs, what="the training output folder", allow_workdir=True)
    last = out / "last.pt"
    if config.resume:
        if not last.is_file():
            raise InputError(out, "--resume: no last.pt here to continue from")
        check_writable(out)
        return
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    existing = [p for p in (out / "last.pt", out / "best.pt", out / HISTORY) if os.path.lexists(p)]
    if existing and not config.overwrite:
        raise CryoDDMError(f"{out} already holds {', '.join(p.name for p in existing)}; pass "
                           "--resume to continue that run or --overwrite to start again")
    for p in existing:
        ours = _is_our_checkpoint(p) if p.suffix == ".pt" else _is_our_history(p)
        if not ours:
            raise InputError(p, "was not written by cryoddm train; refusing to replace it "
                                "(move it or choose another -o)")
    check_writable(out)


def _is_our_history(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "epochs" in doc and "config" in doc


def train(forward_dir: str | os.PathLike[str], out: str | os.PathLike[str],
          config: TrainConfig | None = None, cancel: CancelToken | None = None,
          epochs_given: bool = True) -> Job[TrainResult]:
    """The training job. Yields a `Progress` per batch (payload: epoch, phase, loss, lr) and one per
    epoch (payload `epoch_end`: the phase means and the validation loss); returns a `TrainResult`.

    Stopping (the `CancelToken`) finishes the current batch and writes a resumable `last.pt`.
    """
    import torch.distributed as dist

    config = config or TrainConfig()
    cancel = cancel or CancelToken()
    out = Path(out)
    data = open_forward(forward_dir)
    rank, world, own_group = join_process_group(config.device)
    try:
        return (yield from _train(data, out, config, cancel, rank, world, epochs_given))
    finally:
        cache = out / ".cache" / f"rank{rank}"
        if cache.is_dir():  # the re-cut noise pool (rebuilt by each run; can be GBs)
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
            with contextlib.suppress(OSError):
                (out / ".cache").rmdir()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(data: ForwardData, out: Path, config: TrainConfig, cancel: CancelToken,
           rank: int, world: int, epochs_given: bool = True) -> Job[TrainResult]:
    import torch.distributed as dist

    if config.fresh_noise and not (data.manifest and data.manifest.get("noise")):
        raise InputError(data.folder, "--fresh-noise needs forward.json (micrographs, noise centres "
                                      "and schedule); the original CryoDDM's folders have none")
    _check_out(out, config, [data.folder, config.init if config.init and Path(config.init).exists() else None])
    # (every rank: a refusal on rank 0 alone would leave the others waiting)
    for note in data.warnings:
        log.warning(note)
        warnings.warn(note, UserWarning, stacklevel=3)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(config.device, local_rank if world > 1 else None)
    if world > 1 and config.batch_size < world:
        raise CryoDDMError(f"--batch-size {config.batch_size} is smaller than the {world} processes")

    if config.s2_target == "auto":
        known = bool(data.schedule and data.schedule.get("beta") is not None)
        config = dataclasses.replace(config, s2_target="signal" if known else "step")
    # resume: the stopped run's plan-defining settings win
    resume_state = None
    if config.resume:
        loaded = load_checkpoint(out / "last.pt")
        resume_state = loaded.resume
        if not resume_state:
            raise InputError(out / "last.pt", "holds no resume state")
        saved = resume_state.get("config", {})
        changed = {k: (getattr(config, k), saved.get(k)) for k in _PLAN_FIELDS
                   if k in saved and _norm(getattr(config, k)) != _norm(saved.get(k))}
        if changed:
            note = ("resuming with the stopped run's " + ", ".join(
                f"{k}={v[1]!r} (not {v[0]!r})" for k, v in changed.items()))
            log.warning(note)
            warnings.warn(note, UserWarning, stacklevel=3)
            config = dataclasses.replace(config, **{k: saved[k] for k in changed})
        config = _resumed_epochs(config, saved.get("epochs") or _history_epochs(out),
                                 epochs_given, out)

    # seeds before the model is built (the original seeded afterwards)
    seed_everything(config.seed)
    model = UDenoiseNet()
    init_info = None
    if config.init is not None and resume_state is None:
        init = load_checkpoint(config.init)
        model.load_state_dict(init.model.state_dict())
        init_info = {"path": str(Path(init.path).resolve()), "kind": init.kind,
                     "name": str(config.init)}
        init_norm = init.metadata.get("normalisation")
        if init_norm and init_norm.get("method") != data.normalisation.get("method"):
            note = (f"--init {config.init}: trained on {init_norm.get('method')} normalised data, "
                    f"this forward folder is {data.normalisation.get('method')}; fine-tuning will "
                    "have to adapt to the other intensity scale")
            log.warning(note)
            warnings.warn(note, UserWarning, stacklevel=3)
    elif resume_state is not None:
        model.load_state_dict(loaded.model.state_dict())
        init_info = resume_state.get("init")
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = autocast_dtype(device, config.precision)
    if amp is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        log.warning("--precision bf16 on a CPU without bf16 instructions (%s): PyTorch emulates "
                    "it, measured ~37× slower than fp32 here; use --precision fp32",
                    torch.backends.cpu.get_cpu_capability())
    epochs = config.epochs
    opt, sched = make_optimiser(model, config, epochs)

    # data
    pool = None
    coef = None
    fresh_s2 = None
    if config.fresh_noise:
        from .forward import schedule_coefficients

        sched_info = data.schedule
        if not sched_info or sched_info.get("beta") is None:
            raise InputError(data.folder, "--fresh-noise needs the schedule in forward.json")
        coef = schedule_coefficients(float(sched_info["beta"]), int(sched_info["steps"]))
        cache = out / ".cache" / f"rank{rank}"  # each rank its own: no two writers of one file
        pool = yield from build_noise_pool(data, cache, config.max_shift, cancel)
        fresh_s2 = data.counts["particles"] * (int(sched_info["steps"]) - int(sched_info["start"]))
    targets, noise_scale = _signal_targets(data) if config.s2_target == "signal" else (None, 1.0)
    dataset = PairDataset(data, augment=config.augment, pool=pool, coefficients=coef, targets=targets,
                          noise_scale=noise_scale)

    # the model: D = H∗x + U(x) with H the closed-form linear solution (see linear.py), or U alone
    transfer = None
    if resume_state is not None:
        transfer = loaded.metadata.get("linear_transfer")
    elif config.init is not None:
        transfer = init.metadata.get("linear_transfer")
    elif config.linear_start:
        yield Progress(0, None, "fitting the linear start on the training pairs")
        transfer = fit_linear_start(dataset, data, config, fresh_s2)
        zero_output_layer(model)
    full: nn.Module = LinearPlusNet(model, transfer) if transfer else model
    net: nn.Module = full
    if world > 1:
        net = nn.parallel.DistributedDataParallel(full, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = PlanBatchSampler(rank, world)
    workers = config.workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // max(1, world) - 1))
    loader_kw: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        loader_kw.update(persistent_workers=True, prefetch_factor=4)
    loader = DataLoader(dataset, batch_sampler=sampler, **loader_kw)
    val_set = ValDataset(data, targets)
    val_idx = list(range(rank, len(val_set), world))
    val_loader = DataLoader(torch.utils.data.Subset(val_set, val_idx), batch_size=2 * config.batch_size,
                            shuffle=False, num_workers=min(workers, 2), pin_memory=device.type == "cuda")

    # position
    history: list[dict[str, Any]] = []
    best_val: float | None = None
    best_epoch: int | None = None
    epoch, start_batch = 0, 0
    sums = {p: [0.0, 0] for p in PHASES}
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        for fn in getattr(sched, "lr_lambdas", []):
            if isinstance(fn, CosineFactor) and fn.epochs != epochs:
                fn.epochs = epochs  # --epochs changed on resume: stretch the cosine
                for group, base in zip(opt.param_groups, sched.base_lrs):
                    group["lr"] = base * fn(sched.last_epoch)
        epoch, start_batch = int(resume_state["epoch"]), int(resume_state["batch"])
        sums = {p: [float(v[0]), int(v[1])] for p, v in resume_state["sums"].items()}
        history = list(resume_state.get("history", []))
        best_val = resume_state.get("best_val")
        best_epoch = resume_state.get("best_epoch")
        if resume_state.get("rng"):
            set_rng_state(resume_state["rng"])
        if epoch >= epochs:
            raise CryoDDMError(f"{out / 'last.pt'}: that run already finished {epoch} epochs; "
                               f"pass --epochs N with N > {epoch} to train further")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    weights = (config.s1_weight, 1.0, config.s3_weight)
    clip = config.clip if config.recipe != "original" else 0.0
    skip = tuple(p for p, w in enumerate(weights) if w == 0)
    interleave = config.recipe != "original"
    n_batches = len(epoch_plan(data.counts, config.batch_size, config.seed, 0, fresh_s2, skip, interleave))
    total = epochs * n_batches
    # the default recipe ramps up over --warmup batches, a short run over its first tenth
    warmup = 0 if config.recipe == "original" else min(config.warmup, max(1, total // 10))
    plan_config = {k: to_jsonable(getattr(config, k)) for k in _PLAN_FIELDS}
    plan_config["epochs"] = epochs  # a resume without --epochs keeps it

    def metadata(ep: int, losses: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "architecture": dict(ARCHITECTURE), "window": data.window,
            "diameter_px": (data.manifest or {}).get("diameter_px"),
            "bin_factor": (data.manifest or {}).get("bin_factor", 1),
            "voxel_size": (data.manifest or {}).get("voxel_size"),
            "schedule": data.schedule, "normalisation": data.normalisation,
            "forward": data.summary(), "epoch": ep, "losses": losses,
            "best_val": best_val, "best_epoch": best_epoch,
            "recipe": config.recipe, "lr": config.learning_rate, "fresh_noise": config.fresh_noise,
            "warmup": warmup, "clip": clip, "s2_target": config.s2_target,
            "linear_transfer": transfer,
            "augment": config.augment, "batch_size": config.batch_size, "seed": config.seed,
            "phase_weights": {"s1": config.s1_weight, "s2": 1.0, "s3": config.s3_weight},
            "world_size": world, "device": str(device), "precision": str(amp or "fp32"),
            "init": init_info, "package_version": __version__,
        }

    def resume_payload(ep: int, batch: int) -> dict[str, Any]:
        return {"epoch": ep, "batch": batch, "sums": {p: [float(v[0]), int(v[1])] for p, v in sums.items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                "history": to_jsonable(history), "best_val": best_val, "best_epoch": best_epoch,
                "config": plan_config, "init": init_info, "world_size": world}

    def save_last(ep: int, batch: int, losses: dict[str, Any] | None) -> None:
        if rank == 0:
            save_checkpoint(out / "last.pt", model, metadata(len(history), losses),
                            resume=resume_payload(ep, batch), overwrite=True)

    def write_history() -> None:
        if rank == 0:
            with atomic_write(out / HISTORY, overwrite=True) as tmp:
                tmp.write_text(json.dumps(to_jsonable({"config": dataclasses.asdict(config),
                                                       "forward": data.summary(),
                                                       "epochs": history}), indent=1) + "\n")

    done = epoch * n_batches + start_batch
    yield Progress(done, total, f"training on {device} ({world} process{'es' if world > 1 else ''})")
    stopped = False
    last_losses = history[-1] if history else None
    while epoch < epochs:
        batches = epoch_plan(data.counts, config.batch_size, config.seed, epoch, fresh_s2, skip, interleave)
        last_s1 = max((j for j, b in enumerate(batches) if b[0, 0] == S1), default=-1)
        sampler.set_epoch(batches, start_batch)
        net.train()
        t0 = time.perf_counter()
        for j, (phase_t, x, y, real) in enumerate(loader, start=start_batch):
            phase = int(phase_t[0])
            n_real = float(real.sum())
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            real = real.to(device, non_blocking=True)
            n_global = len(batches[j])
            if warmup:  # linear ramp over the first batches of the run, on top of the schedule
                ramp = min(1.0, (epoch * n_batches + j + 1) / warmup)
                for group, base in zip(opt.param_groups, sched.get_last_lr()):
                    group["lr"] = base * ramp
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                pred = net(x)
            per = F.mse_loss(pred.float(), y, reduction="none").mean(dim=(1, 2, 3)) * real
            loss_sum = per.sum()
            loss_value = float(loss_sum.detach())  # the one host sync per batch (unweighted: logged)
            bad = agreed(not math.isfinite(loss_value), world, device)
            if bad:
                raise CryoDDMError(
                    f"the loss became NaN/infinite at epoch {epoch + 1}, phase {PHASES[phase].upper()}, "
                    f"batch {j + 1}: the training data or the learning rate ({opt.param_groups[0]['lr']:.3g}) "
                    f"is at fault. Nothing was saved from this epoch; "
                    + (f"{out / 'last.pt'} still holds the last good state (epoch {len(history)})."
                       if (out / "last.pt").exists() else "no checkpoint had been written yet."))
            (loss_sum * (weights[phase] * world / n_global)).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if config.recipe == "original" and (phase != S1 or j == last_s1):
                sched.step()  # literal: once after S1, after every S2/S3 batch
            sums[PHASES[phase]][0] += loss_value
            sums[PHASES[phase]][1] += int(n_real)
            done = epoch * n_batches + j + 1
            mean_loss = loss_value / max(1.0, n_real)
            yield Progress(done, total, f"epoch {epoch + 1}/{epochs} {PHASES[phase].upper()} "
                                        f"loss {mean_loss:.4g}",
                           {"epoch": epoch + 1, "phase": PHASES[phase], "batch": j + 1,
                            "batches": n_batches, "loss": mean_loss, "lr": opt.param_groups[0]["lr"]})
            stop_now = agreed(cancel.cancelled, world, device)  # all ranks stop at the same batch
            if stop_now and j + 1 < n_batches:
                save_last(epoch, j + 1, last_losses)
                stopped = True
                break
        if stopped:
            break
        # epoch end: phase means over all ranks, validation, schedule, checkpoints
        totals = torch.tensor([[sums[p][0], sums[p][1]] for p in PHASES], dtype=torch.float64)
        if world > 1:
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        losses = {p: float(totals[i, 0] / max(1.0, float(totals[i, 1]))) for i, p in enumerate(PHASES)}
        net.eval()
        vsum = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for vx, vy in val_loader:
                vx, vy = vx.to(device, non_blocking=True), vy.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                    vp = full(vx)
                vsum[0] += F.mse_loss(vp.float(), vy, reduction="none").mean(dim=(1, 2, 3)).sum().double()
                vsum[1] += len(vx)
        if world > 1:
            dist.all_reduce(vsum)
        losses["val"] = float(vsum[0] / max(1.0, float(vsum[1])))
        if not math.isfinite(losses["val"]):
            raise CryoDDMError(f"the validation loss became NaN/infinite at epoch {epoch + 1}; "
                               f"{out / 'last.pt'} keeps the last good state (epoch {len(history)})")
        losses["lr"] = opt.param_groups[0]["lr"]
        losses["epoch"] = epoch + 1
        losses["seconds"] = time.perf_counter() - t0
        if config.recipe != "original":
            sched.step()
        history.append(losses)
        last_losses = losses
        improved = best_val is None or losses["val"] < best_val
        if improved:
            best_val, best_epoch = losses["val"], epoch + 1
        epoch += 1
        start_batch = 0
        sums = {p: [0.0, 0] for p in PHASES}
        if rank == 0:
            save_last(epoch, 0, losses)
            if improved:
                save_checkpoint(out / "best.pt", model, metadata(epoch, losses), overwrite=True)
            write_history()
        yield Progress(epoch * n_batches, total,
                       f"epoch {epoch}/{epochs}: S1 {losses['s1']:.4g} S2 {losses['s2']:.4g} "
                       f"S3 {losses['s3']:.4g} val {losses['val']:.4g}",
                       {"epoch_end": True, "epoch": epoch, "losses": dict(losses)})
        if agreed(cancel.cancelled, world, device):
            stopped = epoch < epochs
            break
    if world > 1:
        dist.barrier()
    return TrainResult(out=out, epochs_done=len(history), history=history, best_epoch=best_epoch,
                       best_val=best_val, stopped=stopped, last=out / "last.pt",
                       best=(out / "best.pt") if best_epoch is not None else None)


def fit_linear_start(dataset: PairDataset, data: ForwardData, config: TrainConfig,
                     fresh_s2: int | None, cap: int = 512) -> dict[str, Any]:
    """`linear.fit_transfer` over up to `cap` samples of each trained phase, weighted as the
    epoch's loss weighs them (samples drawn from the seed alone, like an epoch plan)."""
    rng = np.random.default_rng([int(config.seed), 0x11EA])
    counts = {S1: data.counts["particles"], S3: data.counts["noise"],
              S2: fresh_s2 if fresh_s2 is not None else data.counts["s2_label"]}
    weights = {S1: config.s1_weight, S2: 1.0, S3: config.s3_weight}

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
        for phase, n in counts.items():
            if not weights[phase] or not n:
                continue
            idx = rng.permutation(n)[:cap]
            w = weights[phase] * n / len(idx)
            for i in idx:
                partner = int((i + 1 + rng.integers(max(1, n - 1))) % n) if phase == S3 else -1
                _, x, y, _ = dataset[(phase, int(i), partner, int(rng.integers(2**62)), 1)]
                yield x[0].numpy(), y[0].numpy(), w

    return fit_transfer(pairs())


def _signal_targets(data: ForwardData) -> tuple[dict[int, tuple[float, float]], float]:
    """k → (λ_k, factor) of the `signal` S2 target for every pair k = start … T of the folder,
    and S3's input scale: √V of the last trained step, the noise level S2's inputs have."""
    from .estimators import chain_statistics, signal_target

    sched = data.schedule or {}
    if sched.get("beta") is None or sched.get("steps") is None:
        raise InputError(data.folder, "records no forward schedule (the original CryoDDM's "
                                      "layout): train it with --s2-target step")
    st = chain_statistics(float(sched["beta"]), int(sched["steps"]))
    steps = int(sched["steps"])
    return ({k: signal_target(st, k) for k in range(1, steps + 1)},
            float(np.sqrt(st["variance"][steps - 1])))


def _history_epochs(out: Path) -> int | None:
    """The planned epochs of a run stopped before this was recorded in last.pt (history.json)."""
    try:
        value = json.loads((out / HISTORY).read_text(encoding="utf-8"))["config"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) else None


def _resumed_epochs(config: TrainConfig, planned: int | None, given: bool, out: Path) -> TrainConfig:
    """A resumed run keeps the stopped run's number of epochs unless the caller gave one; either
    way it says so (a log line: the CLI shows it as a message)."""
    if planned is None or planned == config.epochs:
        return config
    if given:
        note = (f"resuming {out / 'last.pt'} for {config.epochs} epochs in all, as asked "
                f"(the stopped run planned {planned})")
    else:
        note = (f"resuming {out / 'last.pt'} with the stopped run's plan: {planned} epochs "
                "(give --epochs N to change it)")
        config = dataclasses.replace(config, epochs=int(planned))
    log.warning(note)
    warnings.warn(note, UserWarning, stacklevel=4)
    return config


def _norm(v: Any) -> Any:
    return to_jsonable(v)


def read_history(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch losses of a run folder (for plots of a finished or stopped run)."""
    path = Path(out) / HISTORY
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("epochs", []))


__all__ = ["TrainConfig", "TrainResult", "train", "open_forward", "ForwardData", "PairDataset",
           "ValDataset", "epoch_plan", "resolve_device", "LoadedCheckpoint", "build_noise_pool",
           "recut", "d4"]
