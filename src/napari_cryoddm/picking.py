"""Noise picking: square background boxes that forward crops as real noise (step 1 of CryoDDM).

A noise box is the forward window W (what forward cuts around each noise centre), so the box
tested for particles is the box that will be used — the original tested a smaller one. Two
automatic modes share one greedy placement (`box_placement`, where the geometry is described):

* **from particles**: candidate centres on a grid (step box/8) inside the micrograph, visited in
  a seeded random order, accepted when no particle disc (the particle diameter around each
  particle centre) reaches into the box and the box overlaps already accepted boxes (manual ones
  included) by at most a set fraction of its area;
* **coordinate-free**: the same grid ranked by how little structure each box holds (see
  `box_ranking.structure_map`), the emptiest proposed first.

This module holds the configuration, the micrographs and particles as picking sees them, and the
job; the noise-box files are `box_files`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .box_placement import auto_boxes_from_particles, check_fits, particle_box_distance
from .box_ranking import rank_empty_boxes, structure_map
from .errors import CryoDDMError, InputError
from .io.mrc import read_header, read_micrograph
from .io.noise import empty_noise_table
from .jobs import CancelToken, Job, Progress
from .names import match_names, micrograph_stem
from .normalise import check_finite, check_not_blank
from .pick_config import PickConfig

#: Below this many boxes in total the denoiser is starved of distinct noise (a probe: ~60 patches
#: barely beat the raw data, ~270 did clearly better), so the yield report warns.
MIN_TRAINING_BOXES = 300
#: `--screen`: with coordinates, boxes scoring above this multiple of the median are left out.
SCREEN_SCORE = 3.0


# --------------------------------------------------------------------------------------------
# configuration


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

    @property
    def readable(self) -> bool:
        """Whether there are pixels to read (a file or an open layer), not only a shape."""
        return self.pixels is not None or self.path is not None

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


def particles_by_micrograph(
    particles: pd.DataFrame,
    micrographs: Sequence[Micrograph],
    allow_unmatched: bool = False,
    source: str = "particle coordinates",
) -> dict[int, np.ndarray]:
    """Particle (x, y) per micrograph index, matched by stem; unmatched names are an error
    (with examples from both sides) unless `allow_unmatched`, and so is matching nothing."""
    names = [m.name for m in micrographs]
    if particles is None or len(particles) == 0:
        raise InputError(source, "holds no particle coordinates")
    labels = particles["micrograph"].astype(str).to_numpy()
    match = match_names(pd.unique(labels), names)
    if not match.mapping:
        raise InputError(source, "no particle belongs to a micrograph given: " + match.describe_mismatch())
    if match.unmatched and not allow_unmatched:
        raise InputError(
            source,
            f"{len(match.unmatched)} micrograph name(s) in the particle file "
            "match no micrograph given: "
            + match.describe_mismatch()
            + " (allow unmatched names / --allow-unmatched when you pick a subset on purpose)",
        )
    xy = particles[["x", "y"]].to_numpy(np.float64)
    index = np.array([match.mapping.get(label, -1) for label in labels], dtype=np.int64)
    order = np.argsort(index, kind="stable")
    keys, starts = np.unique(index[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {int(key): xy[order[a:b]] for key, a, b in zip(keys, starts, bounds) if key >= 0}


def existing_by_micrograph(existing: pd.DataFrame | None, micrographs: Sequence[Micrograph]) -> dict[int, np.ndarray]:
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
        lines = [
            f"{len(self.new)} new boxes ({self.box_size} px, particle diameter "
            f"{self.diameter_px:.1f} px); {self.total} boxes on {len(self.counts)} micrographs"
        ]
        items = list(self.counts.items())
        for name, n in items[:per_micrograph]:
            lines.append(f"  {name}: {n}")
        if len(items) > per_micrograph:
            rest = [n for _, n in items[per_micrograph:]]
            lines.append(f"  … {len(rest)} more micrographs (min {min(rest)}, max {max(rest)})")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def yield_warning(
    total: int, n_micrographs: int, box: int, overlap: float, minimum: int = MIN_TRAINING_BOXES
) -> str | None:
    """A clear warning, with what to change, when there are too few boxes to train on."""
    if total >= minimum:
        return None
    hints = []
    if overlap < 0.25:
        hints.append("allow boxes to overlap (--overlap 0.25 keeps them largely distinct)")
    hints.append("pick on more micrographs")
    hints.append("bin the micrographs (a smaller particle in pixels gives a smaller window W)")
    hints.append(f"a smaller window than {box} px (--box here and the same window in forward)")
    return (
        f"only {total} noise boxes on {n_micrographs} micrograph(s): the denoiser needs a few "
        f"hundred distinct noise boxes (at least {minimum}) to learn the noise; " + "; ".join(hints)
    )


def _as_micrographs(
    items: Iterable[Micrograph | str | os.PathLike[str]], cancel: CancelToken | None
) -> Job[list[Micrograph]]:
    items = list(items)
    out: list[Micrograph] = []
    for k, item in enumerate(items):
        if cancel is not None:
            cancel.raise_if_cancelled()
        out.append(item if isinstance(item, Micrograph) else Micrograph.from_path(item))
        if k % 50 == 0 or k == len(items) - 1:
            yield Progress(k + 1, len(items), "reading headers")
    return out


def _particles_off_image(per_mic: dict[int, np.ndarray], mics: Sequence[Micrograph], source: str) -> str:
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
    text = (
        f"{off} of {total} particle coordinates lie outside their micrograph (e.g. {example}): "
        "coordinates for another pixel size or binning, or for other micrographs?"
    )
    if off == total:
        raise InputError(
            source,
            text + " No box can be placed away from particles that are not where the file says; check the coordinates",
        )
    return text + " Boxes may sit on those particles; check the coordinates"


def _sizes(mics: Sequence[Micrograph], config: PickConfig) -> tuple[float, int]:
    """(diameter, box) in the micrographs' pixels, after the checks that make them one size."""
    stems = [micrograph_stem(m.name) for m in mics]
    dup = sorted(s for s, n in Counter(stems).items() if n > 1)
    if dup:
        raise CryoDDMError(f"micrographs share a name stem, so coordinates cannot tell them apart: {dup[:3]}")
    apix = next((m.voxel_size for m in mics if m.voxel_size > 0), None)
    if config.diameter_A is not None:
        sizes = {round(m.voxel_size, 3) for m in mics}
        if len(sizes) > 1:
            raise CryoDDMError(
                f"the micrographs have different pixel sizes ({sorted(sizes)[:4]} Å/px); "
                "give --diameter in pixels or pick each set on its own"
            )
    diameter, box = config.resolve(apix)
    for m in mics:
        check_fits(m.shape, box, config.edge_margin, str(m.path or m.name))
    return diameter, box


@dataclass
class _Tally:
    """What the pass over the micrographs gathers for the result and its warnings."""

    names: list[str] = field(default_factory=list)
    xy: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    dirty: int = 0  # existing boxes a particle disc reaches into (kept, but the user should know)
    unusable: list[str] = field(default_factory=list)  # coordinate-free: NaN or constant pixels

    def add(self, name: str, prior: np.ndarray, xy: np.ndarray, scores: np.ndarray) -> None:
        self.names.extend([name] * len(xy))
        self.xy.append(xy)
        self.scores.append(scores)
        self.counts[name] = int(len(prior) + len(xy))

    def new_boxes(self, with_scores: bool) -> pd.DataFrame:
        xy = np.concatenate(self.xy) if self.xy else np.zeros((0, 2), np.int64)
        new = pd.DataFrame(
            {
                "micrograph": pd.Series(self.names, dtype=str),
                "x": xy[:, 0].astype(np.int64),
                "y": xy[:, 1].astype(np.int64),
            }
        )
        if with_scores:
            new["score"] = np.concatenate(self.scores) if self.scores else np.zeros(0)
        return new


def _boxes_from_particles(
    m: Micrograph,
    particles_xy: np.ndarray | None,
    prior: np.ndarray,
    diameter: float,
    box: int,
    config: PickConfig,
    tally: _Tally,
) -> np.ndarray:
    """New boxes on one micrograph clear of its particles (none, and a skip, without particles)."""
    if particles_xy is None:
        tally.skipped.append(m.name)
        return np.zeros((0, 2), np.int64)
    if len(prior):
        dist = particle_box_distance(prior[:, 0], prior[:, 1], box, particles_xy[:, 0], particles_xy[:, 1])
        tally.dirty += int((dist.min(axis=1) < diameter / 2).sum())
    exclude = None
    if config.screen and m.readable:  # screening wherever pixels can be read
        smap = structure_map(m.image(), diameter, box, config.grid_step, config.edge_margin)
        exclude = smap.outlier | (smap.score > SCREEN_SCORE)
    return auto_boxes_from_particles(
        m.shape,
        particles_xy,
        diameter,
        box,
        config.max_per_micrograph,
        config.overlap,
        config.seed,
        prior,
        config.edge_margin,
        config.grid_step,
        m.name,
        exclude,
    )


def _empty_boxes(
    m: Micrograph, prior: np.ndarray, diameter: float, box: int, config: PickConfig, tally: _Tally
) -> tuple[np.ndarray, np.ndarray] | None:
    """The emptiest boxes on one micrograph, or None when its pixels cannot be ranked (one bad
    micrograph gets no boxes, the others go on)."""
    try:
        image = m.image()
        check_finite(image, str(m.path or m.name))
        check_not_blank(image, str(m.path or m.name))
    except InputError as exc:
        tally.unusable.append(str(exc))
        tally.skipped.append(m.name)
        tally.counts[m.name] = int(len(prior))
        return None
    return rank_empty_boxes(
        image,
        diameter,
        box,
        config.max_per_micrograph,
        config.overlap,
        config.empty_threshold,
        prior,
        config.edge_margin,
        config.grid_step,
        m.name,
    )


def _warnings(tally: _Tally, n_mics: int, mode: str, box: int, overlap: float, off_image: str) -> list[str]:
    """What the user should know about the result, each with what to change."""
    warnings = [f"skipped (no boxes proposed): {why}" for why in tally.unusable]
    if off_image:
        warnings.append(off_image)
    if tally.skipped and mode == "particles":
        skipped = tally.skipped
        warnings.append(
            f"{len(skipped)} micrograph(s) have no particles in the coordinates and were "
            f"skipped (boxes there could sit on unpicked particles): "
            + ", ".join(skipped[:3])
            + (" …" if len(skipped) > 3 else "")
        )
    if tally.dirty:
        warnings.append(
            f"{tally.dirty} existing box(es) hold part of a particle (kept, as every manual "
            "pick is; review and delete them, they would teach the denoiser particles "
            "are noise)"
        )
    low = yield_warning(sum(tally.counts.values()), n_mics, box, overlap)
    if low:
        warnings.append(low)
    return warnings


def pick_noise(
    micrographs: Sequence[Micrograph | str | os.PathLike[str]],
    config: PickConfig,
    particles: pd.DataFrame | None = None,
    existing: pd.DataFrame | None = None,
    cancel: CancelToken | None = None,
    particles_source: str = "particle coordinates",
) -> Job[PickResult]:
    """Pick noise boxes on many micrographs; returns all boxes (existing kept, new merged).

    With `particles` (a table `micrograph, x, y`) boxes avoid every particle and only headers are
    read; without, boxes are ranked by emptiness (pixels are read, one micrograph at a time).
    """
    mics = yield from _as_micrographs(micrographs, cancel)
    if not mics:
        raise CryoDDMError("no micrographs given")
    diameter, box = _sizes(mics, config)
    mode = "empty" if particles is None else "particles"
    per_mic = (
        particles_by_micrograph(particles, mics, config.allow_unmatched, particles_source)
        if particles is not None
        else {}
    )
    off_image = _particles_off_image(per_mic, mics, particles_source)
    have = existing_by_micrograph(existing, mics)
    tally = _Tally()
    for k, m in enumerate(mics):
        if cancel is not None:
            cancel.raise_if_cancelled()
        prior = have.get(k, np.zeros((0, 2)))
        if mode == "particles":
            xy = _boxes_from_particles(m, per_mic.get(k), prior, diameter, box, config, tally)
            scores = np.full(len(xy), np.nan)
        else:
            ranked = _empty_boxes(m, prior, diameter, box, config, tally)
            if ranked is None:
                continue
            xy, scores = ranked
        tally.add(m.name, prior, xy, scores)
        if mode == "empty" or config.screen or k % 20 == 0 or k == len(mics) - 1:
            yield Progress(
                k + 1, len(mics), f"{m.name}: {len(xy)} boxes", {"micrograph": m.name, "boxes": int(len(xy))}
            )
    if tally.unusable and len(tally.unusable) == len(mics):
        raise CryoDDMError("no micrograph has pixels to rank boxes on:\n  " + "\n  ".join(tally.unusable[:10]))
    new = tally.new_boxes(with_scores=mode == "empty")
    warnings = _warnings(tally, len(mics), mode, box, config.overlap, off_image)
    return PickResult(merge_boxes(existing, new), new, tally.counts, box, diameter, mode, tally.skipped, warnings)
