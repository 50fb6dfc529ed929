"""The 8 flips/rotations of a square image (the dihedral group D4): training augmentation and
test-time augmentation share one definition, and inference need not import training."""

from __future__ import annotations

import numpy as np


def d4(image: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/rotations (code 0 = identity; 4–7 add a left-right flip)."""
    out = np.rot90(image, code % 4)
    return out[:, ::-1] if code >= 4 else out


def d4_inverse(image: np.ndarray, code: int) -> np.ndarray:
    """Undo `d4(·, code)`."""
    out = image[:, ::-1] if code >= 4 else image
    return np.rot90(out, -(code % 4))


__all__ = ["d4", "d4_inverse"]
