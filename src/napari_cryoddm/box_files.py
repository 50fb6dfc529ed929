"""Noise-box files: read and write `name x y` text or RELION STAR, tell a noise-box file from a
particle STAR, and check the output before picking (merge into or replace only noise-box files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .errors import CryoDDMError, InputError, OutputExistsError
from .io.noise import read_noise_txt, write_noise_txt
from .io.star import read_coordinates, read_star_blocks, write_coordinates_star
from .safety import check_location, check_writable


def read_boxes(path: str | os.PathLike[str], allow_empty: bool = False) -> pd.DataFrame:
    """Noise boxes `micrograph, x, y` from `.star` (RELION) or the original `name x y` text."""
    path = Path(path)
    if path.suffix.lower() == ".star":
        df = read_coordinates(path)
        if len(df) == 0 and not allow_empty:
            raise InputError(path, "holds no boxes")
        return df.loc[:, ["micrograph", "x", "y"]]
    return read_noise_txt(path, allow_empty=allow_empty)


NOISE_COLUMNS = {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"}


def noise_file_problem(path: str | os.PathLike[str]) -> str | None:
    """None for a noise-box file: `name x y` text, or a STAR holding nothing but micrograph names
    and coordinates (what `write_boxes` writes); else why not (a particle STAR with optics,
    angles or CTF is not one, nor is a malformed text)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".star":
            blocks = read_star_blocks(path)
            extra = sorted({c for b in blocks.values() for c in b.columns} - NOISE_COLUMNS)
            if len(blocks) != 1 or extra:
                return f"it holds {', '.join(f'data_{n}' for n in blocks)}" + (
                    f" with {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}" if extra else ""
                )
            return None
        read_noise_txt(path, allow_empty=True)
        return None
    except InputError as exc:
        return exc.problem
    except (CryoDDMError, OSError, ValueError) as exc:
        return str(exc)


def is_noise_file(path: str | os.PathLike[str]) -> bool:
    """True for a noise-box file (see `noise_file_problem`)."""
    return noise_file_problem(path) is None


def _not_noise(path: Path, problem: str, action: str) -> InputError:
    return InputError(
        path,
        f"is not a noise-box file ({problem}); refusing to {action} it — "
        "pick-noise merges into and replaces only noise-box files (name x y, "
        "or a STAR with only micrograph names and coordinates)",
    )


def check_boxes_output(
    path: str | os.PathLike[str], inputs: Sequence[object] = (), merge: bool = False, overwrite: bool = False
) -> pd.DataFrame | None:
    """Before picking: the output is a `.txt` or `.star` name, not an input or a folder, in a
    writable place; an existing one is merged into (returned) or replaced only when asked and only
    if it is a noise-box file — never a particle STAR. Returns the boxes to merge with, if any."""
    path = Path(path)
    check_location(path, inputs, what="the noise-box output")
    if path.suffix.lower() not in (".txt", ".star"):
        raise CryoDDMError(f"{path}: the output must end in .txt (name x y) or .star")
    if os.path.lexists(path):
        if path.is_dir():
            raise InputError(path, "is a folder; give a file name ending in .txt or .star")
        if not (merge or overwrite):
            raise OutputExistsError(path, "pass --merge to add to its boxes or --overwrite to replace it")
        problem = noise_file_problem(path)
        if problem is not None:
            raise _not_noise(path, problem, "merge into" if merge else "replace")
    check_writable(path.parent)
    if merge and path.exists():
        return read_boxes(path, allow_empty=True)
    return None


def write_boxes(path: str | os.PathLike[str], boxes: pd.DataFrame, overwrite: bool) -> Path:
    """Atomically, as `.star` (RELION 3.1) or the original text format (by the suffix). An
    existing file is replaced only if it is a noise-box file (`is_noise_file`), even when asked."""
    path = Path(path)
    problem = noise_file_problem(path) if overwrite and path.exists() else None
    if problem is not None:
        raise _not_noise(path, problem, "replace")
    if path.suffix.lower() == ".star":
        return write_coordinates_star(path, boxes.loc[:, ["micrograph", "x", "y"]], overwrite=overwrite)
    if path.suffix.lower() != ".txt":
        raise CryoDDMError(f"{path}: noise boxes are saved as .txt (name x y) or .star")
    return write_noise_txt(path, boxes, overwrite=overwrite)
