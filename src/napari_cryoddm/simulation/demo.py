"""`cryoddm demo`: the whole workflow on sample data with a known clean signal, then a report.

Sample micrographs (with particles, a RELION STAR and a cryoSPARC-style `.cs` pair) → noise boxes
picked away from the particles → forward → train → predict → cs2star back to the raw micrographs →
a report that scores the denoised micrographs against the truth (`report.py`, `quality.py`).

Every step is the same public job the CLI subcommands and the dock widgets run; this module only
chains them, forwards their progress and checks the seams (the cs2star particles must land on the
sample's true positions). `--quick` is sized for a few CPU minutes; the default is sized for a GPU
or a longer CPU run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..config import ConfigError, to_jsonable
from ..errors import CryoDDMError
from ..jobs import CancelToken, Job, Progress
from . import quality as q
from .report import ReportInput, json_finite, write_report

log = logging.getLogger(__name__)

STEPS = ("sample", "pick noise", "forward", "train", "predict", "cs2star", "report")


@dataclass
class DemoConfig:
    """Sizes of the demo; `quick` picks CPU-friendly values for every field left unset."""

    quick: bool = field(
        default=False,
        metadata={"help": "a few CPU minutes: 3 Å/px (45-px particles, W = 128), fewer micrographs and epochs"},
    )
    micrographs: int | None = field(
        default=None, metadata={"help": "number of sample micrographs (default 6 with --quick, else 16)"}
    )
    size: int | None = field(
        default=None, metadata={"help": "micrograph side (default 768 with --quick, else 1024)", "unit": "px"}
    )
    particles: int | None = field(
        default=None, metadata={"help": "particles per micrograph (default 8 with --quick, else 12)"}
    )
    pixel_size: float | None = field(
        default=None,
        metadata={"help": "pixel size (default 3.0 with --quick, else 1.5: 90-px particles, W = 256)", "unit": "Å/px"},
    )
    snr: float = field(
        default=0.05, metadata={"help": "SNR over the particle envelopes (the quality note's definition)"}
    )
    epochs: int | None = field(default=None, metadata={"help": "training epochs (default 4 with --quick, else 20)"})
    batch_size: int = field(default=16, metadata={"help": "training batch size"})
    window: int | None = field(
        default=None,
        metadata={"help": "forward/training window W (default: the rule (⌊1.5·d⌋ // 128 + 1)·128)", "unit": "px"},
    )
    max_noise: int = field(default=40, metadata={"help": "noise boxes picked per micrograph at most"})
    init: Path | None = field(
        default=None,
        metadata={"help": "start training from these weights (ours or the original's .pth) instead of random ones"},
    )
    device: str = field(default="auto", metadata={"help": "training/prediction device: auto, cpu, cuda, cuda:N, mps"})
    seed: int = field(default=0, metadata={"help": "seed of the sample, picking, forward and training"})
    report_micrographs: int = field(default=3, metadata={"help": "micrographs shown in the montage"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing demo folder's outputs"})

    def resolved(self) -> DemoConfig:
        """Fill the fields left unset from `quick`."""
        quick = self.quick
        values = {
            "micrographs": self.micrographs or (6 if quick else 16),
            "size": self.size or (768 if quick else 1024),
            "particles": self.particles if self.particles is not None else (8 if quick else 12),
            "pixel_size": self.pixel_size or (3.0 if quick else 1.5),
            "epochs": self.epochs or (4 if quick else 20),
        }
        return replace(self, **values)

    def __post_init__(self) -> None:
        for name in ("micrographs", "size", "epochs", "batch_size", "max_noise", "report_micrographs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(self, name, f"must be at least 1, got {v}")
        if self.size is not None and self.size < 128:
            raise ConfigError(self, "size", f"must be at least 128 px, got {self.size}")
        if not (math.isfinite(self.snr) and self.snr > 0):
            raise ConfigError(self, "snr", f"must be positive, got {self.snr}")
        if self.pixel_size is not None and not (math.isfinite(self.pixel_size) and self.pixel_size > 0):
            raise ConfigError(self, "pixel_size", f"must be positive, got {self.pixel_size}")
        if self.seed < 0:
            raise ConfigError(self, "seed", f"must be 0 or more, got {self.seed}")


@dataclass
class DemoResult:
    """Every artefact the demo wrote, and its headline numbers."""

    out: Path
    sample_dir: Path
    noise_txt: Path
    forward_dir: Path
    train_dir: Path
    checkpoint: Path
    denoised: list[Path]
    star: Path
    report_dir: Path
    files: dict[str, Path]
    rows: dict[str, dict[str, float]]
    cs2star_max_error_px: float
    timings: dict[str, float] = field(default_factory=dict)


def _stage(job: Job[Any], index: int, name: str, timings: dict[str, float]) -> Job[Any]:
    """Re-yield a step's progress on the demo's scale (one unit per step, so the bar's total stays
    7 and its rate is seconds per step), with `[i/7 name]` and the step's own count in front;
    time the step."""
    t0 = time.perf_counter()
    prefix = f"[{index + 1}/{len(STEPS)} {name}]"
    yield Progress(index, len(STEPS), prefix)
    while True:
        try:
            ev = next(job)
        except StopIteration as stop:
            timings[name] = round(time.perf_counter() - t0, 2)
            return stop.value
        frac = min(1.0, ev.done / ev.total) if ev.total else 0.0
        count = f" {ev.done}/{ev.total}" if ev.total else ""
        yield Progress(
            round(index + frac, 3),
            len(STEPS),
            f"{prefix}{count} {ev.message}".strip(),
            dict(ev.payload, step=name, step_done=ev.done, step_total=ev.total),
        )


# what a demo folder holds: every step's output, each of which has its own --overwrite guard too
DEMO_LAYOUT = (
    "sample/*",
    "noise_coordinates.txt",
    "forward/*",
    "train/*",
    "denoised/*",
    "cs2star/*",
    "report/*",
    "demo.json",
)


def _check_out(out: Path, overwrite: bool, inputs: Any = ()) -> None:
    """Before any work (`safety`): not the working directory or a parent, holds no input, can be
    written in; an existing folder is reused only with --overwrite and only if it is a demo's."""
    from ..safety import check_output_folder, check_writable

    if out.is_dir() and not any(out.iterdir()):
        check_output_folder(out, "demo", True, inputs)  # an empty folder: just the location rules
    else:
        check_output_folder(
            out,
            "demo",
            overwrite,
            inputs,
            DEMO_LAYOUT,
            lambda folder: (folder / "demo.json").is_file(),
            "pass --overwrite to run the demo again in it, or choose another --out",
        )
    check_writable(out)


def _prepare_out(out: Path, cfg: DemoConfig) -> None:
    """The output rule, the folder and its marker, before any work."""
    from ..safety import output_error, write_marker

    _check_out(out, cfg.overwrite, [cfg.init if cfg.init and Path(cfg.init).exists() else None])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from None
    write_marker(out, "demo", files=(), layout=DEMO_LAYOUT)


def _cs2star(sample: Any, out: Path, overwrite: bool, cancel: CancelToken) -> Job[Any]:
    """cs2star of the sample's cryoSPARC particles back onto its raw micrographs."""
    from ..cs2star import Cs2StarConfig, convert

    config = Cs2StarConfig(strip_uid=True, micrograph_folder=str(sample.micrographs[0].parent), overwrite=overwrite)
    return convert(sample.particles_cs, [sample.passthrough_cs], out / "cs2star" / "particles.star", config, cancel)


def run_demo(
    out: str | Path = "cryoddm-demo", config: DemoConfig | None = None, cancel: CancelToken | None = None
) -> Job[DemoResult]:
    """The demo job: every workflow step in order, then the quality report."""
    from ..io.star import read_star_blocks
    from ..train import TrainConfig
    from .sample import SampleConfig

    cfg = (config or DemoConfig()).resolved()
    cancel = cancel or CancelToken()
    out = Path(out)
    _prepare_out(out, cfg)
    timings: dict[str, float] = {}
    ow = cfg.overwrite
    scfg = SampleConfig(
        n_micrographs=cfg.micrographs,
        width=cfg.size,
        height=cfg.size,
        pixel_size=cfg.pixel_size,
        particles=cfg.particles,
        snr=cfg.snr,
        seed=cfg.seed,
    )
    trained = yield from train_on_sample(
        out,
        scfg,
        TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, init=cfg.init, overwrite=ow
        ),
        window=cfg.window,
        max_noise=cfg.max_noise,
        seed=cfg.seed,
        overwrite=ow,
        timings=timings,
        cancel=cancel,
    )
    sample, noise_txt, fwd, checkpoint = (trained.sample, trained.noise_txt, trained.forward, trained.checkpoint)

    # 5. predict every micrograph
    denoised = yield from _stage(
        _predict(sample.micrographs, checkpoint, out / "denoised", cfg, cancel), 4, STEPS[4], timings
    )

    # 6. cs2star: the cryoSPARC particles back onto the raw micrographs
    c2s = yield from _stage(_cs2star(sample, out, ow, cancel), 5, STEPS[5], timings)
    err = cs2star_error(c2s.outputs[0], sample.particles_star, read_star_blocks)

    # 7. report against the truth
    t0 = time.perf_counter()
    yield Progress(len(STEPS) - 1, len(STEPS), f"[7/7 report] scoring {len(denoised)} micrographs against the truth")
    rep = write_demo_report(out / "report", sample, denoised, cfg, timings, err, checkpoint)
    timings["report"] = round(time.perf_counter() - t0, 2)
    summary = {
        "config": to_jsonable(cfg),
        "timings_s": timings,
        "rows": rep.rows,
        "cs2star_max_error_px": err,
        "checkpoint": str(checkpoint),
    }
    with atomic_write(out / "demo.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(to_jsonable(json_finite(summary)), indent=1) + "\n", encoding="utf-8")
    yield Progress(len(STEPS), len(STEPS), f"[7/7 report] {rep.files['report']}")
    return DemoResult(
        out,
        sample.out_dir,
        noise_txt,
        fwd.out,
        out / "train",
        checkpoint,
        denoised,
        c2s.outputs[0],
        rep.folder,
        rep.files,
        rep.rows,
        err,
        timings,
    )


@dataclass
class Trained:
    """Steps 1–4 of the workflow on a sample set: what they wrote."""

    sample: Any  # sample.SampleSet
    noise_txt: Path
    forward: Any  # forward.ForwardResult
    train: Any  # train.TrainResult
    checkpoint: Path


def train_on_sample(
    out: Path,
    sample_config: Any,
    train_config: Any,
    window: int | None = None,
    max_noise: int = 40,
    seed: int = 0,
    overwrite: bool = False,
    timings: dict[str, float] | None = None,
    cancel: CancelToken | None = None,
) -> Job[Trained]:
    """sample → pick noise (away from the known particles) → forward → train, in `out/`.

    Shared by the demo and `benchmarks/bench_quality.py`, so both train exactly as a user would.
    """
    from ..box_files import write_boxes
    from ..forward import ForwardConfig, run_forward
    from ..io.star import read_coordinates
    from ..picking import PickConfig, pick_noise
    from ..train import train
    from .sample import generate_sample

    cancel = cancel or CancelToken()
    timings = timings if timings is not None else {}
    out = Path(out)
    sample = yield from _stage(
        generate_sample(out / "sample", sample_config, cancel, overwrite=overwrite), 0, STEPS[0], timings
    )
    d_px = float(sample_config.diameter_px)
    particles = read_coordinates(sample.particles_star)
    pick = yield from _stage(
        pick_noise(
            sample.micrographs,
            PickConfig(diameter=d_px, box=window, max_per_micrograph=max_noise, seed=seed),
            particles=particles,
            cancel=cancel,
            particles_source=str(sample.particles_star),
        ),
        1,
        STEPS[1],
        timings,
    )
    noise_txt = write_boxes(out / "noise_coordinates.txt", pick.boxes, overwrite=overwrite)
    fwd = yield from _stage(
        run_forward(
            sample.micrographs,
            sample.particles_star,
            noise_txt,
            out / "forward",
            ForwardConfig(diameter=d_px, window=window, seed=seed, overwrite=overwrite),
            cancel,
        ),
        2,
        STEPS[2],
        timings,
    )
    tres = yield from _stage(train(fwd.out, out / "train", train_config, cancel), 3, STEPS[3], timings)
    if tres.stopped:
        raise CryoDDMError(f"training was stopped; its resumable checkpoint is in {out / 'train'}")
    checkpoint = tres.best or tres.last
    if checkpoint is None:
        raise CryoDDMError(f"training wrote no checkpoint in {out / 'train'}")
    return Trained(sample, noise_txt, fwd, tres, Path(checkpoint))


def _predict(
    micrographs: list[Path], checkpoint: Path, out: Path, cfg: DemoConfig, cancel: CancelToken
) -> Job[list[Path]]:
    from ..predict import PredictConfig, predict_files

    result = yield from predict_files(
        checkpoint, list(micrographs), out, PredictConfig(device=cfg.device, overwrite=cfg.overwrite), cancel=cancel
    )
    if result.failed:
        raise CryoDDMError("predict failed on " + "; ".join(f"{p}: {why}" for p, why in result.failed[:3]))
    return sorted([*result.written, *result.skipped])


def cs2star_error(star: Path, truth_star: Path, read_star_blocks: Any) -> float:
    """Largest distance (px) between a true particle and the nearest cs2star particle on the same
    raw micrograph (and back); cs2star keeps cryoSPARC's particle order, not the truth's."""
    got = _particles_block(read_star_blocks(star))
    truth = _particles_block(read_star_blocks(truth_star))
    if len(got) != len(truth):
        raise CryoDDMError(f"cs2star wrote {len(got)} particles for {len(truth)} true ones")
    name = lambda df: df["rlnMicrographName"].map(lambda s: Path(str(s)).name).to_numpy()  # noqa: E731
    gn, tn = name(got), name(truth)
    if set(gn) != set(tn):
        raise CryoDDMError(f"cs2star names micrographs {sorted(set(gn))[:3]}, the raw ones are {sorted(set(tn))[:3]}")
    xy = lambda df: df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)  # noqa: E731
    gxy, txy = xy(got), xy(truth)
    worst = 0.0
    for mic in set(tn):
        a, b = gxy[gn == mic], txy[tn == mic]
        if len(a) != len(b):
            raise CryoDDMError(f"{mic}: cs2star has {len(a)} particles, the truth {len(b)}")
        d = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
        worst = max(worst, float(d.min(axis=0).max()), float(d.min(axis=1).max()))
    return worst


def _particles_block(blocks: dict[str, Any]) -> Any:
    for name in ("particles", "data_particles"):
        if name in blocks:
            return blocks[name]
    return list(blocks.values())[-1]


def write_demo_report(
    folder: Path,
    sample: Any,
    denoised: list[Path],
    cfg: DemoConfig,
    timings: dict[str, float],
    cs2star_err: float,
    checkpoint: Path,
):
    """Raw, Gaussian σ = 1.5 px, the radial Wiener-like filter and the trained model, scored
    against the clean signal; conformation evidence on the sample's particles."""
    from ..io.mrc import read_image
    from .sample import molecule_for, read_truth

    raw = [read_image(p) for p in sample.micrographs]
    clean = [read_image(p) for p in sample.clean]
    by_name = {p.name: p for p in denoised}
    missing = [p.name for p in sample.micrographs if p.name not in by_name]
    if missing:
        raise CryoDDMError(f"predict wrote no output for {missing[:3]}")
    model = [read_image(by_name[p.name]) for p in sample.micrographs]
    methods = {
        "gaussian σ=1.5 px": [q.gaussian_lowpass(r, 1.5) for r in raw],
        "wiener (radial)": [q.wiener_lowpass(r) for r in raw],
        "CryoDDM (this run)": model,
    }
    _, table = read_truth(sample.truth_json)
    table = table.copy()
    names = [p.name for p in sample.micrographs]
    table["index"] = table["micrograph"].map({n: i for i, n in enumerate(names)})
    box = q.box_size_for(sample.config.diameter_px)
    refs = q.sample_references(table, molecule_for(sample.config), sample.config, box)
    right_raw = q.conformation_correct(raw, clean, table, refs, box)
    accuracy = {"raw": q.conformation_accuracy(right_raw, right_raw)}
    for name, images in methods.items():
        accuracy[name] = q.conformation_accuracy(q.conformation_correct(images, clean, table, refs, box), right_raw)
    particles = [table.loc[table["index"] == i, ["y", "x"]].to_numpy(float) for i in range(len(names))]
    notes = [
        f"sample: {len(names)} micrographs {cfg.size}² px, {cfg.pixel_size} Å/px, "
        f"{sample.config.diameter_px:.0f}-px particles, SNR {cfg.snr}, two conformations "
        f"({sample.config.hinge_angle:g}°), {len(table)} particles",
        f"model: {checkpoint} ({cfg.epochs} epochs); step times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        f"cs2star: the converted particles lie at most {cs2star_err:.2f} px from the true positions",
        "conformation accuracy on so few particles has a large standard error; "
        "benchmarks/bench_quality.py runs the ≥ 3,000-particle test",
    ]
    data = ReportInput(names, raw, clean, methods, particles, notes)
    return write_report(folder, data, accuracy)
