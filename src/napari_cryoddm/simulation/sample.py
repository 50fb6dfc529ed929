"""Synthetic single-particle micrographs whose clean signal and particles are known exactly.

No public micrograph set with a clean truth exists, so every step is tested against these (the
picker, forward crops, training and prediction, cs2star). The physics matches the quality
metrics of docs/quality.md:

* a pseudo-atomic, asymmetric molecule: ~2,000 Gaussian atoms in a few overlapping ellipsoidal
  lobes, ~135 Å across; optionally a second conformation in which a rigid domain holding 20 % of
  the atoms is turned about a hinge;
* projections at uniformly random orientations (scipy `Rotation.random`), placed without overlap;
* a CTF (300 kV, Cs 2.7 mm, amplitude contrast 0.07, defocus 1.0–2.5 µm per micrograph, no
  astigmatism) applied to the whole micrograph in Fourier space, padded so nothing wraps around;
* a smooth ice background (a random field with Fourier support |k| ≤ 3 cycles per image,
  std 0.3 × the noise σ) and white Gaussian noise at the requested SNR, where
  SNR = var(clean signal over the particle envelopes) / var(noise) and the envelope is where the
  CTF-free projection, blurred by 3 px, exceeds 5 % of its maximum.

Conventions (the project's, RELION's): arrays are [y, x]; x = column, y = row, origin at
`data[0, 0]`. A particle's rotation R (scipy, active) maps molecule coordinates into the image
frame as p_image = Rᵀ·p, which is RELION's A = Rᵀ with (rot, tilt, psi) = R.as_euler("ZYZ")
(intrinsic); cryoSPARC's `alignments3D/pose` is R.as_rotvec(), so pyem's
`rot2euler(expmap(pose))` (expmap returns the transposed Rodrigues matrix) gives these angles back.
Micrographs are scaled so the white noise has σ = 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from .. import __version__
from ..atomic import atomic_dir, atomic_write
from ..errors import CryoDDMError, InputError
from ..io.mrc import write_mrc
from ..io.star import write_particles_star
from ..jobs import CancelToken, Job, Progress
from .physics import (
    ENVELOPE_BLUR_PX,
    ENVELOPE_FRACTION,
    Molecule,
    above_fraction,
    apply_ctf,
    build_molecule,
    ctf,
    delocalisation_px,
    envelope_snr,
    filtered,
    gaussian_transfer,
    ice_field,
    image_positions,
    padded_spectrum,
    project,
    relion_angles,
    splat,
    stream,
)
from .sample_config import SampleConfig
from .sample_files import FORMAT, cs_datasets, particles_star_tables, truth_document

MIN_SEPARATION = 1.2  # particle centres at least 1.2 diameters apart (no overlap, some room)
PLACEMENT_BATCHES = 20  # × 128 random candidates per particle before giving up
TRUTH_COLUMNS = ("micrograph", "index", "x", "y", "rot", "tilt", "psi", "defocus", "conformation", "subset")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The molecule
# ----------------------------------------------------------------------------------------------


def molecule_for(config: SampleConfig) -> Molecule:
    """The molecule a sample set with this configuration is made of."""
    return build_molecule(config.diameter, config.atoms, config.hinge_angle, config.seed)


# ----------------------------------------------------------------------------------------------
# Projection, CTF, envelope
# ----------------------------------------------------------------------------------------------


def particle_reference(
    molecule: Molecule, rotation: Rotation, defocus: float, config: SampleConfig, box: int, conformation: int = 1
) -> np.ndarray:
    """The clean CTF-modulated image of one particle in a box×box window centred on it, in the
    same units as the `clean` micrographs only up to a scale (use normalised correlation)."""
    proj = project(molecule, rotation, config.pixel_size, box, conformation)
    return apply_ctf(
        proj,
        config.pixel_size,
        defocus,
        config.voltage,
        config.cs,
        config.amplitude_contrast,
        pad=box // 2 + delocalisation_px(config.pixel_size, defocus, config.voltage, config.cs),
    )


# ----------------------------------------------------------------------------------------------
# One micrograph
# ----------------------------------------------------------------------------------------------


def micrograph_name(index: int, n_micrographs: int) -> str:
    digits = max(3, len(str(max(n_micrographs - 1, 0))))
    return f"mic_{index:0{digits}d}.mrc"


def place_particles(
    rng: np.random.Generator, n: int, shape: tuple[int, int], diameter_px: float, margin: int
) -> np.ndarray:
    """(n, 2) integer centres (x, y), at least `margin` px from every edge and
    `MIN_SEPARATION` × diameter apart (random sequential placement)."""
    ny, nx = shape
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lo_x, hi_x, lo_y, hi_y = margin, nx - 1 - margin, margin, ny - 1 - margin
    if hi_x < lo_x or hi_y < lo_y:
        raise CryoDDMError(
            f"a {nx}×{ny} micrograph has no room for particles {margin} px from its "
            f"edges; make it larger or the particles smaller"
        )
    min_d2 = (MIN_SEPARATION * diameter_px) ** 2
    placed = np.zeros((n, 2), dtype=np.int64)
    for count in range(n):
        for _ in range(PLACEMENT_BATCHES):
            cand = np.stack([rng.integers(lo_x, hi_x + 1, 128), rng.integers(lo_y, hi_y + 1, 128)], axis=1)
            if count:
                d2 = ((cand[:, None, :] - placed[None, :count, :]) ** 2).sum(axis=2).min(axis=1)
                ok = np.flatnonzero(d2 >= min_d2)
            else:
                ok = np.arange(1)
            if ok.size:
                placed[count] = cand[ok[0]]
                break
        else:
            break
    else:
        return placed
    raise CryoDDMError(
        f"could not place {n} particles of {diameter_px:.0f} px without overlap in a "
        f"{nx}×{ny} micrograph (centres ≥ {margin} px from the edges); "
        f"lower --particles or enlarge the micrographs"
    )


@dataclass(eq=False)
class SimulatedMicrograph:
    """One micrograph and everything known about it (float32 images, as written)."""

    name: str
    noisy: np.ndarray
    clean: np.ndarray  # CTF-modulated signal, the truth a denoiser should approach
    ctf_free: np.ndarray  # the projections without CTF (defines the envelope)
    ice: np.ndarray
    defocus: float  # Å
    signal_scale: float  # clean = signal_scale × CTF(projections); noise σ is 1
    snr: float  # measured over the envelope against the realised noise
    particles: pd.DataFrame


@dataclass(eq=False)
class Layout:
    """Where and how the particles of one micrograph are, before any image is made."""

    name: str
    defocus: float  # Å
    centres: np.ndarray  # (n, 2) int (x, y)
    rotations: Rotation | None
    conformations: np.ndarray  # (n,) 1 or 2
    subsets: np.ndarray  # (n,) 1 or 2 (RELION random halves)
    rng: np.random.Generator  # the micrograph's stream, positioned for the ice and the noise


def micrograph_layout(config: SampleConfig, index: int) -> Layout:
    """Micrograph `index`'s defocus and particles (cheap: no pixels). Its random stream depends
    only on the seed and the index, so any micrograph can be regenerated without the others."""
    rng = stream(config.seed, 1, index)
    defocus = float(rng.uniform(config.defocus_min, config.defocus_max) * 1e4)  # Å
    n = config.particles
    margin = max(int(math.ceil(config.diameter_px / 2 + 2)), config.window // 2)
    centres = place_particles(rng, n, config.shape, config.diameter_px, margin)
    rotations = Rotation.random(n, rng) if n else None
    if config.conformations == 2:
        n_a = n // 2 + (n % 2) * (index % 2)
        labels = np.array([1] * n_a + [2] * (n - n_a), dtype=np.int64)
        rng.shuffle(labels)
    else:
        labels = np.ones(n, dtype=np.int64)
    subsets = rng.integers(1, 3, n)
    return Layout(micrograph_name(index, config.n_micrographs), defocus, centres, rotations, labels, subsets, rng)


def simulate_micrograph(config: SampleConfig, molecule: Molecule, index: int) -> SimulatedMicrograph:
    """Micrograph `index` of the set, reproducible on its own (see `micrograph_layout`)."""
    lay = micrograph_layout(config, index)
    rng, shape, name, defocus, n = lay.rng, config.shape, lay.name, lay.defocus, config.particles
    centres, rotations, labels, subsets = lay.centres, lay.rotations, lay.conformations, lay.subsets

    ctf_free = np.zeros(shape, dtype=np.float64)
    for k in range(n):  # one particle at a time: its bounding box stays in cache
        xy = image_positions(molecule.conformation(int(labels[k])), rotations[k], config.pixel_size)
        splat(
            ctf_free,
            xy[:, 0] + centres[k, 0],
            xy[:, 1] + centres[k, 1],
            molecule.weights,
            molecule.sigma / config.pixel_size,
        )
    # one padded FFT of the projections serves both the CTF and the envelope's blur
    pad = (
        max(
            delocalisation_px(config.pixel_size, defocus, config.voltage, config.cs),
            int(math.ceil(5 * ENVELOPE_BLUR_PX)),
        )
        + 8
    )
    spec, pshape = padded_spectrum(ctf_free, pad, np.float32)
    signal = filtered(
        spec,
        ctf(
            pshape,
            config.pixel_size,
            defocus,
            voltage=config.voltage,
            cs=config.cs,
            amplitude_contrast=config.amplitude_contrast,
            dtype=np.float32,
        ),
        pshape,
        shape,
    )
    mask = above_fraction(
        filtered(spec, gaussian_transfer(pshape, ENVELOPE_BLUR_PX, np.float32), pshape, shape), ENVELOPE_FRACTION
    )
    var_env = float(np.var(signal[mask], dtype=np.float64)) if mask.any() else 0.0
    scale = math.sqrt(config.snr / var_env) if var_env > 0 else 1.0  # makes the noise σ = 1
    clean = signal * np.float32(scale)
    ice = ice_field(rng, shape) * np.float32(config.ice)
    noisy = rng.standard_normal(shape).astype(np.float32)  # numpy's standard float64 draws
    noise_var = float(np.var(noisy, dtype=np.float64))
    noisy += clean
    noisy += ice
    snr = envelope_snr(clean, noise_var, mask) if mask.any() else 0.0

    angles = relion_angles(rotations) if n else np.zeros((0, 3))
    particles = pd.DataFrame(
        {
            "micrograph": [name] * n,
            "index": np.full(n, index, dtype=np.int64),
            "x": centres[:, 0].astype(np.int64),
            "y": centres[:, 1].astype(np.int64),
            "rot": angles[:, 0],
            "tilt": angles[:, 1],
            "psi": angles[:, 2],
            "defocus": np.full(n, defocus),
            "conformation": labels,
            "subset": subsets.astype(np.int64),
        }
    )
    return SimulatedMicrograph(name, noisy, clean, ctf_free.astype(np.float32), ice, defocus, scale, snr, particles)


def default_workers() -> int:
    """Threads simulating micrographs ahead. One: each micrograph's FFTs already use every core,
    and on 2 busy cores a second thread measured slower (benchmarks/bench_sample.py)."""
    return 1


def iter_micrographs(
    config: SampleConfig, molecule: Molecule | None = None, workers: int | None = None
) -> Iterator[SimulatedMicrograph]:
    """Every micrograph of the set in order. With `workers` > 1, that many are simulated ahead in
    threads (memory stays a few micrographs); the output is identical whatever `workers` is,
    since each micrograph has its own random stream."""
    molecule = molecule if molecule is not None else molecule_for(config)
    workers = default_workers() if workers is None else max(1, int(workers))
    n = config.n_micrographs
    if workers == 1 or n == 1:
        for i in range(n):
            yield simulate_micrograph(config, molecule, i)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cryoddm-sample") as pool:
        pending = deque(pool.submit(simulate_micrograph, config, molecule, i) for i in range(min(workers, n)))
        nxt = len(pending)
        try:
            while pending:
                result = pending.popleft().result()
                if nxt < n:
                    pending.append(pool.submit(simulate_micrograph, config, molecule, nxt))
                    nxt += 1
                yield result
        finally:
            for f in pending:
                f.cancel()


@dataclass(eq=False)
class SampleArrays:
    """A sample set in memory. Unpacks as `noisy, clean, table = sample_arrays(config)`."""

    noisy: np.ndarray  # (n, y, x) float32
    clean: np.ndarray  # (n, y, x) float32
    table: pd.DataFrame  # one row per particle: micrograph, index, x, y, rot, tilt, psi, defocus, conformation, subset
    ctf_free: np.ndarray  # (n, y, x) float32
    ice: np.ndarray  # (n, y, x) float32
    molecule: Molecule
    config: SampleConfig
    micrographs: list[dict] = field(default_factory=list)  # name, defocus, signal_scale, snr

    def __iter__(self):
        return iter((self.noisy, self.clean, self.table))


def sample_arrays(config: SampleConfig | None = None) -> SampleArrays:
    """The whole set in memory: the same float32 pixels `generate_sample` writes."""
    config = config or SampleConfig()
    molecule = molecule_for(config)
    n, (ny, nx) = config.n_micrographs, config.shape
    noisy, clean, free, ice = (np.empty((n, ny, nx), dtype=np.float32) for _ in range(4))
    tables, infos = [], []
    for i, sim in enumerate(iter_micrographs(config, molecule)):
        noisy[i], clean[i], free[i], ice[i] = sim.noisy, sim.clean, sim.ctf_free, sim.ice
        tables.append(sim.particles)
        infos.append(_mic_info(sim))
    return SampleArrays(noisy, clean, pd.concat(tables, ignore_index=True), free, ice, molecule, config, infos)


def _mic_info(sim: SimulatedMicrograph) -> dict:
    return {
        "name": sim.name,
        "defocus_A": sim.defocus,
        "signal_scale": sim.signal_scale,
        "noise_sigma": 1.0,
        "snr_envelope": sim.snr,
        "particles": int(len(sim.particles)),
    }


# ----------------------------------------------------------------------------------------------
# Files: MRC, RELION STAR, truth JSON, cryoSPARC .cs pair
# ----------------------------------------------------------------------------------------------


@dataclass
class SampleSet:
    """What `generate_sample` wrote."""

    out_dir: Path
    micrographs: list[Path]
    clean: list[Path]
    particles_star: Path
    truth_json: Path
    particles_cs: Path
    passthrough_cs: Path
    config: SampleConfig
    n_particles: int


# what a sample folder holds (recognised for --overwrite in folders written before markers)
SAMPLE_LAYOUT = ("micrographs/*.mrc", "clean/*.mrc", "particles.star", "particles.cs", "passthrough.cs", "truth.json")


def _is_sample_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "truth.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def generate_sample(
    out_dir: str | Path, config: SampleConfig | None = None, cancel: CancelToken | None = None, overwrite: bool = False
) -> Job[SampleSet]:
    """Write a sample set (a job: one progress event per micrograph, then the tables).

    Layout of `out_dir`: `micrographs/mic_000.mrc …` (noisy, float32, voxel size set),
    `clean/mic_000.mrc …` (the CTF-modulated signal), `particles.star` (RELION 3.1),
    `truth.json`, `particles.cs` + `passthrough.cs` (cryoSPARC). Everything is written into
    `OUT.partial/` and renamed when complete; a stopped run leaves only `OUT.partial/`.
    """
    config = config or SampleConfig()
    out_dir = Path(out_dir)
    molecule = molecule_for(config)
    total = config.n_micrographs + 1
    tables: list[pd.DataFrame] = []
    infos: list[dict] = []
    names: list[str] = []
    label = f"napari-cryoddm {__version__} sample seed {config.seed} SNR {config.snr:g} {config.pixel_size:g} A/px"
    with atomic_dir(
        out_dir, overwrite=overwrite, kind="sample", layout=SAMPLE_LAYOUT, manifest=_is_sample_folder
    ) as tmp:
        (tmp / "micrographs").mkdir()
        (tmp / "clean").mkdir()
        for sim in iter_micrographs(config, molecule):
            if cancel is not None:
                cancel.raise_if_cancelled()
            write_mrc(
                tmp / "micrographs" / sim.name,
                sim.noisy,
                voxel_size=config.pixel_size,
                labels=[label, f"{sim.name}: noisy, defocus {sim.defocus:.0f} A"],
                stamp=False,
            )
            write_mrc(
                tmp / "clean" / sim.name,
                sim.clean,
                voxel_size=config.pixel_size,
                labels=[label, f"{sim.name}: clean CTF-modulated signal (truth)"],
                stamp=False,
            )
            tables.append(sim.particles)
            infos.append(_mic_info(sim))
            names.append(sim.name)
            yield Progress(len(names), total, sim.name, {"path": str(out_dir / "micrographs" / sim.name)})
        if cancel is not None:
            cancel.raise_if_cancelled()
        table = pd.concat(tables, ignore_index=True)
        optics, particles = particles_star_tables(table, config)
        write_particles_star(tmp / "particles.star", particles, optics, header=f"{label}: particles (truth)")
        particles_cs, passthrough_cs = cs_datasets(table, config)
        for name, ds in (("particles.cs", particles_cs), ("passthrough.cs", passthrough_cs)):
            with atomic_write(tmp / name) as t:
                with open(t, "wb") as fh:
                    ds.save(fh)
        with atomic_write(tmp / "truth.json") as t:
            t.write_text(json.dumps(truth_document(table, config, molecule, infos), indent=1) + "\n")
        yield Progress(total, total, "tables written")
    return SampleSet(
        out_dir=out_dir,
        micrographs=[out_dir / "micrographs" / n for n in names],
        clean=[out_dir / "clean" / n for n in names],
        particles_star=out_dir / "particles.star",
        truth_json=out_dir / "truth.json",
        particles_cs=out_dir / "particles.cs",
        passthrough_cs=out_dir / "passthrough.cs",
        config=config,
        n_particles=int(len(table)),
    )


def read_truth(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """A sample set's truth JSON (the folder or the file) → (document, particle table)."""
    path = Path(path)
    if path.is_dir():
        path = path / "truth.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable truth JSON ({exc})") from None
    if doc.get("format") != FORMAT:
        raise InputError(path, f"not a napari-cryoddm sample truth file (format {doc.get('format')!r})")
    return doc, pd.DataFrame(doc["particles"], columns=TRUTH_COLUMNS)


def config_from_truth(doc: dict) -> SampleConfig:
    """The SampleConfig a truth document was written with."""
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    return SampleConfig(**{k: v for k, v in doc["config"].items() if k in names})


# the step's public face: the CLI, the sample-data menu, the demo and scripts import from here
__all__ = [
    "SampleArrays",
    "SampleConfig",
    "SampleSet",
    "SimulatedMicrograph",
    "config_from_truth",
    "generate_sample",
    "iter_micrographs",
    "micrograph_layout",
    "molecule_for",
    "particle_reference",
    "read_truth",
    "sample_arrays",
    "simulate_micrograph",
]
