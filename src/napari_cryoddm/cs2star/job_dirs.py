"""cryoSPARC job folders (the original's batch workflow): K consecutive jobs J<N> … J<N+K−1> →
OUT/class0 … class{K−1}, each job's last iteration found by name (`convert_job_dirs`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import CryoDDMError, InputError
from ..io.cryosparc import load_cs
from ..jobs import CancelToken, Job, Progress
from ..safety import check_output_folder
from .config import Cs2StarConfig, Cs2StarResult, StarTables
from .tables import build_tables
from .write import LEGACY_WARNING, legacy_invert_table, result_of, write_star

_JOB_NAME = re.compile(r"^J(\d+)$")


@dataclass
class JobFiles:
    """The files of one cryoSPARC job: its last iteration's particles and the passthrough."""

    job_dir: Path
    particles: Path
    passthrough: Path | None


_PARTICLES = re.compile(r"^J(\d+)_(\d{3,})_particles\.cs$")


def find_job_files(job_dir: str | os.PathLike[str]) -> JobFiles:
    """The last iteration's `J<N>_NNN_particles.cs` and `J<N>_passthrough_particles.cs`."""
    job_dir = Path(job_dir)
    m = _JOB_NAME.match(job_dir.name)
    if not job_dir.is_dir():
        raise InputError(job_dir, "no such cryoSPARC job folder")
    if m is None:
        raise InputError(job_dir, "is not a cryoSPARC job folder (its name should be J<number>)")
    number = m.group(1)
    candidates = []
    for f in job_dir.iterdir():
        fm = _PARTICLES.match(f.name)
        if fm and fm.group(1) == number and f.is_file():
            candidates.append((int(fm.group(2)), f))
    if not candidates:
        others = sorted(f.name for f in job_dir.glob("*.cs"))[:5]
        raise InputError(
            job_dir,
            f"holds no J{number}_NNN_particles.cs (the particles of a "
            "refinement or classification iteration)"
            + (f"; .cs files found: {', '.join(others)}" if others else "; it holds no .cs files at all"),
        )
    particles = max(candidates)[1]
    passthrough = job_dir / f"J{number}_passthrough_particles.cs"
    return JobFiles(job_dir, particles, passthrough if passthrough.is_file() else None)


def job_dirs(job_dir: str | os.PathLike[str], n_jobs: int = 1) -> list[Path]:
    """J<N>, J<N+1>, … J<N+K−1> beside the given one."""
    job_dir = Path(job_dir)
    m = _JOB_NAME.match(job_dir.name)
    if m is None:
        raise InputError(job_dir, "is not a cryoSPARC job folder (its name should be J<number>)")
    if n_jobs < 1:
        raise CryoDDMError(f"--jobs must be at least 1, got {n_jobs}")
    first = int(m.group(1))
    return [job_dir.parent / f"J{first + k}" for k in range(n_jobs)]


def convert_job_dirs(
    job_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    n_jobs: int = 1,
    config: Cs2StarConfig | None = None,
    cancel: CancelToken | None = None,
) -> Job[list[Cs2StarResult]]:
    """Job: K consecutive cryoSPARC jobs → OUT/class0 … class{K−1}, each with
    `particles_relion.star` (as configured) and `cleaned_particles_relion.star` (UIDs stripped);
    `invert.star` too with `legacy_invert`. Every file is checked before anything is written."""
    config = config or Cs2StarConfig()
    cancel = cancel or CancelToken()
    output_dir = Path(output_dir)
    dirs = job_dirs(job_dir, n_jobs)
    inputs = [dirs, config.raw_micrographs]
    check_output_folder(output_dir, "cs2star", config.overwrite, inputs)
    jobs = [find_job_files(d) for d in dirs]  # all problems surface before any reading
    total = 2 * len(jobs) + 1
    built: list[tuple[StarTables, StarTables, JobFiles]] = []
    for k, jf in enumerate(jobs):
        cancel.raise_if_cancelled()
        yield Progress(k, total, f"reading {jf.job_dir.name}")
        primary = load_cs(jf.particles)
        pts = [load_cs(jf.passthrough)] if jf.passthrough else []
        plain = build_tables(primary, pts, replace(config, strip_uid=False))
        cleaned = build_tables(primary, pts, replace(config, strip_uid=True))
        if jf.passthrough is None:
            plain.notes.insert(
                0,
                f"{jf.job_dir.name}: no J{jf.job_dir.name[1:]}_passthrough_particles.cs; "
                "converted the particle file alone",
            )
        built.append((plain, cleaned, jf))
    results: list[Cs2StarResult] = []
    with atomic_dir(output_dir, overwrite=config.overwrite, kind="cs2star", inputs=inputs) as tmp:
        for k, (plain, cleaned, jf) in enumerate(built):
            cancel.raise_if_cancelled()
            yield Progress(len(jobs) + k, total, f"writing class{k}")
            folder = tmp / f"class{k}"
            outs = [
                write_star(folder / "particles_relion.star", plain, True),
                write_star(folder / "cleaned_particles_relion.star", cleaned, True),
            ]
            if config.legacy_invert:
                write_star(folder / "invert.star", replace(cleaned, particles=legacy_invert_table(cleaned)), True)
                outs.append(folder / "invert.star")
                plain.notes.append(LEGACY_WARNING)
            final = [output_dir / o.relative_to(tmp) for o in outs]
            res = result_of(final, plain)
            res.notes.insert(
                0, f"class{k} ← {jf.particles.name}" + (f" + {jf.passthrough.name}" if jf.passthrough else "")
            )
            results.append(res)
    yield Progress(total, total, "done", {"results": results})
    return results
