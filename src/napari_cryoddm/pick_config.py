"""Every parameter of noise picking, in one dataclass: the CLI flags and the widget form are built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .binning import bin_factor
from .config import ConfigError
from .params import diameter_px, window_for_diameter


@dataclass
class PickConfig:
    """Everything the noise picker needs besides the micrographs and the particle coordinates."""

    diameter: float | None = field(
        default=None,
        metadata={"help": "particle diameter in pixels of the micrographs given", "unit": "px", "widget": False},
    )
    diameter_A: float | None = field(
        default=None,
        metadata={
            "help": "particle diameter in Å (turned into pixels with the header's pixel size)",
            "unit": "Å",
            "flag": "--diameter-A",
            "widget": False,
        },
    )
    box: int | None = field(
        default=None,
        metadata={
            "help": "noise box side; default: the forward window W = (⌊1.5·d⌋ // 128 + 1)·128",
            "unit": "px",
            "widget": False,
        },
    )
    bin: float | None = field(
        default=None,
        metadata={
            "help": "the bin factor forward will use (--bin there): the default box is then the "
            "binned window W scaled back to these micrographs' pixels",
            "widget": False,
        },
    )
    target_apix: float | None = field(
        default=None,
        metadata={
            "help": "the pixel size forward will bin to (--target-apix there), instead of --bin",
            "unit": "Å/px",
            "widget": False,
        },
    )
    max_per_micrograph: int = field(
        default=100, metadata={"help": "most new boxes per micrograph", "label": "max per micrograph"}
    )
    overlap: float = field(
        default=0.0,
        metadata={
            "help": "largest allowed overlap between two boxes, as a fraction of a box's area "
            "(0: boxes may touch but not overlap)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random visiting order"})
    edge_margin: int = field(
        default=0,
        metadata={
            "help": "keep boxes this far from the micrograph edges (motion-correction edge artefacts)",
            "unit": "px",
        },
    )
    grid_step: int | None = field(
        default=None, metadata={"help": "candidate grid step; default box/8", "unit": "px", "widget": False}
    )
    empty_threshold: float = field(
        default=0.9,
        metadata={
            "help": "coordinate-free mode: propose boxes whose structure score is at most this "
            "multiple of the micrograph's median box score (lower = stricter)",
            "label": "empty threshold",
        },
    )
    screen: bool = field(
        default=True,
        metadata={
            "help": "with coordinates, also read the pixels and leave out boxes on contamination, "
            "carbon or vacuum (background level > 3 robust σ off) and on strong structure "
            "nobody picked (--no-screen: headers only, faster)",
            "label": "screen pixels",
        },
    )
    allow_unmatched: bool = field(
        default=False,
        metadata={
            "help": "accept particle files that also name micrographs not given (a subset run)",
            "label": "allow unmatched names",
        },
    )

    def __post_init__(self) -> None:
        if self.max_per_micrograph < 1:  # 0 would write an empty noise file and call it done
            raise ConfigError(self, "max_per_micrograph", f"must be at least 1, got {self.max_per_micrograph}")
        if self.seed < 0:
            raise ConfigError(self, "seed", f"must be ≥ 0, got {self.seed}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(self, "overlap", f"is a fraction of the box area in [0, 1), got {self.overlap}")
        if self.box is not None and self.box < 2:
            raise ConfigError(self, "box", f"must be at least 2 px, got {self.box}")
        if self.edge_margin < 0:
            raise ConfigError(self, "edge_margin", f"must be ≥ 0, got {self.edge_margin}")
        if self.grid_step is not None and self.grid_step < 1:
            raise ConfigError(self, "grid_step", f"must be ≥ 1, got {self.grid_step}")
        if self.empty_threshold <= 0:
            raise ConfigError(self, "empty_threshold", f"must be positive, got {self.empty_threshold}")

    def resolve(self, apix: float | None) -> tuple[float, int]:
        """(diameter, box side) in pixels of the micrographs given (pixel size `apix` Å/px).

        Coordinates always stay in these pixels; when forward will bin by f, its window is
        W(d / f) binned pixels, i.e. W(d / f)·f of these, and that is the box tested.
        """
        d = diameter_px(self.diameter, self.diameter_A, apix)
        if self.box:
            return d, int(self.box)
        factor = bin_factor(apix, self.target_apix, self.bin)
        return d, int(math.ceil(window_for_diameter(d / factor) * factor - 1e-9))
