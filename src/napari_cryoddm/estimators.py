"""From one reverse step of the forward chain to an estimate of the clean signal.

The network is trained on pairs of the chain that `forward` writes, x_k = a_k·x_{k−1} + b_k·n_k
(a_k, b_k from `forward.schedule_coefficients`), so it learns D(x_k) ≈ E[x_{k−1} | x_k]. Write
x_{k−1} = c_{k−1}·s + N_{k−1}: the clean signal s scaled by the cumulative coefficient, plus noise
of variance V_{k−1} (the micrograph's own noise and every noise patch added so far, all background
of the same normalised micrographs, variance 1 each), with V_0 = 1 and V_k = a_k²·V_{k−1} + b_k².
The noise of x_k, M = a_k·N_{k−1} + b_k·n_k, splits as E[N_{k−1} | M] = (a_k·V_{k−1}/V_k)·M for
noises of one spectrum, so

    D = λ_k·x_k + c_{k−1}·(1 − a_k·λ_k)·Ŝ,   λ_k = a_k·V_{k−1} / V_k,

and the signal estimate is Ŝ = (D − λ_k·x_k) / (c_{k−1}·(1 − a_k·λ_k)). For one step that adds
noise of the same variance (a = c = V_0 = b = 1) this is Noisier2Noise's 2·D − x.

Training can use that split directly (`--s2-target signal`): the target
t = (c_k/keep)·(x_{k−1} − λ_k·x_k), keep = c_{k−1}·(1 − a_k·λ_k), holds c_k·s, the signal part of
the input x_k, plus noise that is uncorrelated with x_k's (a_k·V_{k−1} − λ_k·V_k = 0). The network
then learns E[c_k·s | x_k] as a Noise2Noise denoiser does, without first having to learn the
large linear part λ_k·x_k exactly (whose small errors would be amplified by the subtraction);
the same quantity E[x_{k−1} | x_k] is recovered as λ_k·x_k + (keep/c_k)·D.

A raw micrograph is not on the chain: it has the most signal and noise of variance 1. The `chain`
estimator scales it to the trained step's noise level (x̃ = √V_k·x, the input statistics the
network saw), applies the formula above and maps the estimate back to the input's scale. `direct`
is the original program's single pass, D(x), kept selectable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .diffusion import schedule_coefficients
from .errors import CryoDDMError

ESTIMATORS = ("chain", "direct")


@dataclass(frozen=True)
class Estimator:
    """out = gain·(D(scale·x) − weight·scale·x); `direct` is scale 1, weight 0, gain 1."""

    name: str
    scale: float = 1.0
    weight: float = 0.0
    gain: float = 1.0
    step: int | None = None

    def combine(self, denoised: np.ndarray, scaled_input: np.ndarray) -> np.ndarray:
        """The estimate from the network's output on `scale·x` and that scaled input (in place)."""
        if self.weight:
            denoised -= np.float32(self.weight) * scaled_input
        if self.gain != 1.0:
            denoised *= np.float32(self.gain)
        return denoised

    def describe(self) -> str:
        if self.name == "direct":
            return "direct (the network's output, one pass)"
        return f"chain step {self.step}: {self.gain:.4g}·(D({self.scale:.4g}·x) − {self.weight:.4g}·{self.scale:.4g}·x)"


def chain_statistics(beta: float, steps: int) -> dict[str, np.ndarray]:
    """Per k = 0…T: noise variance V_k and signal coefficient c_k (k = 0: the micrograph itself)."""

    coef = schedule_coefficients(float(beta), int(steps))
    return statistics_of(coef["x_coef"], coef["noise_coef"])


def statistics_of(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """`chain_statistics` for any per-step coefficients x_k = a_k·x_{k−1} + b_k·n_k."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    variance = [1.0]
    for k in range(len(a)):
        variance.append(a[k] ** 2 * variance[-1] + b[k] ** 2)
    return {
        "variance": np.asarray(variance),
        "signal": np.concatenate([[1.0], np.cumprod(a)]),
        "x_coef": np.concatenate([[1.0], a]),
        "noise_coef": np.concatenate([[0.0], b]),
    }


def chain_estimator(beta: float, steps: int, step: int) -> Estimator:
    """The estimator of the pair (x_step → x_{step−1}) of the schedule (β, T)."""
    if not 1 <= step <= steps:
        raise CryoDDMError(f"--estimator-step {step}: the chain has steps 1…{steps}")
    return estimator_of(chain_statistics(beta, steps), step)


def estimator_of(st: dict[str, np.ndarray], step: int) -> Estimator:
    """The chain estimator of pair (x_step → x_{step−1}) from `statistics_of`'s table."""
    v, c, a = st["variance"], st["signal"], st["x_coef"]
    lam = a[step] * v[step - 1] / v[step]
    keep = c[step - 1] * (1.0 - a[step] * lam)
    scale = math.sqrt(v[step])
    # Ŝ (chain units) = (D − λx̃)/keep; the input x̃ = scale·x holds c_step·Ŝ where x holds s
    gain = c[step] / (keep * scale)
    return Estimator("chain", scale=scale, weight=float(lam), gain=float(gain), step=int(step))


def signal_target(st: dict[str, np.ndarray], step: int) -> tuple[float, float]:
    """(λ_k, factor): the `signal` training target of pair k is factor·(x_{k−1} − λ_k·x_k)."""
    est = estimator_of(st, step)  # factor = c_k/keep, which is the estimator's gain·scale
    return est.weight, float(est.gain * est.scale)


def resolve_estimator(
    name: str, metadata: dict[str, Any] | None, step: int = 0, source: str = "the model"
) -> Estimator:
    """The estimator `name` for a checkpoint's metadata; step 0 = the last step it was trained on."""
    name = name.strip().lower()
    if name not in ESTIMATORS:
        raise CryoDDMError(f"--estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")
    if name == "direct":
        return Estimator("direct")
    sched = (metadata or {}).get("schedule") or {}
    beta, steps, start = sched.get("beta"), sched.get("steps"), sched.get("start")
    if beta is None or steps is None:
        raise CryoDDMError(
            f"{source} records no forward schedule (β, T), so the chain estimator cannot be "
            "derived; it supports --estimator direct only (the original program's checkpoints "
            "carry no schedule)"
        )
    last = int(steps) - 1  # s2 pairs are k = start … T−1 (step T validates)
    k = int(step) if step else last
    if start is not None and step and not int(start) <= k <= last:
        raise CryoDDMError(f"--estimator-step {k}: {source} was trained on steps {start}…{last}")
    est = chain_estimator(float(beta), int(steps), k)
    if (metadata or {}).get("s2_target") == "signal":  # D estimates c_k·s of its input already
        return Estimator("chain", scale=est.scale, weight=0.0, gain=1.0 / est.scale, step=est.step)
    return est


def default_estimator(metadata: dict[str, Any] | None) -> str:
    """`chain` for checkpoints trained on the signal target (whose output is the signal estimate
    at the trained noise level), else `direct`: on step-target models the chain combination
    measured no better than the single pass (docs/research/cpu-denoiser.md)."""
    meta = metadata or {}
    sched = meta.get("schedule") or {}
    known = sched.get("beta") is not None and sched.get("steps") is not None
    return "chain" if known and meta.get("s2_target") == "signal" else "direct"


__all__ = [
    "ESTIMATORS",
    "Estimator",
    "chain_statistics",
    "chain_estimator",
    "statistics_of",
    "estimator_of",
    "signal_target",
    "resolve_estimator",
    "default_estimator",
]
