"""The window rule and physical units, decided once for every step."""

from __future__ import annotations

import math

from .errors import CryoDDMError


def window_for_diameter(diameter_px: float) -> int:
    """The original rule W = (⌊1.5·d⌋ // 128 + 1)·128: a multiple of 128 strictly above 1.5·d."""
    if not (math.isfinite(diameter_px) and diameter_px > 0):
        raise CryoDDMError(f"particle diameter must be a positive number, got {diameter_px}")
    return (math.floor(1.5 * diameter_px) // 128 + 1) * 128


def check_window(window: int) -> int:
    """A window must be a multiple of 32 (the network pools five times) and at least 128."""
    if window < 128 or window % 32:
        raise CryoDDMError(f"window {window} px: must be a multiple of 32 and at least 128")
    return int(window)


def diameter_px(diameter_px: float | None = None, diameter_A: float | None = None, apix: float | None = None) -> float:
    """A diameter in pixels, from pixels or from Å and the pixel size (Å/px)."""
    if diameter_px is not None and diameter_A is not None:
        raise CryoDDMError("give the particle diameter in pixels or in Å, not both")
    if diameter_px is not None:
        if not (math.isfinite(diameter_px) and diameter_px > 0):
            raise CryoDDMError(f"particle diameter must be a positive number, got {diameter_px} px")
        return float(diameter_px)
    if diameter_A is None:
        raise CryoDDMError("the particle diameter is required (--diameter PX or --diameter-A Å)")
    if not (math.isfinite(diameter_A) and diameter_A > 0):
        raise CryoDDMError(f"particle diameter must be a positive number, got {diameter_A} Å")
    if not apix or apix <= 0:
        raise CryoDDMError(
            "a diameter in Å needs the pixel size; the micrograph header has none (give --diameter in pixels)"
        )
    return float(diameter_A) / float(apix)
