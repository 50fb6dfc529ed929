"""cryoSPARC `.cs` particle files: numpy structured arrays or the compressed CSDAT stream.

`load_cs` reads both through cryosparc-tools (`Dataset.load`, offline, memory-mapped for the numpy
format) and falls back to `numpy.load(allow_pickle=False)` when cryosparc-tools is missing. The
result is a `CsTable`: plain numpy columns keyed by cryoSPARC field name (`blob/path`,
`location/center_x_frac`, …), byte strings decoded to `str`, so the converter never depends on
which reader ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

# The first bytes of the two formats cryoSPARC writes.
_NUMPY_MAGIC = b"\x93NUMPY"
_CSDAT_MAGIC = b"\x95CSDAT"


@dataclass
class CsTable:
    """One `.cs` file as columns: `table["ctf/df1_A"]` → a numpy array with one entry per row;
    `len(table)` is the number of rows."""

    path: Path
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    n_rows: int = 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return self.n_rows

    def fields(self) -> list[str]:
        return list(self.columns)

    def prefixes(self) -> list[str]:
        """`blob`, `ctf`, `location`, … in file order."""
        return list(dict.fromkeys(f.split("/", 1)[0] for f in self.columns if "/" in f))

    def take(self, index: np.ndarray) -> CsTable:
        """The rows at `index` (an integer array), in that order."""
        return CsTable(self.path, {k: v[index] for k, v in self.columns.items()}, int(len(index)))


def _decode(column: np.ndarray) -> np.ndarray:
    """Fixed-width byte strings (numpy format) and object columns (cryosparc-tools) → str objects."""
    if column.dtype.kind == "S":
        return np.array([b.decode("utf-8", errors="replace") for b in column.tolist()], dtype=object)
    if column.dtype.kind == "U":
        return column.astype(object)
    if column.dtype.kind == "O":
        return np.array(
            [b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b) for b in column.tolist()],
            dtype=object,
        )
    return column


def _sniff(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None


def _from_records(path: Path, arr: np.ndarray) -> CsTable:
    if arr.dtype.names is None:
        raise InputError(path, "is a numpy array without named fields, not a cryoSPARC .cs file")
    arr = np.atleast_1d(arr)
    cols = {name: _decode(np.asarray(arr[name])) for name in arr.dtype.names}
    return CsTable(path, cols, int(arr.shape[0]))


def _load_with_tools(path: Path) -> CsTable | None:
    try:
        from cryosparc.dataset import Dataset
    except ImportError:  # cryosparc-tools is optional at run time; numpy reads the classic format
        return None
    try:
        header = Dataset.inspect(path)
        ds = Dataset.load(path)
    except Exception:  # DatasetLoadError and friends: let the caller explain
        return None
    stored = [f[0] for f in header.get("dtype", [])]
    if "uid" not in stored:  # Dataset.load invents random uids; a particle file has its own
        raise InputError(
            path, f"has no 'uid' field, so it is not a cryoSPARC particle file (fields: {', '.join(stored[:8])})"
        )
    cols = {name: _decode(np.asarray(ds[name])) for name in ds.fields()}
    return CsTable(path, cols, int(len(ds)))


def load_cs(path: str | os.PathLike[str]) -> CsTable:
    """Read a cryoSPARC `.cs` file (numpy or CSDAT); raise `InputError` for anything else."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a cryoSPARC .cs file")
    magic = _sniff(path)
    if not (magic.startswith(_NUMPY_MAGIC) or magic.startswith(_CSDAT_MAGIC)):
        kind = "an empty file" if not magic else "neither a numpy .cs nor a compressed CSDAT .cs file"
        raise InputError(
            path,
            f"is {kind}; expected a cryoSPARC particle file such as "
            "J12_005_particles.cs or J12_passthrough_particles.cs",
        )
    table = _load_with_tools(path)
    if table is None:
        if magic.startswith(_CSDAT_MAGIC):
            raise InputError(
                path,
                "is a compressed CSDAT .cs file and could not be read; "
                "install cryosparc-tools (pip install cryosparc-tools) to read it",
            )
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
        except Exception as exc:  # ValueError, OSError, EOFError on damaged files
            raise InputError(path, f"is not a readable cryoSPARC .cs file ({exc})") from None
        table = _from_records(path, arr)
    if "uid" not in table.columns:
        raise InputError(
            path,
            f"has no 'uid' field, so it is not a cryoSPARC particle file (fields: {', '.join(table.fields()[:8])})",
        )
    return table
