"""The CryoDDM forward process: real particle crops diffused with real background noise.

Step 2 of the workflow, as in the CryoDDM paper and the original CryoDDM program
(BIT-FuweiLi/CryoDDM). With α_k = 1 − β·k (linear in k) each step is

    x_k = [√α_k + √(1−α_k)(√α_k − 1)]·x_{k−1} + (1−α_k)·n_k

where x_0 are particle crops and n_k are noise patches cut from the same micrographs, paired with
the crops as the original does and re-shuffled at every step. For k = start…T the pair
(x_{k−1}, x_k) is saved: k < T to `s2`, k = T to `val`, in the original's folder layout.

Unlike the original this streams: a first pass decides every crop and noise window from headers
and coordinates (so bad input fails before anything is written), a second pass reads each
micrograph once and writes its crops and noise patches straight into preallocated `.mrcs` files,
and a third computes the chains a block of crops at a time, reading noise patches back from
`s3/noise.mrcs`. Memory does not grow with the number of particles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd

from . import __version__, binning, params
from .atomic import atomic_dir
from .binning import binned_shape
from .config import to_jsonable
from .forward_layout import FORMAT, FORWARD_LAYOUT, MANIFEST, STACK_FILES, VERSION, is_forward_folder
from .errors import CryoDDMError, InputError
from .io.mrc import MrcInfo, ascii_label, read_header
from .io.noise import read_noise_txt
from .io.star import read_coordinates
from .jobs import CancelToken, Job, Progress
from .preprocess import read_prepared
from .names import match_names, micrograph_stem
from .normalise import Normalisation
from .params import check_window, window_for_diameter

log = logging.getLogger(__name__)

PRESETS: dict[str, tuple[float, int, int]] = {
    "config1": (0.1288, 5, 2),  # the original's "配置 1", its default and ours
    "config2": (0.1, 6, 2),     # "配置 2"
    # config1's chain, saving only its last training pair (x_4 → x_3): the pair whose signal
    # target carries the most signal per unit of noise (estimators.py), measured best
    "reference": (0.1288, 5, 4),
}
SUSPECT_NOISE_LEVEL = 3.0  # |patch median − micrograph median| in robust SDs that flags a patch
_BLOCK = 32  # crops per chain block: ~32·(T+2)·W² floats in memory (≈ 130 MB at W = 384, T = 5)


# ----------------------------------------------------------------------------- configuration

@dataclass
class ForwardConfig:
    """Every parameter of the forward step; the CLI flags and the widget form are built from it."""

    diameter: float | None = field(default=None, metadata={
        "help": "particle diameter in pixels of the raw micrographs", "unit": "px"})
    diameter_A: float | None = field(default=None, metadata={
        "help": "particle diameter in Å (uses the header's pixel size)", "flag": "--diameter-A",
        "unit": "Å", "label": "diameter Å"})
    window: int | None = field(default=None, metadata={
        "help": "crop window W in binned pixels (default (⌊1.5·d⌋ // 128 + 1)·128; a multiple "
                "of 32, at least 128)", "unit": "px"})
    bin: float | None = field(default=None, metadata={
        "help": "bin micrographs by this factor (Fourier crop) before anything else"})
    target_apix: float | None = field(default=None, metadata={
        "help": "bin micrographs to this pixel size instead of --bin", "unit": "Å/px",
        "label": "target Å/px"})
    preset: str = field(default="config1", metadata={
        "help": "noise schedule: config1 (β 0.1288, T 5, start 2), config2 (β 0.1, T 6, "
                "start 2), both the original's; reference (config1's chain, only its last pair "
                "x_4 → x_3 trained: the built-in model's) or custom (β, T and start below)",
        "choices": ("config1", "config2", "reference", "custom"), "cli": False})
    beta: float | None = field(default=None, metadata={
        "help": "custom schedule: β (α_k = 1 − β·k; needs β·T < 1)", "label": "β"})
    steps: int | None = field(default=None, metadata={
        "help": "custom schedule: total steps T"})
    start: int | None = field(default=None, metadata={
        "help": "custom schedule: first saved step (1 ≤ start < T)"})
    per_micrograph: int = field(default=20, metadata={
        "help": "at most this many particle crops per micrograph"})
    max_crops: int = field(default=4000, metadata={"help": "at most this many crops in all"})
    jitter: float = field(default=0.2, metadata={
        "help": "random shift of each crop, uniform in ±jitter·W (0 centres the particle)"})
    normalise: str = field(default="robust", metadata={
        "help": "micrograph normalisation: robust (percentile clip, median, MAD) or minmax "
                "(the original's [0, 1])", "choices": ("robust", "minmax")})
    seed: int = field(default=0, metadata={"help": "random seed (jitter and noise pairing)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing finished output folder"})

    def __post_init__(self) -> None:
        if self.preset not in (*PRESETS, "custom"):
            raise CryoDDMError(f"unknown preset {self.preset!r} ({', '.join(PRESETS)} or custom)")
        if self.preset != "custom":
            given = {n: v for n, v in (("beta", self.beta), ("steps", self.steps),
                                       ("start", self.start)) if v is not None}
            if given:
                raise CryoDDMError(f"preset {self.preset} fixes the schedule; "
                                   f"{', '.join(given)} can only be set with the custom preset")
        _ = self.schedule  # validates the custom schedule
        if self.per_micrograph < 1:
            raise CryoDDMError(f"--per-micrograph must be at least 1, got {self.per_micrograph}")
        if self.max_crops < 1:
            raise CryoDDMError(f"--max-crops must be at least 1, got {self.max_crops}")
        if not 0 <= self.jitter < 0.5:
            raise CryoDDMError(f"--jitter must be in [0, 0.5), got {self.jitter}")
        if self.seed < 0:  # numpy's SeedSequence takes no negative seeds
            raise CryoDDMError(f"--seed must be 0 or more, got {self.seed}")
        for name in ("diameter", "diameter_A", "bin", "target_apix"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise CryoDDMError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
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


def validate_schedule(beta: float, steps: int, start: int) -> None:
    """Reject schedules whose α_k would reach 0 or below, or that save nothing."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise CryoDDMError(f"β must be positive, got {beta}")
    if steps < 1:
        raise CryoDDMError(f"the number of steps T must be at least 1, got {steps}")
    if beta * steps >= 1:
        raise CryoDDMError(f"β·T = {beta}·{steps} = {beta * steps:.4g} ≥ 1: α_T = 1 − β·T would "
                           f"reach 0 or below; lower β or T")
    if start < 1:
        raise CryoDDMError(f"start must be at least 1, got {start}")
    if start >= steps:
        raise CryoDDMError(f"start {start} must be smaller than T = {steps} (the pairs of steps "
                           f"start…T−1 train, step T validates)")


def schedule_coefficients(beta: float, steps: int) -> dict[str, np.ndarray]:
    """Per step k = 1…T: α_k, the x-coefficient, the noise coefficient and the cumulative
    x-coefficient (the original program's coefficient table)."""
    k = np.arange(1, steps + 1, dtype=np.float64)
    alpha = 1.0 - beta * k
    if (alpha <= 0).any():
        raise CryoDDMError(f"β·T = {beta * steps:.4g} ≥ 1: α would reach 0")
    x_coef = np.sqrt(alpha) + np.sqrt(1.0 - alpha) * (np.sqrt(alpha) - 1.0)
    noise_coef = 1.0 - alpha
    return {"k": k.astype(int), "alpha": alpha, "x_coef": x_coef, "noise_coef": noise_coef,
            "cumulative_x_coef": np.cumprod(x_coef)}


def diffuse_step(x: np.ndarray, noise: np.ndarray, x_coef: float, noise_coef: float) -> np.ndarray:
    """One step of the chain in float32 (so a saved x_{k−1} is exactly what produced x_k)."""
    out = np.multiply(x, np.float32(x_coef), dtype=np.float32)
    out += np.float32(noise_coef) * np.asarray(noise, dtype=np.float32)
    return out


def chain(x0: np.ndarray, noises: np.ndarray, beta: float) -> np.ndarray:
    """x_0…x_T for one crop, given its noise patch at each step (`noises[k−1]` = n_k)."""
    coef = schedule_coefficients(beta, len(noises))
    xs = [np.asarray(x0, dtype=np.float32)]
    for k in range(len(noises)):
        xs.append(diffuse_step(xs[-1], noises[k], coef["x_coef"][k], coef["noise_coef"][k]))
    return np.stack(xs)


def pair_noise(n_crops: int, n_noise: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Noise patch index for each crop at each step, shape (N, T), as the original: N ≤ M draws N
    patches without replacement, N > M tiles the stack ⌈N/M⌉ times, cuts to N and shuffles; the
    paired stack is re-shuffled after every step."""
    if n_noise < 1:
        raise CryoDDMError("no noise patches to pair with the particle crops")
    if n_crops <= n_noise:
        paired = rng.choice(n_noise, size=n_crops, replace=False)
    else:
        paired = np.tile(np.arange(n_noise), math.ceil(n_crops / n_noise))[:n_crops]
        paired = rng.permutation(paired)
    out = np.empty((n_crops, steps), dtype=np.int64)
    for k in range(steps):
        out[:, k] = paired
        paired = rng.permutation(paired)
    return out


# ----------------------------------------------------------------------------- planning

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
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in (".star", ".cbox")
                           or (kind == "noise" and q.suffix.lower() == ".txt"))
            if not found:
                raise InputError(p, f"folder holds no {kind} coordinate files (.star, .cbox"
                                    f"{', .txt' if kind == 'noise' else ''})")
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
        raise CryoDDMError(f"{label}: no {kind} coordinate matches any micrograph: "
                           + m.describe_mismatch())
    return np.array([m.mapping.get(n, -1) for n in table["micrograph"].astype(str)], dtype=np.int64)


def plan_forward(micrographs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
                 particles: Any, noise: Any, config: ForwardConfig,
                 out: str | os.PathLike[str] | None = None) -> ForwardPlan:
    """Check every input and decide every crop from headers and coordinates (no pixels read).

    Raises a `CryoDDMError` naming the problem for anything a run would fail on, so a bad run
    writes nothing.
    """
    if out is not None:
        _check_output(Path(out), config.overwrite, [micrographs, _sources(particles),
                                                    _sources(noise)])
    mics, factor, voxel_size, d, window = _plan_micrographs(micrographs, config)
    names = [m.path.name for m in mics]
    crops, counts, msgs = _plan_crops(particles, names, mics, factor, window, config)
    noise_df, noise_counts = _plan_noise(noise, names, mics, factor, window)
    _beta, steps, start = config.schedule
    if d > (1 - 2 * config.jitter) * window:
        msgs.append(f"the particle (d = {d:.0f} px) is larger than {1 - 2 * config.jitter:.2g}·W "
                    f"= {(1 - 2 * config.jitter) * window:.0f} px: a jitter of ±{config.jitter:g}·W "
                    f"can push part of it out of the {window}-px window; use a larger --window "
                    f"or a smaller --jitter")
    if d > window:
        msgs.append(f"the particle (d = {d:.0f} px) is larger than the window W = {window} px")
    n = len(crops)
    counts = {"crops": n, "noise": len(noise_df), "s2_pairs": (steps - start) * n, "val_pairs": n,
              **counts, **noise_counts}
    return ForwardPlan(config, mics, factor, voxel_size, d, window, crops, noise_df, counts, msgs)


def _plan_micrographs(micrographs: Any, config: ForwardConfig
                      ) -> tuple[list[_Micrograph], float, float, float, int]:
    """(micrographs, bin factor, binned Å/px or 0, binned diameter, window) from the headers."""
    from .io.mrc import list_micrographs

    paths = list_micrographs(micrographs)
    infos = [read_header(p) for p in paths]
    for info in infos:
        if info.n_images != 1:
            raise InputError(info.path, f"is a stack of {info.n_images} images, not a micrograph")
    apix_values = sorted({round(i.voxel_size, 4) for i in infos})
    apix = infos[0].voxel_size
    if (config.diameter_A is not None or config.target_apix is not None) and len(apix_values) > 1:
        raise CryoDDMError(f"the micrographs have different pixel sizes ({apix_values} Å/px); "
                           f"give --diameter and --bin in pixels, or run them separately")
    factor = binning.bin_factor(apix, config.target_apix, config.bin)
    d = params.diameter_px(config.diameter, config.diameter_A, apix) / factor
    window = check_window(int(config.window)) if config.window else window_for_diameter(d)
    mics = [_Micrograph(p, i, binned_shape(i.image_shape, factor)) for p, i in zip(paths, infos)]
    for m in mics:
        if window > min(m.shape):
            raise InputError(m.path, f"the window W = {window} px is larger than the micrograph "
                                     f"({m.shape[1]}×{m.shape[0]} px after binning ×{factor:g}); "
                                     f"give a smaller --window or --diameter, or bin less")
    stems = [micrograph_stem(p.name) for p in paths]
    if len(set(stems)) < len(stems):
        dup = sorted({str(p) for p, s in zip(paths, stems) if stems.count(s) > 1})
        raise CryoDDMError(f"micrographs share a name stem, so coordinates cannot tell them apart: "
                           f"{dup[:4]}")
    voxel_size = apix * factor if apix and len(apix_values) == 1 else 0.0
    return mics, factor, voxel_size, d, window


def _plan_crops(particles: Any, names: list[str], mics: list[_Micrograph], factor: float,
                window: int, config: ForwardConfig) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
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
        raise CryoDDMError(f"{plabel}: {off_note} Nothing to crop; check the coordinates "
                           "(a smaller --window would not help)")
    if crops.empty:
        raise CryoDDMError(f"{plabel}: none of the {n_matched} matched particles "
                           f"gives a {window}×{window} crop inside its micrograph "
                           f"({skipped_outside} leave the image); use a smaller --window or --jitter")
    counts = {"skipped_outside": skipped_outside, "skipped_limit": skipped_limit,
              "unmatched_particles": int((pidx < 0).sum()), "particles_read": len(ptable)}
    return crops, counts, [f"{plabel}: {off_note} They were left out"] if off_image else []


def _off_image_note(off_image: list[int], pidx: np.ndarray, px: np.ndarray, py: np.ndarray,
                    shapes: np.ndarray, mics: list[_Micrograph], factor: float, n_matched: int) -> str:
    """What to say when particles lie outside their micrograph (another pixel size?)."""
    if not off_image:
        return ""
    r = off_image[0]
    ny, nx = shapes[int(pidx[r])]
    return (f"{len(off_image)} of the {n_matched} matched particles lie outside their "
            f"micrograph (e.g. x {px[r] * factor:g}, y {py[r] * factor:g} on "
            f"{mics[int(pidx[r])].path.name}, {int(nx * factor)}×{int(ny * factor)} px): "
            "coordinates for another pixel size or binning, or for other micrographs?")


def _plan_noise(noise: Any, names: list[str], mics: list[_Micrograph], factor: float,
                window: int) -> tuple[pd.DataFrame, dict[str, int]]:
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
        raise CryoDDMError(f"{nlabel}: none of the {int((nidx >= 0).sum())} matched noise boxes "
                           f"fits a {window}×{window} patch inside its micrograph "
                           f"({noise_outside} leave the image); pick boxes at least W/2 = {half} px "
                           f"from the edges (binned frame) or use a smaller --window")
    return noise_df, {"noise_outside": noise_outside, "unmatched_noise": int((nidx < 0).sum()),
                      "noise_read": len(ntable)}




def _check_output(out: Path, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """Before any work: never the working directory, a parent or an input's folder; an existing
    output is replaced only when asked, and only if it is a forward dataset (or empty) — never a
    folder of something else (`safety`, the rule `atomic_dir` applies again when writing)."""
    from .safety import check_output_folder

    finished = (out / "forward.json").exists()
    check_output_folder(out, "forward", overwrite, inputs, FORWARD_LAYOUT, is_forward_folder,
                        ("it holds a finished forward dataset; " if finished else "")
                        + "pass --overwrite to replace it")


# ----------------------------------------------------------------------------- streamed stacks

class StackWriter:
    """A float32 `.mrcs` of known size written image by image with `pwrite` (no memory map, so
    written pages never count towards the process's memory); header statistics at close."""

    def __init__(self, path: Path, n: int, window: int, voxel_size: float = 0.0,
                 label: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.new_mmap(path, shape=(n, window, window), mrc_mode=2, overwrite=True) as mrc:
                mrc.set_image_stack()
                mrc.header.label[0] = b""  # no "Created by mrcfile.py <time>": seeded runs are
                mrc.header.nlabl = 0       # byte-identical
                if voxel_size:
                    mrc.voxel_size = float(voxel_size)
                if label:
                    mrc.add_label(ascii_label(label))
                self.offset = int(mrc.header.nbytes + mrc.header.nsymbt)
        self.path, self.n, self.window = path, n, window
        self.image_bytes = window * window * 4
        self.fd = os.open(path, os.O_RDWR)
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0

    def write(self, index: int, images: np.ndarray) -> None:
        """Write `images` (one W×W image or a block of them) starting at `index`."""
        arr = np.ascontiguousarray(images, dtype="<f4")
        if arr.ndim == 2:
            arr = arr[None]
        if index < 0 or index + len(arr) > self.n:
            raise IndexError(f"{self.path}: images {index}…{index + len(arr) - 1} outside 0…{self.n - 1}")
        os.pwrite(self.fd, arr.tobytes(), self.offset + index * self.image_bytes)
        if arr.size:
            a64 = arr.astype(np.float64)
            self._min = min(self._min, float(arr.min()))
            self._max = max(self._max, float(arr.max()))
            self._sum += float(a64.sum())
            self._sumsq += float(np.square(a64).sum())

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images back from the file (pread), in the order given."""
        out = np.empty((len(indices), self.window, self.window), dtype="<f4")
        for j, i in enumerate(indices):
            buf = os.pread(self.fd, self.image_bytes, self.offset + int(i) * self.image_bytes)
            out[j] = np.frombuffer(buf, dtype="<f4").reshape(self.window, self.window)
        return out

    def close(self) -> None:
        """Set dmin, dmax, dmean and rms in the header, then close."""
        if self.fd < 0:
            return
        total = self.n * self.window * self.window
        if total and np.isfinite(self._min):
            mean = self._sum / total
            rms = math.sqrt(max(0.0, self._sumsq / total - mean * mean))
            os.pwrite(self.fd, struct.pack("<fff", self._min, self._max, mean), 76)
            os.pwrite(self.fd, struct.pack("<f", rms), 216)
        os.close(self.fd)
        self.fd = -1


def _cut(image: np.ndarray, x: int, y: int, window: int) -> np.ndarray:
    """The W×W window centred (W//2) on column x, row y: rows [y−W/2, y+W/2), cols [x−W/2, x+W/2)."""
    h = window // 2
    return image[y - h:y - h + window, x - h:x - h + window]


# ----------------------------------------------------------------------------- the job

@dataclass
class ForwardResult:
    out: Path
    counts: dict[str, int]
    window: int
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def run_forward(micrographs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
                particles: Any, noise: Any, out: str | os.PathLike[str],
                config: ForwardConfig | None = None,
                cancel: CancelToken | None = None) -> Job[ForwardResult]:
    """The forward job: plan, cut crops and noise (each micrograph read once), run the chains.

    `particles` is a STAR file (or several, or a table with micrograph/x/y in raw pixels);
    `noise` a `name x y` text, a STAR file, or a table. Output goes to `OUT.partial/` and is
    renamed to `OUT/` only when complete.
    """
    config = config or ForwardConfig()
    out = Path(out)
    cancel = cancel or CancelToken()
    yield Progress(0, None, "checking inputs")
    plan = plan_forward(micrographs, particles, noise, config, out)
    for msg in plan.warnings:
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    n = plan.counts["crops"]
    with atomic_dir(out, overwrite=config.overwrite, kind="forward",
                    inputs=[micrographs, _sources(particles), _sources(noise)],
                    layout=FORWARD_LAYOUT, manifest=is_forward_folder) as tmp:
        writers = _open_writers(tmp, plan)
        try:
            stats, suspect = yield from _cut_micrographs(plan, writers, cancel)
            noise_index = yield from _diffuse(plan, writers, cancel)
        finally:
            for wr in writers.values():
                wr.close()
        cancel.raise_if_cancelled()
        _write_pairs(tmp / "pairs.npz", plan, noise_index)
        _flag_suspect(plan, suspect)
        manifest = _manifest(plan, stats, suspect)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    yield Progress(_total(plan), _total(plan), f"wrote {n} crops, {plan.counts['s2_pairs']} s2 pairs")
    return ForwardResult(out, plan.counts, plan.window, manifest, plan.warnings)


def _used(plan: ForwardPlan) -> list[int]:
    """The micrographs that hold a crop or a noise patch."""
    return sorted(set(plan.crops["micrograph"]) | set(plan.noise["micrograph"]))


def _total(plan: ForwardPlan) -> int:
    return len(_used(plan)) + plan.counts["crops"]


def _open_writers(folder: Path, plan: ForwardPlan) -> dict[str, StackWriter]:
    """One preallocated stack per role of the layout (`forward_layout.STACK_FILES`)."""
    _beta, steps, start = plan.schedule
    n, m, w, vs = plan.counts["crops"], plan.counts["noise"], plan.window, plan.voxel_size
    tag = f"napari-cryoddm {__version__} forward"
    sizes = {"particles": (n, "x0 particle crops"), "s2_input": ((steps - start) * n, "x_(k-1)"),
             "s2_label": ((steps - start) * n, "x_k"), "val_input": (n, "x_(T-1)"),
             "val_label": (n, "x_T"), "noise": (m, "noise patches")}
    return {key: StackWriter(folder / STACK_FILES[key], count, w, vs, f"{tag}: {what}")
            for key, (count, what) in sizes.items()}


def _cut_micrographs(plan: ForwardPlan, writers: dict[str, StackWriter],
                     cancel: CancelToken) -> Job[tuple[dict[int, list[float]], list[int]]]:
    """Pass 2: each micrograph once → its crops into s1, its noise patches into s3; returns the
    normalisation stats per micrograph and the noise patches whose level is far from theirs."""
    w, spec = plan.window, plan.config.normalisation
    stats: dict[int, list[float]] = {}
    suspect: list[int] = []
    crop_rows = plan.crops.groupby("micrograph").indices
    noise_rows = plan.noise.groupby("micrograph").indices
    for done, mi in enumerate(_used(plan)):
        cancel.raise_if_cancelled()
        mic = plan.micrographs[mi]
        yield Progress(done, _total(plan), f"cutting {mic.path.name}")
        prep = read_prepared(mic.path, plan.factor, spec)
        image, st = prep.image, prep.stats
        stats[mi] = [float(v) for v in st]
        for i in crop_rows.get(mi, ()):
            r = plan.crops.iloc[i]
            writers["particles"].write(int(i), _cut(image, int(r.x), int(r.y), w))
        centre, spread = _background_level(image)
        for i in noise_rows.get(mi, ()):
            r = plan.noise.iloc[i]
            patch = _cut(image, int(r.x), int(r.y), w)
            writers["noise"].write(int(i), patch)
            if abs(float(np.median(patch)) - centre) > SUSPECT_NOISE_LEVEL * spread:
                suspect.append(int(i))
        del image
    return stats, sorted(suspect)


def _diffuse(plan: ForwardPlan, writers: dict[str, StackWriter], cancel: CancelToken) -> Job[np.ndarray]:
    """Pass 3: the chains, a block of crops at a time, noise read back from s3; returns the
    noise index (crop × step) for pairs.npz."""
    beta, steps, start = plan.schedule
    n, m = plan.counts["crops"], plan.counts["noise"]
    coef = schedule_coefficients(beta, steps)
    pair_rng = np.random.default_rng(np.random.SeedSequence(plan.config.seed).spawn(2)[1])
    noise_index = pair_noise(n, m, steps, pair_rng)
    for b0 in range(0, n, _BLOCK):
        cancel.raise_if_cancelled()
        b1 = min(n, b0 + _BLOCK)
        yield Progress(len(_used(plan)) + b0, _total(plan), f"diffusing crops {b0 + 1}–{b1} of {n}")
        x = writers["particles"].read(range(b0, b1))
        for k in range(1, steps + 1):
            noises = writers["noise"].read(noise_index[b0:b1, k - 1])
            x_new = diffuse_step(x, noises, coef["x_coef"][k - 1], coef["noise_coef"][k - 1])
            if start <= k < steps:
                writers["s2_input"].write((k - start) * n + b0, x)
                writers["s2_label"].write((k - start) * n + b0, x_new)
            elif k == steps:
                writers["val_input"].write(b0, x)
                writers["val_label"].write(b0, x_new)
            x = x_new
    return noise_index


def _write_pairs(path: Path, plan: ForwardPlan, noise_index: np.ndarray) -> None:
    """pairs.npz: enough to recompute every saved pair from s1 and s3."""
    beta, steps, start = plan.schedule
    n = plan.counts["crops"]
    ks = np.arange(start, steps + 1)
    pair_k = np.repeat(ks, n).astype(np.int32)
    pair_crop = np.tile(np.arange(n), len(ks)).astype(np.int64)
    pair_set = np.where(pair_k < steps, "s2", "val")
    pair_index = np.where(pair_k < steps, (pair_k - start) * n + pair_crop, pair_crop)
    with open(path, "wb") as fh:
        np.savez(fh, crop=pair_crop, k=pair_k, set=pair_set.astype("U3"),
                 index=pair_index.astype(np.int64), noise=noise_index[pair_crop].astype(np.int64),
                 beta=np.float64(beta), steps=np.int64(steps), start=np.int64(start))


def _flag_suspect(plan: ForwardPlan, suspect: list[int]) -> None:
    """Say which noise patches look like contamination rather than background."""
    plan.counts["noise_suspect"] = len(suspect)
    if suspect:
        msg = (f"{len(suspect)} of {plan.counts['noise']} noise patches (s3 indices {suspect[:8]}"
               f"{' …' if len(suspect) > 8 else ''}) sit more than {SUSPECT_NOISE_LEVEL:g} "
               f"robust SDs from their micrograph's median — likely contamination, carbon or "
               f"ice edges, not background; check those boxes")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
        plan.warnings.append(msg)


def _background_level(image: np.ndarray) -> tuple[float, float]:
    """A normalised micrograph's median and robust SD (1.4826·MAD) from a strided subsample."""
    step = max(1, int(np.ceil(np.sqrt(image.size / (1 << 18)))))
    sample = image[::step, ::step]
    centre = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - centre)))
    return centre, spread or float(sample.std()) or 1.0


def _manifest(plan: ForwardPlan, stats: dict[int, list[float]],
              suspect: Sequence[int] = ()) -> dict[str, Any]:
    beta, steps, start = plan.schedule
    c = plan.config
    coef = schedule_coefficients(beta, steps)
    mics = []
    for i, m in enumerate(plan.micrographs):
        entry = {"path": str(m.path.resolve()), "name": m.path.name, "shape": list(m.shape),
                 "raw_shape": list(m.info.image_shape), "raw_voxel_size": m.info.voxel_size}
        if i in stats:
            entry["normalisation_stats"] = dict(zip(("clip_low", "clip_high", "offset", "scale"),
                                                    stats[i]))
        mics.append(entry)
    return to_jsonable({
        "format": FORMAT, "version": VERSION,
        "window": plan.window, "diameter_px": plan.diameter_px, "bin_factor": plan.factor,
        "voxel_size": plan.voxel_size,
        "schedule": {"beta": beta, "steps": steps, "start": start, "preset": c.preset,
                     "alpha": coef["alpha"], "x_coef": coef["x_coef"],
                     "noise_coef": coef["noise_coef"]},
        "normalisation": c.normalisation.to_dict(),
        "jitter": c.jitter, "seed": c.seed,
        "per_micrograph": c.per_micrograph, "max_crops": c.max_crops,
        "noisier_member": "label",
        "stacks": {"particles": "s1/particles.mrcs", "s2_input": "s2/input.mrcs",
                   "s2_label": "s2/label.mrcs", "val_input": "val/input.mrcs",
                   "val_label": "val/label.mrcs", "noise": "s3/noise.mrcs"},
        "coordinates": "binned frame, RELION convention: x = column, y = row, origin at data[0, 0]; "
                       "the window of a centre (x, y) is rows [y − W/2, y + W/2), "
                       "columns [x − W/2, x + W/2)",
        "counts": plan.counts,
        "warnings": plan.warnings,
        "micrographs": mics,
        "crops": [{"micrograph": int(r.micrograph), "x": int(r.x), "y": int(r.y),
                   "particle_x": float(r.particle_x), "particle_y": float(r.particle_y)}
                  for r in plan.crops.itertuples(index=False)],
        "noise": [{"micrograph": int(r.micrograph), "x": int(r.x), "y": int(r.y)}
                  for r in plan.noise.itertuples(index=False)],
        "noise_suspect": list(suspect),
        "package_version": __version__,
        "complete": True,
    })


# ----------------------------------------------------------------------------- preview

def preview_chain(micrographs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
                  particles: Any, noise: Any, config: ForwardConfig,
                  crop: int = 0, max_noise: int = 64) -> tuple[np.ndarray, ForwardPlan]:
    """x_0…x_T of one planned crop, shape (T+1, W, W), without writing anything.

    Reads the crop's micrograph and up to `max_noise` noise patches (micrographs read once each);
    the noise pairing is a seeded draw like the run's.
    """
    plan = plan_forward(micrographs, particles, noise, config)
    beta, steps, _start = plan.schedule
    crop = int(np.clip(crop, 0, len(plan.crops) - 1))
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(2)[1])
    chosen = np.sort(rng.choice(len(plan.noise), size=min(max_noise, len(plan.noise)), replace=False))
    spec = config.normalisation
    target = plan.crops.iloc[crop]
    images: dict[int, np.ndarray] = {}

    def image(mi: int) -> np.ndarray:
        if mi not in images:
            images[mi] = read_prepared(plan.micrographs[mi].path, plan.factor, spec).image
        return images[mi]

    x0 = _cut(image(int(target.micrograph)), int(target.x), int(target.y), plan.window).copy()
    patches = []
    for mi, grp in plan.noise.iloc[chosen].groupby("micrograph"):
        img = image(int(mi))
        patches.extend(_cut(img, int(r.x), int(r.y), plan.window).copy() for r in grp.itertuples())
        if int(mi) != int(target.micrograph):
            images.pop(int(mi), None)
    idx = pair_noise(1, len(patches), steps, rng)[0]
    return chain(x0, np.stack([patches[i] for i in idx]), beta), plan
