"""The CryoDDM forward process: real particle crops diffused with real background noise.

Step 2 of the workflow, as in the CryoDDM paper and the original CryoDDM program
(BIT-FuweiLi/CryoDDM). With α_k = 1 − β·k (linear in k) each step is

    x_k = [√α_k + √(1−α_k)(√α_k − 1)]·x_{k−1} + (1−α_k)·n_k

where x_0 are particle crops and n_k are noise patches cut from the same micrographs, paired with
the crops as the original does and re-shuffled at every step. For k = start…T the pair
(x_{k−1}, x_k) is saved: k < T to `s2`, k = T to `val`, in the original's folder layout.

Unlike the original this streams: a first pass decides every crop and noise window from headers
and coordinates (so bad input fails before anything is written), a second pass reads each
micrograph once and writes its crops and noise patches straight into preallocated `.mrcs` files,
and a third computes the chains a block of crops at a time, reading noise patches back from
`s3/noise.mrcs`. Memory does not grow with the number of particles.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_dir
from .config import to_jsonable
from .diffusion import PRESETS, chain, diffuse_step, pair_noise, schedule_coefficients
from .forward_layout import FORMAT, FORWARD_LAYOUT, MANIFEST, STACK_FILES, VERSION, StackWriter, is_forward_folder
from .forward_plan import ForwardConfig, ForwardPlan, _sources, plan_forward
from .jobs import CancelToken, Job, Progress
from .preprocess import read_prepared

log = logging.getLogger(__name__)

SUSPECT_NOISE_LEVEL = 3.0  # |patch median − micrograph median| in robust SDs that flags a patch
_BLOCK = 32  # crops per chain block: ~32·(T+2)·W² floats in memory (≈ 130 MB at W = 384, T = 5)


# ----------------------------------------------------------------------------- configuration


# ----------------------------------------------------------------------------- planning


# ----------------------------------------------------------------------------- streamed stacks


def _cut(image: np.ndarray, x: int, y: int, window: int) -> np.ndarray:
    """The W×W window centred (W//2) on column x, row y: rows [y−W/2, y+W/2), cols [x−W/2, x+W/2)."""
    h = window // 2
    return image[y - h : y - h + window, x - h : x - h + window]


# ----------------------------------------------------------------------------- the job


@dataclass
class ForwardResult:
    out: Path
    counts: dict[str, int]
    window: int
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def run_forward(
    micrographs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    particles: Any,
    noise: Any,
    out: str | os.PathLike[str],
    config: ForwardConfig | None = None,
    cancel: CancelToken | None = None,
) -> Job[ForwardResult]:
    """The forward job: plan, cut crops and noise (each micrograph read once), run the chains.

    `particles` is a STAR file (or several, or a table with micrograph/x/y in raw pixels);
    `noise` a `name x y` text, a STAR file, or a table. Output goes to `OUT.partial/` and is
    renamed to `OUT/` only when complete.
    """
    config = config or ForwardConfig()
    out = Path(out)
    cancel = cancel or CancelToken()
    yield Progress(0, None, "checking inputs")
    plan = plan_forward(micrographs, particles, noise, config, out)
    for msg in plan.warnings:
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    n = plan.counts["crops"]
    with atomic_dir(
        out,
        overwrite=config.overwrite,
        kind="forward",
        inputs=[micrographs, _sources(particles), _sources(noise)],
        layout=FORWARD_LAYOUT,
        manifest=is_forward_folder,
    ) as tmp:
        writers = _open_writers(tmp, plan)
        try:
            stats, suspect = yield from _cut_micrographs(plan, writers, cancel)
            noise_index = yield from _diffuse(plan, writers, cancel)
        finally:
            for wr in writers.values():
                wr.close()
        cancel.raise_if_cancelled()
        _write_pairs(tmp / "pairs.npz", plan, noise_index)
        _flag_suspect(plan, suspect)
        manifest = _manifest(plan, stats, suspect)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    yield Progress(_total(plan), _total(plan), f"wrote {n} crops, {plan.counts['s2_pairs']} s2 pairs")
    return ForwardResult(out, plan.counts, plan.window, manifest, plan.warnings)


def _used(plan: ForwardPlan) -> list[int]:
    """The micrographs that hold a crop or a noise patch."""
    return sorted(set(plan.crops["micrograph"]) | set(plan.noise["micrograph"]))


def _total(plan: ForwardPlan) -> int:
    return len(_used(plan)) + plan.counts["crops"]


def _open_writers(folder: Path, plan: ForwardPlan) -> dict[str, StackWriter]:
    """One preallocated stack per role of the layout (`forward_layout.STACK_FILES`)."""
    _beta, steps, start = plan.schedule
    n, m, w, vs = plan.counts["crops"], plan.counts["noise"], plan.window, plan.voxel_size
    tag = f"napari-cryoddm {__version__} forward"
    sizes = {
        "particles": (n, "x0 particle crops"),
        "s2_input": ((steps - start) * n, "x_(k-1)"),
        "s2_label": ((steps - start) * n, "x_k"),
        "val_input": (n, "x_(T-1)"),
        "val_label": (n, "x_T"),
        "noise": (m, "noise patches"),
    }
    return {
        key: StackWriter(folder / STACK_FILES[key], count, w, vs, f"{tag}: {what}")
        for key, (count, what) in sizes.items()
    }


def _cut_micrographs(
    plan: ForwardPlan, writers: dict[str, StackWriter], cancel: CancelToken
) -> Job[tuple[dict[int, list[float]], list[int]]]:
    """Pass 2: each micrograph once → its crops into s1, its noise patches into s3; returns the
    normalisation stats per micrograph and the noise patches whose level is far from theirs."""
    w, spec = plan.window, plan.config.normalisation
    stats: dict[int, list[float]] = {}
    suspect: list[int] = []
    crop_rows = plan.crops.groupby("micrograph").indices
    noise_rows = plan.noise.groupby("micrograph").indices
    for done, mi in enumerate(_used(plan)):
        cancel.raise_if_cancelled()
        mic = plan.micrographs[mi]
        yield Progress(done, _total(plan), f"cutting {mic.path.name}")
        prep = read_prepared(mic.path, plan.factor, spec)
        image, st = prep.image, prep.stats
        stats[mi] = [float(v) for v in st]
        for i in crop_rows.get(mi, ()):
            r = plan.crops.iloc[i]
            writers["particles"].write(int(i), _cut(image, int(r.x), int(r.y), w))
        centre, spread = _background_level(image)
        for i in noise_rows.get(mi, ()):
            r = plan.noise.iloc[i]
            patch = _cut(image, int(r.x), int(r.y), w)
            writers["noise"].write(int(i), patch)
            if abs(float(np.median(patch)) - centre) > SUSPECT_NOISE_LEVEL * spread:
                suspect.append(int(i))
        del image
    return stats, sorted(suspect)


def _diffuse(plan: ForwardPlan, writers: dict[str, StackWriter], cancel: CancelToken) -> Job[np.ndarray]:
    """Pass 3: the chains, a block of crops at a time, noise read back from s3; returns the
    noise index (crop × step) for pairs.npz."""
    beta, steps, start = plan.schedule
    n, m = plan.counts["crops"], plan.counts["noise"]
    coef = schedule_coefficients(beta, steps)
    pair_rng = np.random.default_rng(np.random.SeedSequence(plan.config.seed).spawn(2)[1])
    noise_index = pair_noise(n, m, steps, pair_rng)
    for b0 in range(0, n, _BLOCK):
        cancel.raise_if_cancelled()
        b1 = min(n, b0 + _BLOCK)
        yield Progress(len(_used(plan)) + b0, _total(plan), f"diffusing crops {b0 + 1}–{b1} of {n}")
        x = writers["particles"].read(range(b0, b1))
        for k in range(1, steps + 1):
            noises = writers["noise"].read(noise_index[b0:b1, k - 1])
            x_new = diffuse_step(x, noises, coef["x_coef"][k - 1], coef["noise_coef"][k - 1])
            if start <= k < steps:
                writers["s2_input"].write((k - start) * n + b0, x)
                writers["s2_label"].write((k - start) * n + b0, x_new)
            elif k == steps:
                writers["val_input"].write(b0, x)
                writers["val_label"].write(b0, x_new)
            x = x_new
    return noise_index


def _write_pairs(path: Path, plan: ForwardPlan, noise_index: np.ndarray) -> None:
    """pairs.npz: enough to recompute every saved pair from s1 and s3."""
    beta, steps, start = plan.schedule
    n = plan.counts["crops"]
    ks = np.arange(start, steps + 1)
    pair_k = np.repeat(ks, n).astype(np.int32)
    pair_crop = np.tile(np.arange(n), len(ks)).astype(np.int64)
    pair_set = np.where(pair_k < steps, "s2", "val")
    pair_index = np.where(pair_k < steps, (pair_k - start) * n + pair_crop, pair_crop)
    with open(path, "wb") as fh:
        np.savez(
            fh,
            crop=pair_crop,
            k=pair_k,
            set=pair_set.astype("U3"),
            index=pair_index.astype(np.int64),
            noise=noise_index[pair_crop].astype(np.int64),
            beta=np.float64(beta),
            steps=np.int64(steps),
            start=np.int64(start),
        )


def _flag_suspect(plan: ForwardPlan, suspect: list[int]) -> None:
    """Say which noise patches look like contamination rather than background."""
    plan.counts["noise_suspect"] = len(suspect)
    if suspect:
        msg = (
            f"{len(suspect)} of {plan.counts['noise']} noise patches (s3 indices {suspect[:8]}"
            f"{' …' if len(suspect) > 8 else ''}) sit more than {SUSPECT_NOISE_LEVEL:g} "
            f"robust SDs from their micrograph's median — likely contamination, carbon or "
            f"ice edges, not background; check those boxes"
        )
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
        plan.warnings.append(msg)


def _background_level(image: np.ndarray) -> tuple[float, float]:
    """A normalised micrograph's median and robust SD (1.4826·MAD) from a strided subsample."""
    step = max(1, int(np.ceil(np.sqrt(image.size / (1 << 18)))))
    sample = image[::step, ::step]
    centre = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - centre)))
    return centre, spread or float(sample.std()) or 1.0


def _manifest(plan: ForwardPlan, stats: dict[int, list[float]], suspect: Sequence[int] = ()) -> dict[str, Any]:
    beta, steps, start = plan.schedule
    c = plan.config
    coef = schedule_coefficients(beta, steps)
    mics = []
    for i, m in enumerate(plan.micrographs):
        entry = {
            "path": str(m.path.resolve()),
            "name": m.path.name,
            "shape": list(m.shape),
            "raw_shape": list(m.info.image_shape),
            "raw_voxel_size": m.info.voxel_size,
        }
        if i in stats:
            entry["normalisation_stats"] = dict(zip(("clip_low", "clip_high", "offset", "scale"), stats[i]))
        mics.append(entry)
    return to_jsonable(
        {
            "format": FORMAT,
            "version": VERSION,
            "window": plan.window,
            "diameter_px": plan.diameter_px,
            "bin_factor": plan.factor,
            "voxel_size": plan.voxel_size,
            "schedule": {
                "beta": beta,
                "steps": steps,
                "start": start,
                "preset": c.preset,
                "alpha": coef["alpha"],
                "x_coef": coef["x_coef"],
                "noise_coef": coef["noise_coef"],
            },
            "normalisation": c.normalisation.to_dict(),
            "jitter": c.jitter,
            "seed": c.seed,
            "per_micrograph": c.per_micrograph,
            "max_crops": c.max_crops,
            "noisier_member": "label",
            "stacks": dict(STACK_FILES),
            "coordinates": "binned frame, RELION convention: x = column, y = row, origin at data[0, 0]; "
            "the window of a centre (x, y) is rows [y − W/2, y + W/2), "
            "columns [x − W/2, x + W/2)",
            "counts": plan.counts,
            "warnings": plan.warnings,
            "micrographs": mics,
            "crops": [
                {
                    "micrograph": int(r.micrograph),
                    "x": int(r.x),
                    "y": int(r.y),
                    "particle_x": float(r.particle_x),
                    "particle_y": float(r.particle_y),
                }
                for r in plan.crops.itertuples(index=False)
            ],
            "noise": [
                {"micrograph": int(r.micrograph), "x": int(r.x), "y": int(r.y)}
                for r in plan.noise.itertuples(index=False)
            ],
            "noise_suspect": list(suspect),
            "package_version": __version__,
            "complete": True,
        }
    )


# ----------------------------------------------------------------------------- preview


def preview_chain(
    micrographs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    particles: Any,
    noise: Any,
    config: ForwardConfig,
    crop: int = 0,
    max_noise: int = 64,
) -> tuple[np.ndarray, ForwardPlan]:
    """x_0…x_T of one planned crop, shape (T+1, W, W), without writing anything.

    Reads the crop's micrograph and up to `max_noise` noise patches (micrographs read once each);
    the noise pairing is a seeded draw like the run's.
    """
    plan = plan_forward(micrographs, particles, noise, config)
    beta, steps, _start = plan.schedule
    crop = int(np.clip(crop, 0, len(plan.crops) - 1))
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(2)[1])
    chosen = np.sort(rng.choice(len(plan.noise), size=min(max_noise, len(plan.noise)), replace=False))
    spec = config.normalisation
    target = plan.crops.iloc[crop]
    images: dict[int, np.ndarray] = {}

    def image(mi: int) -> np.ndarray:
        if mi not in images:
            images[mi] = read_prepared(plan.micrographs[mi].path, plan.factor, spec).image
        return images[mi]

    x0 = _cut(image(int(target.micrograph)), int(target.x), int(target.y), plan.window).copy()
    patches = []
    for mi, grp in plan.noise.iloc[chosen].groupby("micrograph"):
        img = image(int(mi))
        patches.extend(_cut(img, int(r.x), int(r.y), plan.window).copy() for r in grp.itertuples())
        if int(mi) != int(target.micrograph):
            images.pop(int(mi), None)
    idx = pair_noise(1, len(patches), steps, rng)[0]
    return chain(x0, np.stack([patches[i] for i in idx]), beta), plan


# the step's public face: the CLI, the widget and scripts import from here
__all__ = [
    "PRESETS",
    "ForwardConfig",
    "ForwardPlan",
    "ForwardResult",
    "chain",
    "pair_noise",
    "plan_forward",
    "preview_chain",
    "run_forward",
    "schedule_coefficients",
]
