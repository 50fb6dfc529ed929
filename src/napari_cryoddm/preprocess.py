"""Read → check → bin → normalise: the one path from a micrograph to what the network sees.

The forward step, `train --fresh-noise` and prediction all go through it, so a model always sees
micrographs prepared exactly as its training crops were (the normalisation contract of
`docs/formats.md`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .binning import fourier_bin
from .io.mrc import MrcInfo, read_micrograph
from .normalise import Normalisation, check_finite, check_not_blank, normalisation_stats, normalise


@dataclass
class Prepared:
    """A micrograph read, binned and normalised: what the network sees, plus how to undo it."""

    path: Path
    info: MrcInfo | None
    image: np.ndarray
    stats: tuple[float, float, float, float]
    voxel_size: float
    bin_factor: float


def prepare(
    raw: np.ndarray,
    factor: float,
    spec: Normalisation,
    source: str = "image",
    path: Path | None = None,
    info: MrcInfo | None = None,
    voxel_size: float = 0.0,
) -> Prepared:
    """Check (finite before binning, so the error can point at pixels; not blank after), bin by
    `factor` in Fourier space, normalise by `spec`."""
    check_finite(raw, source)
    factor = float(factor or 1.0)
    if factor != 1:
        raw = fourier_bin(raw, factor)
    check_not_blank(raw, source)
    stats = normalisation_stats(raw, spec)
    image = normalise(raw, spec, stats)
    vs = (info.voxel_size if info is not None else voxel_size) or 0.0
    return Prepared(path or Path(f"<{source}>"), info, image, stats, vs * factor, factor)


def read_prepared(path: str | os.PathLike[str], factor: float, spec: Normalisation) -> Prepared:
    """`prepare` of one micrograph file."""
    raw, info = read_micrograph(path)
    return prepare(raw, factor, spec, str(path), Path(path), info)


def restore_intensity(pred: np.ndarray, prep: Prepared, intensity: str) -> np.ndarray:
    """Map back to the input's units when asked: the inverse of the normalisation's affine part."""
    if intensity == "input":
        _lo, _hi, offset, scale = prep.stats
        pred *= np.float32(scale)
        pred += np.float32(offset)
    return pred
