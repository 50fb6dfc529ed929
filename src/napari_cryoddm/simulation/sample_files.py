"""What `cryoddm sample` writes beside its micrographs: the particles as RELION 3.1 STAR, as a
cryoSPARC `.cs` pair, and the truth document that every test scores against."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from .. import __version__
from ..config import to_jsonable
from ..errors import CryoDDMError
from .physics import ENVELOPE_BLUR_PX, ENVELOPE_FRACTION, Molecule, cryosparc_pose, stream

if TYPE_CHECKING:
    from .sample_config import SampleConfig

FORMAT = "napari-cryoddm-sample"
FORMAT_VERSION = 1


def particles_star_tables(table: pd.DataFrame, config: SampleConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 optics and particles tables for a truth table."""
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnMicrographPixelSize": [config.pixel_size],
            "rlnVoltage": [config.voltage],
            "rlnSphericalAberration": [config.cs],
            "rlnAmplitudeContrast": [config.amplitude_contrast],
            "rlnImagePixelSize": [config.pixel_size],
            "rlnImageSize": [config.window],
            "rlnImageDimensionality": [2],
        }
    )
    n = len(table)
    particles = pd.DataFrame(
        {
            "rlnMicrographName": table["micrograph"].astype(str).to_numpy(),
            "rlnCoordinateX": table["x"].to_numpy(np.float64),
            "rlnCoordinateY": table["y"].to_numpy(np.float64),
            "rlnAngleRot": table["rot"].to_numpy(np.float64),
            "rlnAngleTilt": table["tilt"].to_numpy(np.float64),
            "rlnAnglePsi": table["psi"].to_numpy(np.float64),
            "rlnOriginXAngst": np.zeros(n),
            "rlnOriginYAngst": np.zeros(n),
            "rlnDefocusU": table["defocus"].to_numpy(np.float64),
            "rlnDefocusV": table["defocus"].to_numpy(np.float64),
            "rlnDefocusAngle": np.zeros(n),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnClassNumber": table["conformation"].to_numpy(np.int64),
            "rlnRandomSubset": table["subset"].to_numpy(np.int64),
        }
    )
    return optics, particles


def micrograph_uids(config: SampleConfig) -> np.ndarray:
    """cryoSPARC-style uint64 uids of the micrographs (their 21-digit path prefixes)."""
    rng = stream(config.seed, 2)
    return rng.integers(1, 2**63, config.n_micrographs, dtype=np.uint64)


def cs_datasets(table: pd.DataFrame, config: SampleConfig):
    """The cryoSPARC particles and passthrough datasets (cryosparc-tools `Dataset`s).

    Fields mirror a real Extract job: `blob/*` names `J2/extract/<uid:021d>_mic_000_particles.mrc`,
    `location/micrograph_path` is `J1/imported/<uid:021d>_mic_000.mrc`, `micrograph_shape` is
    [ny, nx], `center_x_frac = x/nx`, `center_y_frac = 1 − y/ny` (bottom-left origin), the pose a
    Rodrigues vector, `alignments3D/class` 0-based. The passthrough holds `location/*` and `ctf/*`.
    """
    from cryosparc.dataset import Dataset

    n = len(table)
    ny, nx = config.shape
    mic_uids = micrograph_uids(config)
    uid_rng = stream(config.seed, 3)
    uids = np.unique(uid_rng.integers(1, 2**63, n + 16, dtype=np.uint64))[:n]
    uids = uid_rng.permutation(uids)
    if len(uids) < n:  # pragma: no cover - 2⁶³ makes collisions practically impossible
        raise CryoDDMError("uid collision; choose another seed")
    index = table["index"].to_numpy(np.int64)
    stems = [Path(m).stem for m in table["micrograph"]]
    prefix = [f"{int(mic_uids[i]):021d}_{s}" for i, s in zip(index, stems)]
    blob_idx = table.groupby("index").cumcount().to_numpy(np.uint32)
    rotations = (
        Rotation.from_euler("ZYZ", table[["rot", "tilt", "psi"]].to_numpy(np.float64), degrees=True) if n else None
    )
    defocus = table["defocus"].to_numpy(np.float32)

    ctf_fields = {
        "ctf/type": np.array(["imported"] * n, dtype=object),
        "ctf/exp_group_id": np.zeros(n, np.uint32),
        "ctf/accel_kv": np.full(n, config.voltage, np.float32),
        "ctf/cs_mm": np.full(n, config.cs, np.float32),
        "ctf/amp_contrast": np.full(n, config.amplitude_contrast, np.float32),
        "ctf/df1_A": defocus,
        "ctf/df2_A": defocus.copy(),
        "ctf/df_angle_rad": np.zeros(n, np.float32),
        "ctf/phase_shift_rad": np.zeros(n, np.float32),
        "ctf/scale": np.ones(n, np.float32),
        "ctf/scale_const": np.zeros(n, np.float32),
        "ctf/bfactor": np.zeros(n, np.float32),
    }
    location_fields = {
        "location/micrograph_uid": mic_uids[index] if n else np.zeros(0, np.uint64),
        "location/exp_group_id": np.zeros(n, np.uint32),
        "location/micrograph_path": np.array([f"J1/imported/{p}.mrc" for p in prefix], dtype=object),
        "location/micrograph_shape": np.tile(np.array([ny, nx], np.uint32), (n, 1)),
        "location/center_x_frac": (table["x"].to_numpy(np.float64) / nx).astype(np.float32),
        "location/center_y_frac": (1.0 - table["y"].to_numpy(np.float64) / ny).astype(np.float32),
        "location/min_dist_A": np.full(n, config.diameter, np.float32),
    }
    particle_fields = {
        "blob/path": np.array([f"J2/extract/{p}_particles.mrc" for p in prefix], dtype=object),
        "blob/idx": blob_idx,
        "blob/shape": np.tile(np.array([config.window, config.window], np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, config.pixel_size, np.float32),
        "blob/sign": np.full(n, -1.0, np.float32),
        "blob/import_sig": np.zeros(n, np.uint64),
        **ctf_fields,
        **location_fields,
        "alignments3D/split": (table["subset"].to_numpy(np.int64) - 1).astype(np.uint32),
        "alignments3D/shift": np.zeros((n, 2), np.float32),
        "alignments3D/pose": (cryosparc_pose(rotations) if n else np.zeros((0, 3))).astype(np.float32),
        "alignments3D/psize_A": np.full(n, config.pixel_size, np.float32),
        "alignments3D/class_posterior": np.ones(n, np.float32),
        "alignments3D/class": (table["conformation"].to_numpy(np.int64) - 1).astype(np.uint32),
        "alignments3D/class_ess": np.ones(n, np.float32),
    }

    def build(fields: dict) -> Dataset:
        return Dataset([("uid", uids), *fields.items()])

    return build(particle_fields), build({**location_fields, **ctf_fields})


def truth_document(table: pd.DataFrame, config: SampleConfig, molecule: Molecule, micrographs: list[dict]) -> dict:
    """The truth JSON: configuration, molecule, per micrograph and per particle facts."""
    rows = table.to_dict(orient="records")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "package_version": __version__,
        "conventions": {
            "coordinates": "x = column, y = row, pixels, origin at data[0, 0] (RELION)",
            "angles": "RELION ZYZ (rot, tilt, psi), degrees; particle rotation R with A = R^T; "
            "cryoSPARC pose = rotvec(R)",
            "defocus": "Å, underfocus positive, no astigmatism",
            "noise": "white Gaussian, sigma 1 in the micrograph's units",
            "snr": "var(clean over envelope) / var(noise); envelope: CTF-free projection blurred "
            f"{ENVELOPE_BLUR_PX} px > {ENVELOPE_FRACTION} of its maximum",
        },
        "config": to_jsonable(config),
        "window": config.window,
        "diameter_px": config.diameter_px,
        "molecule": molecule.summary(),
        "micrographs": to_jsonable(micrographs),
        "particles": [
            {
                "micrograph": r["micrograph"],
                "index": int(r["index"]),
                "x": int(r["x"]),
                "y": int(r["y"]),
                "rot": float(r["rot"]),
                "tilt": float(r["tilt"]),
                "psi": float(r["psi"]),
                "defocus": float(r["defocus"]),
                "conformation": int(r["conformation"]),
                "subset": int(r["subset"]),
            }
            for r in rows
        ],
    }
