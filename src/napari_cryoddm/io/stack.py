"""Many micrographs as one lazy stack: a dask array `[i, y, x]`, one chunk per image, a pyramid.

Opening reads headers only (1024 bytes each) plus a bounded row subsample for the contrast
limits; pixels are read when a slice is shown, from a memory map (a `.gz` is decompressed once
into a cache file and mapped from there).

Micrographs of different sizes: the stack is as large as the largest; a smaller micrograph sits
at the top-left (so RELION coordinates, origin at `data[0, 0]`, need no offset) and is padded at
the bottom and right with its own median, so the padding is neutral grey on display. Each slice
keeps its true shape in `slices[i].shape`; processing steps read the file, never the padded view.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np

from ..errors import CryoDDMError, InputError
from .mrc import MrcInfo, list_micrographs, memmap, read_header, read_slice

PYRAMID_MIN_SIZE = 2048  # build a multiscale pyramid when a micrograph side reaches this
PYRAMID_SMALLEST = 512  # the coarsest level's longer side is between this and twice this
CONTRAST_SLICES = 4  # contrast limits look at no more than this many images …
CONTRAST_ROWS = 32  # … and this many whole rows of each
CONTRAST_PERCENTILES = (0.5, 99.5)
_MEDIAN_PIXELS = 1 << 16


@dataclass(frozen=True)
class StackSlice:
    """One image of the stack: which file, which image in it, its true size."""

    info: MrcInfo
    index: int | None = None  # image within a stack or volume file; None for a single image

    @property
    def shape(self) -> tuple[int, int]:
        return self.info.image_shape

    @property
    def name(self) -> str:
        """The file name; RELION's `000001@name.mrcs` for an image of a stack."""
        if self.index is None:
            return self.info.path.name
        return f"{self.index + 1:06d}@{self.info.path.name}"

    def metadata(self) -> dict:
        """The per-slice entry of `layer.metadata["cryoddm"]["micrographs"]`."""
        d = {
            "path": str(self.info.path),
            "name": self.name,
            "shape": list(self.shape),
            "voxel_size": float(self.info.voxel_size),
            "mode": self.info.mode,
            "dtype": self.info.dtype,
            "exttyp": self.info.exttyp,
            "compressed": self.info.compressed,
        }
        if self.index is not None:
            d["index"] = self.index
        return d

    def read(self) -> np.ndarray:
        """The true-size float32 image, straight from the file."""
        return read_slice(self.info, self.index)


@dataclass
class MicrographStack:
    """`levels[0]` is the full-resolution `[i, y, x]` stack; further levels halve y and x."""

    levels: list[da.Array]
    slices: list[StackSlice]
    contrast_limits: tuple[float, float] | None
    voxel_size: float  # Å/px of the first slice with one; 0 when no header has one

    @property
    def data(self) -> da.Array:
        return self.levels[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.levels[0].shape)  # type: ignore[return-value]

    @property
    def multiscale(self) -> bool:
        return len(self.levels) > 1

    @property
    def is_volume(self) -> bool:
        """One file holding a 3-D map (not a stack of 2-D images)."""
        infos = {s.info.path for s in self.slices}
        return len(infos) == 1 and self.slices[0].info.n_images > 1 and not self.slices[0].info.is_stack

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slices]

    def metadata(self) -> dict:
        return {"micrographs": [s.metadata() for s in self.slices]}


def _slices(infos: Sequence[MrcInfo]) -> list[StackSlice]:
    out: list[StackSlice] = []
    for info in infos:
        if info.n_images == 1:
            out.append(StackSlice(info))
        else:
            out.extend(StackSlice(info, k) for k in range(info.n_images))
    return out


def level_shapes(
    shape: tuple[int, int], pyramid_min: int = PYRAMID_MIN_SIZE, smallest: int = PYRAMID_SMALLEST
) -> list[tuple[int, int]]:
    """Level k is shape // 2**k; the coarsest level's longer side lies in [smallest, 2·smallest)."""
    ny, nx = shape
    shapes = [(ny, nx)]
    if max(ny, nx) < pyramid_min:
        return shapes
    while max(shapes[-1]) // 2 >= smallest and min(shapes[-1]) >= 8:
        ny, nx = shapes[-1]
        shapes.append((ny // 2, nx // 2))
    return shapes


def _median(image: np.ndarray) -> float:
    step = max(1, int(np.ceil(np.sqrt(image.size / _MEDIAN_PIXELS))))
    sample = image[::step, ::step]
    sample = sample[np.isfinite(sample)]
    return float(np.median(sample)) if sample.size else 0.0


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor×factor blocks (the remainder rows/columns at the far edges are dropped)."""
    if factor == 1:
        return np.asarray(image, dtype=np.float32)
    ny, nx = image.shape[0] // factor, image.shape[1] // factor
    out = image[: ny * factor, : nx * factor].reshape(ny, factor, nx, factor)
    return out.mean(axis=(1, 3), dtype=np.float32)


def _halve(image: np.ndarray) -> np.ndarray:
    """2×2 block mean as four strided adds (several times faster than reshape + mean), straight
    from the file's dtype to float32, so a 4k uint16 map is never converted whole first."""
    ny, nx = image.shape[0] // 2, image.shape[1] // 2
    out = image[0 : 2 * ny : 2, 0 : 2 * nx : 2].astype(np.float32)
    out += image[1 : 2 * ny : 2, 0 : 2 * nx : 2]
    out += image[0 : 2 * ny : 2, 1 : 2 * nx : 2]
    out += image[1 : 2 * ny : 2, 1 : 2 * nx : 2]
    out *= np.float32(0.25)
    return out


def _raw(sl: StackSlice) -> np.ndarray:
    """The slice as stored (memory-mapped, the file's dtype), for binning before converting."""
    data = memmap(sl.info)
    return data[sl.index] if data.ndim == 3 else data


def _render(sl: StackSlice, shape: tuple[int, int], factor: int) -> np.ndarray:
    """One slice at one pyramid level of size `shape`: read, bin by `factor` (repeated halving,
    each step touching a quarter of the previous one's pixels), pad with the slice's median."""
    if factor == 1:
        image = sl.read()
    else:
        image = _halve(_raw(sl))
        factor //= 2
        while factor > 1:
            image = _halve(image)
            factor //= 2
    if image.shape != tuple(shape):
        padded = np.full(shape, _median(image), dtype=np.float32)
        h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
        padded[:h, :w] = image[:h, :w]
        image = padded
    return image


def _level_array(slices: list[StackSlice], shape: tuple[int, int], factor: int) -> da.Array:
    def chunk(block_info=None) -> np.ndarray:
        i = block_info[None]["chunk-location"][0]
        return _render(slices[i], shape, factor)[None]

    return da.map_blocks(
        chunk,
        chunks=((1,) * len(slices), (shape[0],), (shape[1],)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"cryoddm-level{factor}-{id(slices):x}-{shape[0]}x{shape[1]}",
    )


def read_rows(sl: StackSlice, rows: int) -> np.ndarray:
    """`rows` evenly spaced whole rows of one image, read with seek + read (no memory map), so
    the bytes a sample costs are exactly rows × row length."""
    info = sl.info
    ny, nx = info.image_shape
    dtype = np.dtype(info.dtype)
    if info.compressed or info.mode == 101:
        return read_slice(info, sl.index)[np.linspace(0, ny - 1, min(rows, ny)).astype(int)]
    start = 1024 + info.nsymbt + (sl.index or 0) * ny * nx * dtype.itemsize
    picks = np.unique(np.linspace(0, ny - 1, min(rows, ny) + 2).astype(int)[1:-1] if ny > 2 else np.arange(ny))
    out = np.empty((len(picks), nx), dtype=np.float32)
    row_bytes = nx * dtype.itemsize
    with open(info.path, "rb", buffering=0) as f:
        for k, r in enumerate(picks):
            f.seek(start + int(r) * row_bytes)
            buf = f.read(row_bytes)
            if len(buf) < row_bytes:
                raise InputError(info.path, "truncated: a row of pixels is missing")
            row = np.frombuffer(buf, dtype=dtype)
            out[k] = np.abs(row) if dtype.kind == "c" else row
    return out


def contrast_limits(
    slices: Sequence[StackSlice],
    n_slices: int = CONTRAST_SLICES,
    rows: int = CONTRAST_ROWS,
    percentiles: tuple[float, float] = CONTRAST_PERCENTILES,
) -> tuple[float, float]:
    """Display limits from a bounded sample: ≤ `n_slices` images spread over the stack, `rows`
    rows each, whatever the stack's size (napari would otherwise scan every pixel)."""
    if not slices:
        raise CryoDDMError("no images to take contrast limits from")
    picks = np.unique(np.linspace(0, len(slices) - 1, min(n_slices, len(slices))).astype(int))
    sample = np.concatenate([read_rows(slices[int(i)], rows).ravel() for i in picks])
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
        if not hi > lo:
            hi = lo + 1.0
    return (lo, hi)


def open_stack(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    pyramid: bool = True,
    contrast: bool = True,
    pyramid_min: int = PYRAMID_MIN_SIZE,
) -> MicrographStack:
    """Headers of every file, a lazy stack (plus pyramid levels for large micrographs) and
    contrast limits from a bounded subsample; no pixel is read beyond that sample."""
    paths = list_micrographs(spec)
    infos = [read_header(p) for p in paths]
    volumes = [i for i in infos if i.n_images > 1 and not i.is_stack]
    if volumes and len(infos) > 1:
        raise InputError(volumes[0].path, "is a 3-D volume; open it on its own, not with other files")
    slices = _slices(infos)
    full = (max(s.shape[0] for s in slices), max(s.shape[1] for s in slices))
    shapes = level_shapes(full, pyramid_min) if pyramid else [full]
    levels = [_level_array(slices, shape, 2**k) for k, shape in enumerate(shapes)]
    limits = contrast_limits(slices) if contrast else None
    voxel = next((s.info.voxel_size for s in slices if s.info.voxel_size > 0), 0.0)
    return MicrographStack(levels, slices, limits, float(voxel))


def read_entry(entry: dict) -> np.ndarray:
    """The true-size float32 image of one `metadata["cryoddm"]["micrographs"]` entry, read from
    its file (never the padded display): what processing steps should use."""
    info = read_header(entry["path"])
    return read_slice(info, entry.get("index"))


def voxel_sizes_differ(stack: MicrographStack, rtol: float = 1e-3) -> list[str]:
    """Names of slices whose voxel size differs from the stack's (the layer has one scale)."""
    ref = stack.voxel_size
    return [
        s.name for s in stack.slices if s.info.voxel_size > 0 and ref > 0 and abs(s.info.voxel_size - ref) > rtol * ref
    ]


__all__ = [
    "MicrographStack",
    "StackSlice",
    "open_stack",
    "contrast_limits",
    "level_shapes",
    "block_mean",
    "read_entry",
    "voxel_sizes_differ",
]
