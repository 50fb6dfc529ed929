"""The whole conversion in memory (`build_tables`): particle and optics tables from the mapped
fields, coordinates scaled to the raw micrographs, their names, CTF and optics joined in from a
raw micrographs STAR, and the RELION 3.0 single block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CryoDDMError, InputError
from ..io.cryosparc import CsTable
from ..io.star import read_star_blocks
from ..names import match_names
from .config import Cs2StarConfig, StarTables
from .fields import UID_PATTERN, join_passthroughs, map_fields, replace_folder

# RELION columns that describe an optics group (RELION 3.1 data_optics), in pyem's output order.
OPTICS_COLUMNS = (
    "rlnVoltage",
    "rlnImagePixelSize",
    "rlnMicrographPixelSize",
    "rlnMicrographOriginalPixelSize",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
    "rlnOpticsGroup",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnOpticsGroupName",
    "rlnMtfFileName",
)
# Per-micrograph CTF columns: taken from `--raw-micrographs` when given.
CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
    "rlnCtfAstigmatism",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
)
# Particle column order (pyem's: names, coordinates, alignments, CTF, then the rest).
_FIELD_ORDER = (
    "rlnImageName",
    "rlnMicrographName",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnVoltage",
    "rlnMagnification",
    "rlnDetectorPixelSize",
    "rlnImagePixelSize",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnSphericalAberration",
    "rlnPhaseShift",
    "rlnAmplitudeContrast",
    "rlnCtfBfactor",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
)


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
            raise CryoDDMError(
                "--raw-apix needs --denoised-apix (this .cs has no single "
                "location/micrograph_psize_A to take it from), or give --scale"
            )
        notes.append(
            f"binning not checked: the .cs records no micrograph pixel size; give --scale "
            f"if cryoSPARC saw binned micrographs (raw: {raw:g} Å/px in {raw_from})"
        )
        return 1.0
    scale = round(float(denoised) / float(raw), 5)  # float32 pixel sizes: 2.12/1.06 → 2
    if scale != 1.0 and config.raw_apix is None and config.denoised_apix is None:
        notes.append(
            f"coordinates × {scale:g}: cryoSPARC's micrographs have {denoised:.4g} Å/px, "
            f"the raw ones {raw:.4g} Å/px ({raw_from}); give --scale to override"
        )
    return scale


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in _FIELD_ORDER if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _raw_micrograph_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    blocks = read_star_blocks(path)
    mics = next((b for name, b in blocks.items() if name != "optics" and "rlnMicrographName" in b.columns), None)
    if mics is None:
        raise InputError(
            path,
            "has no block with rlnMicrographName; expected a RELION micrographs "
            "STAR such as CtfFind/job004/micrographs_ctf.star",
        )
    optics = blocks.get("optics")
    return mics, optics


def _join_raw(
    df: pd.DataFrame, optics: pd.DataFrame, raw_path: Path, config: Cs2StarConfig, scale: float, notes: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replace micrograph names, per-micrograph CTF and optics with the raw data's, by stem."""
    if "rlnMicrographName" not in df.columns:
        raise InputError(
            raw_path,
            "cannot be joined: the particles have no micrograph names "
            "(location/micrograph_path); pass the passthrough file",
        )
    mics, raw_optics = _raw_micrograph_tables(raw_path)
    mics = mics.drop_duplicates("rlnMicrographName").reset_index(drop=True)
    raw_names = mics["rlnMicrographName"].astype(str).tolist()
    ours = df["rlnMicrographName"].astype(str)
    # cryoSPARC prefixes imported files with a 21-digit UID; the raw names never carry it
    keyed = ours.map(lambda s: UID_PATTERN.sub("", s))
    match = match_names(keyed.unique().tolist(), raw_names)
    if not match.mapping:
        raise InputError(raw_path, "no micrograph matches the particles' micrographs: " + match.describe_mismatch())
    row = keyed.map(match.mapping)
    keep = row.notna().to_numpy()
    if not keep.all():
        notes.append(
            f"{int((~keep).sum())} particles on {len(match.unmatched)} micrographs "
            f"not in {raw_path.name} were left out ({match.describe_mismatch()})"
        )
    df = df.loc[keep].reset_index(drop=True)
    rows = row[keep].astype(np.int64).to_numpy()
    per_mic = mics.iloc[rows].reset_index(drop=True)
    df = df.drop(columns=[c for c in CTF_COLUMNS + OPTICS_COLUMNS if c in df.columns] + ["rlnMicrographName"])
    df.insert(0, "rlnMicrographName", per_mic["rlnMicrographName"].astype(str).to_numpy())
    for c in CTF_COLUMNS:
        if c in per_mic.columns:
            df[c] = per_mic[c].to_numpy()
    group = (
        pd.to_numeric(per_mic["rlnOpticsGroup"]).astype(np.int64).to_numpy()
        if "rlnOpticsGroup" in per_mic.columns
        else np.ones(len(df), np.int64)
    )
    df["rlnOpticsGroup"] = group
    # optics: the raw table when there is one, else the optics values in the micrograph rows
    if raw_optics is not None and "rlnOpticsGroup" in raw_optics.columns:
        new_optics = raw_optics.copy()
        new_optics["rlnOpticsGroup"] = pd.to_numeric(new_optics["rlnOpticsGroup"]).astype(np.int64)
    else:
        present = [c for c in OPTICS_COLUMNS if c in per_mic.columns and c != "rlnOpticsGroup"]
        new_optics = per_mic[present].assign(rlnOpticsGroup=group).groupby("rlnOpticsGroup").first().reset_index()
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
        new_optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in new_optics["rlnOpticsGroup"]]
    return df, new_optics


def build_tables(
    primary: CsTable, passthroughs: Sequence[CsTable] = (), config: Cs2StarConfig | None = None
) -> StarTables:
    """The whole conversion in memory (no files written): RELION particles and optics tables."""
    config = config or Cs2StarConfig()
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
    df["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in df["rlnOpticsGroup"].tolist()]
    if "rlnPhaseShift" not in df.columns:
        df["rlnPhaseShift"] = 0  # pyem's default; RELION assumes 0 as well

    if config.micrograph_folder and "rlnMicrographName" in df.columns and config.raw_micrographs is None:
        df["rlnMicrographName"] = [replace_folder(p, config.micrograph_folder) for p in df["rlnMicrographName"]]

    optics_cols = [c for c in OPTICS_COLUMNS if c in df.columns]
    optics = df[optics_cols].groupby("rlnOpticsGroup", sort=True).first().reset_index()
    optics = optics[[c for c in OPTICS_COLUMNS if c in optics.columns]]
    particles = df.drop(columns=[c for c in optics_cols if c != "rlnOpticsGroup"])

    if config.raw_apix is not None and config.raw_micrographs is None:
        box_A = (
            (optics["rlnImageSize"] * optics["rlnImagePixelSize"]).astype(np.float64)
            if {"rlnImageSize", "rlnImagePixelSize"} <= set(optics.columns)
            else None
        )
        if not config.keep_image_names:
            optics["rlnImagePixelSize"] = float(config.raw_apix)
            if box_A is not None:
                optics["rlnImageSize"] = [int(2 * round(b / config.raw_apix / 2)) for b in box_A]

    if config.raw_micrographs is not None:
        particles, optics = _join_raw(particles, optics, Path(config.raw_micrographs), config, scale, notes)

    if not config.keep_image_names and "rlnImageName" in particles.columns:
        particles = particles.drop(columns=["rlnImageName"])
        notes.append(
            "rlnImageName left out (it points at particle stacks cut from the micrographs "
            "cryoSPARC saw); re-extract from the raw micrographs in RELION (Extract, "
            "'Re-extract refined particles' with this file), or pass --keep-image-names"
        )
    elif config.keep_image_names and scale != 1.0:
        notes.append(
            "rlnImageName kept: those stacks were cut from the denoised micrographs at "
            f"{scale:g}× the raw pixel size, unlike the coordinates"
        )

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
    apix = pd.to_numeric(per["rlnImagePixelSize"]).to_numpy() if "rlnImagePixelSize" in per.columns else None
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
