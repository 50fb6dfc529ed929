"""MRC files through mrcfile: headers without data, memory-mapped pixels, atomic float32 writes.

Real files are often not strict MRC2014 (no `MAP ` id, zero machine stamp, FEI extended
headers), so every open is permissive; a file that is not MRC at all, or is truncated, gets an
`InputError` naming it.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header

from ..atomic import atomic_write
from ..errors import CryoDDMError, InputError

MRC_PATTERNS = ("*.mrc", "*.mrcs", "*.mrc.gz", "*.mrcs.gz", "*.st", "*.map", "*.rec")
_STACK_SUFFIXES = (".mrcs", ".mrcs.gz", ".st")


def is_mrc_name(path: str | os.PathLike[str]) -> bool:
    name = Path(path).name.lower()
    return any(Path(name).match(p) for p in MRC_PATTERNS)


@dataclass(frozen=True)
class MrcInfo:
    """What the header says. `shape` is (y, x) for one image, (n, y, x) for a stack or volume."""

    path: Path
    shape: tuple[int, ...]
    dtype: str
    mode: int
    voxel_size: float  # Å/px along x; 0 when the header has none
    exttyp: str = ""
    nsymbt: int = 0
    is_stack: bool = False
    compressed: bool = False
    labels: tuple[str, ...] = field(default=())

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.shape[-2], self.shape[-1])

    @property
    def n_images(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def summary(self) -> dict:
        return {"path": str(self.path), "shape": list(self.shape), "dtype": self.dtype,
                "mode": self.mode, "voxel_size": self.voxel_size, "exttyp": self.exttyp,
                "is_stack": self.is_stack, "compressed": self.compressed}


def _open(path: Path, header_only: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mrcfile.open(path, mode="r", permissive=True, header_only=header_only)


def read_header(path: str | os.PathLike[str]) -> MrcInfo:
    """Read only the header (plus the file size for a truncation check)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an MRC file")
    try:
        with _open(path, header_only=True) as mrc:
            h = mrc.header
            compressed = path.suffix.lower() in (".gz", ".bz2")
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            mode = int(h.mode)
            try:
                dtype = np.dtype(data_dtype_from_header(h))
            except ValueError:
                raise InputError(path, f"not an MRC file (unknown data mode {mode})") from None
            if min(nx, ny, nz) < 1 or nx * ny > 2**36:
                raise InputError(path, f"not an MRC file (header dimensions {nx}×{ny}×{nz})")
            vs = float(mrc.voxel_size.x)
            exttyp = bytes(h.exttyp).decode("ascii", "replace").strip("\x00 ")
            nsymbt = int(h.nsymbt)
            nlabl = max(0, min(10, int(h.nlabl)))
            labels = tuple(bytes(h.label[i]).decode("ascii", "replace").strip("\x00 ")
                           for i in range(nlabl))
            ispg = int(h.ispg)
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None
    if not compressed:
        expected = 1024 + nsymbt + nx * ny * nz * dtype.itemsize
        size = path.stat().st_size
        if size < expected:
            raise InputError(path, f"truncated: the header promises {expected} bytes "
                                   f"({nz}×{ny}×{nx} {dtype}), the file has {size}")
    name = path.name.lower()
    is_stack = nz > 1 and (ispg == 0 or name.endswith(_STACK_SUFFIXES))
    shape = (ny, nx) if nz == 1 else (nz, ny, nx)
    return MrcInfo(path, shape, dtype.str, mode, vs if np.isfinite(vs) else 0.0, exttyp, nsymbt,
                   is_stack, compressed, labels)


def _data(path: Path, info: MrcInfo):
    """An open mrcfile object whose `.data` is memory-mapped when the file is uncompressed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if info.compressed:
            return mrcfile.open(path, mode="r", permissive=True)
        return mrcfile.mmap(path, mode="r", permissive=True)


def read_image(path: str | os.PathLike[str], index: int | None = None,
               info: MrcInfo | None = None) -> np.ndarray:
    """One 2-D image as float32: the file's only image, or slice `index` of a stack."""
    path = Path(path)
    info = info or read_header(path)
    try:
        with _data(path, info) as mrc:
            data = mrc.data
            if data is None:
                raise InputError(path, "the MRC header is invalid and no data could be read")
            if data.ndim == 3:
                if index is None:
                    if data.shape[0] != 1:
                        raise InputError(path, f"holds {data.shape[0]} images; choose one")
                    index = 0
                if not -data.shape[0] <= index < data.shape[0]:
                    raise InputError(path, f"has no image {index} (it holds {data.shape[0]})")
                data = data[index]
            elif index not in (None, 0):
                raise InputError(path, f"holds one image; there is no image {index}")
            return np.array(data, dtype=np.float32)
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"cannot read the pixels ({exc})") from None


def read_micrograph(path: str | os.PathLike[str]) -> tuple[np.ndarray, MrcInfo]:
    """A micrograph as float32 with its header; a one-image stack counts as a micrograph."""
    info = read_header(path)
    if info.n_images != 1:
        raise InputError(path, f"is a stack of {info.n_images} images, not a micrograph")
    return read_image(path, info=info), info


def write_mrc(path: str | os.PathLike[str], data: np.ndarray, voxel_size: float | None = None,
              overwrite: bool = False, labels: Sequence[str] = (), dtype=np.float32) -> Path:
    """Write `data` atomically (temporary file, then rename) as float32 unless told otherwise."""
    path = Path(path)
    arr = np.ascontiguousarray(data, dtype=dtype)
    with atomic_write(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            if arr.ndim == 3 and path.name.lower().endswith((".mrcs", ".mrcs.gz")):
                mrc.header.ispg = 0
            if voxel_size:
                mrc.voxel_size = float(voxel_size)
            for label in list(labels)[:10]:
                mrc.add_label(str(label)[:80])
    return path


def list_micrographs(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files from a file, a folder (its MRC files), a glob, or a list of any of these; sorted."""
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    found: list[Path] = []
    for item in spec:
        p = Path(item)
        if p.is_dir():
            hits = sorted(q for q in p.iterdir() if q.is_file() and is_mrc_name(q))
            if not hits:
                raise InputError(p, "folder holds no MRC files (" + " ".join(MRC_PATTERNS) + ")")
            found.extend(hits)
        elif p.exists():
            found.append(p)
        elif any(ch in str(item) for ch in "*?["):
            hits = sorted(Path(h) for h in glob.glob(str(item)) if is_mrc_name(h))
            if not hits:
                raise InputError(item, "pattern matches no MRC files")
            found.extend(hits)
        else:
            raise InputError(p, "no such file or folder")
    if not found:
        raise CryoDDMError("no micrographs given")
    return list(dict.fromkeys(found))
