"""npe2 writers: an image layer → float32 MRC; a boxes layer → noise `.txt` or RELION `.star`.

Both write atomically (temporary file, then rename), so an interrupted save never leaves a
half-written file under the final name. napari's save dialog asks before replacing a file, so
these writers replace an existing file they are pointed at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..attach import detach_points
from ..errors import CryoDDMError
from ..io.mrc import write_mrc_slices
from ..io.noise import write_noise_txt
from ..io.star import write_coordinates_star


def _cryoddm(meta: dict) -> dict:
    value = (meta.get("metadata") or {}).get("cryoddm")
    return value if isinstance(value, dict) else {}


def _voxel_size(meta: dict) -> float | None:
    """The micrographs' voxel size when the layer came from our reader; else the layer scale."""
    ours = _cryoddm(meta)
    vs = ours.get("voxel_size")
    if not vs:
        vs = next((m.get("voxel_size") for m in ours.get("micrographs", []) if m.get("voxel_size")), None)
    if not vs and meta.get("scale") is not None:
        s = float(meta["scale"][-1])
        vs = s if s != 1.0 else None
    return float(vs) if vs else None


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an image layer (numpy, dask or a multiscale list: its full-resolution level) as a
    float32 MRC keeping the voxel size; a 3-D layer becomes a stack, written slice by slice."""
    if meta.get("multiscale") or isinstance(data, (list, tuple)):
        data = data[0]
    if meta.get("rgb"):
        raise CryoDDMError("an RGB image cannot be written as MRC")
    shape = tuple(int(n) for n in data.shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
        data = data[0]
    if len(shape) not in (2, 3):
        raise CryoDDMError(f"only 2-D images and 3-D stacks can be saved as MRC, not {shape}")
    slices = [data] if len(shape) == 2 else (data[k] for k in range(shape[0]))
    slices = (np.asarray(s.compute() if hasattr(s, "compute") else s) for s in slices)
    labels = [f"napari-cryoddm {__version__}: layer {meta.get('name', '')}"[:80]]
    write_mrc_slices(
        path, shape, slices, _voxel_size(meta), overwrite=True, labels=labels, volume=bool(_cryoddm(meta).get("volume"))
    )
    return [str(path)]


def points_to_table(data: Any, meta: dict) -> pd.DataFrame:
    """A boxes layer's data + features → `micrograph`, `x`, `y`, …; names missing on points
    drawn by hand come from the stack's slice names stored at attach time."""
    points = np.asarray(data, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise CryoDDMError(f"boxes must be (i, y, x) points, got an array of shape {points.shape}")
    if points.shape[1] == 2:
        points = np.column_stack([np.zeros(len(points)), points])
    features = meta.get("features")
    features = pd.DataFrame(features).reset_index(drop=True) if features is not None else pd.DataFrame()
    if len(features) != len(points):
        features = pd.DataFrame(index=range(len(points)))
    names = features["micrograph"].astype(str).tolist() if "micrograph" in features.columns else [""] * len(points)
    stack = _cryoddm(meta).get("micrograph_names") or []
    idx = np.round(points[:, 0]).astype(int)
    names = [n if n and n != "nan" else (stack[i] if 0 <= i < len(stack) else "") for n, i in zip(names, idx)]
    missing = sum(1 for n in names if not n)
    if missing:
        raise CryoDDMError(
            f"{missing} of {len(points)} points have no micrograph name; attach the "
            f"layer to a micrograph stack (Attach coordinates) before saving"
        )
    features["micrograph"] = names
    return detach_points(points, features)


def write_points(path: str, data: Any, meta: dict) -> list[str]:
    """`.txt`: the original program's `name x y` noise file; `.star`: RELION 3.1 coordinates."""
    table = points_to_table(data, meta)
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        write_noise_txt(path, table, overwrite=True)
    elif suffix == ".star":
        write_coordinates_star(path, table, overwrite=True)
    else:
        raise CryoDDMError(f"{path}: boxes are saved as .txt (noise coordinates) or .star")
    return [str(path)]
