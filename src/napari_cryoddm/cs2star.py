"""cs2star: cryoSPARC particle sets (`.cs`) → RELION STAR files for the raw micrographs.

Picking and 3D classification run in cryoSPARC on denoised (often binned) micrographs; refinement
runs in RELION on the raw ones. This module maps the cryoSPARC fields the way pyem's
`csparc2star.py` does (checked against pyem's own output in the tests), then optionally carries the
particles back to the raw micrographs: coordinates rescaled by the binning factor, micrograph names
mapped to the raw names, per-micrograph CTF and optics taken from the raw data.

Conventions (pyem's defaults, which are right for cryoSPARC fractions):
- `location/micrograph_shape` is [ny, nx]; X = fx · nx, Y = (1 − fy) · ny (cryoSPARC fractions
  start at the bottom-left, RELION coordinates at the first stored pixel, top-left in napari),
  rounded half-to-even to integer pixels as pyem does.
- `alignments3D/pose` is a rotation vector; RELION's matrix is the transpose of the rotation it
  describes, decomposed into ZYZ (rot, tilt, psi) in degrees.
- shifts (pixels at the alignment pixel size) → `rlnOriginX/YAngst` = shift · alignment Å/px.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from . import __version__
from .atomic import atomic_dir
from .errors import CryoDDMError, InputError, OutputExistsError
from .io.cryosparc import CsTable, load_cs
from .io.star import read_star_blocks, write_particles_star
from .jobs import CancelToken, Job, Progress
from .names import match_names, micrograph_stem


UID_PATTERN = re.compile(r"[0-9]{21}_")
_JOB_NAME = re.compile(r"^J(\d+)$")

LOCATION_FIELDS = ("location/center_x_frac", "location/center_y_frac", "location/micrograph_shape")

# RELION columns that describe an optics group (RELION 3.1 data_optics), in pyem's output order.
OPTICS_COLUMNS = ("rlnVoltage", "rlnImagePixelSize", "rlnMicrographPixelSize",
                  "rlnMicrographOriginalPixelSize", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike",
                  "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
                  "rlnOpticsGroup", "rlnImageSize", "rlnImageDimensionality", "rlnOpticsGroupName",
                  "rlnMtfFileName")
# Per-micrograph CTF columns: taken from `--raw-micrographs` when given.
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
               "rlnCtfScalefactor", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnCtfAstigmatism",
               "rlnCtfImage", "rlnCtfPowerSpectrum")
# Particle column order (pyem's: names, coordinates, alignments, CTF, then the rest).
_FIELD_ORDER = ("rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
                "rlnOriginXAngst", "rlnOriginYAngst", "rlnVoltage", "rlnMagnification",
                "rlnDetectorPixelSize", "rlnImagePixelSize", "rlnDefocusU", "rlnDefocusV",
                "rlnDefocusAngle", "rlnSphericalAberration", "rlnPhaseShift", "rlnAmplitudeContrast",
                "rlnCtfBfactor", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit")


@dataclass
class Cs2StarConfig:
    """How to convert; the defaults reproduce pyem's `csparc2star.py` apart from image names."""

    swap_xy: bool = field(default=True, metadata={
        "flag": "--swap-xy",
        "help": "X = x_frac × shape[1], Y = y_frac × shape[0] (cryoSPARC's shape is [ny, nx]). "
                "Keep on; turn off (--no-swap-xy, pyem's --noswapxy) only for files from old tools "
                "that stored the shape as [nx, ny]"})
    invert_y: bool = field(default=True, metadata={
        "flag": "--invert-y",
        "help": "Y from the bottom-left origin of cryoSPARC fractions to RELION's first row. Keep on "
                "when cryoSPARC saw the same micrographs you will extract from (our denoised ones "
                "keep the raw geometry); turn off only when the micrographs are physically Y-flipped "
                "against cryoSPARC's (Patch Motion vs MotionCor2 sums, pyem#81)"})
    invert_x: bool = field(default=False, metadata={
        "flag": "--invert-x",
        "help": "mirror X (x_frac → 1 − x_frac); only for K3 'tall' images written by SerialEM"})
    strip_uid: bool = field(default=False, metadata={
        "help": "remove cryoSPARC's 21-digit 'NNN…_' prefixes from micrograph and image file names, "
                "so names match the files you imported (e.g. the raw micrographs)"})
    denoised_suffix: str = field(default="", metadata={
        "help": "the --suffix prediction added to the denoised micrographs' names (e.g. "
                "'_denoised'); removed from rlnMicrographName so names match the raw micrographs "
                "(prediction keeps the input name by default, so usually empty)"})
    micrograph_folder: str | None = field(default=None, metadata={
        "help": "replace the folder of every rlnMicrographName (the file name is kept), e.g. the "
                "folder of the raw micrographs in your RELION project"})
    scale: float | None = field(default=None, metadata={
        "help": "multiply coordinates by this factor: denoised Å/px ÷ raw Å/px, e.g. 2 when the "
                "micrographs cryoSPARC saw were binned ×2"})
    denoised_apix: float | None = field(default=None, metadata={
        "unit": "Å/px", "help": "pixel size of the micrographs cryoSPARC saw (with --raw-apix "
                               "instead of --scale; default: location/micrograph_psize_A)"})
    raw_apix: float | None = field(default=None, metadata={
        "unit": "Å/px", "help": "pixel size of the raw micrographs (sets the scale and the "
                               "optics pixel size)"})
    raw_micrographs: Path | None = field(default=None, metadata={
        "help": "RELION micrographs STAR of the raw data (e.g. CtfFind/job004/micrographs_ctf.star): "
                "micrograph names, per-micrograph CTF and optics groups are taken from it, "
                "matched by file stem"})
    keep_image_names: bool = field(default=False, metadata={
        "help": "keep rlnImageName (pointers into cryoSPARC's particle stacks, cut from the "
                "denoised micrographs); off: re-extract from the raw micrographs in RELION"})
    relion30: bool = field(default=False, metadata={
        "help": "write one RELION 3.0 block (optics values per particle, origins in pixels) "
                "instead of RELION 3.1 optics + particles"})
    legacy_invert: bool = field(default=False, metadata={
        "help": "also write the original CryoDDM's invert.star (Y' = height − Y); this undoes the "
                "Y inversion and puts particles at mirrored rows unless your micrographs are "
                "Y-flipped against cryoSPARC's"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing outputs"})

    def validate(self) -> None:
        if self.scale is not None and (self.denoised_apix is not None):
            raise CryoDDMError("give --scale, or --denoised-apix with --raw-apix, not both")
        for name in ("scale", "denoised_apix", "raw_apix"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise CryoDDMError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        if self.denoised_apix is not None and self.raw_apix is None:
            raise CryoDDMError("--denoised-apix needs --raw-apix (the raw micrographs' pixel size)")


@dataclass
class Cs2StarResult:
    """What a conversion wrote and what the user should know about it."""

    outputs: list[Path]
    n_particles: int
    n_micrographs: int
    columns: list[str]
    scale: float
    notes: list[str] = field(default_factory=list)


@dataclass
class StarTables:
    """The converted tables before writing: particles, optics (None for RELION 3.0) and notes."""

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    notes: list[str]
    scale: float
    heights: np.ndarray | None = None  # micrograph height per particle in output pixels


# ---------------------------------------------------------------------------------------------
# Rotations


def rotvec_to_relion_matrix(rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC pose (rotation vector, N×3) → RELION rotation matrices (N×3×3).

    RELION's matrix is the transpose of the rotation the vector describes (Rodrigues formula).
    """
    v = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    theta = np.linalg.norm(v, axis=1)
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = v / safe[:, None]
    kx, ky, kz = k[:, 0], k[:, 1], k[:, 2]
    zero = np.zeros_like(kx)
    kmat = np.stack([np.stack([zero, -kz, ky], -1),
                     np.stack([kz, zero, -kx], -1),
                     np.stack([-ky, kx, zero], -1)], -2)
    s = np.sin(theta)[:, None, None]
    c = (1.0 - np.cos(theta))[:, None, None]
    r = np.eye(3)[None] + s * kmat + c * (kmat @ kmat)
    r[theta <= 1e-12] = np.eye(3)
    return np.ascontiguousarray(r.transpose(0, 2, 1))


def relion_euler_to_matrix(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's Euler_angles2matrix (ZYZ, degrees) for arrays of angles."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack([np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
                     np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
                     np.stack([sc, ss, cb], -1)], -2)


def matrix_to_relion_euler(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION rotation matrices (N×3×3) → (rot, tilt, psi) in degrees, RELION's decomposition
    (tilt in [0°, 180°]; at tilt 0°/180° rot is 0 and psi carries the in-plane angle)."""
    r = np.asarray(r, dtype=np.float64).reshape(-1, 3, 3)
    abs_sb = np.hypot(r[:, 0, 2], r[:, 1, 2])
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    psi = np.arctan2(r[:, 1, 2], -r[:, 0, 2])
    rot = np.arctan2(r[:, 2, 1], r[:, 2, 0])
    tilt = np.arctan2(abs_sb, r[:, 2, 2])  # sin(tilt) ≥ 0: RELION's branch
    top = r[:, 2, 2] > 0
    psi_deg = np.where(top, np.arctan2(-r[:, 1, 0], r[:, 0, 0]), np.arctan2(r[:, 1, 0], -r[:, 0, 0]))
    rot = np.where(regular, rot, 0.0)
    tilt = np.where(regular, tilt, np.where(top, 0.0, np.pi))
    psi = np.where(regular, psi, psi_deg)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


# ---------------------------------------------------------------------------------------------
# Names


def clean_path(path: str, strip_uid: bool = False) -> str:
    """Remove cryoSPARC's `>` export prefix and, when asked, its 21-digit UID prefixes."""
    path = str(path).strip()
    if path.startswith(">"):
        path = path[1:]
    if strip_uid:
        path = UID_PATTERN.sub("", path)
    return path


def strip_name_suffix(path: str, suffix: str) -> str:
    """`J1/imported/mic_007_denoised.mrc` − `_denoised` → `J1/imported/mic_007.mrc`."""
    if not suffix:
        return path
    folder, _, name = path.replace("\\", "/").rpartition("/")
    stem = micrograph_stem(name)
    if stem.endswith(suffix) and len(stem) > len(suffix) and name.startswith(stem):
        name = stem[: -len(suffix)] + name[len(stem):]
    return f"{folder}/{name}" if folder else name


def replace_folder(path: str, folder: str) -> str:
    return str(PurePosixPath(folder) / PurePosixPath(path.replace("\\", "/")).name)


# ---------------------------------------------------------------------------------------------
# Joining


def join_passthroughs(primary: CsTable, passthroughs: Sequence[CsTable], notes: list[str]) -> CsTable:
    """Add each passthrough's new fields to the primary rows, matched on `uid` (an inner join, as
    pyem's; primary order kept). Alignments come from the primary file only (pyem's rule)."""
    keep = np.arange(len(primary))  # primary rows still in the result
    extra: dict[str, np.ndarray] = {}  # passthrough columns, aligned with `keep`
    for pt in passthroughs:
        new = [f for f in pt.fields() if f != "uid" and f not in primary and f not in extra
               and not f.startswith(("alignments2D/", "alignments3D/", "alignments_class_"))]
        if not new:
            notes.append(f"{pt.path.name}: no fields that {primary.path.name} lacks; ignored")
            continue
        wanted = np.asarray(primary["uid"])[keep]
        order = np.argsort(pt["uid"], kind="stable")
        sorted_uids = np.asarray(pt["uid"])[order]
        if len(sorted_uids):
            pos = np.minimum(np.searchsorted(sorted_uids, wanted), len(sorted_uids) - 1)
            found = sorted_uids[pos] == wanted
        else:
            pos = np.zeros(len(wanted), dtype=np.int64)
            found = np.zeros(len(wanted), dtype=bool)
        if len(wanted) and not found.any():
            raise InputError(pt.path, f"none of its {len(pt)} particle uids matches the "
                                      f"{len(wanted)} in {primary.path.name}; is it the passthrough "
                                      "file of the same cryoSPARC job?")
        if not found.all():
            notes.append(f"{int((~found).sum())} of {len(wanted)} particles of {primary.path.name} "
                         f"are not in {pt.path.name} and were left out")
        keep = keep[found]
        extra = {k: v[found] for k, v in extra.items()}
        rows = order[pos[found]]
        for name in new:
            extra[name] = pt[name][rows]
    columns = {k: v[keep] for k, v in primary.columns.items()}
    columns.update(extra)
    return CsTable(primary.path, columns, int(len(keep)))


# ---------------------------------------------------------------------------------------------
# Mapping


def _micrograph_psize(table: CsTable) -> float | None:
    """The pixel size of the micrographs cryoSPARC saw, when the file records a single one."""
    name = "location/micrograph_psize_A"
    if name in table and len(table):
        values = np.unique(np.asarray(table[name], dtype=np.float64))
        if len(values) == 1 and values[0] > 0:
            return float(values[0])
    return None


def _raw_star_psize(path: Path) -> float | None:
    """The single rlnMicrographPixelSize of a raw micrographs STAR (optics or rows), if any."""
    for block in read_star_blocks(path).values():
        if "rlnMicrographPixelSize" in block.columns:
            values = np.unique(pd.to_numeric(block["rlnMicrographPixelSize"], errors="coerce"))
            values = values[np.isfinite(values)]
            if len(values) == 1 and values[0] > 0:
                return float(values[0])
    return None


def _scale_factor(config: Cs2StarConfig, table: CsTable, notes: list[str]) -> float:
    """Coordinate factor from the micrographs cryoSPARC saw to the raw ones: --scale, else
    denoised Å/px ÷ raw Å/px (raw from --raw-apix or the raw micrographs STAR; denoised from
    --denoised-apix or location/micrograph_psize_A)."""
    if config.scale is not None:
        return float(config.scale)
    raw, raw_from = config.raw_apix, "--raw-apix"
    if raw is None and config.raw_micrographs is not None:
        raw, raw_from = _raw_star_psize(Path(config.raw_micrographs)), Path(config.raw_micrographs).name
    if raw is None:
        return 1.0
    denoised = config.denoised_apix or _micrograph_psize(table)
    if denoised is None:
        if config.raw_apix is not None:
            raise CryoDDMError("--raw-apix needs --denoised-apix (this .cs has no single "
                               "location/micrograph_psize_A to take it from), or give --scale")
        notes.append(f"binning not checked: the .cs records no micrograph pixel size; give --scale "
                     f"if cryoSPARC saw binned micrographs (raw: {raw:g} Å/px in {raw_from})")
        return 1.0
    scale = round(float(denoised) / float(raw), 5)  # float32 pixel sizes: 2.12/1.06 → 2
    if scale != 1.0 and config.raw_apix is None and config.denoised_apix is None:
        notes.append(f"coordinates × {scale:g}: cryoSPARC's micrographs have {denoised:.4g} Å/px, "
                     f"the raw ones {raw:.4g} Å/px ({raw_from}); give --scale to override")
    return scale


def _pose_columns(table: CsTable, cols: dict[str, np.ndarray], notes: list[str]) -> None:
    """Angles, origins (Å), class and random subset from the alignments the primary file holds."""
    prefix = None
    fields = table.fields()
    if "alignments3D/pose" in table:
        prefix = "alignments3D/"
        pose = np.asarray(table["alignments3D/pose"], dtype=np.float64)
        rot, tilt, psi = matrix_to_relion_euler(rotvec_to_relion_matrix(pose))
        cols["rlnAngleRot"], cols["rlnAngleTilt"], cols["rlnAnglePsi"] = rot, tilt, psi
        source = {k: table[prefix + k] for k in ("shift", "psize_A", "split", "class")
                  if prefix + k in table}
    else:
        posts = [f for f in fields if f.startswith("alignments_class_") and f.endswith("/class_posterior")]
        if posts:
            groups = [f.rsplit("/", 1)[0] for f in posts]
            phic = np.stack([np.asarray(table[f], dtype=np.float64) for f in posts])
            best = np.argmax(phic, axis=0)
            rows = np.arange(len(table))

            def pick(k: str) -> np.ndarray | None:
                if not all(f"{g}/{k}" in table for g in groups):
                    return None
                stacked = np.stack([np.asarray(table[f"{g}/{k}"]) for g in groups])
                return stacked[best, rows]

            pose = pick("pose")
            if pose is not None:
                rot, tilt, psi = matrix_to_relion_euler(rotvec_to_relion_matrix(pose))
                cols["rlnAngleRot"], cols["rlnAngleTilt"], cols["rlnAnglePsi"] = rot, tilt, psi
            source = {k: v for k in ("shift", "psize_A", "split", "class") if (v := pick(k)) is not None}
            notes.append(f"poses from the most probable of {len(groups)} 3D classes")
        elif "alignments2D/pose" in table:
            prefix = "alignments2D/"
            cols["rlnAnglePsi"] = np.rad2deg(np.asarray(table["alignments2D/pose"], dtype=np.float32))
            source = {k: table[prefix + k] for k in ("shift", "psize_A", "split", "class")
                      if prefix + k in table}
        else:
            return
    if "shift" in source:
        shift = np.asarray(source["shift"], dtype=np.float32).reshape(-1, 2)
        apix = np.asarray(source.get("psize_A", table["blob/psize_A"] if "blob/psize_A" in table
                                     else np.ones(len(table), np.float32)), dtype=np.float32)
        if "blob/psize_A" in table:
            # pyem: shift to pixels at the particle-image pixel size, then × that pixel size
            bpix = np.asarray(table["blob/psize_A"], dtype=np.float32)
            px = shift * apix[:, None] / bpix[:, None]
            angst = px * bpix[:, None]
        else:
            angst = shift * apix[:, None]
        cols["rlnOriginXAngst"], cols["rlnOriginYAngst"] = angst[:, 0], angst[:, 1]
    if "split" in source:
        split = np.asarray(source["split"], dtype=np.int64)
        if len(np.unique(split)) > 1:  # one value carries no information (pyem drops it too)
            cols["rlnRandomSubset"] = split + 1
    if "class" in source:
        cols["rlnClassNumber"] = np.asarray(source["class"], dtype=np.int64) + 1


def _check_locations(table: CsTable, fx: np.ndarray, fy: np.ndarray) -> None:
    """Fractions must be finite and in [0, 1], micrograph shapes positive: anything else would
    become coordinates such as −9223372036854775808, negative rows or every particle at 0 0."""
    if not len(fx):
        return
    shape = np.asarray(table["location/micrograph_shape"], dtype=np.float64).reshape(len(fx), -1)
    for name, bad, what in (
        ("location/center_x_frac", ~np.isfinite(fx), "NaN or infinite"),
        ("location/center_y_frac", ~np.isfinite(fy), "NaN or infinite"),
        ("location/center_x_frac", np.isfinite(fx) & ((fx < 0) | (fx > 1)), "outside 0…1"),
        ("location/center_y_frac", np.isfinite(fy) & ((fy < 0) | (fy > 1)), "outside 0…1"),
        ("location/micrograph_shape", ~(np.isfinite(shape) & (shape >= 1)).all(axis=1),
         "0 (or not a size)"),
    ):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            value = table[name][first]
            raise InputError(table.path, f"{int(bad.sum())} of {len(fx)} particles have {name} "
                                         f"{what} (first: row {first + 1}, {np.asarray(value).tolist()}); "
                                         "their coordinates cannot be computed — is the file damaged, "
                                         "or from another tool?")


def map_fields(table: CsTable, config: Cs2StarConfig, scale: float, notes: list[str]
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """cryoSPARC columns → RELION columns (arrays), and the micrograph height per particle."""
    n = len(table)
    cols: dict[str, np.ndarray] = {}
    if "blob/path" in table and "blob/idx" in table:
        paths = [clean_path(p, config.strip_uid) for p in table["blob/path"]]
        idx = np.asarray(table["blob/idx"], dtype=np.int64) + 1
        cols["rlnImageName"] = np.array([f"{i:06d}@{p}" for i, p in zip(idx.tolist(), paths)],
                                        dtype=object)
    if "location/micrograph_path" in table:
        cols["rlnMicrographName"] = np.array(
            [strip_name_suffix(clean_path(p, config.strip_uid), config.denoised_suffix)
             for p in table["location/micrograph_path"]], dtype=object)
    heights = None
    missing = [f for f in LOCATION_FIELDS if f not in table]
    if not missing:
        fx = np.asarray(table["location/center_x_frac"], dtype=np.float32)
        fy = np.asarray(table["location/center_y_frac"], dtype=np.float32)
        _check_locations(table, fx, fy)
        if config.invert_x:
            fx = np.float32(1) - fx
        if config.invert_y:
            fy = np.float32(1) - fy  # float32 as pyem, so integer coordinates agree exactly
        shape = np.asarray(table["location/micrograph_shape"], dtype=np.float64).reshape(-1, 2)
        sx, sy = (shape[:, 1], shape[:, 0]) if config.swap_xy else (shape[:, 0], shape[:, 1])
        x = fx.astype(np.float64) * sx
        y = fy.astype(np.float64) * sy
        if scale != 1.0:
            x, y = x * scale, y * scale
        cols["rlnCoordinateX"] = np.round(x).astype(np.int64)
        cols["rlnCoordinateY"] = np.round(y).astype(np.int64)
        heights = np.round(sy * scale).astype(np.int64)
    elif n:
        notes.append("no particle coordinates: this file lacks " + ", ".join(missing)
                     + " (pass the job's passthrough file, e.g. J<N>_passthrough_particles.cs)")
    if "location/micrograph_path" not in table and n:
        notes.append("no micrograph names: location/micrograph_path is missing")

    def put(name: str, field_name: str, fn=None) -> None:
        if field_name in table:
            v = np.asarray(table[field_name])
            cols[name] = fn(v) if fn else v

    put("rlnDefocusU", "ctf/df1_A")
    put("rlnDefocusV", "ctf/df2_A")
    put("rlnDefocusAngle", "ctf/df_angle_rad", lambda v: np.rad2deg(v.astype(np.float32)))
    put("rlnPhaseShift", "ctf/phase_shift_rad", lambda v: np.rad2deg(v.astype(np.float32)))
    put("rlnCtfBfactor", "ctf/bfactor")
    put("rlnCtfFigureOfMerit", "ctf/cross_corr_ctffind4")
    put("rlnCtfMaxResolution", "ctf/ctf_fit_to_A")
    put("rlnVoltage", "ctf/accel_kv")
    put("rlnSphericalAberration", "ctf/cs_mm")
    put("rlnAmplitudeContrast", "ctf/amp_contrast")
    if "ctf/amp_contrast" not in table:
        put("rlnAmplitudeContrast", "ctf/ac")
    put("rlnImagePixelSize", "blob/psize_A")
    if "blob/shape" in table:
        cols["rlnImageSize"] = np.asarray(table["blob/shape"]).reshape(n, -1)[:, 0].astype(np.int64)
    if "ctf/exp_group_id" in table:
        cols["rlnOpticsGroup"] = np.asarray(table["ctf/exp_group_id"], dtype=np.int64) + 1
    _pose_columns(table, cols, notes)
    if "filament/filament_uid" in table:
        fil = np.asarray(table["filament/filament_uid"])
        _, tube = np.unique(fil, return_inverse=True)
        cols["rlnHelicalTubeID"] = tube.astype(np.int64) + 1
    if "rlnDefocusU" not in cols and n:
        notes.append("no CTF values: ctf/* fields are missing")
    return cols, heights


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in _FIELD_ORDER if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _raw_micrograph_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    blocks = read_star_blocks(path)
    mics = next((b for name, b in blocks.items()
                 if name != "optics" and "rlnMicrographName" in b.columns), None)
    if mics is None:
        raise InputError(path, "has no block with rlnMicrographName; expected a RELION micrographs "
                               "STAR such as CtfFind/job004/micrographs_ctf.star")
    optics = blocks.get("optics")
    return mics, optics


def _join_raw(df: pd.DataFrame, optics: pd.DataFrame, raw_path: Path, config: Cs2StarConfig,
              scale: float, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replace micrograph names, per-micrograph CTF and optics with the raw data's, by stem."""
    if "rlnMicrographName" not in df.columns:
        raise InputError(raw_path, "cannot be joined: the particles have no micrograph names "
                                   "(location/micrograph_path); pass the passthrough file")
    mics, raw_optics = _raw_micrograph_tables(raw_path)
    mics = mics.drop_duplicates("rlnMicrographName").reset_index(drop=True)
    raw_names = mics["rlnMicrographName"].astype(str).tolist()
    ours = df["rlnMicrographName"].astype(str)
    # cryoSPARC prefixes imported files with a 21-digit UID; the raw names never carry it
    keyed = ours.map(lambda s: UID_PATTERN.sub("", s))
    match = match_names(keyed.unique().tolist(), raw_names)
    if not match.mapping:
        raise InputError(raw_path, "no micrograph matches the particles' micrographs: "
                         + match.describe_mismatch())
    row = keyed.map(match.mapping)
    keep = row.notna().to_numpy()
    if not keep.all():
        notes.append(f"{int((~keep).sum())} particles on {len(match.unmatched)} micrographs "
                     f"not in {raw_path.name} were left out ({match.describe_mismatch()})")
    df = df.loc[keep].reset_index(drop=True)
    rows = row[keep].astype(np.int64).to_numpy()
    per_mic = mics.iloc[rows].reset_index(drop=True)
    df = df.drop(columns=[c for c in CTF_COLUMNS + OPTICS_COLUMNS if c in df.columns]
                 + ["rlnMicrographName"])
    df.insert(0, "rlnMicrographName", per_mic["rlnMicrographName"].astype(str).to_numpy())
    for c in CTF_COLUMNS:
        if c in per_mic.columns:
            df[c] = per_mic[c].to_numpy()
    group = (pd.to_numeric(per_mic["rlnOpticsGroup"]).astype(np.int64).to_numpy()
             if "rlnOpticsGroup" in per_mic.columns else np.ones(len(df), np.int64))
    df["rlnOpticsGroup"] = group
    # optics: the raw table when there is one, else the optics values in the micrograph rows
    if raw_optics is not None and "rlnOpticsGroup" in raw_optics.columns:
        new_optics = raw_optics.copy()
        new_optics["rlnOpticsGroup"] = pd.to_numeric(new_optics["rlnOpticsGroup"]).astype(np.int64)
    else:
        present = [c for c in OPTICS_COLUMNS if c in per_mic.columns and c != "rlnOpticsGroup"]
        new_optics = per_mic[present].assign(rlnOpticsGroup=group).groupby("rlnOpticsGroup").first() \
            .reset_index()
    new_optics = new_optics[new_optics["rlnOpticsGroup"].isin(np.unique(group))].reset_index(drop=True)
    old = optics.iloc[0] if len(optics) else pd.Series(dtype=object)
    if "rlnMicrographPixelSize" in new_optics.columns and config.raw_apix is None:
        new_optics["rlnImagePixelSize"] = pd.to_numeric(new_optics["rlnMicrographPixelSize"])
    elif config.raw_apix is not None:
        new_optics["rlnImagePixelSize"] = float(config.raw_apix)
    elif "rlnImagePixelSize" in old:
        new_optics["rlnImagePixelSize"] = float(old["rlnImagePixelSize"]) / scale
    if "rlnImageSize" in old and "rlnImagePixelSize" in new_optics.columns and "rlnImagePixelSize" in old:
        box_A = float(old["rlnImageSize"]) * float(old["rlnImagePixelSize"])
        new_optics["rlnImageSize"] = [int(2 * round(box_A / float(p) / 2)) for p in new_optics["rlnImagePixelSize"]]
    new_optics["rlnImageDimensionality"] = 2
    if "rlnOpticsGroupName" not in new_optics.columns:
        new_optics["rlnOpticsGroupName"] = ["opticsGroup%d" % g for g in new_optics["rlnOpticsGroup"]]
    return df, new_optics


def build_tables(primary: CsTable, passthroughs: Sequence[CsTable] = (),
                 config: Cs2StarConfig | None = None) -> StarTables:
    """The whole conversion in memory (no files written): RELION particles and optics tables."""
    config = config or Cs2StarConfig()
    config.validate()
    notes: list[str] = []
    table = join_passthroughs(primary, passthroughs, notes)
    scale = _scale_factor(config, table, notes)
    cols, heights = map_fields(table, config, scale, notes)
    n = len(table)
    df = pd.DataFrame({k: v for k, v in cols.items()}, index=pd.RangeIndex(n))
    if heights is not None:
        df["_height"] = heights
    # rows stay in the particle file's order (pyem re-sorts by stack path after a passthrough
    # join and keeps the file's order otherwise; RELION does not care)
    if "rlnOpticsGroup" not in df.columns:
        df["rlnOpticsGroup"] = 1
    df["rlnImageDimensionality"] = 2
    df["rlnOpticsGroupName"] = ["opticsGroup%d" % g for g in df["rlnOpticsGroup"].tolist()]
    if "rlnPhaseShift" not in df.columns:
        df["rlnPhaseShift"] = 0  # pyem's default; RELION assumes 0 as well

    if config.micrograph_folder and "rlnMicrographName" in df.columns and config.raw_micrographs is None:
        df["rlnMicrographName"] = [replace_folder(p, config.micrograph_folder)
                                   for p in df["rlnMicrographName"]]

    optics_cols = [c for c in OPTICS_COLUMNS if c in df.columns]
    optics = df[optics_cols].groupby("rlnOpticsGroup", sort=True).first().reset_index()
    optics = optics[[c for c in OPTICS_COLUMNS if c in optics.columns]]
    particles = df.drop(columns=[c for c in optics_cols if c != "rlnOpticsGroup"])

    if config.raw_apix is not None and config.raw_micrographs is None:
        box_A = (optics["rlnImageSize"] * optics["rlnImagePixelSize"]).astype(np.float64) \
            if {"rlnImageSize", "rlnImagePixelSize"} <= set(optics.columns) else None
        if not config.keep_image_names:
            optics["rlnImagePixelSize"] = float(config.raw_apix)
            if box_A is not None:
                optics["rlnImageSize"] = [int(2 * round(b / config.raw_apix / 2)) for b in box_A]

    if config.raw_micrographs is not None:
        particles, optics = _join_raw(particles, optics, Path(config.raw_micrographs), config,
                                         scale, notes)

    if not config.keep_image_names and "rlnImageName" in particles.columns:
        particles = particles.drop(columns=["rlnImageName"])
        notes.append("rlnImageName left out (it points at particle stacks cut from the micrographs "
                     "cryoSPARC saw); re-extract from the raw micrographs in RELION (Extract, "
                     "'Re-extract refined particles' with this file), or pass --keep-image-names")
    elif config.keep_image_names and scale != 1.0:
        notes.append("rlnImageName kept: those stacks were cut from the denoised micrographs at "
                     f"{scale:g}× the raw pixel size, unlike the coordinates")

    heights_out = particles.pop("_height").to_numpy() if "_height" in particles.columns else None

    if config.relion30:
        particles = _to_relion30(particles, optics)
        optics_out = None
    else:
        optics_out = optics
    particles = _order_columns(particles)
    return StarTables(particles, optics_out, notes, scale, heights_out)


def _to_relion30(particles: pd.DataFrame, optics: pd.DataFrame) -> pd.DataFrame:
    """One legacy block: optics values per particle, origins in pixels, Magnification 10000."""
    per = optics.set_index("rlnOpticsGroup").loc[particles["rlnOpticsGroup"].to_numpy()].reset_index()
    out = particles.copy()
    for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if c in per.columns:
            out[c] = per[c].to_numpy()
    apix = pd.to_numeric(per["rlnImagePixelSize"]).to_numpy() if "rlnImagePixelSize" in per.columns \
        else None
    if apix is not None:
        out["rlnDetectorPixelSize"] = apix
        out["rlnMagnification"] = 10000.0
    for axis in ("X", "Y"):
        ang = f"rlnOrigin{axis}Angst"
        if ang in out.columns:
            if apix is None:
                raise CryoDDMError("RELION 3.0 origins are in pixels, but the pixel size is unknown")
            out[f"rlnOrigin{axis}"] = pd.to_numeric(out[ang]).to_numpy() / apix
            out = out.drop(columns=[ang])
    return out.drop(columns=["rlnOpticsGroup"])


# ---------------------------------------------------------------------------------------------
# Writing


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
    from .safety import check_location, check_writable

    check_location(path, inputs, what="the STAR output")
    if os.path.lexists(path):
        if path.is_dir():
            raise InputError(path, "is a folder; give a file name ending in .star (or use "
                                   "--job-dir for a folder of class0 … outputs)")
        if not overwrite:
            raise OutputExistsError(path)
        if not _ours(path):
            raise InputError(path, "was not written by cryoddm cs2star (no "
                                   f"'# {STAR_HEADER}' first line); refusing to replace it")
    check_writable(path.parent)


def _write(path: Path, tables: StarTables, overwrite: bool) -> Path:
    if overwrite and path.exists() and not _ours(path):
        raise InputError(path, "was not written by cryoddm cs2star; refusing to replace it")
    return write_particles_star(path, tables.particles, tables.optics, overwrite=overwrite,
                                header=f"{STAR_HEADER} {__version__}")


def legacy_invert_table(tables: StarTables) -> pd.DataFrame:
    """The original CryoDDM's invert.star: rlnCoordinateY ← height − Y (undoes the Y inversion)."""
    p = tables.particles
    if "rlnCoordinateY" not in p.columns or tables.heights is None:
        raise CryoDDMError("--legacy-invert needs particle coordinates (location/* fields)")
    out = p.copy()
    out["rlnCoordinateY"] = tables.heights - p["rlnCoordinateY"].to_numpy()
    return out


_LEGACY_WARNING = ("the legacy invert.star flips Y back (Y' = height − Y), undoing the conversion's own Y "
                   "inversion: its particles sit at mirrored rows unless your micrographs are "
                   "Y-flipped against cryoSPARC's. Check it with an overlay before using it.")


def convert(particles: str | os.PathLike[str], passthroughs: Sequence[str | os.PathLike[str]] = (),
            output: str | os.PathLike[str] = "particles.star", config: Cs2StarConfig | None = None,
            cancel: CancelToken | None = None) -> Job[Cs2StarResult]:
    """Job: convert PARTICLES.cs (+ passthroughs) into one STAR file (and `*_invert.star`)."""
    config = config or Cs2StarConfig()
    cancel = cancel or CancelToken()
    output = Path(output)
    config.validate()
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
    outputs = [_write(output, tables, config.overwrite)]
    if invert is not None:
        try:
            _write(invert_path, replace(tables, particles=invert), config.overwrite)
        except BaseException:
            output.unlink(missing_ok=True)
            raise
        outputs.append(invert_path)
        tables.notes.append(_LEGACY_WARNING)
    result = _result(outputs, tables)
    yield Progress(total, total, "done", {"result": result})
    return result


def _result(outputs: list[Path], tables: StarTables) -> Cs2StarResult:
    p = tables.particles
    n_mic = int(p["rlnMicrographName"].nunique()) if "rlnMicrographName" in p.columns else 0
    return Cs2StarResult(outputs, int(len(p)), n_mic, list(p.columns), tables.scale, list(tables.notes))


# ---------------------------------------------------------------------------------------------
# cryoSPARC job folders (the original's batch workflow)


@dataclass
class JobFiles:
    job_dir: Path
    particles: Path
    passthrough: Path | None


_PARTICLES = re.compile(r"^J(\d+)_(\d{3,})_particles\.cs$")


def find_job_files(job_dir: str | os.PathLike[str]) -> JobFiles:
    """The last iteration's `J<N>_NNN_particles.cs` and `J<N>_passthrough_particles.cs`."""
    job_dir = Path(job_dir)
    m = _JOB_NAME.match(job_dir.name)
    if not job_dir.is_dir():
        raise InputError(job_dir, "no such cryoSPARC job folder")
    if m is None:
        raise InputError(job_dir, "is not a cryoSPARC job folder (its name should be J<number>)")
    number = m.group(1)
    candidates = []
    for f in job_dir.iterdir():
        fm = _PARTICLES.match(f.name)
        if fm and fm.group(1) == number and f.is_file():
            candidates.append((int(fm.group(2)), f))
    if not candidates:
        others = sorted(f.name for f in job_dir.glob("*.cs"))[:5]
        raise InputError(job_dir, f"holds no J{number}_NNN_particles.cs (the particles of a "
                                  "refinement or classification iteration)"
                                  + (f"; .cs files found: {', '.join(others)}" if others else
                                     "; it holds no .cs files at all"))
    particles = max(candidates)[1]
    passthrough = job_dir / f"J{number}_passthrough_particles.cs"
    return JobFiles(job_dir, particles, passthrough if passthrough.is_file() else None)


def job_dirs(job_dir: str | os.PathLike[str], n_jobs: int = 1) -> list[Path]:
    """J<N>, J<N+1>, … J<N+K−1> beside the given one."""
    job_dir = Path(job_dir)
    m = _JOB_NAME.match(job_dir.name)
    if m is None:
        raise InputError(job_dir, "is not a cryoSPARC job folder (its name should be J<number>)")
    if n_jobs < 1:
        raise CryoDDMError(f"--jobs must be at least 1, got {n_jobs}")
    first = int(m.group(1))
    return [job_dir.parent / f"J{first + k}" for k in range(n_jobs)]


def convert_job_dirs(job_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                     n_jobs: int = 1, config: Cs2StarConfig | None = None,
                     cancel: CancelToken | None = None) -> Job[list[Cs2StarResult]]:
    """Job: K consecutive cryoSPARC jobs → OUT/class0 … class{K−1}, each with
    `particles_relion.star` (as configured) and `cleaned_particles_relion.star` (UIDs stripped);
    `invert.star` too with `legacy_invert`. Every file is checked before anything is written."""
    from .safety import check_output_folder

    config = config or Cs2StarConfig()
    cancel = cancel or CancelToken()
    config.validate()
    output_dir = Path(output_dir)
    dirs = job_dirs(job_dir, n_jobs)
    inputs = [dirs, config.raw_micrographs]
    check_output_folder(output_dir, "cs2star", config.overwrite, inputs)
    jobs = [find_job_files(d) for d in dirs]  # all problems surface before any reading
    total = 2 * len(jobs) + 1
    built: list[tuple[StarTables, StarTables, JobFiles]] = []
    for k, jf in enumerate(jobs):
        cancel.raise_if_cancelled()
        yield Progress(k, total, f"reading {jf.job_dir.name}")
        primary = load_cs(jf.particles)
        pts = [load_cs(jf.passthrough)] if jf.passthrough else []
        plain = build_tables(primary, pts, replace(config, strip_uid=False))
        cleaned = build_tables(primary, pts, replace(config, strip_uid=True))
        if jf.passthrough is None:
            plain.notes.insert(0, f"{jf.job_dir.name}: no J{jf.job_dir.name[1:]}_passthrough_particles.cs; "
                                  "converted the particle file alone")
        built.append((plain, cleaned, jf))
    results: list[Cs2StarResult] = []
    with atomic_dir(output_dir, overwrite=config.overwrite, kind="cs2star", inputs=inputs) as tmp:
        for k, (plain, cleaned, jf) in enumerate(built):
            cancel.raise_if_cancelled()
            yield Progress(len(jobs) + k, total, f"writing class{k}")
            folder = tmp / f"class{k}"
            outs = [_write(folder / "particles_relion.star", plain, True),
                    _write(folder / "cleaned_particles_relion.star", cleaned, True)]
            if config.legacy_invert:
                _write(folder / "invert.star", replace(cleaned, particles=legacy_invert_table(cleaned)),
                       True)
                outs.append(folder / "invert.star")
                plain.notes.append(_LEGACY_WARNING)
            final = [output_dir / o.relative_to(tmp) for o in outs]
            res = _result(final, plain)
            res.notes.insert(0, f"class{k} ← {jf.particles.name}"
                             + (f" + {jf.passthrough.name}" if jf.passthrough else ""))
            results.append(res)
    yield Progress(total, total, "done", {"results": results})
    return results
