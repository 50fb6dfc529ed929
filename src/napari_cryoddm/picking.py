"""Noise picking: square background boxes that forward crops as real noise (step 1 of CryoDDM).

A noise box is the forward window W (what forward cuts around each noise centre), so the box
tested for particles is the box that will be used — the original tested a smaller one. Two
automatic modes share one greedy placement:

* **from particles**: candidate centres on a grid (step box/8) inside the micrograph, visited in
  a seeded random order, accepted when no particle disc (the particle diameter around each
  particle centre) reaches into the box and the box overlaps already accepted boxes (manual ones
  included) by at most a set fraction of its area;
* **coordinate-free**: the same grid ranked by how little structure each box holds (see
  `structure_map`), the emptiest proposed first.

Geometry (RELION: x = column, y = row, pixel centres at integers): a box of side `b` centred on
(x, y) covers pixel columns `x - b//2 … x - b//2 + b - 1` — exactly forward's crop
`[x - W/2, x + W/2)` — i.e. the continuous square `[x - b//2 - 0.5, x - b//2 + b - 0.5]`.
A particle disc reaches into a box when its centre is closer than d/2 to that square.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .binning import bin_factor as _bin_factor
from .binning import fourier_bin
from .errors import CryoDDMError, InputError
from .io.mrc import read_header, read_micrograph
from .io.noise import empty_noise_table, read_noise_txt, write_noise_txt
from .io.star import read_coordinates, write_coordinates_star
from .jobs import CancelToken, Job, Progress
from .names import match_names, micrograph_stem
from .normalise import Normalisation, check_finite, check_not_blank, normalise
from .params import diameter_px as _diameter_px
from .params import window_for_diameter

#: Below this many boxes in total the denoiser is starved of distinct noise (a probe: ~60 patches
#: barely beat the raw data, ~270 did clearly better), so the yield report warns.
MIN_TRAINING_BOXES = 300

#: The coordinate-free statistic is computed on a copy binned so the particle is this wide (px).
STRUCTURE_DIAMETER_PX = 24.0
#: The background (ice, gradients) removed before measuring structure: a Gaussian of this many
#: particle diameters (0.5 beat 1 and 2 on the sample data: `benchmarks/bench_picker.py`).
BACKGROUND_SIGMA = 0.5
#: `--screen`: with coordinates, boxes scoring above this multiple of the median are left out.
SCREEN_SCORE = 3.0
#: Local energy is averaged over a square of this many diameters.
ENERGY_WINDOW = 1.0
#: A box's score looks this many diameters beyond its edges (a particle centred just outside
#: still reaches in).
REACH = 0.5


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class PickConfig:
    """Everything the noise picker needs besides the micrographs and the particle coordinates."""

    diameter: float | None = field(default=None, metadata={
        "help": "particle diameter in pixels of the micrographs given", "unit": "px",
        "widget": False})
    diameter_A: float | None = field(default=None, metadata={
        "help": "particle diameter in Å (turned into pixels with the header's pixel size)",
        "unit": "Å", "flag": "--diameter-A", "widget": False})
    box: int | None = field(default=None, metadata={
        "help": "noise box side; default: the forward window W = (⌊1.5·d⌋ // 128 + 1)·128",
        "unit": "px", "widget": False})
    bin: float | None = field(default=None, metadata={
        "help": "the bin factor forward will use (--bin there): the default box is then the "
                "binned window W scaled back to these micrographs' pixels", "widget": False})
    target_apix: float | None = field(default=None, metadata={
        "help": "the pixel size forward will bin to (--target-apix there), instead of --bin",
        "unit": "Å/px", "widget": False})
    max_per_micrograph: int = field(default=100, metadata={
        "help": "most new boxes per micrograph", "label": "max per micrograph"})
    overlap: float = field(default=0.0, metadata={
        "help": "largest allowed overlap between two boxes, as a fraction of a box's area "
                "(0: boxes may touch but not overlap)"})
    seed: int = field(default=0, metadata={"help": "seed of the random visiting order"})
    edge_margin: int = field(default=0, metadata={
        "help": "keep boxes this far from the micrograph edges (motion-correction edge artefacts)",
        "unit": "px"})
    grid_step: int | None = field(default=None, metadata={
        "help": "candidate grid step; default box/8", "unit": "px", "widget": False})
    empty_threshold: float = field(default=0.9, metadata={
        "help": "coordinate-free mode: propose boxes whose structure score is at most this "
                "multiple of the micrograph's median box score (lower = stricter)",
        "label": "empty threshold"})
    screen: bool = field(default=False, metadata={
        "help": "with coordinates, also read the pixels and leave out boxes on contamination, "
                "carbon or vacuum (background level > 3 robust σ off) and on strong structure "
                "nobody picked", "label": "screen pixels"})
    allow_unmatched: bool = field(default=False, metadata={
        "help": "accept particle files that also name micrographs not given (a subset run)",
        "label": "allow unmatched names"})

    def validate(self) -> None:
        if self.max_per_micrograph < 1:  # 0 would write an empty noise file and call it done
            raise CryoDDMError(f"--max-per-micrograph must be at least 1, got {self.max_per_micrograph}")
        if self.seed < 0:
            raise CryoDDMError(f"--seed must be ≥ 0, got {self.seed}")
        if not 0.0 <= self.overlap < 1.0:
            raise CryoDDMError(f"--overlap is a fraction of the box area in [0, 1), got {self.overlap}")
        if self.box is not None and self.box < 2:
            raise CryoDDMError(f"--box must be at least 2 px, got {self.box}")
        if self.edge_margin < 0:
            raise CryoDDMError(f"--edge-margin must be ≥ 0, got {self.edge_margin}")
        if self.grid_step is not None and self.grid_step < 1:
            raise CryoDDMError(f"--grid-step must be ≥ 1, got {self.grid_step}")
        if self.empty_threshold <= 0:
            raise CryoDDMError(f"--empty-threshold must be positive, got {self.empty_threshold}")

    def resolve(self, apix: float | None) -> tuple[float, int]:
        """(diameter, box side) in pixels of the micrographs given (pixel size `apix` Å/px).

        Coordinates always stay in these pixels; when forward will bin by f, its window is
        W(d / f) binned pixels, i.e. W(d / f)·f of these, and that is the box tested.
        """
        d = _diameter_px(self.diameter, self.diameter_A, apix)
        if self.box:
            return d, int(self.box)
        factor = _bin_factor(apix, self.target_apix, self.bin)
        return d, int(math.ceil(window_for_diameter(d / factor) * factor - 1e-9))


# --------------------------------------------------------------------------------------------
# geometry


def box_inside(x, y, box: int, shape: tuple[int, int], margin: int = 0) -> np.ndarray:
    """True where the whole box (plus `margin`) lies inside a micrograph of `shape` = (ny, nx)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ny, nx = shape
    x0, y0 = x - box // 2, y - box // 2
    return (x0 >= margin) & (y0 >= margin) & (x0 + box <= nx - margin) & (y0 + box <= ny - margin)


def centre_range(n: int, box: int, margin: int = 0) -> tuple[int, int]:
    """Smallest and largest integer centre whose box fits in `n` pixels (lo > hi: none fits)."""
    return box // 2 + margin, n - (box - box // 2) - margin


def _axis_gap(c: np.ndarray, p: np.ndarray, box: int) -> np.ndarray:
    """Distance along one axis from particle coordinates `p` (P,) to box intervals at `c` (C,)."""
    lo = c[None, :] - box // 2 - 0.5
    hi = lo + box
    pp = p[:, None]
    return np.maximum(0.0, np.maximum(lo - pp, pp - hi))


def particle_box_distance(bx, by, box: int, px, py) -> np.ndarray:
    """(n_boxes, n_particles) Euclidean distance from each particle centre to each box square."""
    bx, by = np.atleast_1d(np.asarray(bx, float)), np.atleast_1d(np.asarray(by, float))
    px, py = np.atleast_1d(np.asarray(px, float)), np.atleast_1d(np.asarray(py, float))
    gx = _axis_gap(bx, px, box).T
    gy = _axis_gap(by, py, box).T
    return np.hypot(gx, gy)


def overlap_fraction(dx, dy, box: int) -> np.ndarray:
    """Shared area of two boxes of side `box` whose centres differ by (dx, dy), over a box's area."""
    ox = np.maximum(0.0, box - np.abs(np.asarray(dx, float)))
    oy = np.maximum(0.0, box - np.abs(np.asarray(dy, float)))
    return ox * oy / float(box * box)


def candidate_grid(shape: tuple[int, int], box: int, step: int | None = None,
                   margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integer candidate centres (ys, xs) whose boxes fit, on a grid centred in the micrograph."""
    step = int(step or max(1, box // 8))
    axes = []
    for n in shape:
        lo, hi = centre_range(int(n), box, margin)
        if hi < lo:
            axes.append(np.zeros(0, dtype=np.int64))
            continue
        span = hi - lo
        offset = (span % step) // 2
        axes.append(np.arange(lo + offset, hi + 1, step, dtype=np.int64))
    return axes[0], axes[1]


def particle_clear_mask(ys: np.ndarray, xs: np.ndarray, box: int, particles_xy: np.ndarray,
                        diameter: float) -> np.ndarray:
    """(len(ys), len(xs)) True where no particle disc of `diameter` reaches into the box.

    Each particle can only reach boxes whose centres lie in a small rectangle of the grid
    (found by binary search); the exact disc-to-square distance is tested there only.
    """
    clear = np.ones((len(ys), len(xs)), dtype=bool)
    pts = np.asarray(particles_xy, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0 or clear.size == 0:
        return clear
    r = diameter / 2.0
    r2 = r * r
    h = box // 2
    # gap < r along an axis  ⇔  p − (box − h) + 0.5 − r < c < p + h + 0.5 + r
    j0 = np.searchsorted(xs, pts[:, 0] - (box - h) + 0.5 - r, side="right")
    j1 = np.searchsorted(xs, pts[:, 0] + h + 0.5 + r, side="left")
    i0 = np.searchsorted(ys, pts[:, 1] - (box - h) + 0.5 - r, side="right")
    i1 = np.searchsorted(ys, pts[:, 1] + h + 0.5 + r, side="left")
    rows, cols = np.maximum(i1 - i0, 0), np.maximum(j1 - j0, 0)
    cells = rows * cols
    total = int(cells.sum())
    if total == 0:
        return clear
    # every (particle, grid cell) pair of those rectangles, flattened into one vectorised test
    k = np.repeat(np.arange(len(pts)), cells)
    t = np.arange(total) - np.repeat(np.cumsum(cells) - cells, cells)
    width = cols[k]
    iy = i0[k] + t // width
    jx = j0[k] + t % width
    lo_x = xs[jx] - h - 0.5  # the box's pixel-area interval [lo, lo + box] along x, then y
    lo_y = ys[iy] - h - 0.5
    gx = np.maximum(0.0, np.maximum(lo_x - pts[k, 0], pts[k, 0] - lo_x - box))
    gy = np.maximum(0.0, np.maximum(lo_y - pts[k, 1], pts[k, 1] - lo_y - box))
    hit = gx * gx + gy * gy < r2
    clear[iy[hit], jx[hit]] = False
    return clear


def _conflict_stencil(box: int, step: int, overlap: float) -> np.ndarray:
    """Grid offsets whose boxes would overlap a box at the origin by more than `overlap`."""
    k = int(math.ceil(box / step))
    offs = np.arange(-k, k + 1) * step
    frac = overlap_fraction(offs[:, None], offs[None, :], box)
    return frac > overlap + 1e-9


def _blocked_by(ys: np.ndarray, xs: np.ndarray, boxes_xy: np.ndarray, box: int,
                overlap: float) -> np.ndarray:
    """Grid cells whose box would overlap any of `boxes_xy` by more than `overlap`."""
    blocked = np.zeros((len(ys), len(xs)), dtype=bool)
    for bx, by in np.asarray(boxes_xy, dtype=np.float64).reshape(-1, 2):
        ox = np.maximum(0.0, box - np.abs(xs - bx))
        oy = np.maximum(0.0, box - np.abs(ys - by))
        if not (ox.any() and oy.any()):
            continue
        blocked |= (oy[:, None] * ox[None, :]) / float(box * box) > overlap + 1e-9
    return blocked


def _greedy(order: np.ndarray, ys: np.ndarray, xs: np.ndarray, box: int, step: int,
            overlap: float, blocked: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Accept cells in `order` (flat indices) unless blocked; each acceptance blocks its stencil.

    Sequential semantics, vectorised: after each acceptance the remaining order is filtered
    at once, so the cost grows with the number accepted (≤ limit), not the grid size.
    """
    stencil = _conflict_stencil(box, step, overlap)
    k = stencil.shape[0] // 2
    ny, nx = blocked.shape
    flat = blocked.reshape(-1)
    chosen: list[tuple[int, int]] = []
    rest = np.asarray(order, dtype=np.int64)
    rest = rest[~flat[rest]]
    while len(rest) and len(chosen) < limit:
        f = int(rest[0])
        i, j = divmod(f, nx)
        chosen.append((int(xs[j]), int(ys[i])))
        i0, i1, j0, j1 = max(0, i - k), min(ny, i + k + 1), max(0, j - k), min(nx, j + k + 1)
        blocked[i0:i1, j0:j1] |= stencil[i0 - (i - k):i1 - (i - k), j0 - (j - k):j1 - (j - k)]
        rest = rest[1:]
        rest = rest[~flat[rest]]
    return chosen


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator per micrograph, so a box set does not depend on which others were picked."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(micrograph_stem(name).encode())])


def _check_fits(shape: tuple[int, int], box: int, margin: int, what: str) -> None:
    lo_y, hi_y = centre_range(shape[0], box, margin)
    lo_x, hi_x = centre_range(shape[1], box, margin)
    if hi_y < lo_y or hi_x < lo_x:
        extra = f" with an edge margin of {margin} px" if margin else ""
        raise InputError(what, f"a {box} px box does not fit in this {shape[0]}×{shape[1]} "
                               f"micrograph{extra}; give a smaller --box (or bin less)")


def auto_boxes_from_particles(shape: tuple[int, int], particles_xy, diameter: float, box: int,
                              max_boxes: int = 100, overlap: float = 0.0, seed: int = 0,
                              existing_xy=(), margin: int = 0, step: int | None = None,
                              name: str = "", exclude: np.ndarray | None = None) -> np.ndarray:
    """Boxes (n, 2) of integer (x, y) centres clear of every particle disc; see the module doc.
    `exclude` (the candidate grid's shape) leaves out more candidates (pixel screening)."""
    _check_fits(shape, box, margin, name or "micrograph")
    step = int(step or max(1, box // 8))
    ys, xs = candidate_grid(shape, box, step, margin)
    allowed = particle_clear_mask(ys, xs, box, particles_xy, diameter)
    blocked = ~allowed | _blocked_by(ys, xs, existing_xy, box, overlap)
    if exclude is not None:
        blocked |= exclude
    free = np.flatnonzero(~blocked.reshape(-1))
    order = _rng(seed, name).permutation(free)
    chosen = _greedy(order, ys, xs, box, step, overlap, blocked, max_boxes)
    return np.array(chosen, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# coordinate-free ranking


@dataclass
class StructureMap:
    """Per-box structure scores on the candidate grid (lower = emptier)."""

    ys: np.ndarray
    xs: np.ndarray
    score: np.ndarray  # (ny, nx): box score / the micrograph's median box score
    outlier: np.ndarray  # (ny, nx): box mean far from the micrograph's (carbon, ice edge, blob)
    factor: float  # bin factor the statistic was computed at


def structure_map(image: np.ndarray, diameter: float, box: int, step: int | None = None,
                  margin: int = 0) -> StructureMap:
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
    energy = ndimage.uniform_filter(band * band, size=max(3, int(round(ENERGY_WINDOW * d_b))),
                                    mode="reflect")
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


def rank_empty_boxes(image: np.ndarray, diameter: float, box: int, max_boxes: int = 100,
                     overlap: float = 0.0, threshold: float = 0.9, existing_xy=(),
                     margin: int = 0, step: int | None = None,
                     name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The emptiest boxes first: ((n, 2) integer (x, y) centres, their scores).

    Candidates with a score above `threshold` (relative to the micrograph's median box) or with
    an outlying background level are never proposed; accepted boxes keep the overlap rule.
    """
    _check_fits(image.shape, box, margin, name or "micrograph")
    step = int(step or max(1, box // 8))
    smap = structure_map(image, diameter, box, step, margin)
    ys, xs = smap.ys, smap.xs
    blocked = (smap.score > threshold) | smap.outlier | _blocked_by(ys, xs, existing_xy, box, overlap)
    flat_score = smap.score.reshape(-1)
    free = np.flatnonzero(~blocked.reshape(-1))
    # stable sort: ties broken by grid position, so results are deterministic
    order = free[np.argsort(flat_score[free], kind="stable")]
    chosen = _greedy(order, ys, xs, box, step, overlap, blocked, max_boxes)
    xy = np.array(chosen, dtype=np.int64).reshape(-1, 2)
    # grid indices of the chosen centres (xs, ys are sorted) → their scores
    scores = smap.score[np.searchsorted(ys, xy[:, 1]), np.searchsorted(xs, xy[:, 0])]
    return xy, scores.astype(np.float64)


# --------------------------------------------------------------------------------------------
# micrographs, particles, merging


@dataclass(frozen=True)
class Micrograph:
    """What picking needs of a micrograph: its name (as written in noise files) and true shape.

    Pixels are read only by the coordinate-free mode: from `pixels()` when given (an open napari
    layer), else from `path`.
    """

    name: str
    shape: tuple[int, int]
    path: Path | None = None
    voxel_size: float = 0.0
    pixels: Callable[[], np.ndarray] | None = field(default=None, compare=False, repr=False)

    def image(self) -> np.ndarray:
        if self.pixels is not None:
            return np.asarray(self.pixels(), dtype=np.float32)
        if self.path is None:
            raise CryoDDMError(f"{self.name}: no pixels to rank boxes on (no file, no layer)")
        return read_micrograph(self.path)[0]

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Micrograph:
        """From the header only (no pixels read)."""
        info = read_header(path)
        if info.n_images != 1:
            raise InputError(path, f"is a stack of {info.n_images} images, not a micrograph")
        return cls(Path(path).name, info.image_shape, Path(path), info.voxel_size)


def particles_by_micrograph(particles: pd.DataFrame, micrographs: Sequence[Micrograph],
                            allow_unmatched: bool = False,
                            source: str = "particle coordinates") -> dict[int, np.ndarray]:
    """Particle (x, y) per micrograph index, matched by stem; unmatched names are an error
    (with examples from both sides) unless `allow_unmatched`, and so is matching nothing."""
    names = [m.name for m in micrographs]
    if particles is None or len(particles) == 0:
        raise InputError(source, "holds no particle coordinates")
    labels = particles["micrograph"].astype(str).to_numpy()
    match = match_names(pd.unique(labels), names)
    if not match.mapping:
        raise InputError(source, "no particle belongs to a micrograph given: "
                         + match.describe_mismatch())
    if match.unmatched and not allow_unmatched:
        raise InputError(source, f"{len(match.unmatched)} micrograph name(s) in the particle file "
                         "match no micrograph given: " + match.describe_mismatch()
                         + " (allow unmatched names / --allow-unmatched when you pick a subset on purpose)")
    xy = particles[["x", "y"]].to_numpy(np.float64)
    index = np.array([match.mapping.get(label, -1) for label in labels], dtype=np.int64)
    order = np.argsort(index, kind="stable")
    keys, starts = np.unique(index[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {int(key): xy[order[a:b]] for key, a, b in zip(keys, starts, bounds) if key >= 0}


def existing_by_micrograph(existing: pd.DataFrame | None,
                           micrographs: Sequence[Micrograph]) -> dict[int, np.ndarray]:
    """Existing boxes (x, y) per micrograph index (names matched by stem); the rest is ignored."""
    if existing is None or len(existing) == 0:
        return {}
    names = [m.name for m in micrographs]
    match = match_names(pd.unique(existing["micrograph"].astype(str)), names)
    idx = existing["micrograph"].astype(str).map(match.mapping)
    out: dict[int, np.ndarray] = {}
    for i, group in existing.assign(_i=idx).dropna(subset=["_i"]).groupby("_i"):
        out[int(i)] = group[["x", "y"]].to_numpy(np.float64)
    return out


def merge_boxes(existing: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """Existing rows first and untouched, then the new ones; exact duplicates dropped."""
    parts = [t.loc[:, ["micrograph", "x", "y"]] for t in (existing, new) if t is not None and len(t)]
    if not parts:
        return empty_noise_table()
    out = pd.concat(parts, ignore_index=True)
    out["x"] = np.round(out["x"].astype(np.float64)).astype(np.int64)
    out["y"] = np.round(out["y"].astype(np.float64)).astype(np.int64)
    return out.drop_duplicates().reset_index(drop=True)


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
            from .io.star import read_star_blocks

            blocks = read_star_blocks(path)
            extra = sorted({c for b in blocks.values() for c in b.columns} - NOISE_COLUMNS)
            if len(blocks) != 1 or extra:
                return (f"it holds {', '.join(f'data_{n}' for n in blocks)}"
                        + (f" with {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}" if extra else ""))
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
    return InputError(path, f"is not a noise-box file ({problem}); refusing to {action} it — "
                            "pick-noise merges into and replaces only noise-box files (name x y, "
                            "or a STAR with only micrograph names and coordinates)")


def check_boxes_output(path: str | os.PathLike[str], inputs: Sequence[object] = (),
                       merge: bool = False, overwrite: bool = False) -> pd.DataFrame | None:
    """Before picking: the output is a `.txt` or `.star` name, not an input or a folder, in a
    writable place; an existing one is merged into (returned) or replaced only when asked and only
    if it is a noise-box file — never a particle STAR. Returns the boxes to merge with, if any."""
    from .errors import OutputExistsError
    from .safety import check_location, check_writable

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


# --------------------------------------------------------------------------------------------
# the job


@dataclass
class PickResult:
    """All boxes (existing + new), what was added, and the yield per micrograph."""

    boxes: pd.DataFrame
    new: pd.DataFrame
    counts: dict[str, int]
    box_size: int
    diameter_px: float
    mode: str  # "particles" | "empty"
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def report(self, per_micrograph: int = 20) -> str:
        lines = [f"{len(self.new)} new boxes ({self.box_size} px, particle diameter "
                 f"{self.diameter_px:.1f} px); {self.total} boxes on {len(self.counts)} micrographs"]
        items = list(self.counts.items())
        for name, n in items[:per_micrograph]:
            lines.append(f"  {name}: {n}")
        if len(items) > per_micrograph:
            rest = [n for _, n in items[per_micrograph:]]
            lines.append(f"  … {len(rest)} more micrographs (min {min(rest)}, max {max(rest)})")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def yield_warning(total: int, n_micrographs: int, box: int, overlap: float,
                  minimum: int = MIN_TRAINING_BOXES) -> str | None:
    """A clear warning, with what to change, when there are too few boxes to train on."""
    if total >= minimum:
        return None
    hints = []
    if overlap < 0.25:
        hints.append("allow boxes to overlap (--overlap 0.25 keeps them largely distinct)")
    hints.append("pick on more micrographs")
    hints.append("bin the micrographs (a smaller particle in pixels gives a smaller window W)")
    hints.append(f"a smaller window than {box} px (--box here and the same window in forward)")
    return (f"only {total} noise boxes on {n_micrographs} micrograph(s): the denoiser needs a few "
            f"hundred distinct noise boxes (at least {minimum}) to learn the noise; "
            + "; ".join(hints))


def _as_micrographs(items: Iterable[Micrograph | str | os.PathLike[str]],
                    cancel: CancelToken | None) -> Job[list[Micrograph]]:
    items = list(items)
    out: list[Micrograph] = []
    for k, item in enumerate(items):
        if cancel is not None:
            cancel.raise_if_cancelled()
        out.append(item if isinstance(item, Micrograph) else Micrograph.from_path(item))
        if k % 50 == 0 or k == len(items) - 1:
            yield Progress(k + 1, len(items), "reading headers")
    return out


def _particles_off_image(per_mic: dict[int, np.ndarray], mics: Sequence[Micrograph],
                         source: str) -> str:
    """Particles whose centre is not on their micrograph: all of them is an error (the boxes would
    land on the real particles), some a warning. Returns the warning ('' when none)."""
    total = off = 0
    example = ""
    for k, xy in per_mic.items():
        ny, nx = mics[k].shape
        out = ~((xy[:, 0] >= 0) & (xy[:, 0] < nx) & (xy[:, 1] >= 0) & (xy[:, 1] < ny))
        total += len(xy)
        off += int(out.sum())
        if out.any() and not example:
            x, y = xy[np.flatnonzero(out)[0]]
            example = f"x {x:g}, y {y:g} on {mics[k].name} ({nx}×{ny} px)"
    if not off:
        return ""
    text = (f"{off} of {total} particle coordinates lie outside their micrograph (e.g. {example}): "
            "coordinates for another pixel size or binning, or for other micrographs?")
    if off == total:
        raise InputError(source, text + " No box can be placed away from particles that are not "
                                        "where the file says; check the coordinates")
    return text + " Boxes may sit on those particles; check the coordinates"


def pick_noise(micrographs: Sequence[Micrograph | str | os.PathLike[str]], config: PickConfig,
               particles: pd.DataFrame | None = None, existing: pd.DataFrame | None = None,
               cancel: CancelToken | None = None, particles_source: str = "particle coordinates",
               ) -> Job[PickResult]:
    """Pick noise boxes on many micrographs; returns all boxes (existing kept, new merged).

    With `particles` (a table `micrograph, x, y`) boxes avoid every particle and only headers are
    read; without, boxes are ranked by emptiness (pixels are read, one micrograph at a time).
    """
    config.validate()
    mics = yield from _as_micrographs(micrographs, cancel)
    if not mics:
        raise CryoDDMError("no micrographs given")
    stems = [micrograph_stem(m.name) for m in mics]
    dup = sorted(s for s, n in Counter(stems).items() if n > 1)
    if dup:
        raise CryoDDMError(f"micrographs share a name stem, so coordinates cannot tell them apart: {dup[:3]}")
    apix = next((m.voxel_size for m in mics if m.voxel_size > 0), None)
    if config.diameter_A is not None:
        sizes = {round(m.voxel_size, 3) for m in mics}
        if len(sizes) > 1:
            raise CryoDDMError(f"the micrographs have different pixel sizes ({sorted(sizes)[:4]} Å/px); "
                               "give --diameter in pixels or pick each set on its own")
    diameter, box = config.resolve(apix)
    for m in mics:
        _check_fits(m.shape, box, config.edge_margin, str(m.path or m.name))
    mode = "empty" if particles is None else "particles"
    per_mic = (particles_by_micrograph(particles, mics, config.allow_unmatched, particles_source)
               if particles is not None else {})
    off_image = _particles_off_image(per_mic, mics, particles_source)
    have = existing_by_micrograph(existing, mics)
    new_names: list[str] = []
    new_xy: list[np.ndarray] = []
    new_scores: list[np.ndarray] = []
    skipped: list[str] = []
    counts: dict[str, int] = {}
    dirty = 0  # existing boxes a particle disc reaches into (kept, but the user should know)
    unusable: list[str] = []  # coordinate-free mode: micrographs with NaN or constant pixels
    for k, m in enumerate(mics):
        if cancel is not None:
            cancel.raise_if_cancelled()
        prior = have.get(k, np.zeros((0, 2)))
        if mode == "particles":
            if k not in per_mic:
                skipped.append(m.name)
                xy = np.zeros((0, 2), np.int64)
            else:
                if len(prior):
                    dist = particle_box_distance(prior[:, 0], prior[:, 1], box,
                                                 per_mic[k][:, 0], per_mic[k][:, 1])
                    dirty += int((dist.min(axis=1) < diameter / 2).sum())
                exclude = None
                if config.screen:
                    smap = structure_map(m.image(), diameter, box, config.grid_step,
                                         config.edge_margin)
                    exclude = smap.outlier | (smap.score > SCREEN_SCORE)
                xy = auto_boxes_from_particles(m.shape, per_mic[k], diameter, box,
                                               config.max_per_micrograph, config.overlap,
                                               config.seed, prior, config.edge_margin,
                                               config.grid_step, m.name, exclude)
            scores = np.full(len(xy), np.nan)
        else:
            try:
                image = m.image()
                check_finite(image, str(m.path or m.name))
                check_not_blank(image, str(m.path or m.name))
            except InputError as exc:  # one bad micrograph: no boxes there, the others go on
                unusable.append(str(exc))
                skipped.append(m.name)
                counts[m.name] = int(len(prior))
                continue
            xy, scores = rank_empty_boxes(image, diameter, box, config.max_per_micrograph,
                                          config.overlap, config.empty_threshold, prior,
                                          config.edge_margin, config.grid_step, m.name)
            del image
        new_names.extend([m.name] * len(xy))
        new_xy.append(xy)
        new_scores.append(scores)
        counts[m.name] = int(len(prior) + len(xy))
        if mode == "empty" or config.screen or k % 20 == 0 or k == len(mics) - 1:
            yield Progress(k + 1, len(mics), f"{m.name}: {len(xy)} boxes",
                           {"micrograph": m.name, "boxes": int(len(xy))})
    xy_all = np.concatenate(new_xy) if new_xy else np.zeros((0, 2), np.int64)
    new = pd.DataFrame({"micrograph": pd.Series(new_names, dtype=str),
                        "x": xy_all[:, 0].astype(np.int64), "y": xy_all[:, 1].astype(np.int64)})
    if mode == "empty":
        new["score"] = np.concatenate(new_scores) if new_scores else np.zeros(0)
    if unusable and len(unusable) == len(mics):
        raise CryoDDMError("no micrograph has pixels to rank boxes on:\n  " + "\n  ".join(unusable[:10]))
    boxes = merge_boxes(existing, new)
    warnings: list[str] = []
    for why in unusable:
        warnings.append(f"skipped (no boxes proposed): {why}")
    if off_image:
        warnings.append(off_image)
    if skipped and mode == "particles":
        warnings.append(f"{len(skipped)} micrograph(s) have no particles in the coordinates and were "
                        f"skipped (boxes there could sit on unpicked particles): "
                        + ", ".join(skipped[:3]) + (" …" if len(skipped) > 3 else ""))
    if dirty:
        warnings.append(f"{dirty} existing box(es) hold part of a particle (kept, as every manual "
                        "pick is; review and delete them, they would teach the denoiser particles "
                        "are noise)")
    low = yield_warning(sum(counts.values()), len(mics), box, config.overlap)
    if low:
        warnings.append(low)
    return PickResult(boxes, new, counts, box, diameter, mode, skipped, warnings)
