"""Predict dock widget: denoise the micrograph on screen for a quick look, or all of them to a
folder in the background, and show the result beside the raw micrographs.

A thin face over `predict.denoise_job` / `predict.predict_files` (the same code as
`cryoddm predict`), run through `workers.start_job` (progress bar, Stop). The denoised layer is a
stack aligned with the raw one (same slider index; scale × the bin factor, so a binned result
overlays the raw pixels). Its slices come from the quick-look results in memory or from the
output files on disk, read lazily, so a long background run never piles up in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton

from ...binning import binned_shape
from ...errors import CryoDDMError
from ...io.mrc import read_image
from ...jobs import CancelToken, Progress
from ...models import available
from ...predict import PredictConfig, PredictModel, denoise_job, output_path, predict_files
from ..layers import current_slice, micrograph_layers, micrographs
from ..reader import robust_limits
from ..session import fill_empty, particle_stack, session
from ..view import grid_of
from ..workers import notify, report_error
from ._form import ConfigForm
from ._qt import finish_dock, status_label
from ._run import JobButtons, path_or_none

QUICK_LOOK_KEEP = 8  # quick-look results kept in memory (older ones are dropped)


def _smoothed(image: np.ndarray, max_side: int = 1024) -> np.ndarray:
    from ...io.stack import block_mean

    factor = int(np.ceil(max(image.shape) / max_side))
    return block_mean(np.asarray(image, np.float32), factor) if factor > 1 else image


def _wide(limits: list[float]) -> tuple[float, float]:
    """A contrast slider range that lets the limits be widened well past the first guess."""
    lo, hi = float(limits[0]), float(limits[1])
    span = max(hi - lo, 1e-6)
    return (lo - 2 * span, hi + 2 * span)


class PredictWidget(Container):
    """Model file, micrograph layer, prediction settings; two actions and Stop."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.model_choice = ComboBox(
            label="model",
            choices=["checkpoint file", *available()],
            value="checkpoint file",
            tooltip="a checkpoint file, or a model shipped with the plugin (sample: trained on synthetic sample data)",
        )
        self.model_file = FileEdit(
            mode="r", label="checkpoint", filter="*.pt *.pth", tooltip="checkpoint from Train, or the original's N.pth"
        )
        self.layer_combo = ComboBox(
            label="micrographs", choices=self._layer_choices, tooltip="an image layer opened with napari-cryoddm"
        )
        self.form = ConfigForm(
            PredictConfig,
            advanced=(
                "batch_size",
                "tile",
                "overlap",
                "precision",
                "estimator",
                "estimator_step",
                "channels_last",
                "compile",
                "threads",
                "prefetch",
                "suffix",
                "overwrite",
            ),
        )
        self.out_dir = FileEdit(
            mode="d", label="output folder", tooltip="where 'Denoise all' writes <name>.mrc (finished ones are skipped)"
        )
        self.overlay = CheckBox(value=False, text="overlay on the raw micrograph (else side by side)")
        self.current_button = PushButton(text="Denoise current micrograph")
        self.all_button = PushButton(text="Denoise all to the folder (background)")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.status = status_label(Label(value=""))
        self.extend(
            [
                self.model_choice,
                self.model_file,
                self.layer_combo,
                self.form,
                self.out_dir,
                self.overlay,
                self.current_button,
                self.all_button,
                self.stop_button,
                self.status,
            ]
        )
        finish_dock(self, self.form)
        self.current_button.changed.connect(self.denoise_current)
        self.all_button.changed.connect(self.denoise_all)
        self.overlay.changed.connect(self._apply_view_mode)
        self.model_choice.changed.connect(self._on_model_choice)
        self.model_file.changed.connect(self._on_model_choice)
        self.viewer.layers.events.inserted.connect(lambda e=None: self.layer_combo.reset_choices())
        if particle_stack(napari_viewer) is not None:
            self.layer_combo.value = particle_stack(napari_viewer)
        self.viewer.layers.events.removed.connect(lambda e=None: self.layer_combo.reset_choices())
        self._model: PredictModel | None = None
        self._model_key: tuple | None = None
        self._runner = JobButtons([self.current_button, self.all_button], self.stop_button)
        self._quick: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._outputs: dict[str, Path] = {}  # raw layer name → folder of 'all' results
        self._hidden: list[Any] = []  # layers hidden for the side-by-side view
        self._session = session(napari_viewer)
        self._session.changed.connect(self._on_session)
        for key in ("particles", "checkpoint"):
            self._on_session(key, self._session.get(key))

    def _on_session(self, key: str, value: Any) -> None:
        """The stack that carries particles and the checkpoint Train just wrote are the defaults."""
        if key == "particles":
            stack = particle_stack(self.viewer)
            if stack is not None:
                self.layer_combo.reset_choices()
                self.layer_combo.value = stack
        elif key == "checkpoint" and value is not None:
            self.model_choice.value = "checkpoint file"
            fill_empty(self.model_file, Path(value))
            fill_empty(self.out_dir, Path(value).parent.parent / "denoised")

    # ------------------------------------------------------------------ inputs

    def _layer_choices(self, _widget: Any = None) -> list:
        return [(layer.name, layer) for layer in micrograph_layers(self.viewer)]

    def _on_model_choice(self, _value: Any = None) -> None:
        """A model picked by hand replaces one handed over in memory by the Train widget."""
        self.model_file.visible = self.model_choice.value == "checkpoint file"
        if self._model_key and self._model_key[0] == "memory":
            self._model, self._model_key = None, None

    def set_model(self, model: PredictModel) -> None:
        """Use a network already in memory (e.g. the one the Train widget just finished)."""
        self._model, self._model_key = model, ("memory", id(model))

    def predict_model(self) -> PredictModel:
        if self._model is not None and self._model_key and self._model_key[0] == "memory":
            return self._model
        if self.model_choice.value != "checkpoint file":
            key = ("builtin", self.model_choice.value)
            if key != self._model_key:
                self._model, self._model_key = PredictModel.from_checkpoint(self.model_choice.value), key
            assert self._model is not None
            return self._model
        path = path_or_none(self.model_file.value)
        if path is None or not path.is_file():
            raise CryoDDMError("choose a model file (a checkpoint from Train or the original's .pth)")
        key = (str(path), path.stat().st_mtime_ns)
        if key != self._model_key:
            self._model, self._model_key = PredictModel.from_checkpoint(path), key
        assert self._model is not None
        return self._model

    def raw_layer(self) -> Any:
        layer = self.layer_combo.value
        if layer is None:
            raise CryoDDMError("open micrographs first (File ▸ Open, or a CryoDDM sample)")
        return layer

    def config(self) -> PredictConfig:
        return self.form.value()

    # ------------------------------------------------------------------ actions

    def denoise_current(self) -> None:
        """Denoise the micrograph at the slider's index; show it beside the raw one."""
        try:
            layer = self.raw_layer()
            pm, config = self.predict_model(), self.config()
            index = current_slice(self.viewer, layer)
            entry = micrographs(layer)[index]
            raw = self._raw_slice(layer, index, entry)
        except CryoDDMError as exc:
            report_error(exc)
            return

        def make(cancel: CancelToken):
            return denoise_job(pm, raw, config, cancel=cancel, source=entry.get("path") or entry["name"])

        def done(result: np.ndarray) -> None:
            self._quick[(layer.name, index)] = result
            while len(self._quick) > QUICK_LOOK_KEEP:
                self._quick.popitem(last=False)
            self._show(layer, pm, focus=result)
            self.status.value = f"denoised {entry['name']}"
            self.side_by_side(layer)

        self.status.value = f"denoising {entry['name']}…"
        self._start(make, f"Denoise {entry['name']}", done)

    def denoise_all(self) -> None:
        """Denoise every micrograph of the layer into the output folder, in the background."""
        try:
            layer = self.raw_layer()
            pm, config = self.predict_model(), self.config()
            out = path_or_none(self.out_dir.value)
            if out is None:
                raise CryoDDMError("choose an output folder for 'Denoise all'")
            paths = [m.get("path") for m in micrographs(layer)]
            if not all(paths):
                raise CryoDDMError(
                    f"layer {layer.name!r} has micrographs without a file; save them "
                    "first or use 'Denoise current micrograph'"
                )
        except CryoDDMError as exc:
            report_error(exc)
            return
        self._outputs[layer.name] = out
        self._show(layer, pm)

        def make(cancel: CancelToken):
            return predict_files(pm, paths, out, config, cancel=cancel)

        contrast_set = False
        reported: list[Any] = []

        def progress(event: Progress) -> None:
            output = event.payload.get("output")
            if output:
                reported.append(output)
                self._show(layer, pm, focus=first_result(reported))

        def first_result(outputs: list[Any]) -> np.ndarray | None:
            """The layer exists before any result: the first one sets its contrast. Outputs are
            written in the background, in order, so the first reported may not exist yet when a
            later one is reported; waiting for it keeps the choice deterministic."""
            nonlocal contrast_set
            if contrast_set or not outputs or not Path(outputs[0]).exists():
                return None
            contrast_set = True
            return read_image(outputs[0])

        def done(result: Any) -> None:
            self._show(layer, pm, focus=first_result(reported or list(result.written) + list(result.skipped)))
            self.status.value = result.summary().splitlines()[0]
            self._session.publish("denoised", out)
            self.side_by_side(layer)
            if result.failed:
                report_error(CryoDDMError(result.summary()))
            else:
                notify(self.status.value)

        self.status.value = f"denoising {len(paths)} micrographs of {layer.name} into {out}…"
        self._start(make, "Denoise all", done, progress)

    def stop(self) -> None:
        self._runner.stop()

    def _start(self, make, description: str, done, progress=None) -> None:
        if self._runner.running:
            report_error(CryoDDMError("a prediction is already running; stop it first"))
            return
        self._runner.start(make, description, on_progress=progress, on_done=done, message=None)

    # ------------------------------------------------------------------ display

    @staticmethod
    def _raw_slice(layer: Any, index: int, entry: dict) -> np.ndarray:
        data = layer.data[0] if layer.multiscale else layer.data
        plane = data[index] if data.ndim == 3 else data
        h, w = (int(v) for v in entry.get("shape") or plane.shape[-2:])
        return np.asarray(plane[:h, :w], dtype=np.float32)

    def denoised_name(self, layer: Any) -> str:
        return f"{layer.name} denoised"

    def _slice(
        self, layer_name: str, index: int, entries: list[dict], suffix: str, shape: tuple[int, int]
    ) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        arr = self._quick.get((layer_name, index))
        folder = self._outputs.get(layer_name)
        if arr is None and folder is not None and entries[index].get("path"):
            target = output_path(entries[index]["path"], folder, suffix)
            if target.exists():
                try:
                    arr = read_image(target)
                except CryoDDMError:
                    arr = None
        if arr is not None:
            h, w = min(arr.shape[0], shape[0]), min(arr.shape[1], shape[1])
            out[:h, :w] = arr[:h, :w]
        return out

    def _show(self, layer: Any, pm: PredictModel, focus: np.ndarray | None = None) -> None:
        """Create or refresh the denoised stack right above the raw layer, on the same grid."""
        import dask
        import dask.array as da

        entries = micrographs(layer)
        factor = float(pm.bin_factor or 1.0)
        data = layer.data[0] if layer.multiscale else layer.data
        full = tuple(int(v) for v in data.shape[-2:])
        shape = binned_shape(full, factor) if factor != 1 else full
        n = len(entries)
        load = dask.delayed(self._slice, pure=False)
        suffix = self.config().suffix
        stack = da.stack(
            [da.from_delayed(load(layer.name, i, entries, suffix, shape), shape, np.float32) for i in range(n)]
        )
        name = self.denoised_name(layer)
        scale = list(layer.scale)
        scale[-1] *= factor
        scale[-2] *= factor
        if focus is not None:  # robust: a contamination blob does not wash the rest out
            (lo, hi), _ = robust_limits(_smoothed(focus))
            limits = [lo, hi]
        else:
            limits = None
        meta = {
            "cryoddm": {
                "micrographs": [
                    {
                        **m,
                        "voxel_size": float(m.get("voxel_size") or 0) * factor,
                        "shape": list(binned_shape(tuple(m.get("shape") or full), factor)),
                    }
                    for m in entries
                ],
                "denoised_from": layer.name,
                "bin_factor": factor,
            }
        }
        if name in self.viewer.layers:
            target = self.viewer.layers[name]
            target.data = stack
            target.scale = scale
            target.translate = list(layer.translate)
            target.metadata = meta
            if limits is not None:
                target.contrast_limits_range = _wide(limits)
                target.contrast_limits = limits
        else:
            target = self.viewer.add_image(
                stack,
                name=name,
                scale=scale,
                translate=list(layer.translate),
                colormap="gray",
                contrast_limits=limits or [-3.0, 3.0],
                metadata=meta,
            )
            target.contrast_limits_range = _wide(limits or [-3.0, 3.0])
            src = self.viewer.layers.index(layer)
            dst = self.viewer.layers.index(target)
            if dst != src + 1:
                self.viewer.layers.move(dst, src + 1)
        target.refresh()

    def side_by_side(self, layer: Any = None) -> None:
        """Show the raw stack and its denoised stack only (side by side in napari's grid, or the
        denoised one over the raw one), fitted to the canvas; other layers are hidden and come
        back when the grid is left (the overlay box)."""
        layer = layer if layer is not None else self.layer_combo.value
        name = self.denoised_name(layer) if layer is not None else None
        if layer is None or name not in self.viewer.layers:
            return
        denoised = self.viewer.layers[name]
        for other in self.viewer.layers:
            if other not in (layer, denoised) and other.visible:
                other.visible = False
                self._hidden.append(other)
        layer.visible = denoised.visible = True
        self._apply_view_mode()

    def _apply_view_mode(self, _value: Any = None) -> None:
        """Side by side: napari's grid mode (the visible layers only); overlay: one canvas, the
        denoised layer on top and the layers hidden for the grid shown again."""
        grid = grid_of(self.viewer)
        grid.enabled = not self.overlay.value
        if self.overlay.value:
            for other in self._hidden:
                if other in self.viewer.layers:
                    other.visible = True
            self._hidden = []
        shown = [lay for lay in self.viewer.layers if lay.visible]
        if shown:
            self.viewer.reset_view(layers=shown)
