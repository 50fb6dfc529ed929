"""Layer helpers every widget uses, so the layer conventions live in one place.

- A micrograph stack is an Image layer, data `[i, y, x]`, with
  `metadata["cryoddm"]["micrographs"] = [{"path", "name", "shape" (true [y, x]), "voxel_size"}, …]`.
- Boxes are a Points layer, data `(i, y, x)` in pixels, `features["micrograph"]` = name,
  `metadata["cryoddm"] = {"kind": "particles"|"noise", "source": path|None, "box_size": int}`,
  drawn as squares of side `box_size` with a red edge and a transparent face, and scaled like
  the micrographs so both sit in the same world (Å when the header has a voxel size).
- Coordinates follow RELION: x = column, y = row, origin at `data[0, 0]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CryoDDMError

KINDS = ("particles", "noise")
BOX_COLOURS = {"particles": "lime", "noise": "red"}  # noise boxes red as in the original
DEFAULT_BOX_SIZE = 256  # the original program's default box


def cryoddm_metadata(layer: Any) -> dict:
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get("cryoddm") if isinstance(meta, dict) else None
    return value if isinstance(value, dict) else {}


def is_micrograph_layer(layer: Any) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and bool(cryoddm_metadata(layer).get("micrographs"))


def micrograph_layers(viewer: Any) -> list:
    """Image layers that are micrograph stacks opened by this plugin (or built like them)."""
    return [layer for layer in viewer.layers if is_micrograph_layer(layer)]


def micrographs(layer: Any) -> list[dict]:
    """The per-slice entries of a micrograph stack layer (path, name, true shape, voxel size)."""
    entries = cryoddm_metadata(layer).get("micrographs")
    if not entries:
        raise CryoDDMError(
            f"layer {getattr(layer, 'name', layer)!r} is not a micrograph stack "
            f"opened with napari-cryoddm (no per-micrograph metadata)"
        )
    return list(entries)


def micrograph_names(layer: Any) -> list[str]:
    return [m["name"] for m in micrographs(layer)]


def micrograph_paths(layer: Any) -> list[str]:
    return [m["path"] for m in micrographs(layer)]


def current_slice(viewer: Any, layer: Any) -> int:
    """The micrograph index the viewer shows for a stack layer (its leading axis)."""
    if layer.ndim < 3:
        return 0
    point = list(viewer.dims.point)[-layer.ndim :]
    index = float(layer.world_to_data(point)[0])
    n = (layer.data[0] if layer.multiscale else layer.data).shape[0]
    return int(np.clip(round(index), 0, n - 1))


def is_boxes_layer(layer: Any, kind: str | None = None) -> bool:
    from napari.layers import Points

    if not isinstance(layer, Points):
        return False
    meta = cryoddm_metadata(layer)
    return kind is None or meta.get("kind") == kind


def points_layers(viewer: Any, kind: str | None = None) -> list:
    """Points layers; with `kind`, only boxes layers of that kind."""
    return [layer for layer in viewer.layers if is_boxes_layer(layer, kind)]


def boxes_layer_kwargs(
    kind: str,
    box_size: int,
    source: str | None = None,
    scale: Sequence[float] | None = None,
    name: str | None = None,
    features: pd.DataFrame | None = None,
    **extra_meta: Any,
) -> dict:
    """The keyword arguments of a boxes Points layer (for `viewer.add_points(data, **kw)` or a
    reader's `(data, kw, "points")`)."""
    if kind not in KINDS:
        raise CryoDDMError(f"kind must be one of {KINDS}, got {kind!r}")
    box_size = int(box_size)
    if box_size < 1:
        raise CryoDDMError(f"box size must be ≥ 1 px, got {box_size}")
    kw: dict[str, Any] = {
        "name": name or kind,
        "symbol": "square",
        "size": box_size,
        "border_color": BOX_COLOURS[kind],
        "face_color": "transparent",
        "border_width": 0.04,
        "border_width_is_relative": True,
        "out_of_slice_display": False,
        "ndim": 3,
        "metadata": {"cryoddm": {"kind": kind, "source": source, "box_size": box_size, **extra_meta}},
    }
    if features is not None:
        kw["features"] = features
    if scale is not None:
        kw["scale"] = tuple(float(s) for s in scale)
    return kw


def add_boxes_layer(
    viewer: Any,
    data: np.ndarray | None,
    kind: str,
    box_size: int,
    micrograph_names: Sequence[str] | None = None,
    source: str | None = None,
    image_layer: Any = None,
    name: str | None = None,
    features: pd.DataFrame | None = None,
    **extra_meta: Any,
):
    """Add a boxes layer over `image_layer` (same scale/translate), `features["micrograph"]` set
    from the leading index when `micrograph_names` (or the image layer) is given."""
    data = np.zeros((0, 3)) if data is None else np.asarray(data, dtype=float).reshape(-1, 3)
    if features is None:
        names = (
            list(micrograph_names)
            if micrograph_names is not None
            else (micrograph_names_of(image_layer) if image_layer is not None else None)
        )
        if names is not None:
            idx = np.clip(np.round(data[:, 0]).astype(int), 0, max(len(names) - 1, 0))
            # object dtype even when empty: an empty list would make a float column, which then
            # refuses the "" default that hand-drawn points get
            features = pd.DataFrame({"micrograph": pd.Series([names[i] for i in idx] if names else [], dtype=object)})
    scale = tuple(image_layer.scale) if image_layer is not None else None
    if image_layer is not None:  # lets the writer name boxes drawn by hand, without the viewer
        extra_meta.setdefault("attached_to", image_layer.name)
        extra_meta.setdefault("micrograph_names", micrograph_names_of(image_layer))
    kw = boxes_layer_kwargs(kind, box_size, source, scale, name, features, **extra_meta)
    layer = viewer.add_points(data, **kw)
    if image_layer is not None:
        layer.translate = tuple(image_layer.translate)
    set_feature_defaults(layer)
    return layer


def micrograph_names_of(layer: Any) -> list[str]:
    return micrograph_names(layer)


def set_feature_defaults(layer: Any) -> None:
    """Points drawn by hand get an empty micrograph name (filled from their slice on export) and
    neutral values in the other feature columns."""
    features = layer.features
    if "micrograph" not in features.columns:
        return
    defaults: dict[str, Any] = {}
    for col in features.columns:
        kind = features[col].dtype.kind
        defaults[col] = "" if kind in "OSUb" or col == "micrograph" else (np.nan if kind == "f" else 0)
    layer.feature_defaults = defaults


def set_box_size(layer: Any, box_size: int) -> None:
    box_size = int(box_size)
    layer.size = box_size
    layer.current_size = box_size
    meta = dict(layer.metadata)
    meta["cryoddm"] = {**cryoddm_metadata(layer), "box_size": box_size}
    layer.metadata = meta


def points_table(layer: Any, image_layer: Any = None) -> pd.DataFrame:
    """The layer's boxes as a table: `micrograph`, `x` (column), `y` (row), features kept.

    Names come from `features["micrograph"]`; empty names (points drawn by hand) are filled from
    the slice names of `image_layer` (or those stored in the layer's metadata when it was
    attached) through the leading index."""
    data = np.asarray(layer.data, dtype=float)
    if data.ndim != 2:
        data = data.reshape(-1, 3)
    features = (
        layer.features.reset_index(drop=True).copy()
        if len(layer.features) == len(data)
        else pd.DataFrame(index=range(len(data)))
    )
    if data.shape[1] == 2:
        data = np.column_stack([np.zeros(len(data)), data])
    names = features["micrograph"].astype(str).tolist() if "micrograph" in features.columns else [""] * len(data)
    stack = (
        micrograph_names(image_layer)
        if image_layer is not None
        else list(cryoddm_metadata(layer).get("micrograph_names") or [])
    )
    if stack:
        idx = np.round(data[:, 0]).astype(int)
        names = [n if n and n != "nan" else (stack[i] if 0 <= i < len(stack) else "") for n, i in zip(names, idx)]
    missing = [k for k, n in enumerate(names) if not n or n == "nan"]
    if missing:
        raise CryoDDMError(
            f"layer {layer.name!r}: {len(missing)} points have no micrograph name "
            f"(attach the layer to a micrograph stack first)"
        )
    table = pd.DataFrame({"micrograph": names, "x": data[:, 2], "y": data[:, 1]})
    extra = features.drop(columns=["micrograph", "x", "y"], errors="ignore")
    return pd.concat([table, extra], axis=1)
