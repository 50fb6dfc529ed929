"""The STAR output (checked before anything is read, replaced only if this tool wrote it) and the
job `convert`: one particle set (+ passthroughs) → one STAR file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .. import __version__
from ..errors import CryoDDMError, InputError, OutputExistsError
from ..io.cryosparc import load_cs
from ..io.star import write_particles_star
from ..jobs import CancelToken, Job, Progress
from ..safety import check_location, check_writable
from .config import Cs2StarConfig, Cs2StarResult, StarTables
from .tables import build_tables

STAR_HEADER = "napari-cryoddm cs2star"


def _ours(path: Path) -> bool:
    """A STAR this tool wrote: its first line is our header comment."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith(f"# {STAR_HEADER}")
    except OSError:
        return False


def check_star_output(path: Path, inputs: Sequence[object], overwrite: bool) -> None:
    """Before reading anything: the output is not an input, not a folder, in a writable place, and
    replaced only when asked and only if this tool wrote it (a user's STAR is never replaced)."""
    check_location(path, inputs, what="the STAR output")
    if os.path.lexists(path):
        if path.is_dir():
            raise InputError(
                path,
                "is a folder; give a file name ending in .star (or use --job-dir for a folder of class0 … outputs)",
            )
        if not overwrite:
            raise OutputExistsError(path)
        if not _ours(path):
            raise InputError(
                path, f"was not written by cryoddm cs2star (no '# {STAR_HEADER}' first line); refusing to replace it"
            )
    check_writable(path.parent)


def write_star(path: Path, tables: StarTables, overwrite: bool) -> Path:
    if overwrite and path.exists() and not _ours(path):
        raise InputError(path, "was not written by cryoddm cs2star; refusing to replace it")
    return write_particles_star(
        path, tables.particles, tables.optics, overwrite=overwrite, header=f"{STAR_HEADER} {__version__}"
    )


def legacy_invert_table(tables: StarTables) -> pd.DataFrame:
    """The original CryoDDM's invert.star: rlnCoordinateY ← height − Y (undoes the Y inversion)."""
    p = tables.particles
    if "rlnCoordinateY" not in p.columns or tables.heights is None:
        raise CryoDDMError("--legacy-invert needs particle coordinates (location/* fields)")
    out = p.copy()
    out["rlnCoordinateY"] = tables.heights - p["rlnCoordinateY"].to_numpy()
    return out


LEGACY_WARNING = (
    "the legacy invert.star flips Y back (Y' = height − Y), undoing the conversion's own Y "
    "inversion: its particles sit at mirrored rows unless your micrographs are "
    "Y-flipped against cryoSPARC's. Check it with an overlay before using it."
)


def convert(
    particles: str | os.PathLike[str],
    passthroughs: Sequence[str | os.PathLike[str]] = (),
    output: str | os.PathLike[str] = "particles.star",
    config: Cs2StarConfig | None = None,
    cancel: CancelToken | None = None,
) -> Job[Cs2StarResult]:
    """Job: convert PARTICLES.cs (+ passthroughs) into one STAR file (and `*_invert.star`)."""
    config = config or Cs2StarConfig()
    cancel = cancel or CancelToken()
    output = Path(output)
    invert_path = output.with_name(output.stem + "_invert.star")
    files = [Path(particles), *map(Path, passthroughs)]
    for p in [output] + ([invert_path] if config.legacy_invert else []):
        check_star_output(p, [files, config.raw_micrographs], config.overwrite)
    total = len(files) + 2
    tables_in = []
    for i, f in enumerate(files):
        cancel.raise_if_cancelled()
        yield Progress(i, total, f"reading {f.name}")
        tables_in.append(load_cs(f))
    cancel.raise_if_cancelled()
    yield Progress(len(files), total, "mapping fields")
    tables = build_tables(tables_in[0], tables_in[1:], config)
    cancel.raise_if_cancelled()
    yield Progress(len(files) + 1, total, f"writing {output.name}")
    invert = legacy_invert_table(tables) if config.legacy_invert else None
    outputs = [write_star(output, tables, config.overwrite)]
    if invert is not None:
        try:
            write_star(invert_path, replace(tables, particles=invert), config.overwrite)
        except BaseException:
            output.unlink(missing_ok=True)
            raise
        outputs.append(invert_path)
        tables.notes.append(LEGACY_WARNING)
    result = result_of(outputs, tables)
    yield Progress(total, total, "done", {"result": result})
    return result


def result_of(outputs: list[Path], tables: StarTables) -> Cs2StarResult:
    p = tables.particles
    n_mic = int(p["rlnMicrographName"].nunique()) if "rlnMicrographName" in p.columns else 0
    return Cs2StarResult(outputs, int(len(p)), n_mic, list(p.columns), tables.scale, list(tables.notes))
