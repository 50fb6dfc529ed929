"""The chain estimator: derivation checked against an exact linear-Gaussian oracle, its errors,
and its wiring into prediction (scale, weight, gain, test-time augmentation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_cryoddm.errors import CryoDDMError
from napari_cryoddm.estimators import (
    chain_estimator,
    chain_statistics,
    default_estimator,
    estimator_of,
    resolve_estimator,
    statistics_of,
)
from napari_cryoddm.forward import schedule_coefficients
from napari_cryoddm.jobs import collect
from napari_cryoddm.predict import PredictConfig, PredictModel, denoise_array, estimate_job, make_runtime

SCHEDULE = {"beta": 0.1288, "steps": 5, "start": 4}


def test_one_equal_step_is_noisier2noise():
    """a = b = c = V_0 = 1: the estimate is 2·D − x on the noisier input (in its own units)."""
    est = estimator_of(statistics_of([1.0], [1.0]), 1)
    assert est.weight == pytest.approx(0.5)
    assert est.scale == pytest.approx(np.sqrt(2))
    # out = gain·(D − λ·x̃) with x̃ = √2·x: in x̃'s units that is (2·D − x̃)/√2 · …
    assert est.gain * est.scale == pytest.approx(2.0)


@pytest.mark.parametrize("step", [2, 3, 4, 5])
def test_chain_estimator_recovers_the_posterior_mean(step):
    """Scalar Gaussian signal, Gaussian noise of variance 1 at every step: the least-squares D of
    the pair (x_k → x_{k−1}) is E[x_{k−1}|x_k] exactly, and (D − λ·x_k)/keep must be E[s|x_k]
    in the chain's units, i.e. c_k·σ²/(c_k²σ² + V_k)·x_k for the signal s of x_0."""
    rng = np.random.default_rng(step)
    coef = schedule_coefficients(0.1288, 5)
    st = chain_statistics(0.1288, 5)
    n, sigma2 = 400_000, 0.7
    s = rng.normal(0, np.sqrt(sigma2), n)
    xs = [s + rng.normal(0, 1, n)]
    for k in range(step):
        xs.append(coef["x_coef"][k] * xs[-1] + coef["noise_coef"][k] * rng.normal(0, 1, n))
    xk, xprev = xs[step], xs[step - 1]
    w = float(xk @ xprev / (xk @ xk))  # least-squares D(x_k) = w·x_k
    est = chain_estimator(0.1288, 5, step)
    lam = est.weight
    keep = st["signal"][step] / (est.gain * est.scale)
    got = (w - lam) / keep  # Ŝ / x_k
    c, v = st["signal"][step], st["variance"][step]
    want = c * sigma2 / (c * c * sigma2 + v)  # E[s|x_k] / x_k
    assert got == pytest.approx(want, rel=0.05, abs=0.02)
    # and the variance bookkeeping matches the simulation
    assert np.var(xk - c * s) == pytest.approx(v, rel=0.02)


def test_errors_name_the_choices_and_the_reason():
    with pytest.raises(CryoDDMError, match="chain, direct"):
        resolve_estimator("best", {"schedule": SCHEDULE})
    with pytest.raises(CryoDDMError, match="direct only"):
        resolve_estimator("chain", {"schedule": None}, source="10059.pth")
    with pytest.raises(CryoDDMError, match="trained on steps 4…4"):
        resolve_estimator("chain", {"schedule": SCHEDULE}, step=2)
    with pytest.raises(CryoDDMError, match="--estimator 'best'"):
        PredictConfig(estimator="best")
    assert default_estimator({"schedule": SCHEDULE, "s2_target": "signal"}) == "chain"
    assert default_estimator({"schedule": SCHEDULE, "s2_target": "step"}) == "direct"
    assert default_estimator({}) == "direct"  # the original program's checkpoints
    assert resolve_estimator("chain", {"schedule": SCHEDULE}).step == 4


class Scale(nn.Module):
    """A linear 'network' D(x) = a·x + b, so the estimator's arithmetic can be checked exactly."""

    def __init__(self, a: float, b: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b


def test_prediction_applies_scale_weight_and_gain():
    image = np.random.default_rng(0).normal(size=(96, 128)).astype(np.float32)
    est = chain_estimator(0.1288, 5, 4)
    rt = make_runtime(Scale(0.9, 0.25), PredictConfig(device="cpu", tile=64, overlap=0), estimator=est)
    got = collect(estimate_job(rt, image))
    xs = est.scale * image
    want = est.gain * ((0.9 * xs + 0.25) - est.weight * xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chain_is_the_default_for_step_target_models_only_when_asked():
    image = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    ours = PredictModel(Scale(1.0), metadata={"schedule": SCHEDULE, "s2_target": "step"})
    theirs = PredictModel(Scale(1.0), metadata={})
    direct = denoise_array(theirs, image, PredictConfig(device="cpu"))
    auto = denoise_array(ours, image, PredictConfig(device="cpu"))
    np.testing.assert_allclose(direct, auto, atol=1e-6)  # identity network: D(x) = x
    chain = denoise_array(ours, image, PredictConfig(device="cpu", estimator="chain"))
    est = chain_estimator(0.1288, 5, 4)
    np.testing.assert_allclose(chain, auto * est.gain * est.scale * (1 - est.weight), rtol=1e-5, atol=1e-5)


def test_signal_target_models_default_to_the_scaled_single_pass():
    """Trained on the signal target, D(√V·x)/√V is the estimate (no λ·x to subtract)."""
    image = np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)
    pm = PredictModel(Scale(0.5, 0.1), metadata={"schedule": SCHEDULE, "s2_target": "signal"})
    got = denoise_array(pm, image, PredictConfig(device="cpu"))
    direct = denoise_array(pm, image, PredictConfig(device="cpu", estimator="direct"))
    est = resolve_estimator("chain", pm.metadata)
    assert est.weight == 0 and est.gain == pytest.approx(1 / est.scale)
    np.testing.assert_allclose(got, direct - 0.1 + 0.1 / est.scale, rtol=1e-4, atol=1e-4)


def test_tta_averages_the_eight_flips_and_rotations():
    """A network that is not flip-equivariant (a one-sided shift): TTA averages 8 views, which
    for a shift by one pixel gives the mean of the 4 one-pixel neighbours."""

    class ShiftRight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(x, 1, dims=-1)

    image = np.random.default_rng(2).normal(size=(64, 64)).astype(np.float32)
    plain = make_runtime(ShiftRight(), PredictConfig(device="cpu", tile=64, overlap=0))
    tta = make_runtime(ShiftRight(), PredictConfig(device="cpu", tile=64, overlap=0, tta=True))
    np.testing.assert_allclose(collect(estimate_job(plain, image)), np.roll(image, 1, axis=1))
    got = collect(estimate_job(tta, image))
    want = (np.roll(image, 1, 1) + np.roll(image, -1, 1) + np.roll(image, 1, 0) + np.roll(image, -1, 0)) / 4
    np.testing.assert_allclose(got[2:-2, 2:-2], want[2:-2, 2:-2], rtol=1e-5, atol=1e-5)
