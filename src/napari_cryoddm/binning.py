"""Binning by Fourier cropping (no aliasing, unlike block averaging) and the coordinate maps.

A Fourier crop keeps sample 0 at position 0, so a point at x in the unbinned frame sits at x / f
in the binned one, and the voxel size grows by f.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from .errors import CryoDDMError


def binned_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return tuple(max(1, int(round(n / factor))) for n in shape)  # type: ignore[return-value]


def fourier_bin(image: np.ndarray, factor: float) -> np.ndarray:
    """Bin a 2-D image by `factor` ≥ 1 by keeping its central Fourier coefficients."""
    if factor < 1:
        raise CryoDDMError(f"bin factor must be ≥ 1, got {factor}")
    if factor == 1:
        return np.asarray(image, dtype=np.float32)
    ny, nx = image.shape
    my, mx = binned_shape((ny, nx), factor)
    spec = scipy.fft.fftshift(scipy.fft.fft2(np.asarray(image, dtype=np.float32), workers=-1))
    cy, cx = ny // 2, nx // 2
    y0, x0 = cy - my // 2, cx - mx // 2
    crop = spec[y0 : y0 + my, x0 : x0 + mx]
    out = scipy.fft.ifft2(scipy.fft.ifftshift(crop), workers=-1).real
    out *= (my * mx) / (ny * nx)
    return out.astype(np.float32)


def bin_factor(apix: float | None, target_apix: float | None = None, factor: float | None = None) -> float:
    """The bin factor from `--bin N` or from `--target-apix A` and the header's pixel size."""
    if factor is not None and target_apix is not None:
        raise CryoDDMError("give --bin or --target-apix, not both")
    if factor is not None:
        if factor < 1:
            raise CryoDDMError(f"--bin must be ≥ 1, got {factor}")
        return float(factor)
    if target_apix is None:
        return 1.0
    if not apix or apix <= 0:
        raise CryoDDMError("--target-apix needs a pixel size in the micrograph header")
    if target_apix < apix:
        raise CryoDDMError(f"--target-apix {target_apix} Å is finer than the data ({apix} Å/px)")
    return float(target_apix) / float(apix)


def to_binned(coords: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(coords, dtype=np.float64) / factor


def to_unbinned(coords: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(coords, dtype=np.float64) * factor


def effective_factors(shape: tuple[int, int], factor: float) -> tuple[float, float]:
    """(fy, fx) actually applied: n / round(n / factor) per axis. Equal to `factor` when it divides
    the size; otherwise within 1/m of it (e.g. 1000 px ÷ 3 → 333 px, 3.003×)."""
    m = binned_shape(shape, factor)
    return (shape[0] / m[0], shape[1] / m[1])


def binned_voxel_size(apix: float, shape: tuple[int, int], factor: float) -> float:
    """The voxel size (Å/px) after `fourier_bin(image, factor)` (x axis, as MRC headers keep)."""
    return float(apix) * effective_factors(shape, factor)[1]
