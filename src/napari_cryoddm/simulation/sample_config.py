"""Every parameter of the synthetic micrographs, in one dataclass (the `cryoddm sample` flags and
the sample-data menu are built from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ConfigError
from ..params import window_for_diameter


def _f(default, help: str, unit: str | None = None, **meta):
    md = {"help": help, **meta}
    if unit:
        md["unit"] = unit
    return field(default=default, metadata=md)


@dataclass
class SampleConfig:
    """What the sample holds. The defaults suit a CPU: 1024² micrographs at 3 Å/px (the 135 Å
    molecule is 45 px, so the forward window is 128) with 7 particles each, which leaves room for
    ≥ 30 noise boxes per micrograph as real micrographs do. The quality benchmark uses
    `pixel_size=1.5` (90 px particles, W = 256)."""

    n_micrographs: int = _f(8, "number of micrographs", flag=["-n", "--n-micrographs"])
    width: int = _f(1024, "micrograph width (columns, x)", "px")
    height: int = _f(1024, "micrograph height (rows, y)", "px")
    pixel_size: float = _f(3.0, "pixel size", "Å/px")
    particles: int = _f(7, "particles per micrograph (placed without overlap, ≥ 1.2 diameters apart)")
    diameter: float = _f(135.0, "molecule diameter", "Å", flag="--diameter-A")
    snr: float = _f(0.05, "SNR = var(clean signal over the particle envelopes) / var(noise)")
    conformations: int = _f(
        2,
        "1: one conformation; 2: half the particles have a domain turned by the hinge angle (rlnClassNumber 1/2)",
        choices=(1, 2),
    )
    hinge_angle: float = _f(12.0, "rotation of the hinged domain (a fifth of the atoms) in conformation 2", "°")
    defocus_min: float = _f(1.0, "smallest defocus (underfocus, one per micrograph)", "µm")
    defocus_max: float = _f(2.5, "largest defocus", "µm")
    voltage: float = _f(300.0, "acceleration voltage", "kV")
    cs: float = _f(2.7, "spherical aberration", "mm")
    amplitude_contrast: float = _f(0.07, "amplitude contrast fraction")
    ice: float = _f(0.3, "std of the smooth ice background, as a fraction of the noise σ")
    atoms: int = _f(2000, "Gaussian atoms in the molecule")
    seed: int = _f(0, "random seed: the same seed gives byte-identical files")

    @property
    def diameter_px(self) -> float:
        return self.diameter / self.pixel_size

    @property
    def window(self) -> int:
        """The forward window W for this particle diameter (the original's rule)."""
        return window_for_diameter(self.diameter_px)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def __post_init__(self) -> None:
        """Refuse the first impossible setting, keyed by its field."""
        for name in (
            "pixel_size",
            "diameter",
            "snr",
            "hinge_angle",
            "defocus_min",
            "defocus_max",
            "voltage",
            "cs",
            "amplitude_contrast",
            "ice",
        ):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(self, name, f"must be a finite number, got {value}")
        checks = [
            ("n_micrographs", self.n_micrographs >= 1, f"must be at least 1, got {self.n_micrographs}"),
            (
                "width",
                self.width >= 64 and self.height >= 64,
                f"and --height must be at least 64 px, got {self.width}×{self.height}",
            ),
            ("pixel_size", self.pixel_size > 0, f"must be positive, got {self.pixel_size} Å/px"),
            ("particles", self.particles >= 0, f"must be ≥ 0, got {self.particles}"),
            ("diameter", self.diameter > 0, f"must be positive, got {self.diameter} Å"),
            # a callable: the diameter in pixels divides by the pixel size checked just above
            (
                "pixel_size",
                lambda: self.diameter_px >= 8,
                lambda: (
                    f"{self.pixel_size}: the molecule would be {self.diameter_px:.1f} px across (diameter "
                    f"{self.diameter} Å); use a smaller pixel size or a larger diameter (≥ 8 px)"
                ),
            ),
            ("snr", self.snr > 0, f"must be positive (SNR), got {self.snr}"),
            ("conformations", self.conformations in (1, 2), f"must be 1 or 2, got {self.conformations}"),
            (
                "defocus_min",
                0 < self.defocus_min <= self.defocus_max,
                f"needs 0 < defocus_min ≤ defocus_max, got {self.defocus_min}–{self.defocus_max} µm",
            ),
            ("voltage", self.voltage > 0, f"must be positive, got {self.voltage} kV"),
            ("cs", self.cs >= 0, f"must be ≥ 0, got {self.cs} mm"),
            (
                "amplitude_contrast",
                0 <= self.amplitude_contrast < 1,
                f"must be in [0, 1), got {self.amplitude_contrast}",
            ),
            ("ice", self.ice >= 0, f"must be ≥ 0, got {self.ice}"),
            ("atoms", self.atoms >= 10, f"must be at least 10, got {self.atoms}"),
            ("seed", self.seed >= 0, f"must be ≥ 0, got {self.seed}"),
        ]
        for name, ok, message in checks:
            if not (ok() if callable(ok) else ok):
                raise ConfigError(self, name, message() if callable(message) else message)
