"""MRC files through mrcfile: headers without data, memory-mapped pixels, atomic float32 writes.

Real files are often not strict MRC2014 (no `MAP ` id, zero machine stamp, FEI extended
headers), so every open is permissive; a file that is not MRC at all, or is truncated, gets an
`InputError` naming it.
"""

from __future__ import annotations

import atexit
import bz2
import glob
import gzip
import os
import shutil
import tempfile
import threading
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.mrcinterpreter import MrcInterpreter
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
        return {
            "path": str(self.path),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "mode": self.mode,
            "voxel_size": self.voxel_size,
            "exttyp": self.exttyp,
            "is_stack": self.is_stack,
            "compressed": self.compressed,
        }


class _HeaderReader(MrcInterpreter):
    """mrcfile's permissive header parser (byte order, odd machine stamps) without the extended
    header: EPU files carry ~0.9 MB of FEI2 metadata that opening a folder should not read."""

    def _read_extended_header(self) -> None:
        self._extended_header = np.empty(0, dtype="V1")


_IMOD_STAMP = 1146047817


def _mode0_dtype(h) -> np.dtype | None:
    """IMOD writes unsigned bytes in mode 0 unless its flags say signed; MRC2014 says signed."""
    extra2 = bytes(h.extra2)
    order = "<" if h.mode.dtype.byteorder in ("<", "=", "|") else ">"
    stamp, flags = np.frombuffer(extra2[40:48], dtype=order + "i4")
    if int(stamp) == _IMOD_STAMP and not int(flags) & 1:
        return np.dtype(np.uint8)
    return None


def _open_stream(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.lower().endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb", buffering=0)


def read_header(path: str | os.PathLike[str]) -> MrcInfo:
    """Read only the 1024-byte main header (plus the file size for a truncation check)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an MRC file")
    compressed = path.name.lower().endswith((".gz", ".bz2"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_stream(path) as stream:
                mrc = _HeaderReader(stream, permissive=True, header_only=True)
        h = mrc.header
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        mode = int(h.mode)
        try:
            dtype = np.dtype(np.uint8) if mode == 101 else np.dtype(data_dtype_from_header(h))
        except ValueError:
            raise InputError(path, f"not an MRC file (unknown data mode {mode}; is it really an MRC image?)") from None
        if mode == 0:
            dtype = _mode0_dtype(h) or dtype
        if min(nx, ny, nz) < 1 or nx * ny > 2**36 or nz > 2**24:
            raise InputError(path, f"not an MRC file (header dimensions {nx}×{ny}×{nz})")
        vs = float(mrc.voxel_size.x)
        exttyp = bytes(h.exttyp).decode("ascii", "replace").strip("\x00 ")
        nsymbt = int(h.nsymbt)
        if nsymbt < 0:
            raise InputError(path, f"not an MRC file (extended header size {nsymbt})")
        nlabl = max(0, min(10, int(h.nlabl)))
        labels = tuple(bytes(h.label[i]).decode("ascii", "replace").strip("\x00 ") for i in range(nlabl))
        ispg = int(h.ispg)
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        problem = str(exc)
        if "enough bytes" in problem:
            problem = "shorter than an MRC header (1024 bytes)"
        raise InputError(path, f"not a readable MRC file ({problem})") from None
    if not compressed:
        expected = 1024 + nsymbt + _data_bytes(nx, ny, nz, mode, dtype)
        size = path.stat().st_size
        if size < expected:
            raise InputError(
                path, f"truncated: the header promises {expected} bytes ({nz}×{ny}×{nx} {dtype}), the file has {size}"
            )
    name = path.name.lower()
    is_stack = nz > 1 and (ispg == 0 or name.endswith(_STACK_SUFFIXES))
    shape = (ny, nx) if nz == 1 else (nz, ny, nx)
    return MrcInfo(
        path,
        shape,
        dtype.str,
        mode,
        vs if np.isfinite(vs) and vs > 0 else 0.0,
        exttyp,
        nsymbt,
        is_stack,
        compressed,
        labels,
    )


def _data_bytes(nx: int, ny: int, nz: int, mode: int, dtype: np.dtype) -> int:
    if mode == 101:  # 4-bit: two pixels a byte, each row padded to a whole byte
        return (nx + 1) // 2 * ny * nz
    return nx * ny * nz * dtype.itemsize


def _unpack_4bit(packed: np.ndarray, nx: int) -> np.ndarray:
    """Mode 101 (IMOD/SerialEM): the first pixel of each pair in the low 4 bits."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :nx]


def read_extended_header(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The FEI1/FEI2 extended header as mrcfile's structured array (one record per section)."""
    path = Path(path)
    read_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
            try:
                return mrc.indexed_extended_header
            except (ValueError, TypeError):
                return None


# ---- pixels --------------------------------------------------------------------------------

_gz_lock = threading.Lock()
_gz_cache: dict[tuple[str, int, int], Path] = {}
_gz_dir: Path | None = None


def _cache_dir() -> Path:
    global _gz_dir
    if _gz_dir is None:
        root = os.environ.get("CRYODDM_CACHE_DIR") or None
        _gz_dir = Path(tempfile.mkdtemp(prefix="cryoddm-gz-", dir=root))
        atexit.register(shutil.rmtree, _gz_dir, True)
    return _gz_dir


def decompressed_path(info: MrcInfo) -> Path:
    """An uncompressed copy of a `.gz`/`.bz2` file, made once per process and memory-mapped
    afterwards (removed at exit; `CRYODDM_CACHE_DIR` picks the folder)."""
    st = info.path.stat()
    key = (str(info.path.resolve()), st.st_mtime_ns, st.st_size)
    with _gz_lock:
        hit = _gz_cache.get(key)
        if hit is not None and hit.exists():
            return hit
        target = _cache_dir() / f"{len(_gz_cache):06d}_{micrograph_stem_safe(info.path)}.mrc"
        ny, nx = info.image_shape
        expected = 1024 + info.nsymbt + _data_bytes(nx, ny, info.n_images, info.mode, np.dtype(info.dtype))
        try:
            with _open_stream(info.path) as src, atomic_write(target, overwrite=True) as tmp:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                size = Path(tmp).stat().st_size
                if size < expected:
                    raise InputError(
                        info.path, f"truncated: decompressed it holds {size} bytes, the header promises {expected}"
                    )
        except InputError:
            raise
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(info.path, f"cannot decompress ({exc})") from None
        _gz_cache[key] = target
        return target


def micrograph_stem_safe(path: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in path.name)[:80]


def memmap(info: MrcInfo) -> np.ndarray:
    """All pixels as a read-only memory map shaped like `info.shape` (`.gz` decompressed once)."""
    source = decompressed_path(info) if info.compressed else info.path
    try:
        if info.mode == 101:  # unpacked into memory: 4-bit files are small
            ny, nx = info.image_shape
            packed = np.memmap(
                source, dtype=np.uint8, mode="r", offset=1024 + info.nsymbt, shape=(*info.shape[:-1], (nx + 1) // 2)
            )
            return _unpack_4bit(np.asarray(packed), nx)
        return np.memmap(source, dtype=np.dtype(info.dtype), mode="r", offset=1024 + info.nsymbt, shape=info.shape)
    except (ValueError, OSError) as exc:
        raise InputError(info.path, f"cannot read the pixels ({exc})") from None


def read_slice(info: MrcInfo, index: int | None = None) -> np.ndarray:
    """Image `index` of the file (None: its only image) as a float32 array, read from the map."""
    data = memmap(info)
    n = info.n_images
    if data.ndim == 3:
        if index is None:
            if n != 1:
                raise InputError(info.path, f"holds {n} images; choose one")
            index = 0
        if not -n <= index < n:
            raise InputError(info.path, f"has no image {index} (it holds {n})")
        data = data[index]
    elif index not in (None, 0, -1):
        raise InputError(info.path, f"holds one image; there is no image {index}")
    try:
        if np.iscomplexobj(data):  # modes 3 and 4 (Fourier transforms): show the amplitude
            return np.abs(data).astype(np.float32)
        return np.array(data, dtype=np.float32)
    except OSError as exc:  # e.g. the file shrank after its header was read
        raise InputError(info.path, f"cannot read the pixels ({exc})") from None


def read_image(path: str | os.PathLike[str], index: int | None = None, info: MrcInfo | None = None) -> np.ndarray:
    """One 2-D image as float32: the file's only image, or slice `index` of a stack."""
    info = info or read_header(path)
    return read_slice(info, index)


def read_micrograph(path: str | os.PathLike[str]) -> tuple[np.ndarray, MrcInfo]:
    """A micrograph as float32 with its header; a one-image stack counts as a micrograph."""
    info = read_header(path)
    if info.n_images != 1:
        raise InputError(path, f"is a stack of {info.n_images} images, not a micrograph")
    return read_image(path, info=info), info


def ascii_label(text: str) -> str:
    """An MRC label: printable ASCII only (mrcfile refuses anything else, so a name such as
    `mïc 000.mrc` would fail the write), at most 80 characters. Others become `?`."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(text))[:80]


def write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray,
    voxel_size: float | None = None,
    overwrite: bool = False,
    labels: Sequence[str] = (),
    dtype=np.float32,
    stamp: bool = True,
) -> Path:
    """Write `data` atomically (temporary file, then rename) as float32 unless told otherwise.

    `stamp=False` drops mrcfile's "Created by mrcfile.py <time>" label, so seeded outputs (the
    sample data) are byte-identical from run to run."""
    path = Path(path)
    arr = np.ascontiguousarray(data, dtype=dtype)
    with atomic_write(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            if not stamp:
                mrc.header.label[0] = b""
                mrc.header.nlabl = 0
            mrc.set_data(arr)
            if arr.ndim == 3 and path.name.lower().endswith((".mrcs", ".mrcs.gz")):
                mrc.header.ispg = 0
            if voxel_size:
                mrc.voxel_size = float(voxel_size)
            for label in list(labels)[:10]:
                mrc.add_label(ascii_label(label))
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


def write_mrc_slices(
    path: str | os.PathLike[str],
    shape: tuple[int, ...],
    slices,
    voxel_size: float | None = None,
    overwrite: bool = False,
    labels: Sequence[str] = (),
    volume: bool = False,
) -> Path:
    """Write a float32 MRC image or stack slice by slice (`slices` yields 2-D arrays), through a
    memory map, atomically: a 100-micrograph lazy stack never has to fit in memory."""
    path = Path(path)
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise CryoDDMError(f"cannot write an image of shape {shape} as MRC")
    with atomic_write(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.new_mmap(tmp, shape=shape, mrc_mode=2, overwrite=True)
        try:
            if len(shape) == 3:
                mrc.header.ispg = 1 if volume else 0
            target = mrc.data if len(shape) == 3 else mrc.data[None]
            n = 0
            for k, image in enumerate(slices):
                if k >= target.shape[0]:
                    raise CryoDDMError(f"more slices than the shape {shape} holds")
                target[k] = np.asarray(image, dtype=np.float32)
                n += 1
            if n != target.shape[0]:
                raise CryoDDMError(f"got {n} slices for a stack of {target.shape[0]}")
            if voxel_size:
                mrc.voxel_size = float(voxel_size)
            for label in list(labels)[:10]:
                mrc.add_label(ascii_label(label))
            mrc.update_header_stats()
        finally:
            mrc.close()
    return path
