"""What cs2star is asked to do (`Cs2StarConfig`), the tables it builds in memory (`StarTables`) and
what it reports (`Cs2StarResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import ConfigError
from ..errors import CryoDDMError


@dataclass
class Cs2StarConfig:
    """How to convert; the defaults reproduce pyem's `csparc2star.py` apart from image names."""

    swap_xy: bool = field(
        default=True,
        metadata={
            "flag": "--swap-xy",
            "help": "X = x_frac × shape[1], Y = y_frac × shape[0] (cryoSPARC's shape is [ny, nx]). "
            "Keep on; turn off (--no-swap-xy, pyem's --noswapxy) only for files from old tools "
            "that stored the shape as [nx, ny]",
        },
    )
    invert_y: bool = field(
        default=True,
        metadata={
            "flag": "--invert-y",
            "help": "Y from the bottom-left origin of cryoSPARC fractions to RELION's first row. Keep on "
            "when cryoSPARC saw the same micrographs you will extract from (our denoised ones "
            "keep the raw geometry); turn off only when the micrographs are physically Y-flipped "
            "against cryoSPARC's (Patch Motion vs MotionCor2 sums, pyem#81)",
        },
    )
    invert_x: bool = field(
        default=False,
        metadata={
            "flag": "--invert-x",
            "help": "mirror X (x_frac → 1 − x_frac); only for K3 'tall' images written by SerialEM",
        },
    )
    strip_uid: bool = field(
        default=False,
        metadata={
            "help": "remove cryoSPARC's 21-digit 'NNN…_' prefixes from micrograph and image file names, "
            "so names match the files you imported (e.g. the raw micrographs)"
        },
    )
    denoised_suffix: str = field(
        default="",
        metadata={
            "help": "the --suffix prediction added to the denoised micrographs' names (e.g. "
            "'_denoised'); removed from rlnMicrographName so names match the raw micrographs "
            "(prediction keeps the input name by default, so usually empty)"
        },
    )
    micrograph_folder: str | None = field(
        default=None,
        metadata={
            "help": "replace the folder of every rlnMicrographName (the file name is kept), e.g. the "
            "folder of the raw micrographs in your RELION project"
        },
    )
    scale: float | None = field(
        default=None,
        metadata={
            "help": "multiply coordinates by this factor: denoised Å/px ÷ raw Å/px, e.g. 2 when the "
            "micrographs cryoSPARC saw were binned ×2"
        },
    )
    denoised_apix: float | None = field(
        default=None,
        metadata={
            "unit": "Å/px",
            "help": "pixel size of the micrographs cryoSPARC saw (with --raw-apix "
            "instead of --scale; default: location/micrograph_psize_A)",
        },
    )
    raw_apix: float | None = field(
        default=None,
        metadata={
            "unit": "Å/px",
            "help": "pixel size of the raw micrographs (sets the scale and the optics pixel size)",
        },
    )
    raw_micrographs: Path | None = field(
        default=None,
        metadata={
            "help": "RELION micrographs STAR of the raw data (e.g. CtfFind/job004/micrographs_ctf.star): "
            "micrograph names, per-micrograph CTF and optics groups are taken from it, "
            "matched by file stem"
        },
    )
    keep_image_names: bool = field(
        default=False,
        metadata={
            "help": "keep rlnImageName (pointers into cryoSPARC's particle stacks, cut from the "
            "denoised micrographs); off: re-extract from the raw micrographs in RELION"
        },
    )
    relion30: bool = field(
        default=False,
        metadata={
            "help": "write one RELION 3.0 block (optics values per particle, origins in pixels) "
            "instead of RELION 3.1 optics + particles"
        },
    )
    legacy_invert: bool = field(
        default=False,
        metadata={
            "help": "also write the original CryoDDM's invert.star (Y' = height − Y); this undoes the "
            "Y inversion and puts particles at mirrored rows unless your micrographs are "
            "Y-flipped against cryoSPARC's"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace existing outputs"})

    def __post_init__(self) -> None:
        if self.scale is not None and (self.denoised_apix is not None):
            raise CryoDDMError("give --scale, or --denoised-apix with --raw-apix, not both")
        for name in ("scale", "denoised_apix", "raw_apix"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise ConfigError(self, name, f"must be a positive number, got {v}")
        if self.denoised_apix is not None and self.raw_apix is None:
            raise ConfigError(self, "denoised_apix", "needs --raw-apix (the raw micrographs' pixel size)")


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
