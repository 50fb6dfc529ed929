"""Where prediction writes and how its outputs are recognised: output names, the MRC labels that
record source, model and scaling, the output-folder check, and the sanity check of each result."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CryoDDMError, InputError
from .io.mrc import read_header
from .names import micrograph_stem
from .safety import check_location, check_name, check_writable, inside, real


def output_path(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str = "") -> Path:
    """OUT/<stem><suffix>.mrc, stem = the input's name without folder and MRC extensions, so
    coordinates picked on the denoised file match the raw micrograph by name. The suffix is
    part of a name (no separators, no `..`) and the result must resolve inside OUT."""

    check_name(suffix, "--suffix")
    name = check_name(f"{micrograph_stem(Path(input_path).name)}{suffix}.mrc", "output name", whole=True)
    return inside(out_dir, Path(out_dir) / name)


def plan_outputs(inputs: Sequence[Path], out_dir: Path, suffix: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs; no two inputs share an output and no output is any input."""

    pairs = [(p, output_path(p, out_dir, suffix)) for p in inputs]
    sources = {real(p): p for p in inputs}
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        if dst in seen:
            raise CryoDDMError(
                f"{seen[dst]} and {src} would both be written to {dst}; rename one or predict them in separate runs"
            )
        seen[dst] = src
        if real(dst) in sources:
            raise CryoDDMError(
                f"{sources[real(dst)]}: the output of {src.name} would replace the input; choose another -o or --suffix"
            )
    return pairs


PREDICT_LABEL = "napari-cryoddm predict:"


def is_predict_output(path: str | os.PathLike[str]) -> bool:
    """True for an MRC this command wrote (our label; mrcfile's 'Created by' comes first): the
    only files --overwrite replaces and the only ones a rerun counts as done."""

    try:
        labels = read_header(path).labels
    except CryoDDMError:
        return False
    return any(label.startswith(PREDICT_LABEL) for label in labels[:2])


def check_out_dir(out_dir: Path, inputs: Sequence[Any] = ()) -> None:
    """Before any work: OUT holds no input and is a folder we can write in (tried, not guessed:
    `os.access` says yes to root in /sys)."""

    check_location(out_dir, inputs, what="the output folder", allow_workdir=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out_dir, f"cannot create the output folder ({exc.strerror or exc})") from None
    if not out_dir.is_dir():
        raise InputError(out_dir, "the output path exists and is not a folder")
    check_writable(out_dir)


def check_output(pred: np.ndarray, src: Path, model_name: str) -> None:
    """NaN or infinite output (a diverged checkpoint, fp16 overflow) is a failure, never a file."""
    bad = int(np.size(pred) - np.count_nonzero(np.isfinite(pred)))
    if bad:
        raise CryoDDMError(
            f"{src}: the network gave {bad} NaN or infinite pixels with model "
            f"{model_name}; nothing was written (is the checkpoint diverged? try "
            "--precision fp32)"
        )
