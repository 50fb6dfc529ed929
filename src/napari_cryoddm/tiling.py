"""The network over a whole micrograph: tiles with margins that cover its receptive field, so the
stitched output equals one pass over the (reflect-padded) image; out-of-memory shrinks the batch,
then the tile, and carries on; on a CPU the full-resolution stages run in strips."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CryoDDMError
from .estimators import Estimator
from .jobs import CancelToken, Job, Progress
from .model import UDenoiseNet

log = logging.getLogger(__name__)

STRIDE = 32  # five 2× poolings: tile origins and sizes are multiples of this


RECEPTIVE_FIELD_PX = 161  # measured one-sided reach of UDenoiseNet (see measure_receptive_field)


DEFAULT_OVERLAP = 192  # the smallest multiple of 32 covering it (see plan_tiles)


DEFAULT_TILE_GPU = 2048  # H200, 4096²: 0.68 s model-only vs 0.87 s at 1024 (docs/benchmarks.md)


DEFAULT_TILE_CPU = 1792  # with lean_forward: 9 tiles per 4k (docs/benchmarks.md)


CPU_TILES = (1792, 1536, 1280, 1024, 768)  # automatic CPU tiles, largest first


CPU_BYTES_PER_TILE_PX = 480  # measured peak of lean_forward's activations (fp32) per tile pixel


CPU_MEMORY_BUDGET = int(1.75 * 2**30)  # keeps an 8k micrograph under 2 GB peak RSS


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
        return (self.counts[0] * self.core[0] + 2 * self.margin, self.counts[1] * self.core[1] + 2 * self.margin)

    @property
    def n_tiles(self) -> int:
        return self.counts[0] * self.counts[1]

    def origins(self) -> list[tuple[int, int]]:
        return [(iy * self.core[0], ix * self.core[1]) for iy in range(self.counts[0]) for ix in range(self.counts[1])]

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
        raise CryoDDMError(
            f"tile {tile} px leaves no core with {margin} px of overlap on each side; "
            f"use --tile ≥ {2 * margin + 2 * STRIDE} (or a smaller --overlap)"
        )
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


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


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

    if not isinstance(model, UDenoiseNet) or x.shape[-2] <= strip:
        return model(x)
    H = x.shape[-2]
    strip -= strip % 2
    halo1 = model.enc1[0].kernel_size[0] // 2
    chunks = []
    for r0 in range(0, H, strip):
        r1 = min(H, r0 + strip)
        a, b = max(0, r0 - halo1), min(H, r1 + halo1)
        y = model.enc1[1](model.enc1[0](x[..., a:b, :]))[..., r0 - a : r1 - a, :]
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
        hs = up(h[..., ha:hb, :], scale_factor=2, mode="nearest")[..., a - 2 * ha : b - 2 * ha, :]
        hs = hs[..., :, : x.shape[-1]]
        y = model.dec1(torch.cat([hs, x[..., a:b, :].to(hs.dtype)], 1))
        out[..., r0:r1, :] = y[..., r0 - a : r1 - a, :]
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
            raise CryoDDMError(
                f"out of memory on {rt.device} even with one {rt.tile}² tile per pass; "
                "free the device or use --device cpu"
            ) from exc
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
        chunk = origins[b * rt.batch_size : (b + 1) * rt.batch_size]
        for j, (oy, ox) in enumerate(chunk):
            _cut_tile(image, oy - m, ox - m, ty, tx, buf[j])
        pred = _forward(rt, buf[: len(chunk)])
        for j, (oy, ox) in enumerate(chunk):
            ys, xs = min(cy, h - oy), min(cx, w - ox)  # the last core may stick out of the image
            if ys > 0 and xs > 0:
                out[oy : oy + ys, ox : ox + xs] = pred[j, m : m + ys, m : m + xs]
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
        into[...] = image[y0 : y0 + ty, x0 : x0 + tx]
    else:
        rows = reflect_index(np.arange(y0, y0 + ty), h)
        cols = reflect_index(np.arange(x0, x0 + tx), w)
        into[...] = image[np.ix_(rows, cols)]


def predict_padded_whole(
    model: nn.Module, image: np.ndarray, overlap: int = DEFAULT_OVERLAP, tile: int = DEFAULT_TILE_CPU
) -> np.ndarray:
    """The reference for the seam test: one untiled pass over the same reflection-padded image."""
    grid = plan_tiles(image.shape, tile, overlap)
    padded = pad_image(image, grid)
    with torch.inference_mode():
        y = model.eval()(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    m = grid.margin
    return np.ascontiguousarray(y[m : m + image.shape[0], m : m + image.shape[1]])


def measure_receptive_field(model: nn.Module | None = None, size: int = 416) -> tuple[int, int]:
    """(reach up, reach down) in px over all 32 phases of the pooling grid.

    A copy of the network with |weights| (so no path cancels) and average pooling in place of max
    pooling (a max passes gradient to one pixel of four, chosen by the data; the average to all,
    so the footprint is the union over every possible input) sees a batch of 32 tall strips;
    copy k back-propagates from output row c + k only, so its input gradient's extent is the
    footprint of that phase. Rows and columns behave alike (square kernels and poolings).
    """

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
