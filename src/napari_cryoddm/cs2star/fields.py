"""cryoSPARC `.cs` fields → RELION particle columns: names, the passthrough join, coordinates,
CTF, poses, classes (pyem's mapping; the conventions are in the package docstring)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from ..errors import InputError
from ..io.cryosparc import CsTable
from ..names import micrograph_stem
from .config import Cs2StarConfig
from .rotations import matrix_to_relion_euler, rotvec_to_relion_matrix

UID_PATTERN = re.compile(r"[0-9]{21}_")
LOCATION_FIELDS = ("location/center_x_frac", "location/center_y_frac", "location/micrograph_shape")


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
        name = stem[: -len(suffix)] + name[len(stem) :]
    return f"{folder}/{name}" if folder else name


def replace_folder(path: str, folder: str) -> str:
    """The file name of `path` in `folder` (`--micrograph-folder`)."""
    return str(PurePosixPath(folder) / PurePosixPath(path.replace("\\", "/")).name)


def join_passthroughs(primary: CsTable, passthroughs: Sequence[CsTable], notes: list[str]) -> CsTable:
    """Add each passthrough's new fields to the primary rows, matched on `uid` (an inner join, as
    pyem's; primary order kept). Alignments come from the primary file only (pyem's rule)."""
    keep = np.arange(len(primary))  # primary rows still in the result
    extra: dict[str, np.ndarray] = {}  # passthrough columns, aligned with `keep`
    for pt in passthroughs:
        new = [
            f
            for f in pt.fields()
            if f != "uid"
            and f not in primary
            and f not in extra
            and not f.startswith(("alignments2D/", "alignments3D/", "alignments_class_"))
        ]
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
            raise InputError(
                pt.path,
                f"none of its {len(pt)} particle uids matches the "
                f"{len(wanted)} in {primary.path.name}; is it the passthrough "
                "file of the same cryoSPARC job?",
            )
        if not found.all():
            notes.append(
                f"{int((~found).sum())} of {len(wanted)} particles of {primary.path.name} "
                f"are not in {pt.path.name} and were left out"
            )
        keep = keep[found]
        extra = {k: v[found] for k, v in extra.items()}
        rows = order[pos[found]]
        for name in new:
            extra[name] = pt[name][rows]
    columns = {k: v[keep] for k, v in primary.columns.items()}
    columns.update(extra)
    return CsTable(primary.path, columns, int(len(keep)))


def _pose_columns(table: CsTable, cols: dict[str, np.ndarray], notes: list[str]) -> None:
    """Angles, origins (Å), class and random subset from the alignments the primary file holds."""
    prefix = None
    fields = table.fields()
    if "alignments3D/pose" in table:
        prefix = "alignments3D/"
        pose = np.asarray(table["alignments3D/pose"], dtype=np.float64)
        rot, tilt, psi = matrix_to_relion_euler(rotvec_to_relion_matrix(pose))
        cols["rlnAngleRot"], cols["rlnAngleTilt"], cols["rlnAnglePsi"] = rot, tilt, psi
        source = {k: table[prefix + k] for k in ("shift", "psize_A", "split", "class") if prefix + k in table}
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
            source = {k: table[prefix + k] for k in ("shift", "psize_A", "split", "class") if prefix + k in table}
        else:
            return
    if "shift" in source:
        shift = np.asarray(source["shift"], dtype=np.float32).reshape(-1, 2)
        apix = np.asarray(
            source.get(
                "psize_A", table["blob/psize_A"] if "blob/psize_A" in table else np.ones(len(table), np.float32)
            ),
            dtype=np.float32,
        )
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
        ("location/micrograph_shape", ~(np.isfinite(shape) & (shape >= 1)).all(axis=1), "0 (or not a size)"),
    ):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            value = table[name][first]
            raise InputError(
                table.path,
                f"{int(bad.sum())} of {len(fx)} particles have {name} "
                f"{what} (first: row {first + 1}, {np.asarray(value).tolist()}); "
                "their coordinates cannot be computed — is the file damaged, "
                "or from another tool?",
            )


def map_fields(
    table: CsTable, config: Cs2StarConfig, scale: float, notes: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """cryoSPARC columns → RELION columns (arrays), and the micrograph height per particle."""
    n = len(table)
    cols: dict[str, np.ndarray] = {}
    if "blob/path" in table and "blob/idx" in table:
        paths = [clean_path(p, config.strip_uid) for p in table["blob/path"]]
        idx = np.asarray(table["blob/idx"], dtype=np.int64) + 1
        cols["rlnImageName"] = np.array([f"{i:06d}@{p}" for i, p in zip(idx.tolist(), paths)], dtype=object)
    if "location/micrograph_path" in table:
        cols["rlnMicrographName"] = np.array(
            [
                strip_name_suffix(clean_path(p, config.strip_uid), config.denoised_suffix)
                for p in table["location/micrograph_path"]
            ],
            dtype=object,
        )
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
        notes.append(
            "no particle coordinates: this file lacks "
            + ", ".join(missing)
            + " (pass the job's passthrough file, e.g. J<N>_passthrough_particles.cs)"
        )
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
