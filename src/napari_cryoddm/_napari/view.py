"""Open micrograph stacks in a viewer side by side: the face of `cryoddm view`, which is the
demo's (and predict's) hand-over to napari."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLUGIN = "napari-cryoddm"


def grid_of(viewer: Any) -> Any:
    """napari's grid model: `viewer.canvas.grid` since napari 0.7, `viewer.grid` before."""
    return getattr(getattr(viewer, "canvas", None), "grid", None) or viewer.grid


def open_side_by_side(viewer: Any, paths: list[Path], overlay: bool = False) -> list[Any]:
    """Each path (an MRC file or a folder of them) as one layer of this plugin's reader, in the
    order given, in napari's grid (one tile each, side by side) or, with `overlay`, on one canvas
    with the last on top; fitted to the canvas either way."""
    layers: list[Any] = []
    for path in paths:
        layers += viewer.open(str(path), plugin=PLUGIN, stack=False)
    grid_of(viewer).enabled = not overlay and len(layers) > 1
    viewer.reset_view()
    return layers


def show(paths: list[Path], overlay: bool = False) -> None:
    """A napari window with `paths` side by side (or overlaid); returns when it is closed."""
    import napari

    viewer = napari.Viewer(title="napari-cryoddm")
    open_side_by_side(viewer, paths, overlay=overlay)
    napari.run()
