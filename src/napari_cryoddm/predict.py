"""Prediction: denoise whole micrographs with a trained UDenoiseNet, tiled without seams.

Why tiles at all: a 4k–8k micrograph does not fit through the network at once on most GPUs (and
takes gigabytes of activations on a CPU). Why no seams: the network's receptive field reaches
±161 px (measured by `measure_receptive_field`: the gradient footprint of a 32×32 block of output
pixels, which covers every phase of the five 2× poolings). Each tile therefore carries a margin
(`overlap`, per side) of at least that much context and only its core is kept; tile origins sit on
multiples of 32 in the reflection-padded image so the pooling grid of every tile is the grid of an
untiled pass. The result equals one pass over the whole padded image (to float rounding), which
the seam test checks against a 64-px margin (the original's) that visibly fails.

Per micrograph: read → (bin, when the checkpoint says so) → normalise exactly as in training
(the checkpoint's `normalisation`) → reflect-pad → tiles in batches → cores stitched → optionally
mapped back to the input's intensity scale → float32 MRC with the voxel size and labels. The job
keeps at most the current micrograph, the next one (prefetched in a thread) and the previous one
(being written in a thread) in memory, so memory stays flat over thousands of files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint
from .d4 import d4, d4_inverse
from .devices import autocast_dtype, resolve_device
from .errors import CryoDDMError, OutputError, OutputExistsError
from .estimators import Estimator, default_estimator, resolve_estimator
from .io.mrc import list_micrographs, write_mrc
from .jobs import Cancelled, CancelToken, Job, Progress, collect
from .linear import apply
from .model import UDenoiseNet
from .normalise import Normalisation
from .predict_config import PredictConfig
from .predict_outputs import PREDICT_LABEL, check_out_dir, check_output, is_predict_output, output_path, plan_outputs
from .prefetch import Pipeline
from .preprocess import Prepared, prepare, read_prepared, restore_intensity
from .safety import NO_ROOM
from .tiling import DEFAULT_TILE_CPU, DEFAULT_TILE_GPU, Runtime, TileGrid, plan_tiles, predict_image_job

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the model


@dataclass
class PredictModel:
    """A network with what prediction must know about its training (from the checkpoint)."""

    model: nn.Module
    normalisation: Normalisation = field(default_factory=Normalisation)
    bin_factor: float = 1.0
    name: str = "model"
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], map_location: Any = "cpu") -> PredictModel:
        path = Path(path)
        loaded = load_checkpoint(path, map_location=map_location)
        meta = loaded.metadata or {}
        return cls(
            loaded.model,
            Normalisation.from_dict(meta.get("normalisation")),
            float(meta.get("bin_factor") or 1.0),
            path.name,
            dict(meta),
        )

    def state(self) -> dict[str, Any]:
        """Picklable and small (3.9 MB): what dask workers need to rebuild the network."""
        inner = getattr(self.model, "_orig_mod", self.model)
        return {
            "state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
            "normalisation": self.normalisation.to_dict(),
            "bin_factor": self.bin_factor,
            "name": self.name,
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PredictModel:
        model = UDenoiseNet()
        model.load_state_dict(state["state_dict"])
        model.eval()
        return cls(
            model,
            Normalisation.from_dict(state["normalisation"]),
            float(state["bin_factor"]),
            state["name"],
            dict(state.get("metadata") or {}),
        )


def estimator_for(pm: PredictModel, config: PredictConfig) -> Estimator:
    """The estimator `config` asks for, derived from the checkpoint's schedule (see `estimators`)."""
    name = default_estimator(pm.metadata) if config.estimator == "auto" else config.estimator
    return resolve_estimator(name, pm.metadata, config.estimator_step, source=pm.name)


def as_predict_model(model: PredictModel | nn.Module | str | os.PathLike[str]) -> PredictModel:
    if isinstance(model, PredictModel):
        return model
    if isinstance(model, nn.Module):
        return PredictModel(model)
    return PredictModel.from_checkpoint(model)


# ----------------------------------------------------------------------------- tile geometry


# ----------------------------------------------------------------------------- devices and runtime


def runtime_for(pm: PredictModel, config: PredictConfig, device: torch.device | None = None) -> Runtime:
    """The runtime of a checkpoint: its network, estimator and linear part."""
    return make_runtime(
        pm.model, config, device, estimator=estimator_for(pm, config), linear=pm.metadata.get("linear_transfer")
    )


def make_runtime(
    model: nn.Module,
    config: PredictConfig,
    device: torch.device | None = None,
    estimator: Estimator | None = None,
    linear: dict[str, Any] | None = None,
) -> Runtime:
    """The network on its device with the tile geometry and, for whole micrographs, the estimator
    (`estimator_for`; the network's plain output when None) and test-time augmentation."""
    device = device or resolve_device(config.device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    channels_last = bool(config.channels_last) and device.type in ("cuda", "cpu")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model, dynamic=False)
    tile = config.tile or (DEFAULT_TILE_GPU if device.type == "cuda" else DEFAULT_TILE_CPU)
    batch = config.batch_size or (8 if device.type == "cuda" else 1)
    lean = device.type == "cpu" and not config.compile
    return Runtime(
        model,
        device,
        tile,
        batch,
        config.overlap,
        autocast_dtype(device, config.precision, fp16=True),
        channels_last,
        lean,
        auto_tile=not config.tile and device.type == "cpu",
        estimator=estimator or Estimator("direct"),
        tta=bool(config.tta),
        linear=linear,
    )


# ----------------------------------------------------------------------------- one image


def predict_image(
    model: nn.Module | Runtime,
    image: np.ndarray,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    config: PredictConfig | None = None,
    cancel: CancelToken | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Denoise one already-normalised 2-D image; returns float32 of the same shape.

    `model` is a network (moved to `config.device`) or a `Runtime` (reused across images; its
    tile/batch shrink after a GPU out-of-memory and stay shrunk). The image is reflection-padded,
    cut into `tile`² tiles whose cores are `2·overlap` smaller, run `batch_size` tiles at a time,
    and the cores are stitched. The result equals one pass over the padded image (seam test).
    """
    rt = _as_runtime(model, config, tile, overlap, batch_size)
    job = predict_image_job(rt, image, cancel)
    return collect(job, None if on_batch is None else lambda e: on_batch(e.done, e.total or 0))


def _as_runtime(
    model: nn.Module | Runtime,
    config: PredictConfig | None,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
) -> Runtime:
    rt = model if isinstance(model, Runtime) else make_runtime(model, config or PredictConfig())
    if tile:
        rt.tile = int(tile)
    if overlap is not None:
        rt.overlap = int(overlap)
    if batch_size:
        rt.batch_size = int(batch_size)
    return rt


def estimate_job(rt: Runtime, image: np.ndarray, cancel: CancelToken | None = None) -> Job[np.ndarray]:
    """The signal estimate of one normalised micrograph: the runtime's estimator around the tiled
    network (`predict_image_job`), averaged over the 8 flips/rotations when `rt.tta`."""
    est = rt.estimator
    x = image if est.scale == 1.0 else image * np.float32(est.scale)
    codes = range(8) if rt.tta else (0,)
    acc: np.ndarray | None = None
    for code in codes:
        view = np.ascontiguousarray(d4(x, code)) if code else x
        pred = yield from predict_image_job(rt, view, cancel)
        pred = d4_inverse(pred, code) if code else pred
        if acc is None:
            acc = np.ascontiguousarray(pred, dtype=np.float32)
        else:
            acc += pred
    assert acc is not None
    if len(codes) > 1:
        acc /= np.float32(len(codes))
    if rt.linear:  # isotropic, so the same for every flip/rotation: added once, whole image
        acc += apply(rt.linear, x)
    return est.combine(acc, x)


# ----------------------------------------------------------------------------- one micrograph


def denoise_job(
    model: PredictModel | nn.Module,
    raw: np.ndarray,
    config: PredictConfig | None = None,
    runtime: Runtime | None = None,
    cancel: CancelToken | None = None,
    source: str = "image",
) -> Job[np.ndarray]:
    """The whole chain on an in-memory micrograph (bin, normalise, tiles, intensity) as a job:
    what the widget shows, and what `predict_files` writes for the same pixels."""
    pm = as_predict_model(model)
    config = config or PredictConfig()
    rt = runtime or runtime_for(pm, config)
    prep = prepare(np.asarray(raw, dtype=np.float32), pm.bin_factor, pm.normalisation, source)
    pred = yield from estimate_job(rt, prep.image, cancel)
    return restore_intensity(pred, prep, config.intensity)


def denoise_array(
    model: PredictModel | nn.Module,
    raw: np.ndarray,
    config: PredictConfig | None = None,
    runtime: Runtime | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """`denoise_job` drained: the denoised micrograph (binned when the checkpoint says so)."""
    return collect(denoise_job(model, raw, config, runtime, cancel))


# ----------------------------------------------------------------------------- naming


def _labels(prep: Prepared, pm: PredictModel, config: PredictConfig, grid: TileGrid) -> list[str]:
    lo, hi, off, sc = prep.stats
    labels = [
        f"{PREDICT_LABEL} {prep.path.name}"[:80],
        f"model {pm.name} epoch {pm.metadata.get('epoch')}"[:80],
        f"norm {pm.normalisation.method} off {off:.6g} scale {sc:.6g} -> {config.intensity}"[:80],
        f"bin {prep.bin_factor:g} tile {grid.tile_shape[0]}x{grid.tile_shape[1]} margin {grid.margin}"[:80],
        f"estimator {estimator_for(pm, config).describe()}{' tta8' if config.tta else ''}"[:80],
    ]
    if prep.info is not None:
        labels += [f"src: {label}"[:80] for label in prep.info.labels[:6] if label]
    return labels[:10]


def predict_one_file(
    pm: PredictModel, rt: Runtime, src: Path, dst: Path, config: PredictConfig, cancel: CancelToken | None = None
) -> Path:
    """Denoise one file to `dst` (atomic). The unit of work of the dask path too."""
    prep = read_prepared(src, pm.bin_factor, pm.normalisation)
    pred = restore_intensity(collect(estimate_job(rt, prep.image, cancel)), prep, config.intensity)
    check_output(pred, src, pm.name)
    grid = plan_tiles(prep.image.shape, rt.tile, rt.overlap)
    return write_mrc(
        dst,
        pred,
        voxel_size=prep.voxel_size or None,
        overwrite=config.overwrite,
        labels=_labels(prep, pm, config, grid),
    )


# ----------------------------------------------------------------------------- the job


@dataclass
class PredictResult:
    """What a run did: outputs written, skipped (already there) and failed (with the reason)."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    oom_events: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{len(self.written)} denoised, {len(self.skipped)} already done (skipped), "
            f"{len(self.failed)} failed; outputs in {self.out_dir}"
        )
        for path, why in self.failed[:10]:
            text += f"\n  failed: {why}" if str(path) in why else f"\n  failed: {path}: {why}"
        return text


def plan_run(
    model: PredictModel | nn.Module | str | os.PathLike[str],
    inputs: Any,
    out_dir: str | os.PathLike[str],
    config: PredictConfig,
) -> tuple[PredictModel, PredictResult, list[tuple[Path, Path]], int]:
    """Check everything before any work: inputs, output folder, the model; outputs that exist are
    skipped (resume) unless `config.overwrite`. Returns (model, result, to-do pairs, total)."""
    out_dir = Path(out_dir)
    sources = list_micrographs(inputs)
    pairs = plan_outputs(sources, out_dir, config.suffix)
    model_file = [model] if isinstance(model, (str, os.PathLike)) and Path(model).exists() else []
    check_out_dir(out_dir, [sources, model_file])
    pm = as_predict_model(model)
    result = PredictResult(out_dir)
    todo = []
    for src, dst in pairs:
        if not os.path.lexists(dst):
            todo.append((src, dst))
        elif not is_predict_output(dst):  # never replaced, never counted as done
            result.failed.append(
                (
                    src,
                    f"{dst}: exists and was not written by cryoddm predict; "
                    "refusing to replace it (move it or choose another -o)",
                )
            )
        elif config.overwrite:
            todo.append((src, dst))
        else:
            result.skipped.append(dst)
    return pm, result, todo, len(pairs)


def predict_files(
    model: PredictModel | nn.Module | str | os.PathLike[str],
    inputs: Any,
    out_dir: str | os.PathLike[str],
    config: PredictConfig | None = None,
    cancel: CancelToken | None = None,
) -> Job[PredictResult]:
    """Denoise every micrograph in `inputs` (files, folders, globs) into `out_dir`.

    Existing outputs are skipped unless `config.overwrite` (an interrupted run resumes). A bad
    micrograph (unreadable, NaN pixels) is reported and the run carries on with the others;
    finished outputs are always kept. Yields one `Progress` per micrograph (payload: `output`).
    """
    config = config or PredictConfig()
    cancel = cancel or CancelToken()
    pm, result, todo, total = plan_run(model, inputs, out_dir, config)
    done = len(result.skipped)
    yield Progress(done, total, f"{done} already done" if done else "starting")
    if not todo:
        return result
    rt = runtime_for(pm, config)
    t0 = time.perf_counter()
    workers = 1 if config.prefetch else 0
    with Pipeline(workers) as pipe:
        nxt = pipe.read(todo[0][0], pm.bin_factor, pm.normalisation)
        pending: Future | None = None
        for k, (src, dst) in enumerate(todo):
            cur, nxt = nxt, (pipe.read(todo[k + 1][0], pm.bin_factor, pm.normalisation) if k + 1 < len(todo) else None)
            try:
                if cancel.cancelled:
                    break
                prep = cur.result()
                pred = restore_intensity(collect(estimate_job(rt, prep.image, cancel)), prep, config.intensity)
                check_output(pred, src, pm.name)
                grid = plan_tiles(prep.image.shape, rt.tile, rt.overlap)
                labels = _labels(prep, pm, config, grid)
                del prep.image
                if pending is not None:
                    _collect_write(pending, result)
                pending = pipe.write(dst, pred, prep.voxel_size, config.overwrite, labels)
                del pred, prep
            except StoppedWriting:
                raise
            except OutputError as exc:
                if exc.errno in NO_ROOM:  # every later file would fail the same way: stop
                    raise _stopped_writing(exc, result) from None
                result.failed.append((src, str(exc)))
                log.error("%s", exc)
            except CryoDDMError as exc:
                result.failed.append((src, str(exc)))
                log.error("%s", exc)
            except Exception as exc:  # noqa: BLE001 - one bad file never stops the others
                if isinstance(exc, Cancelled):
                    break
                result.failed.append((src, f"{src}: {type(exc).__name__}: {exc}"))
                log.error("%s: %s: %s", src, type(exc).__name__, exc)
            done += 1
            yield Progress(done, total, src.name, {"input": str(src), "output": str(dst)})
        if nxt is not None:
            nxt.cancel()
        if pending is not None:
            _collect_write(pending, result)
    result.seconds = time.perf_counter() - t0
    result.oom_events = list(rt.oom_events)
    if result.failed and not result.written and not result.skipped:
        raise CryoDDMError("no micrograph could be denoised:\n  " + "\n  ".join(why for _p, why in result.failed[:10]))
    return result


def _collect_write(fut: Future, result: PredictResult) -> None:
    """Count a finished write: written; done already (another run of the same command wrote it
    meanwhile); or failed with the reason — a full disk stops the run (`_stopped_writing`)."""
    try:
        result.written.append(fut.result())
    except OutputExistsError as exc:
        if is_predict_output(exc.path):
            result.skipped.append(Path(exc.path))
        else:
            result.failed.append(
                (
                    Path(exc.path),
                    f"{exc.path}: appeared meanwhile and was not written by cryoddm predict; left as it is",
                )
            )
    except OutputError as exc:
        if exc.errno in NO_ROOM:
            raise _stopped_writing(exc, result) from None
        result.failed.append((Path(exc.path), str(exc)))
    except CryoDDMError as exc:
        result.failed.append((Path(getattr(exc, "path", "?")), str(exc)))
    except Exception as exc:  # noqa: BLE001 - e.g. a label mrcfile refuses: that file fails
        path = getattr(fut, "path", "?")
        result.failed.append((Path(str(path)), f"{path}: {type(exc).__name__}: {exc}"))


class StoppedWriting(CryoDDMError):
    """The output place is full or read-only: the run stops instead of failing every file."""


def _stopped_writing(exc: OutputError, result: PredictResult) -> StoppedWriting:
    return StoppedWriting(
        f"{exc}; stopped after {len(result.written)} written "
        f"({len(result.skipped)} already done) — finished outputs are kept and a "
        "rerun of the same command resumes"
    )


# the step's public face: the CLI, the widget, distributed prediction and scripts import from here
__all__ = [
    "PredictConfig",
    "PredictModel",
    "PredictResult",
    "denoise_array",
    "denoise_job",
    "estimate_job",
    "is_predict_output",
    "make_runtime",
    "output_path",
    "plan_outputs",
    "plan_run",
    "predict_files",
    "predict_image",
    "predict_one_file",
    "runtime_for",
]
