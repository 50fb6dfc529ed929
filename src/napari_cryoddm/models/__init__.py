"""Models shipped inside the package, addressable by name wherever a checkpoint path is taken
(`cryoddm predict sample …`, `cryoddm train … --init sample`, the Predict widget's model list),
as Topaz-Denoise ships its `unet`.

`sample`: trained by `scripts/train_reference.py` on synthetic `cryoddm sample` micrographs
(3 Å/px, window 128); real data want their own training, or fine-tuning from it. Its metadata
says what it was trained on and how it scored on held-out sample micrographs.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import CryoDDMError

BUILTIN = {"sample": "sample.pt"}


def builtin_path(name: str) -> Path:
    """The installed file of a built-in model, or a clear error when the install lacks it."""
    if name not in BUILTIN:
        raise CryoDDMError(f"no built-in model {name!r} (built in: {', '.join(BUILTIN)})")
    path = Path(str(resources.files(__name__).joinpath(BUILTIN[name])))
    if not path.is_file():
        raise CryoDDMError(
            f"the built-in model {name!r} is missing from this install ({path}); "
            "reinstall napari-cryoddm, or give a checkpoint file instead"
        )
    return path


def available() -> list[str]:
    """The built-in models whose files this install holds."""
    return [name for name, file in BUILTIN.items() if Path(str(resources.files(__name__).joinpath(file))).is_file()]


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A checkpoint file as given, or a built-in model's file when `spec` names one and no file of
    that name exists here (a folder called `sample/` does not hide the built-in model)."""
    path = Path(spec)
    if path.is_file() or str(spec) not in BUILTIN:
        return path
    return builtin_path(str(spec))


__all__ = ["BUILTIN", "available", "builtin_path", "resolve_model"]
