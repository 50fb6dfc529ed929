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
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSpinBox, Label,
                              PushButton, SpinBox)
from napari.utils.notifications import show_info, show_warning

from ...box_files import read_boxes, write_boxes
from ...box_placement import box_inside
from ...errors import CryoDDMError
from ...io.star import read_coordinates
from ...names import match_names
from ...params import window_for_diameter
from ...picking import Micrograph, PickConfig, PickResult, merge_boxes, pick_noise
from ..layers import (add_boxes_layer, cryoddm_metadata, current_slice, is_boxes_layer,
                      micrograph_layers, micrographs, points_table)
from ..session import particle_stack, particles_of, session
from ..workers import report_error, start_job
from ._form import ConfigForm
from ._qt import finish_dock, status_label

VALID_COLOUR = np.array([1.0, 0.0, 0.0, 1.0])  # red, as the original
INVALID_COLOUR = np.array([1.0, 0.85, 0.0, 1.0])  # yellow: the box no longer fits its micrograph
PROPOSAL_COLOUR = "cyan"
NO_LAYER = "(none)"


class NoisePickerWidget(Container):
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

        self.image = ComboBox(label="micrographs", choices=self._image_choices,
                              tooltip="a micrograph stack opened with napari-cryoddm")
        self.diameter = FloatSpinBox(label="particle diameter", value=200.0, min=1.0, max=10000.0,
                                     step=1.0, tooltip="the particle's diameter")
        self.unit = ComboBox(label="unit", choices=["px", "Å"], value="px",
                             tooltip="Å uses the micrographs' pixel size from their headers")
        self.box = SpinBox(label="box size (px)", value=384, min=2, max=16384,
                           tooltip="side of each noise box; defaults to the forward window W for "
                                   "the diameter (what forward crops around each noise centre)")
        self.window_label = Label(value="")
        self.form = ConfigForm(PickConfig, labels={
            "max_per_micrograph": "max per image", "allow_unmatched": "allow unmatched"})
        self.particles_layer = ComboBox(label="particles layer", choices=self._particle_choices,
                                        tooltip="attached particle coordinates (a Points layer)")
        self.particles_file = FileEdit(label="or particles STAR", mode="r", filter="*.star *.cbox",
                                       value="", tooltip="a particle or coordinate STAR file")
        self.scope = ComboBox(label="run on", choices=["all micrographs", "current micrograph"],
                              value="all micrographs")
        self.pick_button = PushButton(text="Pick away from particles")
        self.propose_button = PushButton(text="Propose emptiest boxes (no coordinates)")
        self.accept_button = PushButton(text="Accept proposals (selected, or all)")
        self.invalid_button = PushButton(text="Delete boxes that do not fit")
        self.noise_file = FileEdit(label="noise file", mode="w", filter="*.txt *.star", value="",
                                   tooltip="noise_coordinates.txt (name x y) or .star")
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
        self.extend([self.image, self.diameter, self.unit, self.box, self.window_label, self.form,
                     self.particles_layer, self.particles_file, self.scope, self.pick_button,
                     self.propose_button, self.accept_button, self.invalid_button,
                     self.noise_file, self.load_button, self.save_button, self.counts, self.message])
        finish_dock(self, self.form)
        if particle_stack(napari_viewer) is not None:
            self.image.value = particle_stack(napari_viewer)
        session(napari_viewer).changed.connect(self._on_session)

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
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._layers_changed)
        napari_viewer.dims.events.current_step.connect(self._update_counts)
        self._image_changed()

    # ------------------------------------------------------------------ layers and choices

    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in micrograph_layers(self.viewer)]

    def _particle_choices(self, _widget=None) -> list:
        from napari.layers import Points

        ours = (self.noise_layer, self.proposals_layer)
        return [(NO_LAYER, None)] + [(layer.name, layer) for layer in self.viewer.layers
                                     if isinstance(layer, Points) and layer not in ours
                                     and cryoddm_metadata(layer).get("kind") != "noise"]

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
        return next((float(m.get("voxel_size") or 0) for m in self.micrograph_entries
                     if m.get("voxel_size")), 0.0)

    def diameter_px(self) -> float:
        d = float(self.diameter.value)
        if self.unit.value == "Å":
            apix = self.apix() if self.image.value is not None else 0.0
            if apix <= 0:
                raise CryoDDMError("the micrographs' headers give no pixel size; give the diameter in px")
            d = d / apix
        return d

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

    def ensure_noise_layer(self):
        """The `noise` layer of this widget (created over the chosen stack on first use)."""
        if self.noise_layer is not None and self.noise_layer in self.viewer.layers \
                and id(self.noise_layer) in self._sized:
            return self.noise_layer
        image = self.image.value
        if image is None:
            raise CryoDDMError("open micrographs with napari-cryoddm first (File ▸ Open)")
        layer = self._attached_noise_layer(image)
        if layer is None:
            others = [lay for lay in self.viewer.layers if lay.name == "noise"]
            layer = add_boxes_layer(self.viewer, None, "noise", int(self.box.value),
                                    image_layer=image, name=f"noise {image.name}" if others else "noise",
                                    attached_to=image.name, micrograph_names=self._names(),
                                    features=pd.DataFrame({"micrograph": pd.Series([], dtype=object)}))
        elif id(layer) not in self._sized and len(layer.data):
            layer.size = float(self.box.value)  # a noise file carries no box size: W's
        self._sized.add(id(layer))
        self._adopt(layer)
        self.viewer.layers.selection.active = layer
        self.particles_layer.reset_choices()
        self._restyle()
        return layer

    def _adopt(self, layer) -> None:
        """Make `layer` the noise layer this widget edits (hooked once per layer)."""
        if id(layer) not in self._hooked:
            names = layer.features["micrograph"].astype(object).to_numpy() if len(layer.data) else []
            valid = (layer.features["valid"].to_numpy(bool) if "valid" in layer.features
                     and len(layer.features) == len(layer.data) else np.ones(len(layer.data), bool))
            layer.features = pd.DataFrame({"micrograph": pd.Series(names, dtype=object),
                                           "valid": valid})
            layer.feature_defaults = {"micrograph": "", "valid": True}
            layer.events.data.connect(self._on_data)
            layer.mouse_drag_callbacks.insert(0, self._ctrl_click)
            self._hooked.add(id(layer))
        self.noise_layer = layer

    def _attached_noise_layer(self, image):
        """A noise boxes layer already attached to `image` (a noise file opened with File ▸ Open
        and attached): the widget edits it instead of making a second one."""
        for layer in self.viewer.layers:
            meta = cryoddm_metadata(layer)
            if (is_boxes_layer(layer, "noise") and not meta.get("proposals")
                    and meta.get("attached_to") == image.name
                    and "micrograph" in layer.features.columns):
                return layer
        return None

    # ------------------------------------------------------------------ geometry and styling

    def _sizes(self) -> np.ndarray:
        """Each box's own side (px): boxes keep the size they were picked with."""
        layer = self.noise_layer
        n = len(layer.data) if layer is not None else 0
        size = np.asarray(layer.size, dtype=float).reshape(-1) if n else np.zeros(0)
        return size if len(size) == n else np.full(n, float(self.box.value))

    def _valid(self, data: np.ndarray, box: Any = None) -> np.ndarray:
        box = np.asarray(self.box.value if box is None else box, dtype=float)
        shapes = self._shapes()
        if not len(data):
            return np.zeros(0, dtype=bool)
        idx = np.round(data[:, 0]).astype(int)
        ok = (idx >= 0) & (idx < len(shapes))
        sh = np.array([shapes[i] if 0 <= i < len(shapes) else (0, 0) for i in idx], dtype=float)
        inside = box_inside(data[:, 2], data[:, 1], box, (sh[:, 0], sh[:, 1]))
        return ok & inside

    def _restyle(self) -> None:
        """Sizes from the box; `valid` feature and yellow edges where a box no longer fits."""
        layer = self.noise_layer
        if layer is None:
            return
        data = np.asarray(layer.data, dtype=float).reshape(-1, 3)
        valid = self._valid(data, self._sizes())
        self._guard = True
        try:
            sizes = np.asarray(layer.size, dtype=float).copy()
            layer.current_size = int(self.box.value)  # new boxes; existing ones keep theirs
            if len(sizes) == len(data) and len(data):
                layer.size = sizes  # current_size also resizes the selected boxes: undone
            meta = dict(layer.metadata)
            meta["cryoddm"] = {**cryoddm_metadata(layer), "box_size": int(self.box.value)}
            layer.metadata = meta
            features = layer.features.copy()
            features["valid"] = valid
            layer.features = features
            if len(data):
                layer.border_color = np.where(valid[:, None], VALID_COLOUR, INVALID_COLOUR)
            layer.current_border_color = "red"
        finally:
            self._guard = False
        self._update_counts()

    def _box_changed(self, _value=None) -> None:
        """The box size applies to boxes picked from now on (on the chosen stack)."""
        if self.noise_layer is None:
            return
        self._restyle()

    # ------------------------------------------------------------------ hand editing

    def _on_data(self, event) -> None:
        """Name new boxes after their micrograph; refuse those that leave it."""
        if self._guard or self.noise_layer is None:
            return
        action = str(getattr(event, "action", ""))
        if not action.endswith(("added", "changed", "removed")):
            return
        layer = self.noise_layer
        data = np.asarray(layer.data, dtype=float).reshape(-1, 3)
        if action.endswith("added"):
            added = sorted(int(i) % len(data) for i in (event.data_indices or ()) if len(data))
            if self._suppress_add:  # a Ctrl-click in add mode removes, never adds
                self._suppress_add = False
                self._remove(added)
                return
            data[added, 0] = np.round(data[added, 0])
            bad = [i for i, ok in zip(added, self._valid(data[added])) if not ok]
            if bad:
                self._remove(bad)
                self._say(f"box refused: a {self.box.value} px box there would leave the micrograph",
                          warn=True)
                added = [i for i in added if i not in bad]
                data = np.delete(data, bad, axis=0)
                added = [i - sum(b < i for b in bad) for i in added]
            if added:
                names = self._names()
                self._guard = True
                try:
                    features = layer.features.copy()
                    for i in added:
                        features.loc[features.index[i], "micrograph"] = names[int(data[i, 0])]
                    layer.features = features
                finally:
                    self._guard = False
        self._restyle()

    def _remove(self, indices: list[int]) -> None:
        if not indices:
            return
        self._guard = True
        try:
            self.noise_layer.selected_data = set()
            self.noise_layer.remove(sorted(indices))
        finally:
            self._guard = False

    def box_under(self, index: int, y: float, x: float) -> int | None:
        """The box on micrograph `index` that contains (y, x), nearest centre first."""
        layer = self.noise_layer
        if layer is None or not len(layer.data):
            return None
        data = np.asarray(layer.data, dtype=float)
        half = self._sizes() / 2.0
        hit = (np.round(data[:, 0]) == index) & (np.abs(data[:, 1] - y) <= half) & \
            (np.abs(data[:, 2] - x) <= half)
        if not hit.any():
            return None
        cand = np.flatnonzero(hit)
        return int(cand[np.argmin(np.hypot(data[cand, 1] - y, data[cand, 2] - x))])

    def _ctrl_click(self, layer, event):
        """Ctrl-click removes the box under the cursor (in any mode; in add mode nothing is added)."""
        if event.type != "mouse_press":
            return
        ctrl = any(m in event.modifiers for m in ("Control", "Meta"))
        self._suppress_add = bool(ctrl and layer.mode == "add")
        if not ctrl:
            return
        i, y, x = (float(v) for v in np.asarray(layer.world_to_data(event.position))[-3:])
        k = self.box_under(int(round(i)), y, x)
        if k is None:
            self._say("no box under the cursor")
            return
        self._remove([k])
        self._restyle()
        self._say("box removed")

    def delete_invalid(self) -> int:
        if self.noise_layer is None:
            return 0
        bad = np.flatnonzero(~self._valid(np.asarray(self.noise_layer.data, float).reshape(-1, 3),
                                          self._sizes()))
        self._remove(list(bad))
        self._restyle()
        self._say(f"deleted {len(bad)} boxes that did not fit")
        return int(len(bad))

    # ------------------------------------------------------------------ tables

    def boxes_table(self) -> pd.DataFrame:
        """The layer's boxes (`micrograph, x, y`, integer pixels) of the open micrographs."""
        if self.noise_layer is None or not len(self.noise_layer.data):
            return pd.DataFrame({"micrograph": pd.Series([], dtype=str),
                                 "x": pd.Series([], dtype=np.int64), "y": pd.Series([], dtype=np.int64)})
        table = points_table(self.noise_layer, self.image.value)
        return merge_boxes(None, table)

    def all_boxes(self) -> pd.DataFrame:
        """Boxes of the open micrographs plus those kept for micrographs that are not open."""
        return merge_boxes(self.other_boxes if len(self.other_boxes) else None, self.boxes_table())

    def set_boxes(self, table: pd.DataFrame) -> None:
        """Show `table` (`micrograph, x, y`) in the noise layer; rows of micrographs not open are
        kept aside (and saved back)."""
        layer = self.ensure_noise_layer()
        names = self._names()
        old = np.asarray(layer.data, dtype=float).reshape(-1, 3)
        kept = {(int(round(i)), int(round(y)), int(round(x))): size
                for (i, y, x), size in zip(old, self._sizes())}
        match = match_names(pd.unique(table["micrograph"].astype(str)), names)
        idx = table["micrograph"].astype(str).map(match.mapping)
        mine = table[idx.notna()]
        self.other_boxes = merge_boxes(None, table[idx.isna()])
        ii = idx[idx.notna()].to_numpy(np.int64)
        data = np.column_stack([ii.astype(float), mine["y"].to_numpy(float), mine["x"].to_numpy(float)]) \
            if len(mine) else np.zeros((0, 3))
        self._guard = True
        try:
            layer.selected_data = set()
            layer.data = data
            layer.size = np.array([kept.get((int(round(i)), int(round(y)), int(round(x))),
                                            float(self.box.value)) for i, y, x in data]) \
                if len(data) else float(self.box.value)
            layer.features = pd.DataFrame({"micrograph": [names[i] for i in ii],
                                           "valid": np.ones(len(ii), dtype=bool)})
        finally:
            self._guard = False
        self._restyle()

    # ------------------------------------------------------------------ load / save

    def load(self, path: str | Path | None = None) -> int:
        """Merge a noise file's boxes into the layer (never erasing what is there)."""
        try:
            path = Path(path or self.noise_file.value)
            if not str(path) or str(path) == "." or path.is_dir():
                raise CryoDDMError("choose a noise file (.txt or .star) to load")
            table = read_boxes(path)
            current = self.all_boxes()
            self.set_boxes(merge_boxes(current, table))
            meta = cryoddm_metadata(self.noise_layer)
            meta["source"] = str(path)
            n_other = len(self.other_boxes)
            msg = f"loaded {len(table)} boxes from {path.name}"
            if n_other:
                stems = ", ".join(pd.unique(self.other_boxes["micrograph"])[:3])
                msg += (f"; {n_other} belong to micrographs that are not open ({stems} …): "
                        "they are kept and saved back")
            self._say(msg)
            return len(table)
        except CryoDDMError as exc:
            self._fail(exc)
            return 0

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write every box atomically; an existing file's boxes of micrographs not open are kept."""
        try:
            path = Path(path or self.noise_file.value)
            if not str(path) or str(path) == "." or path.is_dir():
                raise CryoDDMError("choose a noise file (.txt or .star) to save to")
            if self.noise_layer is not None:
                bad = int((~self._valid(np.asarray(self.noise_layer.data, float).reshape(-1, 3),
                                        self._sizes())).sum())
                if bad:
                    raise CryoDDMError(f"{bad} boxes do not fit inside their micrograph at "
                                       f"{self.box.value} px (yellow): move them, delete them "
                                       "(Delete boxes that do not fit) or choose a smaller box")
            table = self.all_boxes()
            if path.exists():
                old = read_boxes(path, allow_empty=True)
                match = match_names(pd.unique(old["micrograph"].astype(str)), self._names())
                keep = old[~old["micrograph"].astype(str).isin(match.mapping)]
                table = merge_boxes(keep, table)
            write_boxes(path, table, overwrite=True)
            if self.noise_layer is not None:
                cryoddm_metadata(self.noise_layer)["source"] = str(path)
            self._say(f"saved {len(table)} boxes to {path.name}")
            return path
        except CryoDDMError as exc:
            self._fail(exc)
            return None

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
        return start_job(lambda cancel: pick_noise(mics, config, particles, existing, cancel, source),
                         "pick noise", on_done=self._picked, on_error=self._fail)

    def propose_empty(self):
        try:
            config = self.config()
            mics = self._micrograph_refs()
            existing = self.all_boxes()
        except CryoDDMError as exc:
            self._fail(exc)
            return None
        return start_job(lambda cancel: pick_noise(mics, config, None, existing, cancel),
                         "propose empty boxes", on_done=self._proposed, on_error=self._fail)

    def _report(self, result: PickResult) -> None:
        self.last_result = result
        text = (f"{len(result.new)} new boxes; {result.total} on {len(result.counts)} micrographs")
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
        data = np.column_stack([ii, new["y"].to_numpy(float), new["x"].to_numpy(float)]) if len(new) \
            else np.zeros((0, 3))
        features = pd.DataFrame({"micrograph": new["micrograph"].to_numpy(),
                                 "score": new["score"].to_numpy(float) if "score" in new else np.nan})
        if self.proposals_layer is not None and self.proposals_layer in self.viewer.layers:
            self.viewer.layers.remove(self.proposals_layer)
        layer = add_boxes_layer(self.viewer, data, "noise", int(self.box.value),
                                image_layer=self.image.value, name="noise proposals",
                                features=features, proposals=True)
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
        self._say(f"{len(new)} proposed boxes (cyan): delete the ones that hold particles, "
                  "then Accept proposals")

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
        text = (f"this micrograph: {n_here} boxes\nopen micrographs: {len(data)} boxes on "
                f"{n_mics} micrographs")
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
