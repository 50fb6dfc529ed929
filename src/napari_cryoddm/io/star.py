"""RELION STAR coordinates through starfile: every dialect into one table, RELION 3.1 out.

The table has `micrograph` (the name as the file gives it, or the file's stem for RELION's
per-micrograph coordinate files), `x` (column) and `y` (row) in pixels with the origin at the
first stored pixel, and every other column under its RELION name.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..atomic import atomic_write
from ..errors import InputError

_X = ("rlnCoordinateX", "CoordinateX")
_Y = ("rlnCoordinateY", "CoordinateY")


def read_star_blocks(path: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file (loop blocks as tables, simple blocks as one-row tables)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on non-STAR text
        where = _bad_row(path)
        raise InputError(path, where or f"not a readable STAR file ({exc})") from None
    out: dict[str, pd.DataFrame] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            out[name] = block
        elif isinstance(block, dict):
            out[name] = pd.DataFrame([block])
    if not out:
        raise InputError(path, "holds no data blocks")
    return out


def _bad_row(path: Path) -> str | None:
    """The first loop row whose number of values differs from its columns ('line N: …'), so a
    name with an unquoted space is reported where it is, not as pandas' 'Length mismatch'."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    columns = 0
    in_header = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            columns, in_header = 0, False
        elif line == "loop_":
            columns, in_header = 0, True
        elif line.startswith("_"):
            columns = columns + 1 if in_header else 0
        elif columns:
            in_header = False
            try:
                values = shlex.split(line, comments=False, posix=True)
            except ValueError:
                values = line.split()
            if len(values) != columns:
                hint = ' (a name with a space must be quoted: "my mic.mrc")' if len(values) > columns else ""
                return f"line {number}: {len(values)} values for {columns} columns{hint}: {line[:120]!r}"
    return None


def _first(columns, candidates) -> str | None:
    return next((c for c in candidates if c in columns), None)


def read_coordinates(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Particle or coordinate STAR (RELION 3.0, 3.1, 5; crYOLO CBOX) → micrograph, x, y, …"""
    path = Path(path)
    blocks = read_star_blocks(path)
    chosen = None
    for name in ("particles", *blocks):
        block = blocks.get(name)
        if block is not None and _first(block.columns, _X) and _first(block.columns, _Y):
            chosen = block
            break
    if chosen is None:
        found = "; ".join(
            f"data_{n}: " + ", ".join(map(str, list(b.columns)[:6])) + (" …" if len(b.columns) > 6 else "")
            for n, b in blocks.items()
        )
        hint = (
            " (a list of particle images, not coordinates)"
            if any("rlnImageName" in b.columns for b in blocks.values())
            else ""
        )
        raise InputError(path, f"no coordinate columns (rlnCoordinateX and rlnCoordinateY){hint}; it holds {found}")
    df = chosen.copy()
    xcol, ycol = _first(df.columns, _X), _first(df.columns, _Y)
    x = pd.to_numeric(df[xcol], errors="coerce").to_numpy(np.float64)
    y = pd.to_numeric(df[ycol], errors="coerce").to_numpy(np.float64)
    if "Width" in df.columns and "Height" in df.columns and xcol == "CoordinateX":
        # crYOLO CBOX stores the lower-left corner of the box; the centre is half a box on
        x = x + pd.to_numeric(df["Width"], errors="coerce").to_numpy(np.float64) / 2
        y = y + pd.to_numeric(df["Height"], errors="coerce").to_numpy(np.float64) / 2
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"{int(bad.sum())} rows have non-numeric coordinates (first: row {row + 1})")
    if "rlnMicrographName" in df.columns:
        mic = df["rlnMicrographName"].astype(str)
    else:
        mic = pd.Series([path.stem] * len(df), index=df.index)
    rest = df.drop(columns=[c for c in (xcol, ycol) if c in df.columns])
    out = pd.concat(
        [
            pd.DataFrame({"micrograph": mic.to_numpy(), "x": x, "y": y}, index=df.index),
            rest.drop(columns=["rlnMicrographName"], errors="ignore"),
        ],
        axis=1,
    )
    return out.reset_index(drop=True)


def write_coordinates_star(path: str | os.PathLike[str], df: pd.DataFrame, overwrite: bool = False) -> Path:
    """A RELION coordinate/particle table (`micrograph`, `x`, `y`, extra rln columns kept)."""
    table = pd.DataFrame(
        {
            "rlnMicrographName": df["micrograph"].astype(str).to_numpy(),
            "rlnCoordinateX": np.asarray(df["x"], dtype=np.float64),
            "rlnCoordinateY": np.asarray(df["y"], dtype=np.float64),
        }
    )
    for col in df.columns:
        if col.startswith("rln") and col not in table.columns:
            table[col] = df[col].to_numpy()
    return write_particles_star(path, table, None, overwrite=overwrite)


def write_particles_star(
    path: str | os.PathLike[str],
    particles: pd.DataFrame,
    optics: pd.DataFrame | None = None,
    overwrite: bool = False,
    header: str | None = None,
) -> Path:
    """RELION 3.1 (`data_optics` + `data_particles`), or one `data_particles` block without optics.

    `header` replaces starfile's first line (a comment with the time of writing) by `# <header>`,
    so seeded outputs (the sample data) are byte-identical from run to run.
    """
    path = Path(path)
    blocks = {"optics": optics, "particles": particles} if optics is not None else {"particles": particles}
    with atomic_write(path, overwrite=overwrite) as tmp:
        starfile.write(blocks, tmp, overwrite=True, float_format="%.6f")
        if header is not None:
            text = tmp.read_text()
            first, sep, rest = text.partition("\n")
            if first.startswith("#"):
                text = rest
            tmp.write_text(f"# {header}\n" + text)
    return path
