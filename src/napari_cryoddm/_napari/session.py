"""What the steps of one viewer hand each other: each dock publishes what it produced (the forward
folder, the checkpoint, the denoised folder) and the next step's dock fills its empty inputs
from it, also when it is opened later in the session.

`particle_stack(viewer)` is the micrograph stack that carries particles (the one a particles
layer is attached to), which every step prefers over the first layer in the list.
"""

from __future__ import annotations

import weakref
from typing import Any

from psygnal import Signal

from .layers import cryoddm_metadata, is_boxes_layer, micrograph_layers


class Session:
    """Outputs of this viewer's steps, by key: `forward` (folder), `checkpoint` (file),
    `denoised` (folder), `box_size` (px of the particles' boxes)."""

    changed = Signal(str, object)

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def publish(self, key: str, value: Any) -> None:
        self.values[key] = value
        self.changed.emit(key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


_SESSIONS: dict[int, Session] = {}


def session(viewer: Any) -> Session:
    """The viewer's session (made on first use, dropped with the viewer). Plugin docks get the
    viewer through napari's public-only proxy: the session belongs to the viewer behind it."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session()
        try:
            weakref.finalize(viewer, _SESSIONS.pop, key, None)
        except TypeError:  # not weak-referenceable: kept for the process
            pass
    return _SESSIONS[key]


def particle_stack(viewer: Any) -> Any:
    """The micrograph stack a particles layer is attached to (the last such), else the stack
    the selected layer belongs to, else the last micrograph stack opened; None without one."""
    stacks = micrograph_layers(viewer)
    if not stacks:
        return None
    by_name = {layer.name: layer for layer in stacks}
    for layer in reversed(list(viewer.layers)):
        if is_boxes_layer(layer, "particles"):
            target = by_name.get(cryoddm_metadata(layer).get("attached_to"))
            if target is not None:
                return target
    active = viewer.layers.selection.active
    if active in stacks:
        return active
    return stacks[-1]


def particles_of(viewer: Any, image: Any) -> Any:
    """The particles layer attached to `image` (the last one), else None."""
    for layer in reversed(list(viewer.layers)):
        if (
            is_boxes_layer(layer, "particles")
            and image is not None
            and cryoddm_metadata(layer).get("attached_to") == image.name
        ):
            return layer
    return None


def fill_empty(widget: Any, value: Any) -> bool:
    """Set a path control from the session unless the user typed something there."""
    current = widget.value
    empty = current is None or str(current) in ("", ".", "None")
    filled = getattr(widget, "_cryoddm_filled", None)
    if empty or (filled is not None and str(current) == str(filled)):
        widget.value = value
        widget._cryoddm_filled = value
        return True
    return False
