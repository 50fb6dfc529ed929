"""cs2star: cryoSPARC particle sets (`.cs`) → RELION STAR files for the raw micrographs.

Picking and 3D classification run in cryoSPARC on denoised (often binned) micrographs; refinement
runs in RELION on the raw ones. This package maps the cryoSPARC fields the way pyem's
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

Modules: `config` (the options, the result and the tables in memory), `fields` (cryoSPARC fields →
RELION columns per particle), `rotations` (poses → RELION Euler angles), `tables` (the whole
mapping: scale, optics, the raw micrographs, RELION 3.0), `write` (the STAR output and the
one-set job `convert`), `job_dirs` (cryoSPARC job folders → class folders, `convert_job_dirs`).
"""

from .config import Cs2StarConfig, Cs2StarResult, StarTables
from .job_dirs import convert_job_dirs
from .tables import build_tables
from .write import convert

__all__ = ["Cs2StarConfig", "Cs2StarResult", "StarTables", "build_tables", "convert", "convert_job_dirs"]
