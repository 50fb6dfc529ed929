"""Training: the CryoDDM U-Net on the forward pairs, on CPU, one GPU or several (DDP).

An epoch is the three phases of the original CryoDDM program, MSE each, one optimiser step
per batch:

* **S1** `s1/particles` → itself (keep the particle's structure);
* **S2** `s2/label` (the noisier x_k) → `s2/input` (the cleaner x_{k−1}): one reverse step;
* **S3** a noise patch → a *different* noise patch (noise2noise on pure background);

then validation, `val/label` (x_T) → `val/input` (x_{T−1}), the same direction as S2 (the
original validated backwards). Faults of the original that are fixed here: the learning-rate
schedule steps per epoch (the original's per-batch StepLR drives the rate to ~0 by epoch 30; it is
kept, literally, as `--recipe original`); seeds are set before the model is built; stacks are
memory-mapped, never loaded whole.

Every random choice of an epoch (order, S3 partners, augmentation, fresh noise) is drawn from
`(seed, epoch)` up front and carried by the sample keys, so the result does not depend on the number
of loader workers or GPUs, and a run stopped mid-epoch resumes exactly: the resume state records the
epoch, the next batch, the running loss sums, optimiser, scheduler and every RNG state.

`--fresh-noise` draws the forward chain in the loader instead of reading `s2`: each S2 sample is a
particle crop x_0 taken k−1 and k steps down the chain with noise patches re-cut around the recorded
noise centres (random shifts that keep the recorded particles out, flips, 90° rotations), a fresh
pairing every epoch, with the schedule coefficients of `forward.schedule_coefficients`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint
from .devices import agreed, join_process_group, resolve_device
from .errors import CryoDDMError, InputError
from .forward_layout import ForwardData, open_forward
from .jobs import CancelToken, Job, Progress
from .safety import check_location, check_writable
from .train_config import CPU_EPOCHS, GPU_EPOCHS, HISTORY, PLAN_FIELDS, RECIPES, TrainConfig
from .train_data import PHASES
from .train_loop import Run, _norm

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configuration


# ----------------------------------------------------------------------------- devices


# ----------------------------------------------------------------------------- the forward folder


# ----------------------------------------------------------------------------- augmentation


# ----------------------------------------------------------------------------- fresh noise


# ----------------------------------------------------------------------------- datasets


# ----------------------------------------------------------------------------- the epoch plan


# ----------------------------------------------------------------------------- optimiser recipes


# ----------------------------------------------------------------------------- RNG state


# ----------------------------------------------------------------------------- the job


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val: float | None
    stopped: bool = False
    last: Path | None = None
    best: Path | None = None


def _is_our_checkpoint(path: Path) -> bool:
    """A napari-cryoddm checkpoint, told from its pickle's bytes without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and b"napari-cryoddm-checkpoint" in zf.read(name)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return False


def _check_out(out: Path, config: TrainConfig, inputs: Sequence[Any] = ()) -> None:
    """Before any work: OUT holds no input and can be written in; --overwrite replaces only this
    tool's checkpoints and history, never files it did not write."""

    check_location(out, inputs, what="the training output folder", allow_workdir=True)
    last = out / "last.pt"
    if config.resume:
        if not last.is_file():
            raise InputError(out, "--resume: no last.pt here to continue from")
        check_writable(out)
        return
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    existing = [p for p in (out / "last.pt", out / "best.pt", out / HISTORY) if os.path.lexists(p)]
    if existing and not config.overwrite:
        raise CryoDDMError(
            f"{out} already holds {', '.join(p.name for p in existing)}; pass "
            "--resume to continue that run or --overwrite to start again"
        )
    for p in existing:
        ours = _is_our_checkpoint(p) if p.suffix == ".pt" else _is_our_history(p)
        if not ours:
            raise InputError(
                p, "was not written by cryoddm train; refusing to replace it (move it or choose another -o)"
            )
    check_writable(out)


def _is_our_history(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "epochs" in doc and "config" in doc


def train(
    forward_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    cancel: CancelToken | None = None,
    epochs_given: bool = True,
) -> Job[TrainResult]:
    """The training job. Yields a `Progress` per batch (payload: epoch, phase, loss, lr) and one per
    epoch (payload `epoch_end`: the phase means and the validation loss); returns a `TrainResult`.

    Stopping (the `CancelToken`) finishes the current batch and writes a resumable `last.pt`.
    """
    import torch.distributed as dist

    config = config or TrainConfig()
    cancel = cancel or CancelToken()
    out = Path(out)
    data = open_forward(forward_dir)
    rank, world, own_group = join_process_group(config.device)
    try:
        return (yield from _train(data, out, config, cancel, rank, world, epochs_given))
    finally:
        cache = out / ".cache" / f"rank{rank}"
        if cache.is_dir():  # the re-cut noise pool (rebuilt by each run; can be GBs)
            shutil.rmtree(cache, ignore_errors=True)
            with contextlib.suppress(OSError):
                (out / ".cache").rmdir()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    data: ForwardData,
    out: Path,
    config: TrainConfig,
    cancel: CancelToken,
    rank: int,
    world: int,
    epochs_given: bool = True,
) -> Job[TrainResult]:
    config, device = _checked(data, out, config, rank, world)
    config, loaded = _resume_config(config, out, epochs_given)
    run = Run(data, out, config, cancel, rank, world, device, loaded)
    yield from run.build()
    run.restore()
    yield Progress(
        run.epoch * run.n_batches + run.start_batch,
        run.total,
        f"training on {device} ({world} process{'es' if world > 1 else ''})",
    )
    stopped = False
    while run.epoch < run.epochs:
        stopped = yield from run.train_epoch()
        if stopped:
            break
        yield run.end_epoch(run.validate())
        if agreed(cancel.cancelled, world, device):
            stopped = run.epoch < run.epochs
            break
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(
        out=out,
        epochs_done=len(run.history),
        history=run.history,
        best_epoch=run.best_epoch,
        best_val=run.best_val,
        stopped=stopped,
        last=out / "last.pt",
        best=(out / "best.pt") if run.best_epoch is not None else None,
    )


def _checked(
    data: ForwardData, out: Path, config: TrainConfig, rank: int, world: int
) -> tuple[TrainConfig, torch.device]:
    """Refuse what would fail later (on every rank: a refusal on rank 0 alone would leave the
    others waiting); resolve the device and `--s2-target auto`."""
    if config.fresh_noise and not (data.manifest and data.manifest.get("noise")):
        raise InputError(
            data.folder,
            "--fresh-noise needs forward.json (micrographs, noise centres "
            "and schedule); the original CryoDDM's folders have none",
        )
    _check_out(out, config, [data.folder, config.init if config.init and Path(config.init).exists() else None])
    for note in data.warnings:
        log.warning(note)
        warnings.warn(note, UserWarning, stacklevel=4)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(config.device, local_rank if world > 1 else None)
    if world > 1 and config.batch_size < world:
        raise CryoDDMError(f"--batch-size {config.batch_size} is smaller than the {world} processes")
    if config.epochs is None:
        config = dataclasses.replace(config, epochs=GPU_EPOCHS if device.type == "cuda" else CPU_EPOCHS)
    if config.s2_target == "auto":
        known = bool(data.schedule and data.schedule.get("beta") is not None)
        config = dataclasses.replace(config, s2_target="signal" if known else "step")
    return config, device


def _resume_config(config: TrainConfig, out: Path, epochs_given: bool) -> tuple[TrainConfig, LoadedCheckpoint | None]:
    """On --resume, the stopped run's plan-defining settings win (said as a warning)."""
    if not config.resume:
        return config, None
    loaded = load_checkpoint(out / "last.pt")
    if not loaded.resume:
        raise InputError(out / "last.pt", "holds no resume state")
    saved = loaded.resume.get("config", {})
    changed = {
        k: (getattr(config, k), saved.get(k))
        for k in PLAN_FIELDS
        if k in saved and _norm(getattr(config, k)) != _norm(saved.get(k))
    }
    if changed:
        note = "resuming with the stopped run's " + ", ".join(
            f"{k}={v[1]!r} (not {v[0]!r})" for k, v in changed.items()
        )
        log.warning(note)
        warnings.warn(note, UserWarning, stacklevel=4)
        config = dataclasses.replace(config, **{k: saved[k] for k in changed})
    return _resumed_epochs(config, saved.get("epochs") or _history_epochs(out), epochs_given, out), loaded


def _history_epochs(out: Path) -> int | None:
    """The planned epochs of a run stopped before this was recorded in last.pt (history.json)."""
    try:
        value = json.loads((out / HISTORY).read_text(encoding="utf-8"))["config"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) else None


def _resumed_epochs(config: TrainConfig, planned: int | None, given: bool, out: Path) -> TrainConfig:
    """A resumed run keeps the stopped run's number of epochs unless the caller gave one; either
    way it says so (a log line: the CLI shows it as a message)."""
    if planned is None or planned == config.epochs:
        return config
    if given:
        note = (
            f"resuming {out / 'last.pt'} for {config.epochs} epochs in all, as asked "
            f"(the stopped run planned {planned})"
        )
    else:
        note = (
            f"resuming {out / 'last.pt'} with the stopped run's plan: {planned} epochs (give --epochs N to change it)"
        )
        config = dataclasses.replace(config, epochs=int(planned))
    log.warning(note)
    warnings.warn(note, UserWarning, stacklevel=4)
    return config


def read_history(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch losses of a run folder (for plots of a finished or stopped run)."""
    path = Path(out) / HISTORY
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("epochs", []))


__all__ = ["PHASES", "RECIPES", "TrainConfig", "TrainResult", "read_history", "train"]
