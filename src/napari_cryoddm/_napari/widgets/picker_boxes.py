"""The noise picker's boxes: its `noise` Points layer (one per micrograph stack, each box keeping
the size it was picked with), adding and removing boxes, and the noise files it loads and saves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...box_files import read_boxes, write_boxes
from ...box_placement import box_inside
from ...errors import CryoDDMError
from ...names import match_names
from ...picking import merge_boxes
from ..layers import add_boxes_layer, cryoddm_metadata, is_boxes_layer, points_table

VALID_COLOUR = np.array([1.0, 0.0, 0.0, 1.0])  # red, as the original
INVALID_COLOUR = np.array([1.0, 0.85, 0.0, 1.0])  # yellow: the box no longer fits its micrograph
PROPOSAL_COLOUR = "cyan"
NO_LAYER = "(none)"


class NoiseBoxes:
    """The box half of `NoisePickerWidget` (a mixin: it uses the widget's viewer, fields and form)."""

    def ensure_noise_layer(self):
        """The `noise` layer of this widget (created over the chosen stack on first use)."""
        if (
            self.noise_layer is not None
            and self.noise_layer in self.viewer.layers
            and id(self.noise_layer) in self._sized
        ):
            return self.noise_layer
        image = self.image.value
        if image is None:
            raise CryoDDMError("open micrographs with napari-cryoddm first (File ▸ Open)")
        layer = self._attached_noise_layer(image)
        if layer is None:
            others = [lay for lay in self.viewer.layers if lay.name == "noise"]
            layer = add_boxes_layer(
                self.viewer,
                None,
                "noise",
                int(self.box.value),
                image_layer=image,
                name=f"noise {image.name}" if others else "noise",
                attached_to=image.name,
                micrograph_names=self._names(),
                features=pd.DataFrame({"micrograph": pd.Series([], dtype=object)}),
            )
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
            valid = (
                layer.features["valid"].to_numpy(bool)
                if "valid" in layer.features and len(layer.features) == len(layer.data)
                else np.ones(len(layer.data), bool)
            )
            layer.features = pd.DataFrame({"micrograph": pd.Series(names, dtype=object), "valid": valid})
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
            if (
                is_boxes_layer(layer, "noise")
                and not meta.get("proposals")
                and meta.get("attached_to") == image.name
                and "micrograph" in layer.features.columns
            ):
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
                self._say(f"box refused: a {self.box.value} px box there would leave the micrograph", warn=True)
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
        hit = (np.round(data[:, 0]) == index) & (np.abs(data[:, 1] - y) <= half) & (np.abs(data[:, 2] - x) <= half)
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
        bad = np.flatnonzero(~self._valid(np.asarray(self.noise_layer.data, float).reshape(-1, 3), self._sizes()))
        self._remove(list(bad))
        self._restyle()
        self._say(f"deleted {len(bad)} boxes that did not fit")
        return int(len(bad))

    # ------------------------------------------------------------------ tables

    def boxes_table(self) -> pd.DataFrame:
        """The layer's boxes (`micrograph, x, y`, integer pixels) of the open micrographs."""
        if self.noise_layer is None or not len(self.noise_layer.data):
            return pd.DataFrame(
                {
                    "micrograph": pd.Series([], dtype=str),
                    "x": pd.Series([], dtype=np.int64),
                    "y": pd.Series([], dtype=np.int64),
                }
            )
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
        kept = {(int(round(i)), int(round(y)), int(round(x))): size for (i, y, x), size in zip(old, self._sizes())}
        match = match_names(pd.unique(table["micrograph"].astype(str)), names)
        idx = table["micrograph"].astype(str).map(match.mapping)
        mine = table[idx.notna()]
        self.other_boxes = merge_boxes(None, table[idx.isna()])
        ii = idx[idx.notna()].to_numpy(np.int64)
        data = (
            np.column_stack([ii.astype(float), mine["y"].to_numpy(float), mine["x"].to_numpy(float)])
            if len(mine)
            else np.zeros((0, 3))
        )
        self._guard = True
        try:
            layer.selected_data = set()
            layer.data = data
            layer.size = (
                np.array(
                    [kept.get((int(round(i)), int(round(y)), int(round(x))), float(self.box.value)) for i, y, x in data]
                )
                if len(data)
                else float(self.box.value)
            )
            layer.features = pd.DataFrame({"micrograph": [names[i] for i in ii], "valid": np.ones(len(ii), dtype=bool)})
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
                msg += f"; {n_other} belong to micrographs that are not open ({stems} …): they are kept and saved back"
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
                bad = int((~self._valid(np.asarray(self.noise_layer.data, float).reshape(-1, 3), self._sizes())).sum())
                if bad:
                    raise CryoDDMError(
                        f"{bad} boxes do not fit inside their micrograph at "
                        f"{self.box.value} px (yellow): move them, delete them "
                        "(Delete boxes that do not fit) or choose a smaller box"
                    )
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
