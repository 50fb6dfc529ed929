"""Prediction: denoise whole micrographs with a trained UDenoiseNet, tiled without seams.

Why tiles at all: a 4k–8k micrograph does not fit through the network at once on most GPUs (and
takes gigabytes of activations on a CPU). Why no seams: the network's receptive field reaches
±161 px (measured by `measure_receptive_field`: the gradient footprint of a 32×32 block of output
pixels, which covers every phase of the five 2× poolings). Each tile therefore carries a margin
(`overlap`, per side) of at least that much context and only its core is kept; tile origins sit on
multiples of 32 in the reflection-padded image so the pooling grid of every tile is the grid of an
untiled pass. The result equals one pass over the whole padded image (to float rounding), which
the seam test checks against a 64-px margin (the original's) that visibly fails.

Per micrograph: read → (bin, when the checkpoint says so) → normalise exactly as in training
(the checkpoint's `normalisation`) → reflect-pad → tiles in batches → cores stitched → optionally
mapped back to the input's intensity scale → float32 MRC with the voxel size and labels. The job
keeps at most the current micrograph, the next one (prefetched in a thread) and the previous one
(being written in a thread) in memory, so memory stays flat over thousands of files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .d4 import d4, d4_inverse

from .devices import PREDICT_PRECISIONS, autocast_dtype, resolve_device
from .errors import CryoDDMError, InputError, OutputError, OutputExistsError
from .estimators import ESTIMATORS, Estimator, default_estimator, resolve_estimator
from .io.mrc import list_micrographs, write_mrc
from .jobs import CancelToken, Job, Progress, collect
from .names import micrograph_stem
from .preprocess import Prepared, prepare, read_prepared, restore_intensity
from .normalise import Normalisation
from .safety import NO_ROOM

log = logging.getLogger(__name__)

STRIDE = 32                 # five 2× poolings: tile origins and sizes are multiples of this
RECEPTIVE_FIELD_PX = 161    # measured one-sided reach of UDenoiseNet (see measure_receptive_field)
DEFAULT_OVERLAP = 192       # the smallest multiple of 32 covering it (see plan_tiles)
DEFAULT_TILE_GPU = 2048    # H200, 4096²: 0.68 s model-only vs 0.87 s at 1024 (docs/benchmarks.md)
DEFAULT_TILE_CPU = 1792     # with lean_forward: 9 tiles per 4k (docs/benchmarks.md)
CPU_TILES = (1792, 1536, 1280, 1024, 768)  # automatic CPU tiles, largest first
CPU_BYTES_PER_TILE_PX = 480  # measured peak of lean_forward's activations (fp32) per tile pixel
CPU_MEMORY_BUDGET = int(1.75 * 2**30)  # keeps an 8k micrograph under 2 GB peak RSS
INTENSITIES = ("normalised", "input")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PredictConfig:
    """How to denoise. Defaults: seam-free margins, the fastest measured geometry per device,
    outputs on the normalised scale (see `intensity`)."""

    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    batch_size: int = _f(0, "tiles per forward pass; 0 picks one per device (halved automatically "
                            "on a GPU out-of-memory)")
    tile: int = _f(0, "tile edge in px (a multiple of 32); 0: 2048 on a GPU, on a CPU the largest "
                      "of 1792…768 that fits 1.75 GiB with the micrograph (1792 for 4k, 1536 for "
                      "8k); micrographs smaller than a tile are padded", unit="px")
    overlap: int = _f(DEFAULT_OVERLAP, "context kept on each side of a tile core; must cover the "
                                       f"network's receptive field ({RECEPTIVE_FIELD_PX} px) or seams "
                                       "appear; rounded up to a multiple of 32", unit="px")
    intensity: str = _f("normalised", "output scale: 'normalised' (the scale the network was trained "
                                      "on, comparable across micrographs) or 'input' (mapped back "
                                      "to the input's units)", choices=INTENSITIES)
    precision: str = _f("auto", "auto (bf16 autocast on a GPU that has it, else fp32), fp32, bf16, "
                                "fp16 (GPU only)", choices=PREDICT_PRECISIONS)
    estimator: str = _f("auto", "how the network's output becomes the estimate: chain (derived from "
                                "the forward chain's coefficients) or direct (the original's single "
                                "pass); auto: chain for models trained with --s2-target signal, "
                                "else direct", choices=("auto",) + ESTIMATORS)
    estimator_step: int = _f(0, "chain estimator: the chain step whose pair the estimate uses "
                                "(0: the last trained step)", widget=False)
    tta: bool = _f(False, "average the 8 flips/rotations of each micrograph (8× the compute)")
    suffix: str = _f("", "appended to each output's name: OUT/<stem><suffix>.mrc")
    overwrite: bool = _f(False, "replace existing outputs (default: skip them, so a stopped run resumes)")
    channels_last: bool = _f(True, "NHWC memory layout (faster on GPUs and with oneDNN on CPUs)")
    compile: bool = _f(False, "torch.compile the network (pays off on GPUs for long runs; "
                              "recompiles per tile shape)")
    threads: int = _f(0, "CPU threads for PyTorch (0: leave PyTorch's default)")
    prefetch: bool = _f(True, "read and normalise the next micrograph while this one computes, "
                              "and write in the background", widget=False)
    gpus: str = _f("", "run on these GPUs through a local dask cluster, one worker each, e.g. 0,1",
                   widget=False)
    workers: int = _f(0, "run on N local CPU worker processes (dask LocalCluster)", widget=False)
    scheduler: str = _f("", "send one task per micrograph to this dask scheduler "
                            "(tcp://HOST:PORT, e.g. from dask-jobqueue)", widget=False)

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise CryoDDMError(f"--intensity {self.intensity!r}: use normalised or input")
        if self.precision not in PREDICT_PRECISIONS:
            raise CryoDDMError(f"--precision {self.precision!r}: use {', '.join(PREDICT_PRECISIONS)}")
        if self.tile and (self.tile < 64 or self.tile % STRIDE):
            raise CryoDDMError(f"--tile {self.tile}: use a multiple of 32, at least 64")
        if self.overlap < 0:
            raise CryoDDMError(f"--overlap {self.overlap}: must be ≥ 0")
        if self.batch_size < 0:
            raise CryoDDMError(f"--batch-size {self.batch_size}: must be ≥ 0 (0 = automatic)")
        if self.estimator not in ("auto",) + ESTIMATORS:
            raise CryoDDMError(f"--estimator {self.estimator!r}: choose one of auto, {', '.join(ESTIMATORS)}")
        if self.estimator_step < 0:
            raise CryoDDMError(f"--estimator-step {self.estimator_step}: must be ≥ 0 (0 = the last trained step)")


# ----------------------------------------------------------------------------- the model

@dataclass
class PredictModel:
    """A network with what prediction must know about its training (from the checkpoint)."""

    model: nn.Module
    normalisation: Normalisation = field(default_factory=Normalisation)
    bin_factor: float = 1.0
    name: str = "model"
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], map_location: Any = "cpu") -> PredictModel:
        from .checkpoint import load_checkpoint

        path = Path(path)
        loaded = load_checkpoint(path, map_location=map_location)
        meta = loaded.metadata or {}
        return cls(loaded.model, Normalisation.from_dict(meta.get("normalisation")),
                   float(meta.get("bin_factor") or 1.0), path.name, dict(meta))

    def state(self) -> dict[str, Any]:
        """Picklable and small (3.9 MB): what dask workers need to rebuild the network."""
        inner = getattr(self.model, "_orig_mod", self.model)
        return {"state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
                "normalisation": self.normalisation.to_dict(), "bin_factor": self.bin_factor,
                "name": self.name, "metadata": self.metadata}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PredictModel:
        from .model import UDenoiseNet

        model = UDenoiseNet()
        model.load_state_dict(state["state_dict"])
        model.eval()
        return cls(model, Normalisation.from_dict(state["normalisation"]), float(state["bin_factor"]),
                   state["name"], dict(state.get("metadata") or {}))


def estimator_for(pm: PredictModel, config: PredictConfig) -> Estimator:
    """The estimator `config` asks for, derived from the checkpoint's schedule (see `estimators`)."""
    name = default_estimator(pm.metadata) if config.estimator == "auto" else config.estimator
    return resolve_estimator(name, pm.metadata, config.estimator_step, source=pm.name)


def as_predict_model(model: PredictModel | nn.Module | str | os.PathLike[str]) -> PredictModel:
    if isinstance(model, PredictModel):
        return model
    if isinstance(model, nn.Module):
        return PredictModel(model)
    return PredictModel.from_checkpoint(model)


# ----------------------------------------------------------------------------- tile geometry

@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image go. The image sits at (margin, margin) of the padded array,
    which is `counts·core + 2·margin` long per axis; tile k starts at k·core (a multiple of 32)."""

    shape: tuple[int, int]
    margin: int
    core: tuple[int, int]
    counts: tuple[int, int]

    @property
    def tile_shape(self) -> tuple[int, int]:
        return (self.core[0] + 2 * self.margin, self.core[1] + 2 * self.margin)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.counts[0] * self.core[0] + 2 * self.margin,
                self.counts[1] * self.core[1] + 2 * self.margin)

    @property
    def n_tiles(self) -> int:
        return self.counts[0] * self.counts[1]

    def origins(self) -> list[tuple[int, int]]:
        return [(iy * self.core[0], ix * self.core[1])
                for iy in range(self.counts[0]) for ix in range(self.counts[1])]

    @property
    def redundancy(self) -> float:
        """Pixels pushed through the network per output pixel (1.0 would be no overlap)."""
        ty, tx = self.tile_shape
        return self.n_tiles * ty * tx / (self.shape[0] * self.shape[1])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_tiles(shape: tuple[int, int], tile: int, overlap: int) -> TileGrid:
    """Balanced tiles: per axis the fewest cores of ≤ tile − 2·margin px that cover the image,
    evened out (so a 4096 image does not end with a sliver tile), each a multiple of 32.

    A micrograph smaller than a tile gets a single, smaller tile (padded up to a multiple of 32).
    The margin is rounded up to a multiple of 32 so the image sits on the network's pooling grid
    at phase 0 whatever the overlap: results then do not depend on the tiling at all (a margin
    of 176 would shift the grid by 16 px, which changes a U-Net's output everywhere).
    """
    margin = _round_up(max(0, int(overlap)), STRIDE)
    max_core = int(tile) - 2 * margin
    if max_core < STRIDE:
        raise CryoDDMError(f"tile {tile} px leaves no core with {margin} px of overlap on each side; "
                           f"use --tile ≥ {2 * margin + 2 * STRIDE} (or a smaller --overlap)")
    core, counts = [], []
    for n in shape:
        if n < 1:
            raise CryoDDMError(f"cannot tile an image of shape {shape}")
        k = -(-n // max_core)
        core.append(_round_up(-(-n // k), STRIDE))
        counts.append(k)
    return TileGrid((int(shape[0]), int(shape[1])), margin, (core[0], core[1]), (counts[0], counts[1]))


def pad_image(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Reflection-pad to the grid's padded shape (image at (margin, margin)); float32."""
    (h, w), m = grid.shape, grid.margin
    py, px = grid.padded_shape
    return np.pad(np.asarray(image, dtype=np.float32), ((m, py - h - m), (m, px - w - m)), mode="reflect")


# ----------------------------------------------------------------------------- devices and runtime

def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@dataclass
class Runtime:
    """The network on its device, and the tile/batch sizes in force (shrunk after an OOM, and
    kept shrunk for the rest of the run)."""

    model: nn.Module
    device: torch.device
    tile: int
    batch_size: int
    overlap: int
    dtype: torch.dtype | None
    channels_last: bool
    lean: bool = False
    auto_tile: bool = False
    oom_events: list[str] = field(default_factory=list)
    estimator: Estimator = field(default_factory=lambda: Estimator("direct"))
    tta: bool = False
    linear: dict[str, Any] | None = None  # the model's linear part H (see linear.py), if any


def runtime_for(pm: PredictModel, config: PredictConfig, device: torch.device | None = None) -> Runtime:
    """The runtime of a checkpoint: its network, estimator and linear part."""
    return make_runtime(pm.model, config, device, estimator=estimator_for(pm, config),
                        linear=pm.metadata.get("linear_transfer"))


def make_runtime(model: nn.Module, config: PredictConfig, device: torch.device | None = None,
                 estimator: Estimator | None = None, linear: dict[str, Any] | None = None) -> Runtime:
    """The network on its device with the tile geometry and, for whole micrographs, the estimator
    (`estimator_for`; the network's plain output when None) and test-time augmentation."""
    device = device or resolve_device(config.device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    channels_last = bool(config.channels_last) and device.type in ("cuda", "cpu")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model, dynamic=False)
    tile = config.tile or (DEFAULT_TILE_GPU if device.type == "cuda" else DEFAULT_TILE_CPU)
    batch = config.batch_size or (8 if device.type == "cuda" else 1)
    lean = device.type == "cpu" and not config.compile
    return Runtime(model, device, tile, batch, config.overlap, autocast_dtype(device, config.precision, fp16=True),
                   channels_last, lean, auto_tile=not config.tile and device.type == "cpu",
                   estimator=estimator or Estimator("direct"), tta=bool(config.tta), linear=linear)


def auto_cpu_tile(shape: tuple[int, int], overlap: int, batch: int = 1) -> int:
    """The largest CPU tile whose activations, with the micrograph and its output, fit the budget:
    big tiles waste less on margins, but an 8k micrograph needs smaller ones to stay under 2 GB."""
    image_bytes = 2 * 4 * shape[0] * shape[1]  # the normalised input and the output
    for tile in CPU_TILES:
        try:
            grid = plan_tiles(shape, tile, overlap)
        except CryoDDMError:
            continue
        ty, tx = grid.tile_shape
        if image_bytes + batch * ty * tx * CPU_BYTES_PER_TILE_PX <= CPU_MEMORY_BUDGET:
            return tile
    return CPU_TILES[-1]


LEAN_STRIP = 128  # rows per strip of the full-resolution stages in `lean_forward`


def lean_forward(model: nn.Module, x: torch.Tensor, strip: int = LEAN_STRIP) -> torch.Tensor:
    """UDenoiseNet's forward with its two full-resolution stages computed in row strips.

    The plain forward holds ~1.4 kB of activations per pixel (the 97-channel concatenation at full
    resolution); this holds ~0.25 kB, so a CPU can take tiles big enough to make the overlap
    cheap, and an 8k micrograph fits in 2 GB. Exact: each strip carries the rows its convolutions
    need (5 for the 11×11 first layer, 3 for the three 3×3 top layers) and drops them after;
    at the image's own edges the convolutions pad with zeros as in the plain forward.
    """
    from .model import UDenoiseNet

    if not isinstance(model, UDenoiseNet) or x.shape[-2] <= strip:
        return model(x)
    H = x.shape[-2]
    strip -= strip % 2
    halo1 = model.enc1[0].kernel_size[0] // 2
    chunks = []
    for r0 in range(0, H, strip):
        r1 = min(H, r0 + strip)
        a, b = max(0, r0 - halo1), min(H, r1 + halo1)
        y = model.enc1[1](model.enc1[0](x[..., a:b, :]))[..., r0 - a:r1 - a, :]
        chunks.append(model.enc1[2](y))
        del y
    p1 = torch.cat(chunks, -2)
    del chunks
    p2 = model.enc2(p1)
    p3 = model.enc3(p2)
    p4 = model.enc4(p3)
    p5 = model.enc5(p4)
    h = model.enc6(p5)
    del p5
    up = torch.nn.functional.interpolate
    h = model.dec5(torch.cat([up(h, size=p4.shape[-2:], mode="nearest"), p4], 1))
    del p4
    h = model.dec4(torch.cat([up(h, size=p3.shape[-2:], mode="nearest"), p3], 1))
    del p3
    h = model.dec3(torch.cat([up(h, size=p2.shape[-2:], mode="nearest"), p2], 1))
    del p2
    h = model.dec2(torch.cat([up(h, size=p1.shape[-2:], mode="nearest"), p1], 1))
    del p1
    halo = 3  # three 3×3 convolutions
    out = torch.empty((x.shape[0], 1, H, x.shape[-1]), dtype=h.dtype, device=x.device)
    for r0 in range(0, H, strip):
        r1 = min(H, r0 + strip)
        a, b = max(0, r0 - halo), min(H, r1 + halo)
        ha, hb = a // 2, (b + 1) // 2  # nearest ×2: row r of the upsampled map is row r // 2
        hs = up(h[..., ha:hb, :], scale_factor=2, mode="nearest")[..., a - 2 * ha:b - 2 * ha, :]
        hs = hs[..., :, :x.shape[-1]]
        y = model.dec1(torch.cat([hs, x[..., a:b, :].to(hs.dtype)], 1))
        out[..., r0:r1, :] = y[..., r0 - a:r1 - a, :]
        del hs, y
    return out


def _forward(rt: Runtime, batch: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(batch)[:, None]
    if rt.device.type == "cuda":
        x = x.pin_memory().to(rt.device, non_blocking=True)
    else:
        x = x.to(rt.device)
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        run = (lambda t: lean_forward(rt.model, t)) if rt.lean else rt.model
        if rt.dtype is not None:
            with torch.autocast(rt.device.type, dtype=rt.dtype):
                y = run(x)
        else:
            y = run(x)
        return y[:, 0].float().cpu().numpy()


# ----------------------------------------------------------------------------- one image

def predict_image(model: nn.Module | Runtime, image: np.ndarray, *, tile: int | None = None,
                  overlap: int | None = None, batch_size: int | None = None,
                  config: PredictConfig | None = None, cancel: CancelToken | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Denoise one already-normalised 2-D image; returns float32 of the same shape.

    `model` is a network (moved to `config.device`) or a `Runtime` (reused across images; its
    tile/batch shrink after a GPU out-of-memory and stay shrunk). The image is reflection-padded,
    cut into `tile`² tiles whose cores are `2·overlap` smaller, run `batch_size` tiles at a time,
    and the cores are stitched. The result equals one pass over the padded image (seam test).
    """
    rt = _as_runtime(model, config, tile, overlap, batch_size)
    job = predict_image_job(rt, image, cancel)
    return collect(job, None if on_batch is None else lambda e: on_batch(e.done, e.total or 0))


def _as_runtime(model: nn.Module | Runtime, config: PredictConfig | None, tile: int | None = None,
                overlap: int | None = None, batch_size: int | None = None) -> Runtime:
    rt = model if isinstance(model, Runtime) else make_runtime(model, config or PredictConfig())
    if tile:
        rt.tile = int(tile)
    if overlap is not None:
        rt.overlap = int(overlap)
    if batch_size:
        rt.batch_size = int(batch_size)
    return rt


def predict_image_job(rt: Runtime, image: np.ndarray, cancel: CancelToken | None = None) -> Job[np.ndarray]:
    """`predict_image` as a job: one `Progress` per batch of tiles; an out-of-memory error
    shrinks the batch (then the tile) and starts the image again."""
    if image.ndim != 2:
        raise CryoDDMError(f"predict_image needs a 2-D image, got shape {image.shape}")
    while True:
        try:
            return (yield from _predict_tiled(rt, image, cancel))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_oom(exc):
                raise
            _shrink(rt, exc)


def estimate_job(rt: Runtime, image: np.ndarray, cancel: CancelToken | None = None) -> Job[np.ndarray]:
    """The signal estimate of one normalised micrograph: the runtime's estimator around the tiled
    network (`predict_image_job`), averaged over the 8 flips/rotations when `rt.tta`."""
    est = rt.estimator
    x = image if est.scale == 1.0 else image * np.float32(est.scale)
    codes = range(8) if rt.tta else (0,)
    acc: np.ndarray | None = None
    for code in codes:
        view = np.ascontiguousarray(d4(x, code)) if code else x
        pred = yield from predict_image_job(rt, view, cancel)
        pred = d4_inverse(pred, code) if code else pred
        if acc is None:
            acc = np.ascontiguousarray(pred, dtype=np.float32)
        else:
            acc += pred
    assert acc is not None
    if len(codes) > 1:
        acc /= np.float32(len(codes))
    if rt.linear:  # isotropic, so the same for every flip/rotation: added once, whole image
        from .linear import apply

        acc += apply(rt.linear, x)
    return est.combine(acc, x)


def _shrink(rt: Runtime, exc: BaseException) -> None:
    """Halve the batch; at batch 1 halve the tile; give up when the tile would lose its core."""
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    if rt.batch_size > 1:
        rt.batch_size //= 2
        what = f"batch size → {rt.batch_size}"
    else:
        margin = _round_up(rt.overlap, STRIDE)
        new_tile = _round_up(rt.tile // 2, STRIDE)
        if new_tile - 2 * margin < STRIDE:
            raise CryoDDMError(f"out of memory on {rt.device} even with one {rt.tile}² tile per pass; "
                               "free the device or use --device cpu") from exc
        rt.tile, rt.auto_tile = new_tile, False
        what = f"tile → {rt.tile} px"
    rt.oom_events.append(what)
    log.warning("out of memory on %s; %s and carrying on", rt.device, what)


def _predict_tiled(rt: Runtime, image: np.ndarray, cancel: CancelToken | None) -> Job[np.ndarray]:
    if rt.auto_tile:
        rt.tile = auto_cpu_tile(image.shape, rt.overlap, rt.batch_size)
    grid = plan_tiles(image.shape, rt.tile, rt.overlap)
    out = np.empty(grid.shape, dtype=np.float32)
    (h, w), m = grid.shape, grid.margin
    (ty, tx), (cy, cx) = grid.tile_shape, grid.core
    origins = grid.origins()
    n_batches = -(-len(origins) // rt.batch_size)
    buf = np.empty((rt.batch_size, ty, tx), dtype=np.float32)
    for b in range(n_batches):
        if cancel is not None:
            cancel.raise_if_cancelled()
        chunk = origins[b * rt.batch_size:(b + 1) * rt.batch_size]
        for j, (oy, ox) in enumerate(chunk):
            _cut_tile(image, oy - m, ox - m, ty, tx, buf[j])
        pred = _forward(rt, buf[:len(chunk)])
        for j, (oy, ox) in enumerate(chunk):
            ys, xs = min(cy, h - oy), min(cx, w - ox)  # the last core may stick out of the image
            if ys > 0 and xs > 0:
                out[oy:oy + ys, ox:ox + xs] = pred[j, m:m + ys, m:m + xs]
        yield Progress(b + 1, n_batches, f"tiles {min(len(origins), (b + 1) * rt.batch_size)}/{len(origins)}")
    return out


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Where index i of a reflection-padded axis of length n reads from (np.pad 'reflect')."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    i = np.mod(index, period)
    return np.where(i >= n, period - i, i)


def _cut_tile(image: np.ndarray, y0: int, x0: int, ty: int, tx: int, into: np.ndarray) -> None:
    """Tile [y0, y0+ty) × [x0, x0+tx) of the reflection-padded image, without padding the whole
    image (an 8k micrograph would need another 300 MB): a slice inside, a gather at the edges."""
    h, w = image.shape
    if y0 >= 0 and x0 >= 0 and y0 + ty <= h and x0 + tx <= w:
        into[...] = image[y0:y0 + ty, x0:x0 + tx]
    else:
        rows = reflect_index(np.arange(y0, y0 + ty), h)
        cols = reflect_index(np.arange(x0, x0 + tx), w)
        into[...] = image[np.ix_(rows, cols)]


def predict_padded_whole(model: nn.Module, image: np.ndarray, overlap: int = DEFAULT_OVERLAP,
                         tile: int = DEFAULT_TILE_CPU) -> np.ndarray:
    """The reference for the seam test: one untiled pass over the same reflection-padded image."""
    grid = plan_tiles(image.shape, tile, overlap)
    padded = pad_image(image, grid)
    with torch.inference_mode():
        y = model.eval()(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    m = grid.margin
    return np.ascontiguousarray(y[m:m + image.shape[0], m:m + image.shape[1]])


def measure_receptive_field(model: nn.Module | None = None, size: int = 416) -> tuple[int, int]:
    """(reach up, reach down) in px over all 32 phases of the pooling grid.

    A copy of the network with |weights| (so no path cancels) and average pooling in place of max
    pooling (a max passes gradient to one pixel of four, chosen by the data; the average to all,
    so the footprint is the union over every possible input) sees a batch of 32 tall strips;
    copy k back-propagates from output row c + k only, so its input gradient's extent is the
    footprint of that phase. Rows and columns behave alike (square kernels and poolings).
    """
    import copy

    from .model import UDenoiseNet

    net = copy.deepcopy(model) if model is not None else UDenoiseNet()
    net = getattr(net, "_orig_mod", net).float().cpu().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size))
    x = torch.rand(STRIDE, 1, size, STRIDE, requires_grad=True)
    c = _round_up(size // 2, STRIDE)
    y = net(x)
    k = torch.arange(STRIDE)
    y[k, 0, c + k, STRIDE // 2].sum().backward()
    up = down = 0
    for j in range(STRIDE):
        rows = np.nonzero(x.grad[j, 0].abs().sum(1).numpy())[0]
        up, down = max(up, c + j - int(rows.min())), max(down, int(rows.max()) - (c + j))
    return up, down


# ----------------------------------------------------------------------------- one micrograph

def denoise_job(model: PredictModel | nn.Module, raw: np.ndarray, config: PredictConfig | None = None,
                runtime: Runtime | None = None, cancel: CancelToken | None = None,
                source: str = "image") -> Job[np.ndarray]:
    """The whole chain on an in-memory micrograph (bin, normalise, tiles, intensity) as a job:
    what the widget shows, and what `predict_files` writes for the same pixels."""
    pm = as_predict_model(model)
    config = config or PredictConfig()
    rt = runtime or runtime_for(pm, config)
    prep = prepare(np.asarray(raw, dtype=np.float32), pm.bin_factor, pm.normalisation, source)
    pred = yield from estimate_job(rt, prep.image, cancel)
    return restore_intensity(pred, prep, config.intensity)


def denoise_array(model: PredictModel | nn.Module, raw: np.ndarray, config: PredictConfig | None = None,
                  runtime: Runtime | None = None, cancel: CancelToken | None = None) -> np.ndarray:
    """`denoise_job` drained: the denoised micrograph (binned when the checkpoint says so)."""
    return collect(denoise_job(model, raw, config, runtime, cancel))


# ----------------------------------------------------------------------------- naming

def output_path(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str = "") -> Path:
    """OUT/<stem><suffix>.mrc, stem = the input's name without folder and MRC extensions, so
    coordinates picked on the denoised file match the raw micrograph by name. The suffix is
    part of a name (no separators, no `..`) and the result must resolve inside OUT."""
    from .safety import check_name, inside

    check_name(suffix, "--suffix")
    name = check_name(f"{micrograph_stem(Path(input_path).name)}{suffix}.mrc", "output name", whole=True)
    return inside(out_dir, Path(out_dir) / name)


def plan_outputs(inputs: Sequence[Path], out_dir: Path, suffix: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs; no two inputs share an output and no output is any input."""
    from .safety import real

    pairs = [(p, output_path(p, out_dir, suffix)) for p in inputs]
    sources = {real(p): p for p in inputs}
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        if dst in seen:
            raise CryoDDMError(f"{seen[dst]} and {src} would both be written to {dst}; "
                               "rename one or predict them in separate runs")
        seen[dst] = src
        if real(dst) in sources:
            raise CryoDDMError(f"{sources[real(dst)]}: the output of {src.name} would replace the "
                               "input; choose another -o or --suffix")
    return pairs


PREDICT_LABEL = "napari-cryoddm predict:"


def is_predict_output(path: str | os.PathLike[str]) -> bool:
    """True for an MRC this command wrote (our label; mrcfile's 'Created by' comes first): the
    only files --overwrite replaces and the only ones a rerun counts as done."""
    from .io.mrc import read_header

    try:
        labels = read_header(path).labels
    except CryoDDMError:
        return False
    return any(label.startswith(PREDICT_LABEL) for label in labels[:2])


def _labels(prep: Prepared, pm: PredictModel, config: PredictConfig, grid: TileGrid) -> list[str]:
    lo, hi, off, sc = prep.stats
    labels = [f"{PREDICT_LABEL} {prep.path.name}"[:80],
              f"model {pm.name} epoch {pm.metadata.get('epoch')}"[:80],
              f"norm {pm.normalisation.method} off {off:.6g} scale {sc:.6g} -> {config.intensity}"[:80],
              f"bin {prep.bin_factor:g} tile {grid.tile_shape[0]}x{grid.tile_shape[1]} margin {grid.margin}"[:80],
              f"estimator {estimator_for(pm, config).describe()}{' tta8' if config.tta else ''}"[:80]]
    if prep.info is not None:
        labels += [f"src: {label}"[:80] for label in prep.info.labels[:6] if label]
    return labels[:10]


def _check_out_dir(out_dir: Path, inputs: Sequence[Any] = ()) -> None:
    """Before any work: OUT holds no input and is a folder we can write in (tried, not guessed:
    `os.access` says yes to root in /sys)."""
    from .safety import check_location, check_writable

    check_location(out_dir, inputs, what="the output folder", allow_workdir=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out_dir, f"cannot create the output folder ({exc.strerror or exc})") from None
    if not out_dir.is_dir():
        raise InputError(out_dir, "the output path exists and is not a folder")
    check_writable(out_dir)


def predict_one_file(pm: PredictModel, rt: Runtime, src: Path, dst: Path, config: PredictConfig,
                     cancel: CancelToken | None = None) -> Path:
    """Denoise one file to `dst` (atomic). The unit of work of the dask path too."""
    prep = read_prepared(src, pm.bin_factor, pm.normalisation)
    pred = restore_intensity(collect(estimate_job(rt, prep.image, cancel)), prep, config.intensity)
    check_output(pred, src, pm)
    grid = plan_tiles(prep.image.shape, rt.tile, rt.overlap)
    return write_mrc(dst, pred, voxel_size=prep.voxel_size or None, overwrite=config.overwrite,
                     labels=_labels(prep, pm, config, grid))


# ----------------------------------------------------------------------------- the job

@dataclass
class PredictResult:
    """What a run did: outputs written, skipped (already there) and failed (with the reason)."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    oom_events: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{len(self.written)} denoised, {len(self.skipped)} already done (skipped), "
                f"{len(self.failed)} failed; outputs in {self.out_dir}")
        for path, why in self.failed[:10]:
            text += f"\n  failed: {why}" if str(path) in why else f"\n  failed: {path}: {why}"
        return text


def plan_run(model: PredictModel | nn.Module | str | os.PathLike[str], inputs: Any,
             out_dir: str | os.PathLike[str], config: PredictConfig
             ) -> tuple[PredictModel, PredictResult, list[tuple[Path, Path]], int]:
    """Check everything before any work: inputs, output folder, the model; outputs that exist are
    skipped (resume) unless `config.overwrite`. Returns (model, result, to-do pairs, total)."""
    out_dir = Path(out_dir)
    sources = list_micrographs(inputs)
    pairs = plan_outputs(sources, out_dir, config.suffix)
    model_file = [model] if isinstance(model, (str, os.PathLike)) and Path(model).exists() else []
    _check_out_dir(out_dir, [sources, model_file])
    pm = as_predict_model(model)
    result = PredictResult(out_dir)
    todo = []
    for src, dst in pairs:
        if not os.path.lexists(dst):
            todo.append((src, dst))
        elif not is_predict_output(dst):  # never replaced, never counted as done
            result.failed.append((src, f"{dst}: exists and was not written by cryoddm predict; "
                                       "refusing to replace it (move it or choose another -o)"))
        elif config.overwrite:
            todo.append((src, dst))
        else:
            result.skipped.append(dst)
    return pm, result, todo, len(pairs)


def predict_files(model: PredictModel | nn.Module | str | os.PathLike[str], inputs: Any,
                  out_dir: str | os.PathLike[str], config: PredictConfig | None = None,
                  cancel: CancelToken | None = None) -> Job[PredictResult]:
    """Denoise every micrograph in `inputs` (files, folders, globs) into `out_dir`.

    Existing outputs are skipped unless `config.overwrite` (an interrupted run resumes). A bad
    micrograph (unreadable, NaN pixels) is reported and the run carries on with the others;
    finished outputs are always kept. Yields one `Progress` per micrograph (payload: `output`).
    """
    config = config or PredictConfig()
    cancel = cancel or CancelToken()
    pm, result, todo, total = plan_run(model, inputs, out_dir, config)
    done = len(result.skipped)
    yield Progress(done, total, f"{done} already done" if done else "starting")
    if not todo:
        return result
    rt = runtime_for(pm, config)
    t0 = time.perf_counter()
    workers = 1 if config.prefetch else 0
    with _Pipeline(workers) as pipe:
        nxt = pipe.read(todo[0][0], pm)
        pending: Future | None = None
        for k, (src, dst) in enumerate(todo):
            cur, nxt = nxt, (pipe.read(todo[k + 1][0], pm) if k + 1 < len(todo) else None)
            try:
                if cancel.cancelled:
                    break
                prep = cur.result()
                pred = restore_intensity(collect(estimate_job(rt, prep.image, cancel)), prep, config.intensity)
                check_output(pred, src, pm)
                grid = plan_tiles(prep.image.shape, rt.tile, rt.overlap)
                labels = _labels(prep, pm, config, grid)
                del prep.image
                if pending is not None:
                    _collect_write(pending, result)
                pending = pipe.write(dst, pred, prep.voxel_size, config.overwrite, labels)
                del pred, prep
            except StoppedWriting:
                raise
            except OutputError as exc:
                if exc.errno in NO_ROOM:  # every later file would fail the same way: stop
                    raise _stopped_writing(exc, result) from None
                result.failed.append((src, str(exc)))
                log.error("%s", exc)
            except CryoDDMError as exc:
                result.failed.append((src, str(exc)))
                log.error("%s", exc)
            except Exception as exc:  # noqa: BLE001 - one bad file never stops the others
                from .jobs import Cancelled

                if isinstance(exc, Cancelled):
                    break
                result.failed.append((src, f"{src}: {type(exc).__name__}: {exc}"))
                log.error("%s: %s: %s", src, type(exc).__name__, exc)
            done += 1
            yield Progress(done, total, src.name, {"input": str(src), "output": str(dst)})
        if nxt is not None:
            nxt.cancel()
        if pending is not None:
            _collect_write(pending, result)
    result.seconds = time.perf_counter() - t0
    result.oom_events = list(rt.oom_events)
    if result.failed and not result.written and not result.skipped:
        raise CryoDDMError("no micrograph could be denoised:\n  " +
                           "\n  ".join(why for _p, why in result.failed[:10]))
    return result


def _collect_write(fut: Future, result: PredictResult) -> None:
    """Count a finished write: written; done already (another run of the same command wrote it
    meanwhile); or failed with the reason — a full disk stops the run (`_stopped_writing`)."""
    try:
        result.written.append(fut.result())
    except OutputExistsError as exc:
        if is_predict_output(exc.path):
            result.skipped.append(Path(exc.path))
        else:
            result.failed.append((Path(exc.path), f"{exc.path}: appeared meanwhile and was not "
                                                  "written by cryoddm predict; left as it is"))
    except OutputError as exc:
        if exc.errno in NO_ROOM:
            raise _stopped_writing(exc, result) from None
        result.failed.append((Path(exc.path), str(exc)))
    except CryoDDMError as exc:
        result.failed.append((Path(getattr(exc, "path", "?")), str(exc)))
    except Exception as exc:  # noqa: BLE001 - e.g. a label mrcfile refuses: that file fails
        path = getattr(fut, "path", "?")
        result.failed.append((Path(str(path)), f"{path}: {type(exc).__name__}: {exc}"))


class StoppedWriting(CryoDDMError):
    """The output place is full or read-only: the run stops instead of failing every file."""


def _stopped_writing(exc: OutputError, result: PredictResult) -> StoppedWriting:
    return StoppedWriting(f"{exc}; stopped after {len(result.written)} written "
                          f"({len(result.skipped)} already done) — finished outputs are kept and a "
                          "rerun of the same command resumes")


def check_output(pred: np.ndarray, src: Path, pm: PredictModel) -> None:
    """NaN or infinite output (a diverged checkpoint, fp16 overflow) is a failure, never a file."""
    bad = int(np.size(pred) - np.count_nonzero(np.isfinite(pred)))
    if bad:
        raise CryoDDMError(f"{src}: the network gave {bad} NaN or infinite pixels with model "
                           f"{pm.name}; nothing was written (is the checkpoint diverged? try "
                           "--precision fp32)")


class _Pipeline:
    """Reads ahead and writes behind in threads (I/O and numpy release the GIL); inline when 0."""

    def __init__(self, workers: int) -> None:
        self._reader = ThreadPoolExecutor(1, "cryoddm-read") if workers else None
        self._writer = ThreadPoolExecutor(1, "cryoddm-write") if workers else None

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _done(fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - surfaced by .result()
            fut.set_exception(exc)
        return fut

    def read(self, path: Path, pm: PredictModel) -> Future:
        if self._reader is None:
            return _LazyFuture(read_prepared, path, pm.bin_factor, pm.normalisation)
        return self._reader.submit(read_prepared, path, pm.bin_factor, pm.normalisation)

    def write(self, dst: Path, pred: np.ndarray, voxel_size: float, overwrite: bool,
              labels: list[str]) -> Future:
        args = (dst, pred, voxel_size or None, overwrite, labels)
        fut = self._done(write_mrc, *args) if self._writer is None else self._writer.submit(write_mrc, *args)
        fut.path = dst  # type: ignore[attr-defined]  # named in a failure
        return fut


class _LazyFuture(Future):
    """Without prefetch, read when the result is wanted (keeps one micrograph in memory)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__()
        self._fn, self._args = fn, args

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            try:
                self.set_result(self._fn(*self._args))
            except BaseException as exc:  # noqa: BLE001
                self.set_exception(exc)
        return super().result(timeout)


__all__ = ["PredictConfig", "PredictModel", "PredictResult", "TileGrid", "Runtime", "plan_tiles",
           "pad_image", "predict_image", "predict_image_job", "predict_files", "denoise_job", "predict_one_file", "denoise_array",
           "output_path", "measure_receptive_field", "make_runtime", "runtime_for", "estimate_job"]
