"""Coordinate-free picking: every candidate box scored by the structure it holds, the emptiest
proposed first (`rank_empty_boxes`); `structure_map` also screens boxes when coordinates exist."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .binning import fourier_bin
from .box_placement import blocked_by_boxes, candidate_grid, check_fits, greedy_place
from .normalise import Normalisation, normalise

#: The coordinate-free statistic is computed on a copy binned so the particle is this wide (px).
STRUCTURE_DIAMETER_PX = 24.0
#: The background (ice, gradients) removed before measuring structure: a Gaussian of this many
#: particle diameters (0.5 beat 1 and 2 on the sample data: `benchmarks/bench_picker.py`).
BACKGROUND_SIGMA = 0.5
#: Local energy is averaged over a square of this many diameters.
ENERGY_WINDOW = 1.0
#: A box's score looks this many diameters beyond its edges (a particle centred just outside
#: still reaches in).
REACH = 0.5


@dataclass
class StructureMap:
    """Per-box structure scores on the candidate grid (lower = emptier)."""

    ys: np.ndarray
    xs: np.ndarray
    score: np.ndarray  # (ny, nx): box score / the micrograph's median box score
    outlier: np.ndarray  # (ny, nx): box mean far from the micrograph's (carbon, ice edge, blob)
    factor: float  # bin factor the statistic was computed at


def structure_map(
    image: np.ndarray, diameter: float, box: int, step: int | None = None, margin: int = 0
) -> StructureMap:
    """Score every candidate box by the structure it holds.

    The image is robustly normalised (hot pixels clipped) and Fourier-binned so the particle is
    ~24 px wide; pixel noise is damped by a 1 px Gaussian, and ice, gradients and the slow parts
    of carbon edges are removed by subtracting a Gaussian of σ = half a particle diameter. The
    local energy of that band-passed image, averaged over a particle-sized square, is high
    wherever a particle (or its CTF fringes) lies. A box's score is the *largest* local energy
    within the box grown by half a diameter on each side — a particle reaching into a corner, or
    centred just outside, counts as much as one in the middle (the box mean dilutes it). Each
    choice was measured on the sample data (`benchmarks/bench_picker.py`). Scores are divided by
    the micrograph's median box score, so a threshold carries across micrographs; boxes whose
    mean background is > 3 robust σ from the micrograph's (carbon, vacuum, contamination) are
    flagged as outliers.
    """
    shape = image.shape
    step = int(step or max(1, box // 8))
    ys, xs = candidate_grid(shape, box, step, margin)
    factor = max(1.0, diameter / STRUCTURE_DIAMETER_PX)
    img = normalise(np.asarray(image, dtype=np.float32), Normalisation("robust", 0.1, 99.9))
    small = fourier_bin(img, factor) if factor > 1.0 + 1e-6 else img
    d_b = diameter / factor
    low = ndimage.gaussian_filter(small, 1.0, mode="reflect")
    background = ndimage.gaussian_filter(small, BACKGROUND_SIGMA * d_b, mode="reflect")
    band = low - background
    energy = ndimage.uniform_filter(band * band, size=max(3, int(round(ENERGY_WINDOW * d_b))), mode="reflect")
    wb = max(1, int(round(box / factor)))
    reach = int(round(REACH * d_b))
    box_max = ndimage.maximum_filter(energy, size=wb + 2 * reach, mode="nearest")
    box_mean = ndimage.uniform_filter(background, size=wb, mode="nearest")
    # box centre in continuous pixel coordinates, then in the binned frame (x_b = x / f)
    cy = (ys - box // 2 + (box - 1) / 2.0) / factor
    cx = (xs - box // 2 + (box - 1) / 2.0) / factor
    iy = np.clip(np.round(cy).astype(int), 0, small.shape[0] - 1)
    ix = np.clip(np.round(cx).astype(int), 0, small.shape[1] - 1)
    score = box_max[np.ix_(iy, ix)].astype(np.float64)
    mean = box_mean[np.ix_(iy, ix)].astype(np.float64)
    if score.size:
        med = float(np.median(score))
        score = score / med if med > 0 else score
        centre = float(np.median(mean))
        mad = 1.4826 * float(np.median(np.abs(mean - centre)))
        outlier = np.abs(mean - centre) > 3.0 * mad if mad > 0 else np.zeros_like(mean, bool)
    else:
        outlier = np.zeros_like(score, dtype=bool)
    return StructureMap(ys, xs, score, outlier, factor)


def rank_empty_boxes(
    image: np.ndarray,
    diameter: float,
    box: int,
    max_boxes: int = 100,
    overlap: float = 0.0,
    threshold: float = 0.9,
    existing_xy=(),
    margin: int = 0,
    step: int | None = None,
    name: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """The emptiest boxes first: ((n, 2) integer (x, y) centres, their scores).

    Candidates with a score above `threshold` (relative to the micrograph's median box) or with
    an outlying background level are never proposed; accepted boxes keep the overlap rule.
    """
    check_fits(image.shape, box, margin, name or "micrograph")
    step = int(step or max(1, box // 8))
    smap = structure_map(image, diameter, box, step, margin)
    ys, xs = smap.ys, smap.xs
    blocked = (smap.score > threshold) | smap.outlier | blocked_by_boxes(ys, xs, existing_xy, box, overlap)
    flat_score = smap.score.reshape(-1)
    free = np.flatnonzero(~blocked.reshape(-1))
    # stable sort: ties broken by grid position, so results are deterministic
    order = free[np.argsort(flat_score[free], kind="stable")]
    chosen = greedy_place(order, ys, xs, box, step, overlap, blocked, max_boxes)
    xy = np.array(chosen, dtype=np.int64).reshape(-1, 2)
    # grid indices of the chosen centres (xs, ys are sorted) → their scores
    scores = smap.score[np.searchsorted(ys, xy[:, 1]), np.searchsorted(xs, xy[:, 0])]
    return xy, scores.astype(np.float64)
