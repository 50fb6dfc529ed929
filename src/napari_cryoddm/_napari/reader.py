"""npe2 readers: micrographs as one lazy stack layer, coordinates as a boxes Points layer.

Micrographs (`*.mrc *.mrcs *.mrc.gz *.mrcs.gz *.st *.map *.rec`, a folder, or several files)
open as one Image layer `[i, y, x]` built from `io/stack.py`: headers only plus a bounded
contrast sample, pixels read per slice when shown, a pyramid for large micrographs, the voxel
size as the layer scale, and the per-slice metadata every widget uses.

Coordinates (`*.star *.cbox *noise*.txt`) open as a Points layer `(i, y, x)` whose
`features["micrograph"]` holds the name the file gives. A reader sees a path, not the viewer, so
the leading index is provisional (the order of first appearance) until the points are attached
to a micrograph stack: the Attach widget, or at once when the viewer holds exactly one micrograph
stack that every name matches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..attach import attach_coordinates
from ..errors import InputError
from ..io.mrc import MRC_PATTERNS, is_mrc_name
from ..io.noise import read_noise_txt
from ..io.stack import open_stack, voxel_sizes_differ
from ..io.star import read_coordinates
from .layers import DEFAULT_BOX_SIZE, boxes_layer_kwargs, micrograph_layers, micrograph_names

log = logging.getLogger(__name__)

PathOrPaths = str | Sequence[str]
LayerData = tuple[Any, dict, str]

_ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json", ".zattrs")
_COORD_SUFFIXES = (".star", ".cbox", ".txt", ".box", ".cs", ".json", ".md", ".log")


def _as_list(path: PathOrPaths) -> list[str]:
    return [str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]


# ---- micrographs ---------------------------------------------------------------------------


def _folder_claim(folder: Path) -> bool | None:
    """True: holds MRC files; False: empty or only files no image reader wants (we explain why
    nothing opens); None: leave it to other readers (zarr, a folder of TIFFs, …)."""
    if folder.name.lower().endswith(".zarr") or any((folder / m).exists() for m in _ZARR_MARKERS):
        return None
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(is_mrc_name(p) for p in files):
        return True
    if all(p.name.lower().endswith(_COORD_SUFFIXES) for p in files):
        return False
    return None


def get_micrograph_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """The npe2 reader hook: our reader for MRC files and folders holding them, else None."""
    paths = _as_list(path)
    if not paths:
        return None
    for p in paths:
        q = Path(p)
        if q.is_dir():
            claim = _folder_claim(q)
            if claim is None:
                return None
        elif not is_mrc_name(q):
            return None
    return read_micrographs


def _layer_name(paths: list[str]) -> str:
    if len(paths) == 1:
        p = Path(paths[0].rstrip("/\\"))
        return p.name or str(p)
    parents = {str(Path(p).parent) for p in paths}
    return (
        f"{Path(parents.pop()).name} ({len(paths)} files)" if len(parents) == 1 else f"micrographs ({len(paths)} files)"
    )


def micrograph_layer_data(path: PathOrPaths, pyramid_min: int | None = None) -> LayerData:
    """One Image LayerData for a file, folder or list (the reader's work, callable directly)."""
    paths = _as_list(path)
    kwargs = {} if pyramid_min is None else {"pyramid_min": pyramid_min}
    # the contrast comes from the same bounded sample, read once here (display_limits)
    stack = open_stack(paths if len(paths) > 1 else paths[0], contrast=False, **kwargs)
    vs = stack.voxel_size or 1.0
    axis0 = vs if stack.is_volume and stack.voxel_size else 1.0
    differ = voxel_sizes_differ(stack)
    if differ:
        msg = (
            f"{len(differ)} micrographs have another voxel size than {vs:.4f} Å/px "
            f"(e.g. {differ[0]}); the layer uses one scale"
        )
        log.warning(msg)
        _show_warning(msg)  # in the viewer too, not only in the log
    limits, full = display_limits(stack)
    meta = stack.metadata()
    meta.update(
        {
            "voxel_size": stack.voxel_size,
            "volume": stack.is_volume,
            "source": paths[0] if len(paths) == 1 else paths,
            "padded": len({tuple(s.shape) for s in stack.slices}) > 1,
            "contrast_range": list(full),
        }
    )
    _install_range_hook()
    kw = {
        "name": _layer_name(paths),
        "scale": (axis0, vs, vs),
        "contrast_limits": limits,
        "colormap": "gray",
        "multiscale": stack.multiscale,
        "metadata": {"cryoddm": meta},
    }
    if stack.multiscale:
        # fit-to-window shows a pyramid level at about half a screen pixel per level pixel; nearest
        # sampling then shows only pixel noise, a Gaussian kernel averages it and the particles show
        kw["interpolation2d"] = "gaussian"
    data = stack.levels if stack.multiscale else stack.levels[0]
    return (data, kw, "image")


def _show_warning(message: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(message)
    except Exception:  # no napari: the log has it
        pass


def _sample(stack: Any, overview_side: int = 1024) -> np.ndarray:
    """The bounded row sample the stack's own contrast uses (a few whole rows of a few images;
    opening never reads more), each row block-averaged over f² pixels, f = the binning that
    brings the micrograph to `overview_side`: for noise-dominated micrographs that has the
    spread of the smoothed overview the viewer shows at fit-to-window."""
    from ..io import stack as stackio

    slices = stack.slices
    picks = np.unique(np.linspace(0, len(slices) - 1, min(stackio.CONTRAST_SLICES, len(slices))).astype(int))
    f = int(np.ceil(max(stack.levels[0].shape[-2:]) / overview_side))
    k = f * f
    rows = []
    for i in picks:
        sample = stackio.read_rows(slices[int(i)], stackio.CONTRAST_ROWS)
        n = sample.shape[1] // k * k
        rows.append(sample[:, :n].reshape(len(sample), -1, k).mean(axis=2) if k > 1 and n else sample)
    return np.concatenate([r.ravel() for r in rows])


def robust_limits(image: np.ndarray, k: float = 3.0) -> tuple[tuple[float, float], tuple[float, float]]:
    """(display limits, full range): the median ± k robust σ (1.4826·MAD) of `image` (the
    smoothed sample), so a contamination blob, vacuum or hot pixels do not stretch the grey scale; the
    full range spans everything in it with a margin, for the contrast slider."""
    values = image[np.isfinite(image)].ravel()
    if not values.size:
        return (0.0, 1.0), (0.0, 1.0)
    med = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - med)))
    lo_all, hi_all = float(values.min()), float(values.max())
    if not sigma > 0:
        sigma = float(values.std()) or 1.0
    lo, hi = max(lo_all, med - k * sigma), min(hi_all, med + k * sigma)
    if not hi > lo:
        lo, hi = med - 1.0, med + 1.0
    span = max(hi_all - lo_all, hi - lo)
    return (lo, hi), (min(lo, lo_all - 0.5 * span), max(hi, hi_all + 0.5 * span))


def display_limits(stack: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """Robust display limits and the contrast slider's full range for a micrograph stack."""
    try:
        return robust_limits(_sample(stack))
    except InputError:  # a truncated file: it opens, and says so when a slice is shown
        return (0.0, 1.0), (0.0, 1.0)


_HOOKED: set[int] = set()


def _install_range_hook() -> None:
    """napari takes a new layer's contrast slider range from its first limits, so the slider
    could not be widened; once per viewer, micrograph layers get the full range we measured."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:
        return
    if viewer is None or id(viewer) in _HOOKED:
        return
    _HOOKED.add(id(viewer))
    viewer.layers.events.inserted.connect(_widen_range)
    for layer in viewer.layers:
        _widen_range(type("E", (), {"value": layer})())


def _widen_range(event: Any) -> None:
    layer = getattr(event, "value", None)
    meta = getattr(layer, "metadata", None) or {}
    full = (meta.get("cryoddm") or {}).get("contrast_range") if isinstance(meta, dict) else None
    if full and hasattr(layer, "contrast_limits_range"):
        lo, hi = layer.contrast_limits
        layer.contrast_limits_range = (min(full[0], lo), max(full[1], hi))
        layer.contrast_limits = (lo, hi)


def read_micrographs(path: PathOrPaths, stack: bool = False) -> list[LayerData]:
    """Reader function: always one layer (a single micrograph is a stack of one)."""
    paths = _as_list(path)
    for p in paths:
        q = Path(p)
        if q.is_dir() and _folder_claim(q) is False:
            what = ", ".join(sorted(x.name for x in q.iterdir())[:5]) or "nothing"
            raise InputError(q, f"folder holds no MRC files ({' '.join(MRC_PATTERNS)}); it holds {what}")
    return [micrograph_layer_data(paths)]


# ---- coordinates ---------------------------------------------------------------------------


def get_coordinate_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    paths = _as_list(path)
    if not paths or any(Path(p).is_dir() for p in paths):
        return None
    for p in paths:
        name = Path(p).name.lower()
        if not (name.endswith((".star", ".cbox")) or (name.endswith(".txt") and "noise" in name)):
            return None
    return read_coordinate_files


def read_coordinate_table(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, str]:
    """(table `micrograph, x, y, …`, kind): noise `.txt` → noise, STAR/CBOX → particles."""
    p = Path(path)
    if p.name.lower().endswith(".txt"):
        return read_noise_txt(p), "noise"
    return read_coordinates(p), "particles"


def _features(table: pd.DataFrame) -> pd.DataFrame:
    """Per-point features: the micrograph name plus the file's scalar columns."""
    keep = {}
    for col in table.columns:
        if col in ("x", "y"):
            continue
        series = table[col]
        if series.dtype == object:
            series = series.astype(str)
        keep[col] = series.to_numpy()
    return pd.DataFrame(keep)


def _box_size(table: pd.DataFrame) -> int:
    for col in ("Width", "rlnImageSize"):
        if col in table.columns:
            v = pd.to_numeric(table[col], errors="coerce").median()
            if np.isfinite(v) and v > 0:
                return int(round(v))
    return DEFAULT_BOX_SIZE


def _auto_attach_targets() -> list:
    """The viewer's micrograph stacks (none without a viewer)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt, no viewer: nothing to attach to
        return []
    return micrograph_layers(viewer) if viewer is not None else []


def coordinate_layer_data(path: str | os.PathLike[str], image_layer: Any = None) -> LayerData:
    """A boxes Points LayerData for one coordinate file; attached to `image_layer` when given
    (or found) and every name matches, else with a provisional leading index."""
    table, kind = read_coordinate_table(path)
    box = _box_size(table)
    # attached at once to the given stack, else to the one open stack whose names all match
    candidates = [image_layer] if image_layer is not None else _auto_attach_targets()
    matches = []
    for candidate in candidates:
        names = micrograph_names(candidate)
        shapes = [m.get("shape") for m in candidate.metadata["cryoddm"]["micrographs"]]
        result = attach_coordinates(table, names, shapes, require_match=False)
        if not result.unmatched and result.n_points == len(table):
            matches.append((candidate, result))
    target, attached = matches[0] if len(matches) == 1 else (None, None)
    if attached is not None:
        data, features = attached.points, attached.features
        scale = tuple(target.scale)
        extra = {"attached_to": target.name, "micrograph_names": micrograph_names(target)}
    else:
        order = {n: i for i, n in enumerate(dict.fromkeys(table["micrograph"].astype(str)))}
        idx = table["micrograph"].astype(str).map(order).to_numpy(np.float64)
        data = np.column_stack([idx, table["y"].to_numpy(np.float64), table["x"].to_numpy(np.float64)])
        features = _features(table)
        scale = None
        extra = {"attached_to": None}
    name = Path(path).name
    kw = boxes_layer_kwargs(kind, box, str(path), scale, name, features, **extra)
    if attached is not None:
        kw["translate"] = tuple(target.translate)
    return (data.reshape(-1, 3), kw, "points")


def read_coordinate_files(path: PathOrPaths, stack: bool = False) -> list[LayerData]:
    return [coordinate_layer_data(p) for p in _as_list(path)]
