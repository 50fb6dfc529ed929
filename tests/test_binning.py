"""Fourier binning: exact on band-limited images, no aliasing, voxel size, coordinate round trips.

Tolerance: a band-limited periodic image binned by Fourier cropping equals the same continuous
function sampled on the coarse grid (sample j at position j·f) to float32 round-off; we allow
2e-4 of the image's amplitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_cryoddm.binning import (
    bin_factor,
    binned_shape,
    binned_voxel_size,
    effective_factors,
    fourier_bin,
    to_binned,
    to_unbinned,
)
from napari_cryoddm.errors import CryoDDMError

TOL = 2e-4


def _band_limited(n_y: int, n_x: int, max_cycles: int, seed: int = 0):
    """A sum of random cosines with at most `max_cycles` cycles per image along each axis, as a
    function of continuous (row, col) so we can sample it anywhere."""
    rng = np.random.default_rng(seed)
    waves = [
        (
            rng.integers(-max_cycles, max_cycles + 1),
            rng.integers(-max_cycles, max_cycles + 1),
            rng.uniform(0.2, 1.0),
            rng.uniform(0, 2 * np.pi),
        )
        for _ in range(25)
    ]

    def f(r, c):
        out = np.zeros(np.broadcast(r, c).shape)
        for v, u, a, phi in waves:
            out += a * np.cos(2 * np.pi * (u * c / n_x + v * r / n_y) + phi)
        return out + 3.0

    return f


@pytest.mark.parametrize("shape, factor", [((128, 128), 2), ((96, 160), 2), ((96, 96), 1.5), ((120, 90), 3)])
def test_band_limited_image_binned_equals_analytic_downsample(shape, factor):
    ny, nx = shape
    my, mx = binned_shape(shape, factor)
    f = _band_limited(ny, nx, max_cycles=min(my, mx) // 2 - 2)
    r, c = np.mgrid[0:ny, 0:nx]
    image = f(r, c).astype(np.float32)
    binned = fourier_bin(image, factor)
    assert binned.shape == (my, mx) and binned.dtype == np.float32
    fy, fx = effective_factors(shape, factor)
    rr, cc = np.mgrid[0:my, 0:mx]
    expected = f(rr * fy, cc * fx)  # sample j sits at position j·f: origin kept
    amplitude = np.abs(image - image.mean()).max()
    assert np.abs(binned - expected).max() < TOL * amplitude


def test_no_aliasing_where_block_mean_aliases():
    """A wave above the new Nyquist vanishes; a 2×2 block mean folds it back into the image."""
    n = 128
    r, c = np.mgrid[0:n, 0:n]
    image = np.cos(2 * np.pi * 40 * c / n).astype(np.float32)  # 40 cycles > 32 = new Nyquist
    assert np.abs(fourier_bin(image, 2)).max() < 1e-4
    block = image.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    assert np.abs(block).max() > 0.3


def test_blob_lands_at_scaled_coordinates():
    """A particle at (x, y) in the raw frame is at to_binned((x, y)) after binning."""
    n, f = 256, 4
    r, c = np.mgrid[0:n, 0:n]
    x0, y0 = 150.0, 70.0
    image = np.exp(-((c - x0) ** 2 + (r - y0) ** 2) / (2 * 8.0**2)).astype(np.float32)
    b = fourier_bin(image, f)
    rr, cc = np.mgrid[0 : b.shape[0], 0 : b.shape[1]]
    w = np.clip(b, 0, None)
    centre = np.array([(cc * w).sum() / w.sum(), (rr * w).sum() / w.sum()])
    np.testing.assert_allclose(centre, to_binned(np.array([x0, y0]), f), atol=0.02)


def test_coordinates_round_trip():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 7676, size=(1000, 2))
    for f in (1, 2, 3.0, 2.5, 7.3):
        np.testing.assert_allclose(to_unbinned(to_binned(coords, f), f), coords, rtol=1e-12)
        np.testing.assert_allclose(to_binned(coords, f), coords / f)


def test_voxel_size_and_factor_choice():
    assert bin_factor(0.66, factor=2) == 2.0
    assert bin_factor(0.66, target_apix=1.32) == pytest.approx(2.0)
    assert bin_factor(0.66) == 1.0
    assert binned_voxel_size(0.66, (4096, 4096), 2) == pytest.approx(1.32)
    assert binned_voxel_size(1.0, (1000, 1000), 3) == pytest.approx(1000 / 333)
    with pytest.raises(CryoDDMError, match="not both"):
        bin_factor(1.0, target_apix=2.0, factor=2)
    with pytest.raises(CryoDDMError, match="finer than the data"):
        bin_factor(1.0, target_apix=0.5)
    with pytest.raises(CryoDDMError, match="needs a pixel size"):
        bin_factor(0.0, target_apix=2.0)
    with pytest.raises(CryoDDMError, match="must be ≥ 1"):
        fourier_bin(np.zeros((8, 8)), 0.5)


def test_real_micrograph_binned_keeps_mean_and_low_frequencies(real_data):
    from napari_cryoddm.io.mrc import read_micrograph

    image, info = read_micrograph(real_data / "micrographs/epu2.9_example_bin4.mrc")
    b = fourier_bin(image, 2)
    assert b.shape == (508, 508)
    assert b.mean() == pytest.approx(image.mean(), rel=1e-5)
    # binning by 2 then by 4 equals binning by 8 at once (a crop of a crop)
    coarse_a = fourier_bin(image, 8)
    coarse_b = fourier_bin(b, 4)
    np.testing.assert_allclose(coarse_a, coarse_b, rtol=0, atol=1e-3 * float(np.std(image)))
