"""Noise picker dock widget: a `noise` Points layer of forward-window squares over a micrograph stack.

By hand: napari's add mode adds a box (refused, with a message, when it would leave its
micrograph); select + Delete removes; Ctrl-click removes the box under the cursor (the original's
gesture). Automatically: from particle coordinates (a STAR file or a particles layer) or, without
coordinates, the emptiest boxes proposed in a separate `noise proposals` layer to review and accept.
Everything computational is `picking.pick_noise`, the job the CLI runs too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox
from napari.utils.notifications import show_info, show_warning

from ... import params
from ...errors import CryoDDMError
from ...io.star import read_coordinates
from ...params import window_for_diameter
from ...picking import Micrograph, PickConfig, PickResult, merge_boxes, pick_noise
from ..layers import add_boxes_layer, cryoddm_metadata, current_slice, micrograph_layers, micrographs, points_table
from ..session import particle_stack, particles_of, session
from ..workers import report_error, start_job
from ._form import ConfigForm
from ._qt import finish_dock, status_label
from .picker_boxes import NO_LAYER, PROPOSAL_COLOUR, NoiseBoxes


class NoisePickerWidget(NoiseBoxes, Container):
    """Pick noise boxes by hand or automatically; load and save `noise_coordinates.txt` / STAR."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.noise_layer = None
        self.proposals_layer = None
        self.other_boxes = pd.DataFrame(columns=["micrograph", "x", "y"])  # micrographs not open
        self._guard = False
        self._suppress_add = False
        self.last_result: PickResult | None = None

        self._build_controls()
        self.extend(
            [
                self.image,
                self.diameter,
                self.unit,
                self.box,
                self.window_label,
                self.form,
                self.particles_layer,
                self.particles_file,
                self.scope,
                self.pick_button,
                self.propose_button,
                self.accept_button,
                self.invalid_button,
                self.noise_file,
                self.load_button,
                self.save_button,
                self.counts,
                self.message,
            ]
        )
        finish_dock(self, self.form)
        if particle_stack(napari_viewer) is not None:
            self.image.value = particle_stack(napari_viewer)
        self._connect()

    def _build_controls(self) -> None:
        """The dock's fields and buttons (laid out by __init__)."""
        self.image = ComboBox(
            label="micrographs", choices=self._image_choices, tooltip="a micrograph stack opened with napari-cryoddm"
        )
        self.diameter = FloatSpinBox(
            label="particle diameter", value=200.0, min=1.0, max=10000.0, step=1.0, tooltip="the particle's diameter"
        )
        self.unit = ComboBox(
            label="unit",
            choices=["px", "Å"],
            value="px",
            tooltip="Å uses the micrographs' pixel size from their headers",
        )
        self.box = SpinBox(
            label="box size (px)",
            value=384,
            min=2,
            max=16384,
            tooltip="side of each noise box; defaults to the forward window W for "
            "the diameter (what forward crops around each noise centre)",
        )
        self.window_label = Label(value="")
        self.form = ConfigForm(
            PickConfig, labels={"max_per_micrograph": "max per image", "allow_unmatched": "allow unmatched"}
        )
        self.particles_layer = ComboBox(
            label="particles layer",
            choices=self._particle_choices,
            tooltip="attached particle coordinates (a Points layer)",
        )
        self.particles_file = FileEdit(
            label="or particles STAR",
            mode="r",
            filter="*.star *.cbox",
            value="",
            tooltip="a particle or coordinate STAR file",
        )
        self.scope = ComboBox(
            label="run on", choices=["all micrographs", "current micrograph"], value="all micrographs"
        )
        self.pick_button = PushButton(text="Pick away from particles")
        self.propose_button = PushButton(text="Propose emptiest boxes (no coordinates)")
        self.accept_button = PushButton(text="Accept proposals (selected, or all)")
        self.invalid_button = PushButton(text="Delete boxes that do not fit")
        self.noise_file = FileEdit(
            label="noise file",
            mode="w",
            filter="*.txt *.star",
            value="",
            tooltip="noise_coordinates.txt (name x y) or .star",
        )
        self.load_button = PushButton(text="Load")
        self.save_button = PushButton(text="Save")
        self.counts = Label(value="")
        self.message = Label(value="")
        for label in (self.counts, self.message, self.window_label):
            status_label(label)  # long messages wrap inside the dock, never widen it
        self._hooked: set[int] = set()
        self._sized: set[int] = set()
        self._settings: dict[str, tuple[float, str]] = {}  # stack name → (diameter, unit)
        self._restoring = False

    def _connect(self) -> None:
        """The dock's reactions: its buttons and fields, the viewer's layers and slider."""
        session(self.viewer).changed.connect(self._on_session)

        self.diameter.changed.connect(self._diameter_changed)
        self.unit.changed.connect(self._diameter_changed)
        self.box.changed.connect(self._box_changed)
        self.image.changed.connect(self._image_changed)
        self.particles_layer.changed.connect(self._particles_changed)
        self.pick_button.changed.connect(lambda _=None: self.pick_from_particles())
        self.propose_button.changed.connect(lambda _=None: self.propose_empty())
        self.accept_button.changed.connect(lambda _=None: self.accept_proposals())
        self.invalid_button.changed.connect(lambda _=None: self.delete_invalid())
        self.load_button.changed.connect(lambda _=None: self.load())
        self.save_button.changed.connect(lambda _=None: self.save())
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._layers_changed)
        self.viewer.dims.events.current_step.connect(self._update_counts)
        self._image_changed()

    # ------------------------------------------------------------------ layers and choices

    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in micrograph_layers(self.viewer)]

    def _particle_choices(self, _widget=None) -> list:
        from napari.layers import Points

        ours = (self.noise_layer, self.proposals_layer)
        return [(NO_LAYER, None)] + [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Points) and layer not in ours and cryoddm_metadata(layer).get("kind") != "noise"
        ]

    def _layers_changed(self, event=None) -> None:
        removed = getattr(event, "type", "") == "removed"
        if removed and getattr(event, "value", None) is self.noise_layer:
            self.noise_layer = None
        if removed and getattr(event, "value", None) is self.proposals_layer:
            self.proposals_layer = None
        self.image.reset_choices()
        self.particles_layer.reset_choices()
        self._update_counts()

    def _on_session(self, key: str, value) -> None:
        """Particles attached to a stack (Attach, cs2star): the picker works on that stack."""
        if key == "particles" and value is not None:
            stack = particle_stack(self.viewer)
            if stack is not None and stack is not self.image.value:
                self.image.value = stack

    def _image_changed(self, _value=None) -> None:
        """Each stack has its own noise layer; settings apply to the stack chosen here, and boxes
        already picked keep the size they were picked with."""
        image = self.image.value
        layer = self._attached_noise_layer(image) if image is not None else None
        if layer is not self.noise_layer:
            self.noise_layer = None
            if layer is not None:
                self._adopt(layer)
        saved = self._settings.get(image.name) if image is not None else None
        if saved is not None:  # this stack's own diameter and unit, as last set for it
            self._restoring = True
            try:
                self.unit.value, self.diameter.value = saved[1], saved[0]
            finally:
                self._restoring = False
        particles = particles_of(self.viewer, image)
        if particles is not None:
            self.particles_layer.reset_choices()
            self.particles_layer.value = particles
        self._diameter_changed()
        self._update_counts()

    @property
    def micrograph_entries(self) -> list[dict]:
        layer = self.image.value
        if layer is None:
            raise CryoDDMError("open micrographs with napari-cryoddm first (File ▸ Open)")
        return micrographs(layer)

    def _names(self) -> list[str]:
        return [m["name"] for m in self.micrograph_entries]

    def _shapes(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in m["shape"][-2:]) for m in self.micrograph_entries]

    def apix(self) -> float:
        return next((float(m.get("voxel_size") or 0) for m in self.micrograph_entries if m.get("voxel_size")), 0.0)

    def diameter_px(self) -> float:
        """The diameter field in pixels, converted as the CLI converts --diameter-A."""
        value = float(self.diameter.value)
        if self.unit.value == "Å":
            apix = self.apix() if self.image.value is not None else 0.0
            return params.diameter_px(diameter_A=value, apix=apix)
        return params.diameter_px(diameter_px=value)

    def _particles_changed(self, _value=None) -> None:
        """A particles layer that knows its particle diameter (the sample data) sets it."""
        layer = self.particles_layer.value
        d = cryoddm_metadata(layer).get("diameter_px") if layer is not None else None
        if d:
            self.unit.value = "px"
            self.diameter.value = float(d)

    def _diameter_changed(self, _value=None) -> None:
        image = self.image.value
        if image is not None and not self._restoring:
            self._settings[image.name] = (float(self.diameter.value), self.unit.value)
        try:
            w = window_for_diameter(self.diameter_px())
        except CryoDDMError as exc:
            self.window_label.value = str(exc)
            return
        self.window_label.value = f"forward window W = {w} px"
        if int(self.box.value) != w:
            self.box.value = w  # fires _box_changed

    # ------------------------------------------------------------------ automatic modes

    def config(self) -> PickConfig:
        return self.form.value(diameter=self.diameter_px(), box=int(self.box.value))

    def _micrograph_refs(self) -> list[Micrograph]:
        layer = self.image.value
        entries = self.micrograph_entries
        refs = []
        indices = range(len(entries))
        if self.scope.value == "current micrograph":
            indices = [current_slice(self.viewer, layer)]
        for k in indices:
            m = entries[k]
            shape = tuple(int(v) for v in m["shape"][-2:])
            path = Path(m["path"]) if m.get("path") else None
            pixels = None
            if path is None or not path.exists():
                data = layer.data[0] if layer.multiscale else layer.data

                def _pixels(k=k, shape=shape, data=data):
                    arr = data[k][: shape[0], : shape[1]]
                    return np.asarray(arr.compute() if hasattr(arr, "compute") else arr)

                pixels = _pixels
            refs.append(Micrograph(m["name"], shape, path, float(m.get("voxel_size") or 0), pixels))
        return refs

    def _particles(self) -> tuple[pd.DataFrame, str]:
        file = self.particles_file.value
        if file is not None and str(file) not in ("", ".") and Path(file).is_file():
            table = read_coordinates(file)
            return table.loc[:, ["micrograph", "x", "y"]], str(file)
        layer = self.particles_layer.value
        if layer is None:
            raise CryoDDMError("choose particle coordinates: an attached particles layer or a STAR file")
        return points_table(layer, self.image.value).loc[:, ["micrograph", "x", "y"]], layer.name

    def pick_from_particles(self):
        try:
            config = self.config()
            particles, source = self._particles()
            mics = self._micrograph_refs()
            existing = self.all_boxes()
        except CryoDDMError as exc:
            self._fail(exc)
            return None
        return start_job(
            lambda cancel: pick_noise(mics, config, particles, existing, cancel, source),
            "pick noise",
            on_done=self._picked,
            on_error=self._fail,
        )

    def propose_empty(self):
        try:
            config = self.config()
            mics = self._micrograph_refs()
            existing = self.all_boxes()
        except CryoDDMError as exc:
            self._fail(exc)
            return None
        return start_job(
            lambda cancel: pick_noise(mics, config, None, existing, cancel),
            "propose empty boxes",
            on_done=self._proposed,
            on_error=self._fail,
        )

    def _report(self, result: PickResult) -> None:
        self.last_result = result
        text = f"{len(result.new)} new boxes; {result.total} on {len(result.counts)} micrographs"
        for w in result.warnings:
            show_warning(w)
        self._say(text)

    def _picked(self, result: PickResult) -> None:
        self.set_boxes(merge_boxes(self.all_boxes(), result.new))
        self._report(result)
        self._publish()

    def _publish(self) -> None:
        """Forward takes the diameter and these noise boxes as its defaults."""
        s = session(self.viewer)
        try:
            s.publish("diameter_px", float(self.diameter_px()))
        except CryoDDMError:
            pass
        s.publish("noise", self.noise_layer)

    def _proposed(self, result: PickResult) -> None:
        names = self._names()
        index = {n: i for i, n in enumerate(names)}
        new = result.new
        ii = new["micrograph"].map(index).to_numpy(np.float64)
        data = (
            np.column_stack([ii, new["y"].to_numpy(float), new["x"].to_numpy(float)]) if len(new) else np.zeros((0, 3))
        )
        features = pd.DataFrame(
            {
                "micrograph": new["micrograph"].to_numpy(),
                "score": new["score"].to_numpy(float) if "score" in new else np.nan,
            }
        )
        if self.proposals_layer is not None and self.proposals_layer in self.viewer.layers:
            self.viewer.layers.remove(self.proposals_layer)
        layer = add_boxes_layer(
            self.viewer,
            data,
            "noise",
            int(self.box.value),
            image_layer=self.image.value,
            name="noise proposals",
            features=features,
            proposals=True,
        )
        layer.border_color = PROPOSAL_COLOUR
        layer.current_border_color = PROPOSAL_COLOUR
        self.proposals_layer = layer
        self.particles_layer.reset_choices()
        self.ensure_noise_layer()
        self.viewer.layers.selection.active = layer
        self.last_result = result
        for w in result.warnings:
            if "needs a few" not in w:
                show_warning(w)
        self._say(f"{len(new)} proposed boxes (cyan): delete the ones that hold particles, then Accept proposals")

    def accept_proposals(self) -> int:
        """Move the selected proposals (all when none is selected) into the noise layer."""
        layer = self.proposals_layer
        if layer is None or not len(layer.data):
            self._say("no proposals to accept")
            return 0
        chosen = sorted(layer.selected_data) or list(range(len(layer.data)))
        data = np.asarray(layer.data, dtype=float)[chosen]
        names = layer.features["micrograph"].astype(str).to_numpy()[chosen]
        table = pd.DataFrame({"micrograph": names, "x": data[:, 2], "y": data[:, 1]})
        self.set_boxes(merge_boxes(self.all_boxes(), table))
        layer.selected_data = set()
        layer.remove(chosen)
        self._say(f"accepted {len(chosen)} proposed boxes")
        self._publish()
        return len(chosen)

    # ------------------------------------------------------------------ messages and counts

    def _update_counts(self, _event=None) -> None:
        if self.image.value is None:
            self.counts.value = "open micrographs with napari-cryoddm"
            return
        layer = self.noise_layer
        data = np.asarray(layer.data, float).reshape(-1, 3) if layer is not None else np.zeros((0, 3))
        idx = np.round(data[:, 0]).astype(int)
        cur = current_slice(self.viewer, self.image.value)
        n_here = int((idx == cur).sum())
        n_mics = len(set(idx.tolist()))
        text = f"this micrograph: {n_here} boxes\nopen micrographs: {len(data)} boxes on {n_mics} micrographs"
        if len(self.other_boxes):
            text += f"\nkept for micrographs not open: {len(self.other_boxes)} boxes"
        self.counts.value = text

    def count_per_micrograph(self) -> dict[str, int]:
        table = self.boxes_table()
        return {str(k): int(v) for k, v in table.groupby("micrograph").size().items()}

    def _say(self, text: str, warn: bool = False) -> None:
        self.message.value = text
        (show_warning if warn else show_info)(text)

    def _fail(self, exc: BaseException) -> None:
        self.message.value = str(exc)
        report_error(exc)
