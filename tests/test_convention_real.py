"""The coordinate convention, proven on real data (not assumed).

`Ucsf_stack_1142_DW.mrc` with its RELION autopicks: particles are darker than the ice around
them. Through the same path the napari layers use (lazy stack → attach → `(i, y, x)` points), the
convention x = column, y = row must land on darker pixels than each alternative mapping.

Statistic: each pick's value in a band-passed micrograph (Gaussian σ = 3 px low-pass minus a
σ = 40 px background, so the ice-thickness gradient and the dark contamination blob at the top
right do not dominate), compared per pick between the convention and an alternative: a paired
t statistic, mean(d) / (sd(d) / √n) with d = value(alternative) − value(convention), must reach 3.
A sign test on the same pairs is reported alongside in the assertion message.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import binomtest

from napari_cryoddm.attach import attach_coordinates
from napari_cryoddm.io.stack import open_stack
from napari_cryoddm.io.star import read_coordinates


def _paired_t(d: np.ndarray) -> float:
    return float(d.mean() / (d.std(ddof=1) / np.sqrt(len(d))))


def test_x_is_column_y_is_row_on_real_autopicks(real_data):
    stack = open_stack(real_data / "micrographs/Ucsf_stack_1142_DW.mrc")
    table = read_coordinates(real_data / "coordinates/Ucsf_stack_1142_DW_autopick.star")
    result = attach_coordinates(table, stack.names, [s.shape for s in stack.slices])
    assert result.n_points == 45 and not result.unmatched and result.n_outside == 0
    i, y, x = result.points.T
    assert np.all(i == 0)
    image = np.asarray(stack.data[0].compute(), dtype=np.float64)
    ny, nx = image.shape
    assert (ny, nx) == (927, 959)  # not square, so a swap is visible at the edges as well
    band = ndi.gaussian_filter(image, 3) - ndi.gaussian_filter(image, 40)
    band /= band.std()

    def at(rows, cols):
        r = np.clip(np.round(rows).astype(int), 0, ny - 1)
        c = np.clip(np.round(cols).astype(int), 0, nx - 1)
        return band[r, c]

    ours = at(y, x)
    alternatives = {"x↔y swapped": at(x, y), "Y flipped": at(ny - 1 - y, x), "X flipped": at(y, nx - 1 - x)}
    assert ours.mean() < -0.5  # picks sit on clearly darker pixels
    for name, values in alternatives.items():
        d = values - ours
        t = _paired_t(d)
        sign_p = binomtest(int((d > 0).sum()), len(d), 0.5, alternative="greater").pvalue
        assert t >= 3, f"{name}: paired t = {t:.2f} (< 3 SE); sign test p = {sign_p:.2g}"
