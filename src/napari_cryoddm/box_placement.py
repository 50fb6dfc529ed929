"""Where noise boxes may go: box geometry against particle discs and other boxes, the candidate
grid, and the greedy placement both automatic picking modes share (see `picking`).

Geometry (RELION: x = column, y = row, pixel centres at integers): a box of side `b` centred on
(x, y) covers pixel columns `x - b//2 … x - b//2 + b - 1` — exactly forward's crop
`[x - W/2, x + W/2)` — i.e. the continuous square `[x - b//2 - 0.5, x - b//2 + b - 0.5]`.
A particle disc reaches into a box when its centre is closer than d/2 to that square.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from .errors import InputError
from .names import micrograph_stem


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


def candidate_grid(
    shape: tuple[int, int], box: int, step: int | None = None, margin: int = 0
) -> tuple[np.ndarray, np.ndarray]:
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


def particle_clear_mask(
    ys: np.ndarray, xs: np.ndarray, box: int, particles_xy: np.ndarray, diameter: float
) -> np.ndarray:
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


def blocked_by_boxes(ys: np.ndarray, xs: np.ndarray, boxes_xy: np.ndarray, box: int, overlap: float) -> np.ndarray:
    """Grid cells whose box would overlap any of `boxes_xy` by more than `overlap`."""
    blocked = np.zeros((len(ys), len(xs)), dtype=bool)
    for bx, by in np.asarray(boxes_xy, dtype=np.float64).reshape(-1, 2):
        ox = np.maximum(0.0, box - np.abs(xs - bx))
        oy = np.maximum(0.0, box - np.abs(ys - by))
        if not (ox.any() and oy.any()):
            continue
        blocked |= (oy[:, None] * ox[None, :]) / float(box * box) > overlap + 1e-9
    return blocked


def greedy_place(
    order: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    box: int,
    step: int,
    overlap: float,
    blocked: np.ndarray,
    limit: int,
) -> list[tuple[int, int]]:
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
        blocked[i0:i1, j0:j1] |= stencil[i0 - (i - k) : i1 - (i - k), j0 - (j - k) : j1 - (j - k)]
        rest = rest[1:]
        rest = rest[~flat[rest]]
    return chosen


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator per micrograph, so a box set does not depend on which others were picked."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(micrograph_stem(name).encode())])


def check_fits(shape: tuple[int, int], box: int, margin: int, what: str) -> None:
    """A clear error when not even one box of side `box` fits (with its margin) in `shape`."""
    lo_y, hi_y = centre_range(shape[0], box, margin)
    lo_x, hi_x = centre_range(shape[1], box, margin)
    if hi_y < lo_y or hi_x < lo_x:
        extra = f" with an edge margin of {margin} px" if margin else ""
        raise InputError(
            what,
            f"a {box} px box does not fit in this {shape[0]}×{shape[1]} "
            f"micrograph{extra}; give a smaller --box (or bin less)",
        )


def auto_boxes_from_particles(
    shape: tuple[int, int],
    particles_xy,
    diameter: float,
    box: int,
    max_boxes: int = 100,
    overlap: float = 0.0,
    seed: int = 0,
    existing_xy=(),
    margin: int = 0,
    step: int | None = None,
    name: str = "",
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Boxes (n, 2) of integer (x, y) centres clear of every particle disc; see the module doc.
    `exclude` (the candidate grid's shape) leaves out more candidates (pixel screening)."""
    check_fits(shape, box, margin, name or "micrograph")
    step = int(step or max(1, box // 8))
    ys, xs = candidate_grid(shape, box, step, margin)
    allowed = particle_clear_mask(ys, xs, box, particles_xy, diameter)
    blocked = ~allowed | blocked_by_boxes(ys, xs, existing_xy, box, overlap)
    if exclude is not None:
        blocked |= exclude
    free = np.flatnonzero(~blocked.reshape(-1))
    order = _rng(seed, name).permutation(free)
    chosen = greedy_place(order, ys, xs, box, step, overlap, blocked, max_boxes)
    return np.array(chosen, dtype=np.int64).reshape(-1, 2)
