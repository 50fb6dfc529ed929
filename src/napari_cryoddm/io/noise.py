"""The original program's noise coordinates text: one `name x y` line per box, x = column, y = row.

Lines such as `stack_0009_2x_dfpt.mrc 3274 2914` round-trip, so files move between the original
program and this one. CRLF endings and blank lines (both in the original's example) are accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_write
from ..errors import CryoDDMError, InputError

COLUMNS = ("micrograph", "x", "y")


def empty_noise_table() -> pd.DataFrame:
    return pd.DataFrame(
        {"micrograph": pd.Series([], dtype=str), "x": pd.Series([], dtype=np.int64), "y": pd.Series([], dtype=np.int64)}
    )


def read_noise_txt(path: str | os.PathLike[str], allow_empty: bool = False) -> pd.DataFrame:
    """Read a noise coordinates file; a malformed line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "not a text file") from None
    names, xs, ys = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise InputError(path, f"line {lineno}: expected 'micrograph x y', got {line!r}")
        try:
            x, y = float(parts[1]), float(parts[2])
        except ValueError:
            raise InputError(path, f"line {lineno}: x and y must be numbers, got {line!r}") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(path, f"line {lineno}: x and y must be finite, got {line!r}")
        names.append(parts[0])
        xs.append(int(round(x)))
        ys.append(int(round(y)))
    if not names and not allow_empty:
        raise InputError(path, "holds no noise boxes")
    if not names:
        return empty_noise_table()
    return pd.DataFrame({"micrograph": names, "x": np.array(xs, dtype=np.int64), "y": np.array(ys, dtype=np.int64)})


def write_noise_txt(path: str | os.PathLike[str], df: pd.DataFrame, overwrite: bool = True) -> Path:
    """Write atomically, one `name x y` line per box, in the table's order, duplicates dropped."""
    bad = [n for n in df["micrograph"].astype(str) if not n or any(c.isspace() for c in n)]
    if bad:
        raise CryoDDMError(f"micrograph names must not be empty or contain spaces: {bad[:3]}")
    table = df.loc[:, list(COLUMNS)].copy()
    table["x"] = np.round(np.asarray(table["x"], dtype=np.float64)).astype(np.int64)
    table["y"] = np.round(np.asarray(table["y"], dtype=np.float64)).astype(np.int64)
    table = table.drop_duplicates()
    lines = [f"{n} {x} {y}\n" for n, x, y in table.itertuples(index=False)]
    with atomic_write(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text("".join(lines), encoding="utf-8")
    return Path(path)
