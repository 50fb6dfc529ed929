"""What training reads: the pair datasets, the fresh-noise pool, the epoch plans and their sampler,
and the random state a resumed run restores.

A batch is a key (phase, index, partner, seed, augment); the plan of an epoch is a pure function
of the seed and the epoch, so any number of loader processes or ranks draw the same batches and a
run stopped mid-epoch resumes exactly.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .d4 import d4
from .errors import InputError
from .estimators import chain_statistics, signal_target
from .forward_layout import ForwardData
from .jobs import CancelToken, Job, Progress
from .linear import fit_transfer
from .normalise import Normalisation
from .preprocess import read_prepared

PHASES = ("s1", "s2", "s3")
S1, S2, S3 = 0, 1, 2


@dataclass
class NoisePool:
    """Noise patches cut once with a margin, so re-cuts may shift; `lo/hi` bound each shift."""

    patches: np.ndarray  # (M, W + 2S, W + 2S) float32, memory-mapped
    lo: np.ndarray  # (M, 2) smallest allowed (dy, dx)
    hi: np.ndarray  # (M, 2) largest allowed (dy, dx)
    particles: list[np.ndarray]  # per noise patch: particle (y, x) relative to its centre
    clearance: float  # a shifted box must keep |Δ| ≥ W/2 + d/2 from every recorded particle
    window: int
    margin: int


def build_noise_pool(
    data: ForwardData, cache: Path, max_shift: int | None = None, cancel: CancelToken | None = None
) -> Job[NoisePool]:
    """Re-read the micrographs of the recorded noise centres (binned and normalised exactly as the
    forward step did) and cache W+2S patches around them as one float32 file."""

    m = data.manifest
    if not m or not m.get("noise") or not m.get("micrographs"):
        raise InputError(
            data.folder,
            "--fresh-noise needs forward.json with the micrographs and "
            "noise centres (the original's folders have none)",
        )
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
            raise InputError(
                mpath,
                "micrograph named in forward.json is gone; --fresh-noise re-cuts "
                "noise from the micrographs (train without it, or restore the file)",
            )
        image = read_prepared(mpath, factor, spec).image
        ny, nx = image.shape
        pts = np.asarray(parts.get(mi, []), dtype=np.float64).reshape(-1, 2)
        for i in idx:
            cx, cy = int(noise[i]["x"]), int(noise[i]["y"])
            y0, x0 = cy - w // 2 - s, cx - w // 2 - s
            ys0, xs0 = max(0, y0), max(0, x0)
            ys1, xs1 = min(ny, y0 + size), min(nx, x0 + size)
            patches[i] = 0
            patches[i, ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = image[ys0:ys1, xs0:xs1]
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
    patch = pool.patches[index, s + dy : s + dy + w, s + dx : s + dx + w]
    return d4(patch, int(rng.integers(8))) if augment else np.asarray(patch)


class PairDataset(Dataset):
    """Map-style dataset over memory-mapped stacks; a key is (phase, index, partner, seed, real).

    S1: particles[i] → particles[i]; S2: s2/label[i] (x_k) → s2/input[i] (x_{k−1}); S3:
    noise[i] → noise[partner]. The seed picks the flip/rotation (and, with a noise pool, the fresh
    chain), so a sample is the same whichever process loads it.
    """

    def __init__(
        self,
        data: ForwardData,
        augment: bool = True,
        pool: NoisePool | None = None,
        coefficients: dict[str, np.ndarray] | None = None,
        targets: dict[int, tuple[float, float]] | None = None,
        noise_scale: float = 1.0,
    ) -> None:
        self.data = data
        self.augment = augment
        self.pool = pool
        self.coef = coefficients
        self.targets = targets  # k → (λ_k, factor): S2 learns factor·(x_{k−1} − λ_k·x_k)
        self.noise_scale = noise_scale  # S3 input scale in the signal framing (`signal_targets`)
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
            self._maps[key] = np.memmap(
                self.data.path(key), dtype="<f4", mode="r", offset=self.data.offsets[key], shape=(n, w, w)
            )
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
            x = (
                np.float32(self.coef["x_coef"][step]) * x
                + np.float32(self.coef["noise_coef"][step]) * n.astype(np.float32)
            ).astype(np.float32)
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
                n = recut(self.pool, index, rng, augment=False) if self.pool is not None else self.stack("noise")[index]
                x = np.float32(self.noise_scale) * np.asarray(n, dtype=np.float32)
                return x, np.zeros_like(x)
            if self.pool is not None:
                return (recut(self.pool, index, rng, augment=False), recut(self.pool, partner, rng, augment=False))
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
        return (
            torch.from_numpy(np.array(x, dtype=np.float32))[None],
            torch.from_numpy(np.array(y, dtype=np.float32))[None],
        )


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (S3 pairs each noise patch with another one)."""
    perm = rng.permutation(n)
    fixed = np.flatnonzero(perm == np.arange(n))
    for i in fixed:  # swap each fixed point with a neighbour; stays a permutation
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def epoch_plan(
    counts: dict[str, int],
    batch_size: int,
    seed: int,
    epoch: int,
    fresh_s2: int | None = None,
    skip: Sequence[int] = (),
    interleave: bool = True,
) -> list[np.ndarray]:
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
        keys = np.stack(
            [
                np.full(len(idx), phase),
                idx,
                partners if partners is not None else np.full(len(idx), -1),
                seeds,
                np.ones(len(idx), dtype=np.int64),
            ],
            axis=1,
        ).astype(np.int64)
        for b in range(0, len(keys), batch_size):
            batches.append(keys[b : b + batch_size])
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
        for b in self.batches[self.start :]:
            yield [tuple(int(v) for v in k) for k in local_keys(b, self.rank, self.world)]


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
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


def signal_targets(data: ForwardData) -> tuple[dict[int, tuple[float, float]], float]:
    """k → (λ_k, factor) of the `signal` S2 target for every pair k = start … T of the folder,
    and S3's input scale: √V of the last trained step, the noise level S2's inputs have."""

    sched = data.schedule or {}
    if sched.get("beta") is None or sched.get("steps") is None:
        raise InputError(
            data.folder, "records no forward schedule (the original CryoDDM's layout): train it with --s2-target step"
        )
    st = chain_statistics(float(sched["beta"]), int(sched["steps"]))
    steps = int(sched["steps"])
    return ({k: signal_target(st, k) for k in range(1, steps + 1)}, float(np.sqrt(st["variance"][steps - 1])))


def fit_linear_start(
    dataset: PairDataset,
    data: ForwardData,
    seed: int,
    phase_weights: tuple[float, float, float],
    fresh_s2: int | None,
    cap: int = 512,
) -> dict[str, Any]:
    """`linear.fit_transfer` over up to `cap` samples of each trained phase, weighted as the
    epoch's loss weighs them (samples drawn from the seed alone, like an epoch plan)."""
    rng = np.random.default_rng([int(seed), 0x11EA])
    counts = {
        S1: data.counts["particles"],
        S3: data.counts["noise"],
        S2: fresh_s2 if fresh_s2 is not None else data.counts["s2_label"],
    }
    weights = dict(zip((S1, S2, S3), phase_weights))

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
