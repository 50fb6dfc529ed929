"""One normalisation, shared by forward and predict, so training and inference see the same data.

Robust by default: real micrographs have hot pixels (fei-extended: 13,556 against a mean of
3,526) that squeeze min–max scaling into a sliver of the range. The statistics come from a bounded,
strided subsample, so a 8k micrograph costs no more than a 1k one to analyse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import CryoDDMError, InputError

_MAX_STAT_PIXELS = 1 << 20  # ~1 M pixels are plenty for percentiles, median and MAD


@dataclass(frozen=True)
class Normalisation:
    """`robust`: clip at the `low`/`high` percentiles, centre on the median, divide by 1.4826·MAD.
    `minmax`: the original program's per-micrograph scaling to [0, 1]."""

    method: str = "robust"
    low: float = 0.1
    high: float = 99.9

    def __post_init__(self) -> None:
        if self.method not in ("robust", "minmax"):
            raise CryoDDMError(f"unknown normalisation {self.method!r} (robust or minmax)")
        if not 0 <= self.low < self.high <= 100:
            raise CryoDDMError(
                f"normalisation percentiles must satisfy 0 ≤ low < high ≤ 100, got {self.low}, {self.high}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Normalisation:
        return cls(**d) if d else cls()


MINMAX = Normalisation("minmax", 0.0, 100.0)


def _subsample(image: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil(np.sqrt(image.size / _MAX_STAT_PIXELS))))
    return np.asarray(image[::step, ::step], dtype=np.float32)


def normalisation_stats(image: np.ndarray, spec: Normalisation) -> tuple[float, float, float, float]:
    """(clip_low, clip_high, offset, scale): normalised = (clip(x, lo, hi) − offset) / scale."""
    sample = _subsample(image)
    if spec.method == "minmax":
        lo, hi = float(sample.min()), float(sample.max())
        if sample.shape != image.shape:  # min/max must see every pixel
            lo, hi = float(np.min(image)), float(np.max(image))
        return lo, hi, lo, (hi - lo) or 1.0
    lo, hi = (float(v) for v in np.percentile(sample, [spec.low, spec.high]))
    clipped = np.clip(sample, lo, hi)
    med = float(np.median(clipped))
    mad = float(np.median(np.abs(clipped - med))) * 1.4826
    if mad <= 0:
        mad = float(clipped.std()) or 1.0
    return lo, hi, med, mad


def normalise(
    image: np.ndarray, spec: Normalisation = Normalisation(), stats: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Return a float32 copy of `image` normalised by `spec` (stats computed unless given)."""
    lo, hi, offset, scale = stats if stats is not None else normalisation_stats(image, spec)
    out = np.clip(np.asarray(image, dtype=np.float32), lo, hi)
    out -= np.float32(offset)
    out /= np.float32(scale)
    return out


def check_finite(image: np.ndarray, source: str) -> None:
    """NaN or infinite pixels poison every later step; refuse them with the file's name."""

    if not np.isfinite(_subsample(image)).all() or not np.isfinite(image).all():
        bad = int(np.size(image) - np.isfinite(image).sum())
        raise InputError(source, f"{bad} pixels are NaN or infinite")


def check_not_blank(image: np.ndarray, source: str) -> None:
    """A micrograph whose pixels are all equal (an all-zero frame, a failed export) has no noise
    to learn from and no boxes to rank; refuse it with the file's name."""

    if image.size and float(np.max(image)) == float(np.min(image)):
        raise InputError(
            source,
            f"all pixels are {float(np.min(image)):g}: a blank micrograph (failed export or empty frame); leave it out",
        )
