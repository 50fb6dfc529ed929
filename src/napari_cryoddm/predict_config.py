"""Every parameter of prediction, in one dataclass: the CLI flags and the widget form are built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError
from .devices import PREDICT_PRECISIONS
from .estimators import ESTIMATORS
from .tiling import DEFAULT_OVERLAP, RECEPTIVE_FIELD_PX, STRIDE

INTENSITIES = ("normalised", "input")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PredictConfig:
    """How to denoise. Defaults: seam-free margins, the fastest measured geometry per device,
    outputs on the normalised scale (see `intensity`)."""

    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    batch_size: int = _f(
        0, "tiles per forward pass; 0 picks one per device (halved automatically on a GPU out-of-memory)"
    )
    tile: int = _f(
        0,
        "tile edge in px (a multiple of 32); 0: 2048 on a GPU, on a CPU the largest "
        "of 1792…768 that fits 1.75 GiB with the micrograph (1792 for 4k, 1536 for "
        "8k); micrographs smaller than a tile are padded",
        unit="px",
    )
    overlap: int = _f(
        DEFAULT_OVERLAP,
        "context kept on each side of a tile core; must cover the "
        f"network's receptive field ({RECEPTIVE_FIELD_PX} px) or seams "
        "appear; rounded up to a multiple of 32",
        unit="px",
    )
    intensity: str = _f(
        "normalised",
        "output scale: 'normalised' (the scale the network was trained "
        "on, comparable across micrographs) or 'input' (mapped back "
        "to the input's units)",
        choices=INTENSITIES,
    )
    precision: str = _f(
        "auto",
        "auto (bf16 autocast on a GPU that has it, else fp32), fp32, bf16, fp16 (GPU only)",
        choices=PREDICT_PRECISIONS,
    )
    estimator: str = _f(
        "auto",
        "how the network's output becomes the estimate: chain (derived from "
        "the forward chain's coefficients) or direct (the original's single "
        "pass); auto: chain for models trained with --s2-target signal, "
        "else direct",
        choices=("auto",) + ESTIMATORS,
    )
    estimator_step: int = _f(
        0, "chain estimator: the chain step whose pair the estimate uses (0: the last trained step)", widget=False
    )
    tta: bool = _f(False, "average the 8 flips/rotations of each micrograph (8× the compute)")
    suffix: str = _f("", "appended to each output's name: OUT/<stem><suffix>.mrc")
    overwrite: bool = _f(False, "replace existing outputs (default: skip them, so a stopped run resumes)")
    channels_last: bool = _f(True, "NHWC memory layout (faster on GPUs and with oneDNN on CPUs)")
    compile: bool = _f(False, "torch.compile the network (pays off on GPUs for long runs; recompiles per tile shape)")
    threads: int = _f(0, "CPU threads for PyTorch (0: leave PyTorch's default)")
    prefetch: bool = _f(
        True,
        "read and normalise the next micrograph while this one computes, and write in the background",
        widget=False,
    )
    gpus: str = _f("", "run on these GPUs through a local dask cluster, one worker each, e.g. 0,1", widget=False)
    workers: int = _f(0, "run on N local CPU worker processes (dask LocalCluster)", widget=False)
    scheduler: str = _f(
        "",
        "send one task per micrograph to this dask scheduler (tcp://HOST:PORT, e.g. from dask-jobqueue)",
        widget=False,
    )

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise ConfigError(self, "intensity", f"{self.intensity!r}: use normalised or input")
        if self.precision not in PREDICT_PRECISIONS:
            raise ConfigError(self, "precision", f"{self.precision!r}: use {', '.join(PREDICT_PRECISIONS)}")
        if self.tile and (self.tile < 64 or self.tile % STRIDE):
            raise ConfigError(self, "tile", f"{self.tile}: use a multiple of 32, at least 64")
        if self.overlap < 0:
            raise ConfigError(self, "overlap", f"{self.overlap}: must be ≥ 0")
        if self.batch_size < 0:
            raise ConfigError(self, "batch_size", f"{self.batch_size}: must be ≥ 0 (0 = automatic)")
        if self.estimator not in ("auto",) + ESTIMATORS:
            raise ConfigError(self, "estimator", f"{self.estimator!r}: choose one of auto, {', '.join(ESTIMATORS)}")
        if self.estimator_step < 0:
            raise ConfigError(self, "estimator_step", f"{self.estimator_step}: must be ≥ 0 (0 = the last trained step)")
