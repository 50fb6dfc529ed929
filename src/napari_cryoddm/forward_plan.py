"""What the forward step decides before a pixel is read: its configuration and its plan.

Every input is checked here from headers and coordinates, so a bad run fails before anything is
written; `forward.run_forward` then only executes the plan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import binning, params
from .binning import binned_shape
from .config import ConfigError
from .diffusion import PRESETS, validate_schedule
from .errors import CryoDDMError, InputError
from .forward_layout import FORWARD_LAYOUT, is_forward_folder
from .io.mrc import MrcInfo, list_micrographs, read_header
from .io.noise import read_noise_txt
from .io.star import read_coordinates
from .names import match_names, micrograph_stem
from .normalise import Normalisation
from .params import check_window, window_for_diameter
from .safety import check_output_folder


@dataclass
class ForwardConfig:
    """Every parameter of the forward step; the CLI flags and the widget form are built from it."""

    diameter: float | None = field(
        default=None, metadata={"help": "particle diameter in pixels of the raw micrographs", "unit": "px"}
    )
    diameter_A: float | None = field(
        default=None,
        metadata={
            "help": "particle diameter in Å (uses the header's pixel size)",
            "flag": "--diameter-A",
            "unit": "Å",
            "label": "diameter Å",
        },
    )
    window: int | None = field(
        default=None,
        metadata={
            "help": "crop window W in binned pixels (default (⌊1.5·d⌋ // 128 + 1)·128; a multiple of 32, at least 128)",
            "unit": "px",
        },
    )
    bin: float | None = field(
        default=None, metadata={"help": "bin micrographs by this factor (Fourier crop) before anything else"}
    )
    target_apix: float | None = field(
        default=None,
        metadata={
            "help": "bin micrographs to this pixel size instead of --bin",
            "unit": "Å/px",
            "label": "target Å/px",
        },
    )
    preset: str = field(
        default="config1",
        metadata={
            "help": "noise schedule: config1 (β 0.1288, T 5, start 2), config2 (β 0.1, T 6, "
            "start 2), both the original's; reference (config1's chain, only its last pair "
            "x_4 → x_3 trained: the built-in model's) or custom (β, T and start below)",
            "choices": ("config1", "config2", "reference", "custom"),
            "cli": False,
        },
    )
    beta: float | None = field(
        default=None, metadata={"help": "custom schedule: β (α_k = 1 − β·k; needs β·T < 1)", "label": "β"}
    )
    steps: int | None = field(default=None, metadata={"help": "custom schedule: total steps T"})
    start: int | None = field(default=None, metadata={"help": "custom schedule: first saved step (1 ≤ start < T)"})
    per_micrograph: int = field(default=20, metadata={"help": "at most this many particle crops per micrograph"})
    max_crops: int = field(default=4000, metadata={"help": "at most this many crops in all"})
    jitter: float = field(
        default=0.2, metadata={"help": "random shift of each crop, uniform in ±jitter·W (0 centres the particle)"}
    )
    normalise: str = field(
        default="robust",
        metadata={
            "help": "micrograph normalisation: robust (percentile clip, median, MAD) or minmax (the original's [0, 1])",
            "choices": ("robust", "minmax"),
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed (jitter and noise pairing)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing finished output folder"})

    def __post_init__(self) -> None:
        if self.preset not in (*PRESETS, "custom"):
            raise ConfigError(self, "preset", f"{self.preset!r}: use {', '.join(PRESETS)} or custom")
        if self.preset != "custom":
            given = {
                n: v for n, v in (("beta", self.beta), ("steps", self.steps), ("start", self.start)) if v is not None
            }
            if given:
                raise ConfigError(
                    self,
                    "preset",
                    f"{self.preset} fixes the schedule; {', '.join(given)} can only be set with the custom preset",
                )
        _ = self.schedule  # validates the custom schedule
        if self.per_micrograph < 1:
            raise ConfigError(self, "per_micrograph", f"must be at least 1, got {self.per_micrograph}")
        if self.max_crops < 1:
            raise ConfigError(self, "max_crops", f"must be at least 1, got {self.max_crops}")
        if not 0 <= self.jitter < 0.5:
            raise ConfigError(self, "jitter", f"must be in [0, 0.5), got {self.jitter}")
        if self.seed < 0:  # numpy's SeedSequence takes no negative seeds
            raise ConfigError(self, "seed", f"must be 0 or more, got {self.seed}")
        for name in ("diameter", "diameter_A", "bin", "target_apix"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(self, name, f"must be a positive number, got {value}")
        if self.window is not None:
            check_window(int(self.window))
        if self.diameter is not None and self.diameter_A is not None:
            raise CryoDDMError("give the particle diameter in pixels or in Å, not both")
        if self.bin is not None and self.target_apix is not None:
            raise CryoDDMError("give --bin or --target-apix, not both")
        Normalisation(self.normalise)

    @property
    def schedule(self) -> tuple[float, int, int]:
        """(β, T, start), validated. Custom fields left empty fall back to Config 1's values."""
        if self.preset in PRESETS:
            return PRESETS[self.preset]
        d_beta, d_steps, d_start = PRESETS["config1"]
        beta = float(self.beta if self.beta is not None else d_beta)
        steps = int(self.steps if self.steps is not None else d_steps)
        start = int(self.start if self.start is not None else d_start)
        validate_schedule(beta, steps, start)
        return beta, steps, start

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation(self.normalise)


@dataclass
class _Micrograph:
    path: Path
    info: MrcInfo
    shape: tuple[int, int]  # binned (y, x)


@dataclass
class ForwardPlan:
    """Everything decided before a pixel is read: windows, crops, noise boxes, counts."""

    config: ForwardConfig
    micrographs: list[_Micrograph]
    factor: float
    voxel_size: float  # binned, Å/px (0 when unknown)
    diameter_px: float  # binned frame
    window: int
    crops: pd.DataFrame  # micrograph (index), x, y (window centre), particle_x, particle_y
    noise: pd.DataFrame  # micrograph (index), x, y
    counts: dict[str, int]
    warnings: list[str]

    @property
    def schedule(self) -> tuple[float, int, int]:
        return self.config.schedule


def _as_table(source: Any, kind: str) -> tuple[pd.DataFrame, str]:
    """Coordinates from a DataFrame, a STAR file, a list of them, or (noise) a `name x y` text."""
    if isinstance(source, pd.DataFrame):
        return source, f"the {kind} table"
    if isinstance(source, (str, os.PathLike)):
        sources = [source]
    else:
        sources = list(source)
    if not sources:
        raise CryoDDMError(f"no {kind} coordinates given")
    expanded: list[Any] = []
    for src in sources:  # a folder stands for its coordinate files (RELION's per-micrograph ones)
        p = Path(src)
        if p.is_dir():
            found = sorted(
                q
                for q in p.iterdir()
                if q.suffix.lower() in (".star", ".cbox") or (kind == "noise" and q.suffix.lower() == ".txt")
            )
            if not found:
                raise InputError(
                    p, f"folder holds no {kind} coordinate files (.star, .cbox{', .txt' if kind == 'noise' else ''})"
                )
            expanded.extend(found)
        else:
            expanded.append(src)
    sources = expanded
    tables = []
    for s in sources:
        p = Path(s)
        if p.suffix.lower() in (".star", ".cbox"):
            t = read_coordinates(p)
        elif kind == "noise":
            t = read_noise_txt(p)
        else:
            raise InputError(p, "particle coordinates must be a STAR file (.star) or a crYOLO .cbox")
        if t.empty:
            raise InputError(p, f"holds no {kind} coordinates")
        tables.append(t.loc[:, ["micrograph", "x", "y"]])
    label = ", ".join(str(s) for s in sources[:3]) + (" …" if len(sources) > 3 else "")
    return pd.concat(tables, ignore_index=True), label


def _sources(source: Any) -> list[Any]:
    """The paths among coordinate sources (tables are not files)."""
    if isinstance(source, pd.DataFrame) or source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        return [source]
    return [s for s in source if isinstance(s, (str, os.PathLike))]


def _match(table: pd.DataFrame, label: str, kind: str, names: list[str]) -> np.ndarray:
    """The micrograph index of every row (−1: no micrograph of that name)."""
    if table.empty:
        raise CryoDDMError(f"{label}: holds no {kind} coordinates")
    m = match_names(table["micrograph"].astype(str).tolist(), names)
    if not m.mapping:
        raise CryoDDMError(f"{label}: no {kind} coordinate matches any micrograph: " + m.describe_mismatch())
    return np.array([m.mapping.get(n, -1) for n in table["micrograph"].astype(str)], dtype=np.int64)


def plan_forward(
    micrographs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    particles: Any,
    noise: Any,
    config: ForwardConfig,
    out: str | os.PathLike[str] | None = None,
) -> ForwardPlan:
    """Check every input and decide every crop from headers and coordinates (no pixels read).

    Raises a `CryoDDMError` naming the problem for anything a run would fail on, so a bad run
    writes nothing.
    """
    if out is not None:
        _check_output(Path(out), config.overwrite, [micrographs, _sources(particles), _sources(noise)])
    mics, factor, voxel_size, d, window = _plan_micrographs(micrographs, config)
    names = [m.path.name for m in mics]
    crops, counts, msgs = _plan_crops(particles, names, mics, factor, window, config)
    noise_df, noise_counts = _plan_noise(noise, names, mics, factor, window)
    _beta, steps, start = config.schedule
    if d > (1 - 2 * config.jitter) * window:
        msgs.append(
            f"the particle (d = {d:.0f} px) is larger than {1 - 2 * config.jitter:.2g}·W "
            f"= {(1 - 2 * config.jitter) * window:.0f} px: a jitter of ±{config.jitter:g}·W "
            f"can push part of it out of the {window}-px window; use a larger --window "
            f"or a smaller --jitter"
        )
    if d > window:
        msgs.append(f"the particle (d = {d:.0f} px) is larger than the window W = {window} px")
    n = len(crops)
    counts = {
        "crops": n,
        "noise": len(noise_df),
        "s2_pairs": (steps - start) * n,
        "val_pairs": n,
        **counts,
        **noise_counts,
    }
    return ForwardPlan(config, mics, factor, voxel_size, d, window, crops, noise_df, counts, msgs)


def _plan_micrographs(micrographs: Any, config: ForwardConfig) -> tuple[list[_Micrograph], float, float, float, int]:
    """(micrographs, bin factor, binned Å/px or 0, binned diameter, window) from the headers."""

    paths = list_micrographs(micrographs)
    infos = [read_header(p) for p in paths]
    for info in infos:
        if info.n_images != 1:
            raise InputError(info.path, f"is a stack of {info.n_images} images, not a micrograph")
    apix_values = sorted({round(i.voxel_size, 4) for i in infos})
    apix = infos[0].voxel_size
    if (config.diameter_A is not None or config.target_apix is not None) and len(apix_values) > 1:
        raise CryoDDMError(
            f"the micrographs have different pixel sizes ({apix_values} Å/px); "
            f"give --diameter and --bin in pixels, or run them separately"
        )
    factor = binning.bin_factor(apix, config.target_apix, config.bin)
    d = params.diameter_px(config.diameter, config.diameter_A, apix) / factor
    window = check_window(int(config.window)) if config.window else window_for_diameter(d)
    mics = [_Micrograph(p, i, binned_shape(i.image_shape, factor)) for p, i in zip(paths, infos)]
    for m in mics:
        if window > min(m.shape):
            raise InputError(
                m.path,
                f"the window W = {window} px is larger than the micrograph "
                f"({m.shape[1]}×{m.shape[0]} px after binning ×{factor:g}); "
                f"give a smaller --window or --diameter, or bin less",
            )
    stems = [micrograph_stem(p.name) for p in paths]
    if len(set(stems)) < len(stems):
        dup = sorted({str(p) for p, s in zip(paths, stems) if stems.count(s) > 1})
        raise CryoDDMError(f"micrographs share a name stem, so coordinates cannot tell them apart: {dup[:4]}")
    voxel_size = apix * factor if apix and len(apix_values) == 1 else 0.0
    return mics, factor, voxel_size, d, window


def _plan_crops(
    particles: Any, names: list[str], mics: list[_Micrograph], factor: float, window: int, config: ForwardConfig
) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
    """The crops, in file order: jittered windows inside their micrograph, within the limits."""
    half = window // 2
    shapes = np.array([m.shape for m in mics], dtype=np.int64)
    jitter_rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(2)[0])
    ptable, plabel = _as_table(particles, "particle")
    pidx = _match(ptable, plabel, "particle", names)
    px = np.asarray(ptable["x"], dtype=np.float64) / factor
    py = np.asarray(ptable["y"], dtype=np.float64) / factor
    j = int(math.floor(config.jitter * window))
    shifts = jitter_rng.integers(-j, j + 1, size=(len(ptable), 2)) if j else np.zeros((len(ptable), 2), int)
    per_mic = np.zeros(len(mics), dtype=np.int64)
    rows: list[tuple[int, int, int, float, float]] = []
    skipped_outside = skipped_limit = 0
    off_image: list[int] = []  # particles whose centre is not on their micrograph at all
    for r in range(len(ptable)):
        mi = int(pidx[r])
        if mi < 0:
            continue
        ny, nx = shapes[mi]
        if not (0 <= px[r] < nx and 0 <= py[r] < ny):
            off_image.append(r)
            skipped_outside += 1
            continue
        cx = int(np.floor(px[r] + 0.5)) + int(shifts[r, 0])
        cy = int(np.floor(py[r] + 0.5)) + int(shifts[r, 1])
        if cx - half < 0 or cy - half < 0 or cx - half + window > nx or cy - half + window > ny:
            skipped_outside += 1
            continue
        if per_mic[mi] >= config.per_micrograph or len(rows) >= config.max_crops:
            skipped_limit += 1
            continue
        per_mic[mi] += 1
        rows.append((mi, cx, cy, float(px[r]), float(py[r])))
    crops = pd.DataFrame(rows, columns=["micrograph", "x", "y", "particle_x", "particle_y"])
    n_matched = int((pidx >= 0).sum())
    off_note = _off_image_note(off_image, pidx, px, py, shapes, mics, factor, n_matched)
    if crops.empty and len(off_image) == n_matched:
        raise CryoDDMError(
            f"{plabel}: {off_note} Nothing to crop; check the coordinates (a smaller --window would not help)"
        )
    if crops.empty:
        raise CryoDDMError(
            f"{plabel}: none of the {n_matched} matched particles "
            f"gives a {window}×{window} crop inside its micrograph "
            f"({skipped_outside} leave the image); use a smaller --window or --jitter"
        )
    counts = {
        "skipped_outside": skipped_outside,
        "skipped_limit": skipped_limit,
        "unmatched_particles": int((pidx < 0).sum()),
        "particles_read": len(ptable),
    }
    return crops, counts, [f"{plabel}: {off_note} They were left out"] if off_image else []


def _off_image_note(
    off_image: list[int],
    pidx: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    shapes: np.ndarray,
    mics: list[_Micrograph],
    factor: float,
    n_matched: int,
) -> str:
    """What to say when particles lie outside their micrograph (another pixel size?)."""
    if not off_image:
        return ""
    r = off_image[0]
    ny, nx = shapes[int(pidx[r])]
    return (
        f"{len(off_image)} of the {n_matched} matched particles lie outside their "
        f"micrograph (e.g. x {px[r] * factor:g}, y {py[r] * factor:g} on "
        f"{mics[int(pidx[r])].path.name}, {int(nx * factor)}×{int(ny * factor)} px): "
        "coordinates for another pixel size or binning, or for other micrographs?"
    )


def _plan_noise(
    noise: Any, names: list[str], mics: list[_Micrograph], factor: float, window: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The noise boxes whose W×W patch lies inside their micrograph (duplicates dropped)."""
    half = window // 2
    shapes = np.array([m.shape for m in mics], dtype=np.int64)
    ntable, nlabel = _as_table(noise, "noise")
    nidx = _match(ntable, nlabel, "noise", names)
    nx_ = np.floor(np.asarray(ntable["x"], dtype=np.float64) / factor + 0.5).astype(np.int64)
    ny_ = np.floor(np.asarray(ntable["y"], dtype=np.float64) / factor + 0.5).astype(np.int64)
    nrows = []
    noise_outside = 0
    for r in range(len(ntable)):
        mi = int(nidx[r])
        if mi < 0:
            continue
        ny, nx = shapes[mi]
        x0, y0 = int(nx_[r]) - half, int(ny_[r]) - half
        if x0 < 0 or y0 < 0 or x0 + window > nx or y0 + window > ny:
            noise_outside += 1
            continue
        nrows.append((mi, int(nx_[r]), int(ny_[r])))
    noise_df = pd.DataFrame(nrows, columns=["micrograph", "x", "y"]).drop_duplicates(ignore_index=True)
    if noise_df.empty:
        raise CryoDDMError(
            f"{nlabel}: none of the {int((nidx >= 0).sum())} matched noise boxes "
            f"fits a {window}×{window} patch inside its micrograph "
            f"({noise_outside} leave the image); pick boxes at least W/2 = {half} px "
            f"from the edges (binned frame) or use a smaller --window"
        )
    return noise_df, {
        "noise_outside": noise_outside,
        "unmatched_noise": int((nidx < 0).sum()),
        "noise_read": len(ntable),
    }


def _check_output(out: Path, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """Before any work: never the working directory, a parent or an input's folder; an existing
    output is replaced only when asked, and only if it is a forward dataset (or empty) — never a
    folder of something else (`safety`, the rule `atomic_dir` applies again when writing)."""

    finished = (out / "forward.json").exists()
    check_output_folder(
        out,
        "forward",
        overwrite,
        inputs,
        FORWARD_LAYOUT,
        is_forward_folder,
        ("it holds a finished forward dataset; " if finished else "") + "pass --overwrite to replace it",
    )
