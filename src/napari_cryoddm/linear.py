"""The linear part of the training objective, solved in closed form, as the model's starting point.

At the SNR of cryo-EM micrographs the learnable part of the S2 loss is well under 1 % of the
target's noise, so a U-Net trained from random weights spends its first CPU hour learning what a
linear filter would do (and scores below its input meanwhile). The best *linear, shift-invariant*
estimator of the same targets from the same inputs has a closed form that averages over every
pixel of the training pairs, with no gradient noise: per spatial frequency f,

    H(f) = Σ Re(X̄(f)·T(f)) / Σ |X(f)|²       (radially averaged; X input, T target spectra).

The model is then D(x) = H∗x + U(x): H fixed (stored in the checkpoint's metadata as a radial
profile in cycles per pixel, so it applies to any image size), the U-Net U starting from a zero
output layer (D = H∗x exactly at step 0) and learning the nonlinear rest with the method's own
loss. Nothing outside the training pairs goes into H.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

N_BINS = 64
F_MAX = 0.5 * np.sqrt(2.0)  # the corner of the 2-D spectrum, cycles per pixel


def _radius(shape: tuple[int, int]) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.sqrt(fy * fy + fx * fx)


def bin_centres(n_bins: int = N_BINS) -> np.ndarray:
    return (np.arange(n_bins) + 0.5) * (F_MAX / n_bins)


def fit_transfer(pairs: Iterable[tuple[np.ndarray, np.ndarray, float]], n_bins: int = N_BINS) -> dict[str, Any]:
    """H per radial bin from (input, target, weight) pairs; JSON-safe (`{"f": [...], "H": [...]}`)."""
    cross = np.zeros(n_bins)
    power = np.zeros(n_bins)
    count = 0
    for x, t, w in pairs:
        if not w:
            continue
        x = np.asarray(x, dtype=np.float64)
        fx, ft = np.fft.rfft2(x), np.fft.rfft2(np.asarray(t, dtype=np.float64))
        idx = np.minimum((_radius(x.shape) / F_MAX * n_bins).astype(int), n_bins - 1)
        cross += w * np.bincount(idx.ravel(), (fx.conj() * ft).real.ravel(), n_bins)
        power += w * np.bincount(idx.ravel(), (np.abs(fx) ** 2).ravel(), n_bins)
        count += 1
    if not count:
        raise ValueError("no training pairs to fit the linear start on")
    h = np.divide(cross, power, out=np.zeros(n_bins), where=power > 0)
    return {"f": [float(v) for v in bin_centres(n_bins)], "H": [float(v) for v in h], "pairs": count}


def transfer_grid(transfer: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """H on the rfft2 grid of an image of `shape` (linear interpolation of the radial profile)."""
    f = np.asarray(transfer["f"], dtype=np.float64)
    h = np.asarray(transfer["H"], dtype=np.float64)
    return np.interp(_radius(shape), f, h, left=h[0], right=h[-1])


def apply(transfer: dict[str, Any], image: np.ndarray) -> np.ndarray:
    """H∗image (periodic; a micrograph's edges wrap, which the cores of prediction tiles do not
    see because the whole micrograph is filtered at once)."""
    image = np.asarray(image, dtype=np.float32)
    out = np.fft.irfft2(np.fft.rfft2(image) * transfer_grid(transfer, image.shape), s=image.shape)
    return out.astype(np.float32)


class LinearPlusNet(nn.Module):
    """D(x) = H∗x + U(x) for batches (B, 1, H, W); H is a fixed buffer, U is trained."""

    def __init__(self, net: nn.Module, transfer: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.transfer = transfer
        self._grids: dict[tuple[int, int, str], torch.Tensor] = {}

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-2], x.shape[-1], str(x.device))
        if key not in self._grids:
            g = transfer_grid(self.transfer, (x.shape[-2], x.shape[-1]))
            self._grids[key] = torch.as_tensor(g, dtype=torch.float32, device=x.device)
        return self._grids[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = torch.fft.irfft2(torch.fft.rfft2(x.float()) * self._grid(x), s=x.shape[-2:])
        return lin.to(x.dtype) + self.net(x)


def zero_output_layer(net: nn.Module) -> None:
    """Zero the last convolution, so U(x) = 0 at the start (D = H∗x exactly)."""
    last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


__all__ = ["fit_transfer", "transfer_grid", "apply", "LinearPlusNet", "zero_output_layer", "N_BINS"]
