"""Every parameter of training, in one dataclass: the CLI flags and the widget form are built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .devices import TRAIN_PRECISIONS

RECIPES = ("default", "original")


HISTORY = "history.json"


# epochs when none are given: a GPU run of the original's length, a CPU run that ends within the hour
GPU_EPOCHS, CPU_EPOCHS = 60, 10


@dataclass
class TrainConfig:
    """Every parameter of training; the CLI flags and the widget form are built from it."""

    epochs: int | None = field(
        default=None,
        metadata={
            "help": "number of epochs (S1 + S2 + S3 + validation each); default: "
            f"{GPU_EPOCHS} on a GPU, {CPU_EPOCHS} on a CPU"
        },
    )
    batch_size: int = field(
        default=32, metadata={"help": "samples per optimiser step (all GPUs together; each of N ranks takes B/N)"}
    )
    recipe: str = field(
        default="default",
        metadata={
            "help": "optimiser: default (Adam, cosine decay per epoch, chosen by measurement) or "
            "original (SGD 1e-3, StepLR(100, 0.9) stepped per batch, as CryoDDM did)",
            "choices": RECIPES,
        },
    )
    lr: float | None = field(
        default=None, metadata={"help": "learning rate (default 1e-3 for both recipes)", "label": "learning rate"}
    )
    warmup: int = field(
        default=200, metadata={"help": "batches over which the learning rate ramps up linearly from 0 (default recipe)"}
    )
    clip: float = field(
        default=1.0,
        metadata={"help": "largest gradient norm per step, 0 = no clipping (default recipe)", "label": "gradient clip"},
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto, cpu, cuda, cuda:N or mps (auto: the GPU of this rank if any, else CPU)"},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16", "choices": TRAIN_PRECISIONS},
    )
    augment: bool = field(
        default=True, metadata={"help": "random flips and 90° rotations (the same for input and target)"}
    )
    fresh_noise: bool = field(
        default=False,
        metadata={
            "help": "draw the forward chain on the fly with noise re-cut around the recorded noise "
            "centres, a fresh pairing each epoch (ignores s2/)"
        },
    )
    max_shift: int | None = field(
        default=None,
        metadata={"help": "--fresh-noise: largest shift of a re-cut noise patch (default W/8)", "unit": "px"},
    )
    s1_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the S1 (particle → itself) loss; 0 leaves the phase out (its optimum is "
            "the identity, which passes the noise through)",
            "label": "S1 weight",
        },
    )
    s3_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the S3 (noise → other noise) loss; 0 leaves the phase out", "label": "S3 weight"},
    )
    s2_target: str = field(
        default="step",
        metadata={
            "help": "what S2 learns from x_k: signal (the part of x_{k-1} that estimates x_k's clean "
            "signal, derived from the chain's coefficients: a Noise2Noise target), step "
            "(x_{k-1} itself, as the original did) or auto (signal when the forward folder "
            "records its schedule, else step)",
            "choices": ("auto", "signal", "step"),
            "label": "S2 target",
        },
    )
    linear_start: bool = field(
        default=False,
        metadata={
            "help": "start from the closed-form best linear filter for the training pairs (fitted "
            "once, kept in the checkpoint) and train the U-Net on what it leaves"
        },
    )
    seed: int = field(default=42, metadata={"help": "random seed (set before the model is built)"})
    workers: int | None = field(
        default=None, metadata={"help": "data-loader processes (default: 0 on CPU, up to 8 per GPU)"}
    )
    init: Path | None = field(
        default=None,
        metadata={
            "help": "start from these weights (ours, the original's N.pth / checkpoint.pth, or a "
            "built-in model's name: sample)",
            "label": "init checkpoint",
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue OUT/last.pt exactly where it stopped (mid-epoch too)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace checkpoints already in OUT", "widget": False})

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(self, "epochs", f"must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(self, "batch_size", f"must be at least 1, got {self.batch_size}")
        if self.recipe not in RECIPES:
            raise ConfigError(self, "recipe", f"{self.recipe!r}: use {' or '.join(RECIPES)}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError(self, "precision", f"{self.precision!r}: use {', '.join(TRAIN_PRECISIONS)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(self, "lr", f"must be a positive number, got {self.lr}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(self, "workers", f"must be 0 or more, got {self.workers}")
        for name in ("s1_weight", "s3_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(self, name, f"must be 0 or more, got {value}")
        if self.s2_target not in ("auto", "signal", "step"):
            raise ConfigError(self, "s2_target", f"{self.s2_target!r}: use auto, signal or step")
        if self.warmup < 0:
            raise ConfigError(self, "warmup", f"must be 0 or more, got {self.warmup}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(self, "clip", f"must be 0 or more, got {self.clip}")
        if self.max_shift is not None and self.max_shift < 0:
            raise ConfigError(self, "max_shift", f"must be 0 or more, got {self.max_shift}")
        if self.seed < 0:  # numpy and torch take no negative seeds
            raise ConfigError(self, "seed", f"must be 0 or more, got {self.seed}")
        if isinstance(self.init, str):
            self.init = Path(self.init) if self.init else None

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else 1e-3


# Fields that decide the sequence of batches: a resumed run keeps the stopped run's values.
PLAN_FIELDS = (
    "batch_size",
    "recipe",
    "lr",
    "augment",
    "fresh_noise",
    "max_shift",
    "seed",
    "s1_weight",
    "s3_weight",
    "warmup",
    "clip",
    "s2_target",
    "linear_start",
)
