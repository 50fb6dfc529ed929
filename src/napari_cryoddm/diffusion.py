"""The CryoDDM forward chain: its schedule, its coefficients and one diffusion step.

With α_k = 1 − β·k each step is x_k = [√α_k + √(1−α_k)(√α_k − 1)]·x_{k−1} + (1−α_k)·n_k
(the CryoDDM paper and the original program); `estimators.py` derives from the same
coefficients what a trained network's output estimates.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CryoDDMError

PRESETS: dict[str, tuple[float, int, int]] = {
    "config1": (0.1288, 5, 2),  # the original's "配置 1", its default and ours
    "config2": (0.1, 6, 2),  # "配置 2"
    # config1's chain, saving only its last training pair (x_4 → x_3): the pair whose signal
    # target carries the most signal per unit of noise (estimators.py), measured best
    "reference": (0.1288, 5, 4),
}


def validate_schedule(beta: float, steps: int, start: int) -> None:
    """Reject schedules whose α_k would reach 0 or below, or that save nothing."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise CryoDDMError(f"β must be positive, got {beta}")
    if steps < 1:
        raise CryoDDMError(f"the number of steps T must be at least 1, got {steps}")
    if beta * steps >= 1:
        raise CryoDDMError(
            f"β·T = {beta}·{steps} = {beta * steps:.4g} ≥ 1: α_T = 1 − β·T would reach 0 or below; lower β or T"
        )
    if start < 1:
        raise CryoDDMError(f"start must be at least 1, got {start}")
    if start >= steps:
        raise CryoDDMError(
            f"start {start} must be smaller than T = {steps} (the pairs of steps start…T−1 train, step T validates)"
        )


def schedule_coefficients(beta: float, steps: int) -> dict[str, np.ndarray]:
    """Per step k = 1…T: α_k, the x-coefficient, the noise coefficient and the cumulative
    x-coefficient (the original program's coefficient table)."""
    k = np.arange(1, steps + 1, dtype=np.float64)
    alpha = 1.0 - beta * k
    if (alpha <= 0).any():
        raise CryoDDMError(f"β·T = {beta * steps:.4g} ≥ 1: α would reach 0")
    x_coef = np.sqrt(alpha) + np.sqrt(1.0 - alpha) * (np.sqrt(alpha) - 1.0)
    noise_coef = 1.0 - alpha
    return {
        "k": k.astype(int),
        "alpha": alpha,
        "x_coef": x_coef,
        "noise_coef": noise_coef,
        "cumulative_x_coef": np.cumprod(x_coef),
    }


def diffuse_step(x: np.ndarray, noise: np.ndarray, x_coef: float, noise_coef: float) -> np.ndarray:
    """One step of the chain in float32 (so a saved x_{k−1} is exactly what produced x_k)."""
    out = np.multiply(x, np.float32(x_coef), dtype=np.float32)
    out += np.float32(noise_coef) * np.asarray(noise, dtype=np.float32)
    return out


def chain(x0: np.ndarray, noises: np.ndarray, beta: float) -> np.ndarray:
    """x_0…x_T for one crop, given its noise patch at each step (`noises[k−1]` = n_k)."""
    coef = schedule_coefficients(beta, len(noises))
    xs = [np.asarray(x0, dtype=np.float32)]
    for k in range(len(noises)):
        xs.append(diffuse_step(xs[-1], noises[k], coef["x_coef"][k], coef["noise_coef"][k]))
    return np.stack(xs)


def pair_noise(n_crops: int, n_noise: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Noise patch index for each crop at each step, shape (N, T), as the original: N ≤ M draws N
    patches without replacement, N > M tiles the stack ⌈N/M⌉ times, cuts to N and shuffles; the
    paired stack is re-shuffled after every step."""
    if n_noise < 1:
        raise CryoDDMError("no noise patches to pair with the particle crops")
    if n_crops <= n_noise:
        paired = rng.choice(n_noise, size=n_crops, replace=False)
    else:
        paired = np.tile(np.arange(n_noise), math.ceil(n_crops / n_noise))[:n_crops]
        paired = rng.permutation(paired)
    out = np.empty((n_crops, steps), dtype=np.int64)
    for k in range(steps):
        out[:, k] = paired
        paired = rng.permutation(paired)
    return out
