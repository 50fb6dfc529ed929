"""The cs2star dock widget: the face of `cs2star.convert` / `cs2star.convert_job_dirs`.

Choose the cryoSPARC particle file and its passthrough (or a job folder J<N> and how many
consecutive jobs), the output, and the same `Cs2StarConfig` the CLI uses; Run writes the STAR
file(s) with a progress bar, then opens the particles as boxes on the chosen micrograph stack
(the raw micrographs) through the attach step, so the overlay can be checked by eye.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox

from ...attach import AttachResult, attach_coordinates
from ...cs2star import Cs2StarConfig, Cs2StarResult, convert, convert_job_dirs
from ...cs2star.fields import UID_PATTERN
from ...errors import CryoDDMError
from ...io.star import read_coordinates, read_star_blocks
from ...jobs import Cancelled
from ..layers import DEFAULT_BOX_SIZE, add_boxes_layer, cryoddm_metadata, micrograph_layers, micrographs
from ..session import particle_stack, particles_of, session
from ..workers import JobHandle, notify, report_error
from ._form import ConfigForm
from ._qt import finish_dock, status_label
from ._run import JobButtons, path_or_none

INPUT_MODES = ("particle files", "job folder")
_OPTIONAL_NUMBERS = ("scale", "denoised_apix", "raw_apix")


def particles_on_micrographs(star: Path, image_layer: Any) -> tuple[AttachResult, int]:
    """Read a converted STAR and place its particles on a micrograph stack layer.

    cryoSPARC's 21-digit UID prefixes are ignored when matching names, so a file converted
    without `--strip-uid` still lands on the raw micrographs. Returns the attach result and the
    box size (the optics' rlnImageSize when there is one)."""
    table = read_coordinates(star)
    table["micrograph"] = table["micrograph"].astype(str).map(lambda s: UID_PATTERN.sub("", s))
    entries = micrographs(image_layer)
    result = attach_coordinates(table, [m["name"] for m in entries], [m.get("shape") for m in entries])
    box = DEFAULT_BOX_SIZE
    optics = read_star_blocks(star).get("optics")
    if optics is not None and "rlnImageSize" in optics.columns and len(optics):
        box = int(pd.to_numeric(optics["rlnImageSize"]).max())
    return result, box


class Cs2StarWidget(Container):
    """cryoSPARC `.cs` → RELION STAR for the raw micrographs, shown as boxes on them."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._build_controls()
        self.extend(
            [
                self._mode,
                self._particles,
                self._passthrough,
                self._job_dir,
                self._jobs,
                self._output,
                self.form,
                self._image,
                self._box,
                self._run_button,
                self._stop_button,
                self._status,
            ]
        )
        finish_dock(self, self.form)
        self._runner = JobButtons(self._run_button, self._stop_button, self._status)
        self.results: list[Cs2StarResult] = []
        self.layers: list[Any] = []
        self._connect()

    def _build_controls(self) -> None:
        """The dock's fields and buttons (laid out by __init__)."""
        self._mode = ComboBox(
            label="input",
            choices=INPUT_MODES,
            value=INPUT_MODES[0],
            tooltip="particle files, or cryoSPARC job folder(s) as the original",
        )
        self._particles = FileEdit(
            label="particles .cs",
            mode="r",
            filter="*.cs",
            tooltip="e.g. J102/J102_008_particles.cs (numpy or compressed)",
        )
        self._passthrough = FileEdit(
            label="passthrough .cs",
            mode="rm",
            filter="*.cs",
            tooltip="e.g. J102/J102_passthrough_particles.cs; joined on uid "
            "(it holds the coordinates of refinement outputs)",
        )
        self._job_dir = FileEdit(
            label="job folder J<N>",
            mode="d",
            tooltip="its highest J<N>_NNN_particles.cs + J<N>_passthrough_particles.cs",
        )
        self._jobs = SpinBox(
            label="consecutive jobs", value=1, min=1, max=999, tooltip="J<N> … J<N+K−1> → class0 … class{K−1}"
        )
        self._output = FileEdit(
            label="output", mode="w", filter="*.star", tooltip="a .star file (particle files) or a folder (job folder)"
        )
        self.form = ConfigForm(
            Cs2StarConfig,
            advanced=("swap_xy", "invert_y", "invert_x", "scale", "denoised_apix", "raw_apix", "keep_image_names"),
        )
        self.form["micrograph_folder"].value = ""
        self.form["raw_micrographs"].filter = "*.star"
        for name in _OPTIONAL_NUMBERS:  # 0 in the form reads back as None (ConfigForm)
            self.form[name].max = 1e6
        self._image = ComboBox(
            label="show on",
            nullable=True,
            choices=lambda _w: [(lay.name, lay) for lay in micrograph_layers(self.viewer)],
            tooltip="the raw micrograph stack to draw the particles on (optional)",
        )
        self._box = FloatSpinBox(
            label="box size (px)",
            value=0,
            min=0,
            max=4096,
            step=1,
            tooltip="side of the boxes drawn; 'from the STAR': the particle box "
            "of the output (its rlnImageSize), else that of the particles "
            "already on the stack",
        )
        self._box.native.setDecimals(0)  # a whole number; QDoubleSpinBox for the text at 0
        self._box.native.setSpecialValueText("from the STAR")
        self._run_button = PushButton(text="Convert")
        self._stop_button = PushButton(text="Stop", enabled=False)
        self._status = status_label(Label(value=""))

    def _connect(self) -> None:
        """The dock's reactions: its buttons and fields, the viewer's layers and slider."""
        self._mode.changed.connect(self._on_mode)
        self._run_button.changed.connect(self.run)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh)
        self._on_mode(self._mode.value)
        self._refresh()

    # ------------------------------------------------------------------ inputs

    def _refresh(self, *_: Any) -> None:
        """Default: the stack that carries particles; the box size of its particles."""
        self._image.reset_choices()
        if self._image.value is None:
            stack = particle_stack(self.viewer)
            if stack is not None:
                self._image.value = stack
            elif self._image.choices[1:]:
                self._image.value = self._image.choices[1]
        particles = particles_of(self.viewer, self._image.value)
        if particles is not None and not int(self._box.value):
            size = cryoddm_metadata(particles).get("box_size")
            if size:
                self._box.value = int(size)

    def _on_mode(self, mode: str) -> None:
        files = mode == INPUT_MODES[0]
        self._particles.visible = files
        self._passthrough.visible = files
        self._job_dir.visible = not files
        self._jobs.visible = not files
        self._output.mode = "w" if files else "d"

    def config(self) -> Cs2StarConfig:
        extra: dict[str, Any] = {}
        folder = str(self.form["micrograph_folder"].value or "").strip()
        extra["micrograph_folder"] = folder if folder and folder != "None" else None
        extra["raw_micrographs"] = path_or_none(self.form["raw_micrographs"].value)
        return self.form.value(**extra)

    def _make_job(self):
        config = self.config()
        out = path_or_none(self._output.value)
        if out is None:
            raise CryoDDMError("choose where to write the output")
        if self._mode.value == INPUT_MODES[0]:
            particles = path_or_none(self._particles.value)
            if particles is None:
                raise CryoDDMError("choose the cryoSPARC particle file (.cs)")
            if out.suffix.lower() != ".star":
                out = out.with_suffix(".star")
            passthroughs = (
                path_or_none(list(v) if isinstance(v := self._passthrough.value, (list, tuple)) else [v]) or []
            )
            return lambda cancel: convert(particles, passthroughs, out, config, cancel)
        job_dir = path_or_none(self._job_dir.value)
        if job_dir is None:
            raise CryoDDMError("choose a cryoSPARC job folder (J<N>)")
        n = int(self._jobs.value)
        return lambda cancel: convert_job_dirs(job_dir, out, n, config, cancel)

    # ------------------------------------------------------------------ actions

    def run(self, *_: Any) -> JobHandle | None:
        """Convert (threaded, with progress; inline under CRYODDM_NAPARI_NOTHREADS), then show."""
        if self._runner.running:
            return self._runner.handle
        try:
            make_job = self._make_job()
        except CryoDDMError as exc:
            self._failed(exc)
            return None
        return self._runner.start(make_job, "cs2star", on_done=self._done, on_error=self._failed, message="converting…")

    def stop(self, *_: Any) -> None:
        self._runner.stop()

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):  # Stop: outputs are written atomically, so none exist
            self._status.value = "stopped; nothing was written"
            notify("cs2star stopped; nothing was written")
            return
        self._status.value = f"failed: {exc}"
        report_error(exc)

    def _done(self, result: Cs2StarResult | list[Cs2StarResult]) -> None:
        batch = isinstance(result, list)
        results = result if batch else [result]
        self.results = results
        lines = []
        for res in results:
            where = res.outputs[0].parent.name if batch else res.outputs[0].name
            lines.append(f"{where}: {res.n_particles} particles on {res.n_micrographs} micrographs")
            lines.extend(f"  note: {n}" for n in res.notes)
        self.layers = []
        image = self._image.value
        if image is not None:
            for k, res in enumerate(results):
                star = next((o for o in res.outputs if o.name == "cleaned_particles_relion.star"), res.outputs[0])
                try:
                    layer, attached = self._show(star, image, f"cs2star class{k}" if batch else f"cs2star {star.stem}")
                except CryoDDMError as exc:
                    lines.append(f"  not shown: {exc}")
                    continue
                self.layers.append(layer)
                session(self.viewer).publish("particles", layer)
                lines.append("  " + attached.summary())
        self._status.value = "\n".join(lines)
        notify(lines[0] if len(lines) == 1 else "\n".join(lines[:6]))

    def _show(self, star: Path, image: Any, name: str) -> tuple[Any, AttachResult]:
        if "rlnCoordinateX" not in read_star_blocks(star).get("particles", pd.DataFrame()).columns:
            raise CryoDDMError(f"{star.name} has no coordinates to show")
        attached, box = particles_on_micrographs(star, image)
        if int(self._box.value):
            box = int(self._box.value)
        layer = add_boxes_layer(
            self.viewer,
            attached.points,
            "particles",
            box,
            source=str(star),
            image_layer=image,
            name=name,
            features=attached.features,
        )
        return layer, attached
