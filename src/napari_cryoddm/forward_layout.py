"""The forward folder: its files, its manifest (`forward.json`) and the checked reader.

`forward` writes this layout and `train` reads it; `docs/formats.md` describes it for users.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from .config import to_jsonable
from .errors import InputError
from .io.mrc import ascii_label, read_header
from .model import STRIDE
from .normalise import MINMAX

FORMAT = "napari-cryoddm-forward"
VERSION = 1
# every stack of a forward folder, by role (the original CryoDDM's file names)
STACK_FILES = {
    "particles": "s1/particles.mrcs",
    "s2_input": "s2/input.mrcs",
    "s2_label": "s2/label.mrcs",
    "val_input": "val/input.mrcs",
    "val_label": "val/label.mrcs",
    "noise": "s3/noise.mrcs",
}
MANIFEST = "forward.json"
# what a forward folder holds (recognised for --overwrite in folders written before markers)
FORWARD_LAYOUT = (*STACK_FILES.values(), MANIFEST, "pairs.npz")


def is_forward_folder(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A finished forward folder's `forward.json` (for training and the widget)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(folder, "is not a forward dataset (no forward.json)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise InputError(path, "is not a complete napari-cryoddm forward manifest")
    return manifest


def _stack_header(path: Path) -> tuple[int, int, int, int]:
    """(n, y, x, data offset) of a float32 stack, from its header; InputError otherwise."""

    info = read_header(path)
    if len(info.shape) == 2:
        n, (ny, nx) = 1, info.shape
    else:
        n, ny, nx = info.shape
    if np.dtype(info.dtype) != np.dtype("<f4"):
        raise InputError(path, f"holds {np.dtype(info.dtype).name} pixels; the forward step writes float32")
    if info.compressed:
        raise InputError(path, "is compressed; training memory-maps the stacks (decompress it first)")
    return n, ny, nx, 1024 + info.nsymbt


@dataclass
class ForwardData:
    """A checked forward folder: stack sizes, window, manifest (None for the original's folders)."""

    folder: Path
    window: int
    counts: dict[str, int]
    offsets: dict[str, int]
    manifest: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)

    def path(self, key: str) -> Path:
        return self.folder / STACK_FILES[key]

    @property
    def normalisation(self) -> dict[str, Any]:
        if self.manifest and self.manifest.get("normalisation"):
            return dict(self.manifest["normalisation"])
        return MINMAX.to_dict()

    @property
    def schedule(self) -> dict[str, Any] | None:
        if not self.manifest:
            return None
        s = self.manifest.get("schedule") or {}
        return {"beta": s.get("beta"), "steps": s.get("steps"), "start": s.get("start")}

    def summary(self) -> dict[str, Any]:
        """What a checkpoint records about its training data (JSON-safe, small)."""
        m = self.manifest or {}
        return to_jsonable(
            {
                "path": str(self.folder.resolve()),
                "window": self.window,
                "stacks": self.counts,
                "has_manifest": self.manifest is not None,
                "counts": m.get("counts"),
                "seed": m.get("seed"),
                "jitter": m.get("jitter"),
                "noisier_member": m.get("noisier_member", "label"),
                "micrographs": len(m.get("micrographs") or []),
                "package_version": m.get("package_version"),
            }
        )


def open_forward(folder: str | os.PathLike[str]) -> ForwardData:
    """Check a forward folder (ours or the original's) before anything is trained or written."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "no such folder")
    if not folder.is_dir():
        raise InputError(folder, "is not a folder (give the forward step's output folder)")
    missing = [rel for rel in STACK_FILES.values() if not (folder / rel).is_file()]
    if missing:
        raise InputError(
            folder,
            "is not a forward folder: missing "
            + ", ".join(missing)
            + " (a forward folder holds s1/, s2/, s3/ and val/; run `cryoddm forward`)",
        )
    counts, offsets, shapes = {}, {}, {}
    for key, rel in STACK_FILES.items():
        n, ny, nx, off = _stack_header(folder / rel)
        counts[key], offsets[key], shapes[key] = n, off, (ny, nx)
    sizes = set(shapes.values())
    if len(sizes) != 1:
        listed = ", ".join(f"{STACK_FILES[k]} {s[1]}×{s[0]}" for k, s in shapes.items())
        raise InputError(folder, f"the stacks have different image sizes ({listed})")
    ny, nx = sizes.pop()
    if ny != nx:
        raise InputError(folder / STACK_FILES["particles"], f"images are {nx}×{ny}; training needs square W×W crops")
    if nx % STRIDE or nx < STRIDE:
        raise InputError(
            folder / STACK_FILES["particles"],
            f"window {nx} px is not a multiple of {STRIDE} (the network pools five times)",
        )
    for a, b in (("s2_input", "s2_label"), ("val_input", "val_label")):
        if counts[a] != counts[b]:
            raise InputError(
                folder / STACK_FILES[b],
                f"holds {counts[b]} images but {STACK_FILES[a]} holds {counts[a]}: the pairs do not match",
            )
    if counts["noise"] < 2:
        raise InputError(folder / STACK_FILES["noise"], "S3 pairs different noise patches: needs at least 2")
    notes: list[str] = []
    manifest = None
    if (folder / "forward.json").is_file():
        manifest = read_manifest(folder)
        if int(manifest.get("window", nx)) != nx:
            raise InputError(
                folder / "forward.json", f"says window {manifest.get('window')} but the stacks hold {nx}×{nx} images"
            )
        if manifest.get("noisier_member", "label") != "label":
            raise InputError(
                folder / "forward.json",
                "noisier_member is not 'label'; this folder was written by an incompatible forward step",
            )
    else:
        notes.append(
            f"{folder}: no forward.json (the original CryoDDM's layout): assuming min–max "
            "normalised micrographs, bin 1, schedule unknown"
        )
    return ForwardData(folder, nx, counts, offsets, manifest, notes)


class StackWriter:
    """A float32 `.mrcs` of known size written image by image with `pwrite` (no memory map, so
    written pages never count towards the process's memory); header statistics at close."""

    def __init__(self, path: Path, n: int, window: int, voxel_size: float = 0.0, label: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.new_mmap(path, shape=(n, window, window), mrc_mode=2, overwrite=True) as mrc:
                mrc.set_image_stack()
                mrc.header.label[0] = b""  # no "Created by mrcfile.py <time>": seeded runs are
                mrc.header.nlabl = 0  # byte-identical
                if voxel_size:
                    mrc.voxel_size = float(voxel_size)
                if label:
                    mrc.add_label(ascii_label(label))
                self.offset = int(mrc.header.nbytes + mrc.header.nsymbt)
        self.path, self.n, self.window = path, n, window
        self.image_bytes = window * window * 4
        self.fd = os.open(path, os.O_RDWR)
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0

    def write(self, index: int, images: np.ndarray) -> None:
        """Write `images` (one W×W image or a block of them) starting at `index`."""
        arr = np.ascontiguousarray(images, dtype="<f4")
        if arr.ndim == 2:
            arr = arr[None]
        if index < 0 or index + len(arr) > self.n:
            raise IndexError(f"{self.path}: images {index}…{index + len(arr) - 1} outside 0…{self.n - 1}")
        os.pwrite(self.fd, arr.tobytes(), self.offset + index * self.image_bytes)
        if arr.size:
            a64 = arr.astype(np.float64)
            self._min = min(self._min, float(arr.min()))
            self._max = max(self._max, float(arr.max()))
            self._sum += float(a64.sum())
            self._sumsq += float(np.square(a64).sum())

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images back from the file (pread), in the order given."""
        out = np.empty((len(indices), self.window, self.window), dtype="<f4")
        for j, i in enumerate(indices):
            buf = os.pread(self.fd, self.image_bytes, self.offset + int(i) * self.image_bytes)
            out[j] = np.frombuffer(buf, dtype="<f4").reshape(self.window, self.window)
        return out

    def close(self) -> None:
        """Set dmin, dmax, dmean and rms in the header, then close."""
        if self.fd < 0:
            return
        total = self.n * self.window * self.window
        if total and np.isfinite(self._min):
            mean = self._sum / total
            rms = math.sqrt(max(0.0, self._sumsq / total - mean * mean))
            os.pwrite(self.fd, struct.pack("<fff", self._min, self._max, mean), 76)
            os.pwrite(self.fd, struct.pack("<f", rms), 216)
        os.close(self.fd)
        self.fd = -1
