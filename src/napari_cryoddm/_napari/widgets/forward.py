"""The Forward dock widget: the face of `forward.run_forward` and `forward.preview_chain`.

Inputs come from the viewer (a micrograph stack layer, particle and noise boxes layers) or from
files; parameters from the same `ForwardConfig` the CLI uses. "Preview" shows one particle's
chain x_0…x_T as a strip of small images in the dock (the viewer's layers and slider are left
alone); "Run" writes the dataset with a progress bar, and "Stop" cancels it (a cancelled run
leaves only `OUT.partial/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox

from ...errors import CryoDDMError
from ...forward import PRESETS, ForwardConfig, ForwardResult, preview_chain, run_forward
from ...jobs import Cancelled, Progress
from ..layers import cryoddm_metadata, micrograph_layers, micrograph_paths, points_layers, points_table
from ..session import particle_stack, particles_of, session
from ..workers import JobHandle, notify, report_error, start_job
from ._form import ConfigForm
from ._qt import finish_dock, status_label
from ._run import JobButtons, path_or_none

_SCHEDULE = ("beta", "steps", "start")


class ChainStrip:
    """x_0 … x_T of one crop side by side, in a small matplotlib canvas inside the dock."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 1.0))
        self.figure.subplots_adjust(left=0.01, right=0.99, top=0.8, bottom=0.02, wspace=0.05)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(0)
        self.canvas.setMaximumHeight(0)  # hidden until there is a chain

    def show(self, xs: np.ndarray, start: int) -> None:
        self.figure.clear()
        lo, hi = (float(v) for v in np.percentile(xs[0], [1, 99]))
        n = len(xs)
        for k, x in enumerate(xs):
            ax = self.figure.add_subplot(1, n, k + 1)
            ax.imshow(x, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(f"x{k}" + ("*" if k >= start else ""), fontsize=7, pad=2)
            ax.set_axis_off()
        self.canvas.setMaximumHeight(16777215)
        self.canvas.setMinimumHeight(110)
        self.canvas.draw_idle()


class ForwardWidget(Container):
    """Forward process: micrographs + particles + noise boxes → CryoDDM training pairs."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._build_controls()
        self.extend(
            [
                self._micrographs,
                self._micrograph_files,
                self._particles,
                self._particles_file,
                self._noise,
                self._noise_file,
                self.form,
                self._output,
                self._preview_crop,
                self._preview_button,
                self._run_button,
                self._stop_button,
                self._status,
            ]
        )
        self.chain_plot = ChainStrip()
        self.native.layout().addWidget(self.chain_plot.canvas)
        finish_dock(self, self.form)
        self._runner = JobButtons(
            self._run_button,
            self._stop_button,
            self._status,
            stop_message="stopping after the current micrograph or block of crops…",
        )
        self.result: ForwardResult | None = None
        self.preview: np.ndarray | None = None
        self.preview_info: dict[str, Any] = {}
        self._connect()

    def _build_controls(self) -> None:
        """The dock's fields and buttons (laid out by __init__)."""
        self._micrographs = ComboBox(
            label="micrographs",
            nullable=True,
            choices=lambda _w: [(lay.name, lay) for lay in micrograph_layers(self.viewer)],
            tooltip="a micrograph stack opened with napari-cryoddm",
        )
        self._micrograph_files = FileEdit(
            label="or micrograph files",
            mode="rm",
            filter="*.mrc *.mrcs *.mrc.gz *.st *.map *.rec",
            tooltip="used when no micrograph layer is chosen",
        )
        self._particles = ComboBox(
            label="particles",
            nullable=True,
            choices=lambda _w: self._points_choices("particles"),
            tooltip="a particles boxes layer (x = column, y = row)",
        )
        self._particles_file = FileEdit(
            label="or particle STAR", mode="r", filter="*.star *.cbox", tooltip="used when no particles layer is chosen"
        )
        self._noise = ComboBox(
            label="noise boxes",
            nullable=True,
            choices=lambda _w: self._points_choices("noise"),
            tooltip="a noise boxes layer (from the noise picker)",
        )
        self._noise_file = FileEdit(
            label="or noise file",
            mode="r",
            filter="*.txt *.star",
            tooltip="`name x y` text or STAR; used when no noise layer is chosen",
        )
        self.form = ConfigForm(
            ForwardConfig,
            advanced=("normalise", "seed", "jitter", "max_crops"),
            special={"diameter": "not given", "diameter_A": "not given"},
        )
        self.form["beta"].step = 0.0001  # four decimals: Config 1's β is 0.1288
        self._output = FileEdit(
            label="output folder", mode="d", tooltip="written as OUT.partial/ and renamed when complete"
        )
        self._preview_crop = SpinBox(
            label="preview crop", value=0, min=0, max=100000, tooltip="which planned crop the preview shows"
        )
        self._preview_button = PushButton(text="Preview one chain")
        self._run_button = PushButton(text="Run")
        self._stop_button = PushButton(text="Stop", enabled=False)
        self._status = status_label(Label(value=""))  # long results must not widen the dock

    def _connect(self) -> None:
        """The dock's reactions: its buttons and fields, the viewer's layers and slider."""
        self._preview_button.changed.connect(self.run_preview)
        self._run_button.changed.connect(self.run)
        self.form["preset"].changed.connect(self._on_preset)
        self._on_preset(self.form["preset"].value)
        self._particles.changed.connect(self._particles_changed)
        for event in (
            self.viewer.layers.events.inserted,
            self.viewer.layers.events.removed,
            self.viewer.layers.events.moved,
        ):
            event.connect(self._refresh)
        self._refresh()
        self._session = session(self.viewer)
        self._session.changed.connect(self._on_session)
        for key in ("particles", "noise", "diameter_px"):
            if self._session.get(key) is not None:
                self._on_session(key, self._session.get(key))

    def _on_session(self, key: str, value: Any) -> None:
        """The picker's stack, particles, noise boxes and diameter become the defaults."""
        if key in ("particles", "noise"):
            self._refresh(prefer=True)
        elif key == "diameter_px" and value and not self.form["diameter"].value and not self.form["diameter_A"].value:
            self.form["diameter"].value = float(value)

    # ------------------------------------------------------------------ inputs

    def _points_choices(self, kind: str) -> list[tuple[str, Any]]:
        layers = points_layers(self.viewer, kind)
        if not layers:  # plain points layers with a micrograph feature also do
            layers = [lay for lay in points_layers(self.viewer) if "micrograph" in lay.features]
        return [(lay.name, lay) for lay in layers]

    def _refresh(self, *_: Any, prefer: bool = False) -> None:
        """Defaults: the stack that carries particles, its particles and its noise boxes."""
        for combo in (self._micrographs, self._particles, self._noise):
            combo.reset_choices()
        stack = particle_stack(self.viewer)
        if stack is not None and (prefer or self._micrographs.value is None):
            self._micrographs.value = stack
        stack = self._micrographs.value
        for combo, layer in ((self._particles, particles_of(self.viewer, stack)), (self._noise, self._noise_of(stack))):
            if layer is not None and (prefer or combo.value is None):
                combo.value = layer
            elif combo.value is None and combo.choices[1:]:
                combo.value = combo.choices[1]

    def _noise_of(self, stack: Any) -> Any:
        for layer in reversed(points_layers(self.viewer, "noise")):
            meta = cryoddm_metadata(layer)
            if stack is not None and meta.get("attached_to") == stack.name and not meta.get("proposals"):
                return layer
        return None

    def _particles_changed(self, layer: Any = None) -> None:
        """A particles layer that knows its diameter (the sample data, the picker's) fills an
        unset diameter, so the user need not type it again."""
        d = cryoddm_metadata(layer).get("diameter_px") if layer is not None else None
        if d and not self.form["diameter"].value and not self.form["diameter_A"].value:
            self.form["diameter"].value = float(d)

    def _on_preset(self, preset: str) -> None:
        """The schedule fields are editable only for the custom preset (they show its values)."""
        beta, steps, start = PRESETS.get(preset, PRESETS["config1"])
        custom = preset == "custom"
        for name, value in zip(_SCHEDULE, (beta, steps, start)):
            control = self.form[name]
            if not custom or control.value in (None, 0):
                control.value = value
            control.enabled = custom

    def inputs(self) -> tuple[list[str], Any, Any]:
        """(micrograph paths, particles, noise) from the chosen layers, else the chosen files."""
        image = self._micrographs.value
        files = path_or_none(self._micrograph_files.value)
        if image is not None:
            mics = micrograph_paths(image)
        elif files:
            mics = [str(p) for p in files]
        else:
            raise CryoDDMError("choose a micrograph layer or micrograph files")
        particles = self._table_or_file(self._particles.value, self._particles_file.value, image, "particles")
        noise = self._table_or_file(self._noise.value, self._noise_file.value, image, "noise")
        return mics, particles, noise

    @staticmethod
    def _table_or_file(layer: Any, path: Any, image: Any, kind: str) -> pd.DataFrame | Path:
        if layer is not None:
            table = points_table(layer, image)
            if table.empty:
                raise CryoDDMError(f"layer {layer.name!r} holds no {kind} boxes")
            return table.loc[:, ["micrograph", "x", "y"]]
        p = path_or_none(path)
        if p is None:
            raise CryoDDMError(f"choose a {kind} layer or a {kind} file")
        return p

    def config(self) -> ForwardConfig:
        """The form's config (a preset ignores the custom schedule fields)."""
        preset = self.form["preset"].value
        extra: dict[str, Any] = {} if preset == "custom" else dict.fromkeys(_SCHEDULE)
        return self.form.value(**extra)

    def output(self) -> Path:
        out = path_or_none(self._output.value)
        if out is None:
            raise CryoDDMError("choose an output folder")
        return out

    # ------------------------------------------------------------------ actions

    def run_preview(self, *_: Any) -> None:
        """x_0…x_T of one crop as an image stack (the job reads one micrograph and some noise)."""
        try:
            mics, particles, noise = self.inputs()
            config = self.config()
        except CryoDDMError as exc:
            report_error(exc)
            self._status.value = str(exc)
            return
        crop = int(self._preview_crop.value)
        image = self._micrographs.value

        def job(cancel):
            yield Progress(0, 1, "previewing one chain")
            return preview_chain(mics, particles, noise, config, crop=crop)

        start_job(job, "forward preview", on_done=lambda r: self._show_preview(r, image, crop), on_error=self._failed)

    def _show_preview(self, result: tuple[np.ndarray, Any], image: Any = None, crop: int = 0) -> None:
        """Show the chain x_0…x_T as a strip of small images in the dock (one contrast for all,
        that of x_0), so the viewer's layers and its micrograph slider are untouched."""
        xs, plan = result
        self.preview = xs
        beta, steps, start = plan.schedule
        crop = int(np.clip(crop, 0, len(plan.crops) - 1))
        row = plan.crops.iloc[crop]
        mic = plan.micrographs[int(row.micrograph)].path.name
        self.preview_info = {
            "window": plan.window,
            "crop": crop,
            "micrograph": mic,
            "x": int(row.x),
            "y": int(row.y),
            "bin_factor": plan.factor,
            "schedule": {"beta": beta, "steps": steps, "start": start},
        }
        self.chain_plot.show(xs, start)
        self._status.value = (
            f"preview: crop {crop} of {plan.counts['crops']} "
            f"({mic}, x {int(row.x)}, y {int(row.y)}"
            f"{'' if plan.factor == 1 else f' binned ×{plan.factor:g}'}), "
            f"W = {plan.window} px, steps 0…{steps} (pairs saved from k = {start})"
        )

    def run(self, *_: Any) -> JobHandle | None:
        """Write the dataset (threaded, with progress; inline under CRYODDM_NAPARI_NOTHREADS)."""
        if self._runner.running:
            return self._runner.handle
        try:
            mics, particles, noise = self.inputs()
            config = self.config()
            out = self.output()
        except CryoDDMError as exc:
            report_error(exc)
            self._status.value = str(exc)
            return None
        self.result = None
        return self._runner.start(
            lambda cancel: run_forward(mics, particles, noise, out, config, cancel),
            "forward",
            on_done=self._done,
            on_error=self._failed,
        )

    def stop(self, *_: Any) -> None:
        self._runner.stop()

    def _done(self, result: ForwardResult) -> None:
        self.result = result
        self._session.publish("forward", result.out)
        c = result.counts
        msg = (
            f"{result.out}: {c['crops']} crops, {c['noise']} noise patches, W = {result.window} px, "
            f"{c['s2_pairs']} s2 + {c['val_pairs']} val pairs"
            + (f"; {c['skipped_outside']} crops left the image" if c["skipped_outside"] else "")
        )
        for w in result.warnings:
            msg += f"\nwarning: {w}"
        self._status.value = msg
        notify(msg)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._status.value = "stopped: nothing finished was written (only OUT.partial/ remains)"
            notify(self._status.value)
            return
        self._status.value = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CryoDDMError) else str(exc)
        report_error(exc)
