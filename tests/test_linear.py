"""The closed-form linear start: it recovers a known filter from noisy pairs, and the model
D = H∗x + U(x) equals H∗x exactly at step 0 (zeroed output layer), in training and prediction."""

from __future__ import annotations

import numpy as np
import torch

from napari_cryoddm.linear import LinearPlusNet, apply, fit_transfer, transfer_grid, zero_output_layer
from napari_cryoddm.model import UDenoiseNet


def gaussian_transfer(shape, sigma):
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2 * (np.pi * sigma) ** 2 * (fy * fy + fx * fx))


def test_fit_recovers_a_filter_through_target_noise():
    """Targets = Gaussian(σ 2 px)∗x plus independent noise 5× the signal: H is the Gaussian's
    transfer function (noise uncorrelated with the input averages out of the cross-spectrum)."""
    rng = np.random.default_rng(0)
    shape = (64, 64)
    g = gaussian_transfer(shape, 2.0)

    def pairs():
        for _ in range(300):
            x = rng.normal(size=shape)
            t = np.fft.irfft2(np.fft.rfft2(x) * g, s=shape) + 5 * rng.normal(size=shape)
            yield x, t, 1.0

    fit = fit_transfer(pairs())
    got = transfer_grid(fit, shape)
    radius = np.sqrt(np.fft.fftfreq(64)[:, None] ** 2 + np.fft.rfftfreq(64)[None, :] ** 2)
    low = (radius > 0) & (radius < 0.2)  # DC is one coefficient per image: too noisy to pin
    err = np.abs(got - g)[low]
    assert err.max() < 0.12 and err.mean() < 0.03
    assert fit["pairs"] == 300
    # applying it is filtering
    x = rng.normal(size=shape).astype(np.float32)
    want = np.fft.irfft2(np.fft.rfft2(x) * got, s=shape)
    np.testing.assert_allclose(apply(fit, x), want, atol=1e-5)


def test_linear_plus_net_starts_as_the_filter():
    torch.manual_seed(0)
    fit = {"f": list(np.linspace(0, 0.71, 64)), "H": list(np.exp(-np.linspace(0, 0.71, 64) * 8))}
    net = UDenoiseNet()
    zero_output_layer(net)
    model = LinearPlusNet(net, fit).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        out = model(x).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i, 0], apply(fit, x[i, 0].numpy()), atol=1e-5)
