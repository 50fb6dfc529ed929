"""Attach coordinates to micrographs: a points layer + a micrograph stack + a box size → boxes.

The face of `attach.attach_coordinates`: the chosen points layer is updated in place (leading
index from the micrograph names, squares of the box size, the stack's scale) and names that
matched no micrograph are listed in the widget and in a notification.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, Label, PushButton, SpinBox

from ...attach import AttachResult, attach_coordinates
from ...errors import CryoDDMError
from ..layers import (
    DEFAULT_BOX_SIZE,
    boxes_layer_kwargs,
    cryoddm_metadata,
    micrograph_layers,
    micrograph_names,
    micrographs,
    set_feature_defaults,
)
from ..session import session
from ..workers import notify, report_error
from ._qt import finish_dock, status_label


def _table(layer: Any) -> pd.DataFrame:
    """The points layer as `micrograph, x, y, …` from its data and features."""
    data = np.asarray(layer.data, dtype=np.float64).reshape(len(layer.data), -1)
    features = layer.features.reset_index(drop=True)
    if "micrograph" not in features.columns or len(features) != len(data):
        raise CryoDDMError(
            f"layer {layer.name!r} has no 'micrograph' feature per point; open "
            f"coordinates with the napari-cryoddm reader"
        )
    table = pd.DataFrame(
        {"micrograph": features["micrograph"].astype(str).to_numpy(), "x": data[:, -1], "y": data[:, -2]}
    )
    if "source_micrograph" in features.columns:  # re-attaching: match on the file's own names
        table["micrograph"] = features["source_micrograph"].astype(str).to_numpy()
    rest = features.drop(columns=["micrograph", "source_micrograph"], errors="ignore")
    return pd.concat([table, rest], axis=1)


def attach_layer(points_layer: Any, image_layer: Any, box_size: int) -> AttachResult:
    """Attach in place; returns the core result (the widget and tests share this)."""
    entries = micrographs(image_layer)
    names = micrograph_names(image_layer)
    result = attach_coordinates(_table(points_layer), names, [m.get("shape") for m in entries])
    meta = cryoddm_metadata(points_layer)
    kind = meta.get("kind") or "particles"
    kw = boxes_layer_kwargs(
        kind,
        box_size,
        meta.get("source"),
        tuple(image_layer.scale),
        points_layer.name,
        None,
        attached_to=image_layer.name,
        micrograph_names=names,
    )
    # data and features replaced together (the row counts change when names are left out)
    points_layer.selected_data = set()
    points_layer.data = result.points
    points_layer.features = result.features
    points_layer.scale = kw["scale"]
    points_layer.translate = tuple(image_layer.translate)
    points_layer.symbol = kw["symbol"]
    points_layer.size = kw["size"]
    points_layer.current_size = kw["size"]
    points_layer.border_color = kw["border_color"]
    points_layer.face_color = kw["face_color"]
    points_layer.border_width_is_relative = True
    points_layer.border_width = kw["border_width"]
    points_layer.metadata = {**dict(points_layer.metadata), "cryoddm": kw["metadata"]["cryoddm"]}
    set_feature_defaults(points_layer)
    points_layer.refresh()
    return result


class AttachWidget(Container):
    """Choose a points layer, a micrograph stack and a box size; Attach."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.points = ComboBox(
            label="coordinates",
            choices=self._points_choices,
            tooltip="a Points layer opened from a STAR, CBOX or noise .txt file",
        )
        self.image = ComboBox(
            label="micrographs", choices=self._image_choices, tooltip="a micrograph stack opened with napari-cryoddm"
        )
        self.box_size = SpinBox(
            label="box size (px)",
            value=DEFAULT_BOX_SIZE,
            min=1,
            max=4096,
            tooltip="side of the square drawn around each coordinate",
        )
        self.button = PushButton(text="Attach")
        self.result = Label(value="")
        status_label(self.result)
        self.extend([self.points, self.image, self.box_size, self.button, self.result])
        finish_dock(self)
        self.button.changed.connect(self.attach)
        self.points.changed.connect(self._take_box_size)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._refresh)
        self.last: AttachResult | None = None
        self._take_box_size()

    def _points_choices(self, _widget=None) -> list:
        from napari.layers import Points

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Points)]

    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in micrograph_layers(self.viewer)]

    def _refresh(self, _event=None) -> None:
        self.points.reset_choices()
        self.image.reset_choices()

    def _take_box_size(self, _value=None) -> None:
        """A coordinates layer brings its box size and chooses the stack its names match."""
        layer = self.points.value
        if layer is not None:
            size = cryoddm_metadata(layer).get("box_size")
            if size:
                self.box_size.value = int(size)
            match = self._matching_stack(layer)
            if match is not None:
                self.image.value = match

    def _matching_stack(self, layer) -> Any:
        from ...names import match_names

        if "micrograph" not in layer.features.columns:
            return None
        wanted = pd.unique(layer.features.get("source_micrograph", layer.features["micrograph"]).astype(str))
        best, best_n = None, 0
        for stack in micrograph_layers(self.viewer):
            n = len(match_names(wanted, micrograph_names(stack)).mapping)
            if n > best_n:
                best, best_n = stack, n
        return best

    def attach(self, _value=None) -> AttachResult | None:
        try:
            if self.points.value is None:
                raise CryoDDMError("open a coordinates file (STAR, CBOX or noise .txt) first")
            if self.image.value is None:
                raise CryoDDMError("open micrographs with napari-cryoddm first")
            result = attach_layer(self.points.value, self.image.value, int(self.box_size.value))
        except CryoDDMError as exc:
            self.result.value = str(exc)
            report_error(exc)
            return None
        self.last = result
        session(self.viewer).publish("particles", self.points.value)
        self.result.value = result.summary()
        notify(result.summary())
        return result
