"""Screenshots of the real napari window for each workflow step → docs/images/*.png.

Walks the sample data through the five dock widgets in one viewer, the way a user would:
File ▸ Open Sample ▸ CryoDDM stack → Noise picker (away from the sample's particles) → Forward
(micrographs, particles and noise boxes from the layers) → Train (the forward folder it just
wrote) → Predict (the checkpoint it just wrote; denoised layer beside the raw one) → cs2star
(the sample's cryoSPARC `.cs` pair; particles land as boxes on the raw micrographs).

Run it under Xvfb (a hidden viewer's screenshot is black):

    xvfb-run -a .venv/bin/python scripts/screenshots.py            # writes docs/images/
    xvfb-run -a .venv/bin/python scripts/screenshots.py --out /tmp/shots --work /tmp/walk
    xvfb-run -a .venv/bin/python scripts/screenshots.py --real    # real-*.png from ../shared/data/real
    xvfb-run -a .venv/bin/python scripts/screenshots.py --sample demo-out/sample   # cryoddm demo's files

`tests/test_demo_viewer.py` runs the same `walk()` (without saving pictures) and checks the
results against the core functions and the sample's truth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("CRYODDM_NAPARI_NOTHREADS", "1")  # each step finishes before the next

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "napari-cryoddm"


def _open_dock(viewer: Any, name: str, docks: list[Any]) -> Any:
    """Open a plugin dock widget; the previous step's dock is hidden so each picture shows one."""
    for dock in docks:
        dock.setVisible(False)
    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    docks.append(dock_widget)
    return widget


_dock = _open_dock


def _process(viewer: Any) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(3):
        QApplication.processEvents()


def open_sample(viewer: Any, sample_config: Any = None, sample_folder: Path | None = None) -> None:
    """File ▸ Open Sample ▸ CryoDDM stack, or the same layers for a smaller `SampleConfig`, or for
    a sample folder already written (`cryoddm demo`'s OUT/sample)."""
    if sample_config is None and sample_folder is None:
        viewer.open_sample(PLUGIN, "stack")
        return
    from napari_cryoddm._napari.sample_data import sample_layers

    for data, kwargs, kind in sample_layers(sample_config, "CryoDDM sample stack", folder=sample_folder):
        getattr(viewer, f"add_{kind}")(data, **kwargs)


def walk(
    viewer: Any,
    work: Path,
    shot: Callable[[str], None] | None = None,
    epochs: int = 1,
    max_noise: int = 8,
    sample_config: Any = None,
    sample_folder: Path | None = None,
) -> dict[str, Any]:
    """Run every step in `viewer` on the sample stack; `shot(name)` after each step."""
    from napari_cryoddm._napari.layers import micrograph_layers, points_layers

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shot = shot or (lambda name: None)
    widths = DockWidths(viewer)
    out: dict[str, Any] = {"defaults": {}, "widths": widths}
    defaults = out["defaults"]
    docks: list[Any] = []

    def _dock(viewer: Any, name: str, docks: list[Any]) -> Any:
        widget = _open_dock(viewer, name, docks)
        widths.opened(name, docks[-1])
        return widget

    # 1. sample data: noisy stack, hidden clean signal, true particles as boxes
    open_sample(viewer, sample_config, sample_folder)
    raw_layer = micrograph_layers(viewer)[0]
    particles_layer = points_layers(viewer, "particles")[0]
    sample_meta = raw_layer.metadata["cryoddm"]["sample"]
    out["raw_layer"], out["particles_layer"], out["sample"] = raw_layer, particles_layer, sample_meta
    viewer.reset_view()
    _process(viewer)
    shot("01-sample")

    # 2. noise picker: boxes away from the particles layer
    picker = _dock(viewer, "Noise picker", docks)
    defaults["picker"] = (picker.image.value, picker.particles_layer.value, picker.form["screen"].value)
    picker.image.value = raw_layer
    picker.unit.value = "px"
    picker.diameter.value = float(
        particles_layer.metadata["cryoddm"].get("diameter_px")
        or sample_meta["config"]["diameter"] / sample_meta["config"]["pixel_size"]
    )
    picker.particles_layer.value = particles_layer
    picker.form["max_per_micrograph"].value = max_noise
    picker.pick_from_particles()
    noise_layer = picker.noise_layer
    if noise_layer is None or len(noise_layer.data) == 0:
        raise RuntimeError(f"the noise picker made no boxes: {picker.message.value}")
    out["noise_layer"] = noise_layer
    widths.check()
    _process(viewer)
    shot("02-noise-picker")

    # 3. forward: everything from the layers
    forward = _dock(viewer, "Forward", docks)
    defaults["forward"] = (
        forward._micrographs.value,
        forward._particles.value,
        forward._noise.value,
        forward.form["diameter"].value,
    )
    forward._micrographs.value = raw_layer
    forward._particles.value = particles_layer
    forward._noise.value = noise_layer
    forward.form["diameter"].value = float(picker.diameter_px())  # the forward form asks for it
    forward._output.value = work / "forward"
    forward.run()
    if forward.result is None:
        raise RuntimeError(f"forward did not finish: {forward._status.value}")
    out["forward"] = forward.result
    widths.check()
    _process(viewer)
    shot("03-forward")

    # 4. train on the folder forward wrote
    train = _dock(viewer, "Train", docks)
    defaults["train_forward"] = train._forward.value
    train._forward.value = forward.result.out
    train._out.value = work / "train"
    train.form["epochs"].value = epochs
    train.form["batch_size"].value = 8
    train.start()
    if train.result is None:
        raise RuntimeError(f"training did not finish: {train._status.value}")
    out["train"] = train.result
    checkpoint = train.result.best or train.result.last
    out["checkpoint"] = checkpoint
    widths.check()
    _process(viewer)
    shot("04-train")

    # 5. predict with the checkpoint train wrote; the denoised stack lands beside the raw one
    predict = _dock(viewer, "Predict", docks)
    defaults["predict"] = (predict.model_file.value, predict.layer_combo.value)
    predict.model_file.value = Path(checkpoint)
    predict.layer_combo.value = raw_layer
    predict.out_dir.value = work / "denoised"
    predict.form["device"].value = "cpu"
    predict.denoise_all()
    name = predict.denoised_name(raw_layer)
    if name not in viewer.layers:
        raise RuntimeError(f"predict added no layer: {predict.status.value}")
    out["denoised_layer"] = viewer.layers[name]
    out["predict_config"] = predict.config()
    out["grid"] = {"enabled": viewer.canvas.grid.enabled, "visible": [lay.name for lay in viewer.layers if lay.visible]}
    widths.check()
    _process(viewer)
    shot("05-predict")
    viewer.canvas.grid.enabled = False
    for lay in viewer.layers:
        lay.visible = lay is raw_layer

    # 6. cs2star: the sample's .cs pair back onto the raw micrographs
    cs = _dock(viewer, "cs2star", docks)
    defaults["cs2star"] = (cs._image.value, cs._box.value)
    cs._particles.value = Path(sample_meta["particles_cs"])
    cs._passthrough.value = [Path(sample_meta["passthrough_cs"])]
    cs._output.value = work / "cs2star" / "particles.star"
    cs.form["strip_uid"].value = True
    cs._image.value = raw_layer
    cs.run()
    if not cs.layers:
        raise RuntimeError(f"cs2star showed no particles: {cs._status.value}")
    out["cs2star_layer"] = cs.layers[0]
    out["cs2star"] = cs.results[0]
    widths.check()
    cs.layers[0].visible = True
    viewer.reset_view()
    _process(viewer)
    shot("06-cs2star")
    return out


class DockWidths:
    """Each dock's width when it first appears, and the widest it has been since (item 2 of the
    real-data review: a status message must never widen a dock or the window)."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.initial: dict[str, int] = {}
        self.widest: dict[str, int] = {}
        self.window = 0

    def opened(self, name: str, dock: Any) -> None:
        _process(self.viewer)
        self.initial[name] = self.widest[name] = dock.width()
        self._docks = getattr(self, "_docks", {})
        self._docks[name] = dock

    def check(self) -> None:
        _process(self.viewer)
        for name, dock in getattr(self, "_docks", {}).items():
            if dock.isVisible():
                self.widest[name] = max(self.widest[name], dock.width())
        self.window = max(self.window, self.viewer.window._qt_window.width())

    def grown(self) -> dict[str, tuple[int, int]]:
        return {n: (self.initial[n], w) for n, w in self.widest.items() if w > self.initial[n]}


def walk_real(
    viewer: Any, data: Path, work: Path, shot: Callable[[str], None] | None = None, widths: DockWidths | None = None
) -> dict[str, Any]:
    """The review's walk on real data: the 4k EPU micrograph and `Ucsf_stack_1142_DW.mrc` with its
    RELION autopicks → Attach → Noise picker → Forward (binned ×2) → Train (1 epoch) → Predict
    (the Ucsf micrograph) → cs2star (a real `.cs` whose names match no open micrograph).

    Each dock is used with the defaults the previous step left, as a new user would; what the
    defaults were is returned (`out["defaults"]`) so a test can check the hand-over."""
    from napari_cryoddm._napari.layers import micrograph_layers, points_layers

    data, work = Path(data), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shot = shot or (lambda name: None)
    widths = widths or DockWidths(viewer)
    out: dict[str, Any] = {"defaults": {}, "widths": widths}
    defaults = out["defaults"]
    docks: list[Any] = []

    def dock(name: str) -> Any:
        widget = _dock(viewer, name, docks)
        widths.opened(name, docks[-1])
        return widget

    # 1. open: the 4k EPU micrograph, the Ucsf micrograph and its autopicks
    viewer.open(str(data / "full_size" / "epu2.9_example.mrc"), plugin=PLUGIN)
    viewer.open(str(data / "micrographs" / "Ucsf_stack_1142_DW.mrc"), plugin=PLUGIN)
    viewer.open(str(data / "coordinates" / "Ucsf_stack_1142_DW_autopick.star"), plugin=PLUGIN)
    epu, ucsf = micrograph_layers(viewer)
    star = points_layers(viewer)[-1]
    out.update(
        epu=epu,
        ucsf=ucsf,
        star=star,
        axis_labels=tuple(viewer.dims.axis_labels),
        star_attached_at_open=star.metadata["cryoddm"].get("attached_to"),
    )
    epu.visible = False
    viewer.reset_view(layers=[lay for lay in viewer.layers if lay.visible])
    _process(viewer)
    shot("real-01-open")

    # 2. attach the autopicks to the micrograph whose name they match
    attach = dock("Attach coordinates")
    defaults["attach_image"] = attach.image.value
    attach.box_size.value = 64
    attach.attach()
    widths.check()
    viewer.reset_view(layers=[ucsf])
    _process(viewer)
    shot("real-02-attach")

    # 3. noise picker on the stack that carries particles, pixel screening on by default
    picker = dock("Noise picker")
    defaults["picker_image"] = picker.image.value
    defaults["picker_particles"] = picker.particles_layer.value
    defaults["picker_screen"] = picker.form["screen"].value
    picker.unit.value = "px"
    picker.diameter.value = 48.0
    picker.pick_from_particles()
    noise = picker.noise_layer
    if noise is None or not len(noise.data):
        raise RuntimeError(f"the noise picker made no boxes: {picker.message.value}")
    out["noise_layer"] = noise
    out["noise_sizes"] = np.asarray(noise.size, dtype=float).copy()
    widths.check()
    _process(viewer)
    shot("real-03-noise-picker")
    # settings for another micrograph leave the boxes already picked alone
    picker.image.value = epu
    picker.unit.value = "Å"
    picker.diameter.value = 250.0
    out["noise_sizes_after"] = np.asarray(noise.size, dtype=float).copy()
    out["noise_layer_for_epu"] = picker.noise_layer
    out["counts_epu"] = picker.counts.value
    picker.image.value = ucsf
    out["picker_back"] = (picker.diameter.value, picker.unit.value, picker.box.value)
    viewer.layers.selection.active = epu  # another layer selected: the counts stay Ucsf's
    picker._update_counts()
    out["counts_back"] = picker.counts.value
    widths.check()

    # 4. forward: micrographs, particles, noise and diameter come from the steps before
    forward = dock("Forward")
    defaults["forward"] = (
        forward._micrographs.value,
        forward._particles.value,
        forward._noise.value,
        forward.form["diameter"].value,
    )
    forward.form["bin"].value = 2.0
    forward._output.value = work / "forward"
    forward._preview_crop.value = 0
    forward.run_preview()
    out["axis_labels_after_preview"] = tuple(viewer.dims.axis_labels)
    widths.check()
    _process(viewer)
    shot("real-04-forward-preview")
    forward.run()
    if forward.result is None:
        raise RuntimeError(f"forward did not finish: {forward._status.value}")
    out["forward"] = forward.result
    widths.check()
    _process(viewer)
    shot("real-05-forward")

    # 5. train one epoch on the folder forward wrote (filled in)
    train = dock("Train")
    defaults["train_forward"] = train._forward.value
    defaults["train_out"] = train._out.value
    train.form["epochs"].value = 1
    train.form["batch_size"].value = 8
    train.start()
    if train.result is None:
        raise RuntimeError(f"training did not finish: {train._status.value}")
    out["train"] = train.result
    out["checkpoint"] = train.result.best or train.result.last
    widths.check()
    _process(viewer)
    shot("real-06-train")

    # 6. predict the Ucsf micrograph with the checkpoint train wrote (filled in)
    predict = dock("Predict")
    defaults["predict_model"] = predict.model_file.value
    defaults["predict_layer"] = predict.layer_combo.value
    predict.form["device"].value = "cpu"
    predict.denoise_current()
    name = predict.denoised_name(ucsf)
    if name not in viewer.layers:
        raise RuntimeError(f"predict added no layer: {predict.status.value}")
    out["denoised_layer"] = viewer.layers[name]
    out["grid"] = {
        "enabled": viewer.canvas.grid.enabled,
        "visible": [lay.name for lay in viewer.layers if lay.visible],
        "shape": viewer.canvas.grid.actual_shape(viewer.layers),
        "zoom": viewer.scene.camera.zoom,
        "viewbox": tuple(viewer.canvas.viewbox_size(viewer.layers)),
        "extent": [tuple(np.ptp(lay.extent.world[:, -2:], axis=0)) for lay in (ucsf, out["denoised_layer"])],
    }
    widths.check()
    _process(viewer)
    shot("real-07-predict")
    viewer.canvas.grid.enabled = False
    predict.overlay.value = True  # back to one canvas; the hidden layers come back
    predict.overlay.value = False
    viewer.canvas.grid.enabled = False
    for lay in viewer.layers:
        lay.visible = lay in (ucsf, star)

    # 7. cs2star: a real cryoSPARC file whose micrographs are not open here
    cs = dock("cs2star")
    defaults["cs2star_image"] = cs._image.value
    defaults["cs2star_box"] = cs._box.value
    cs._particles.value = data / "cs2star_reference" / "T20S_J30_extract_particles_from_cryosparc-tools_conftest.cs"
    cs._output.value = work / "cs2star" / "particles.star"
    cs.run()
    out["cs2star_status"] = cs._status.value
    widths.check()
    viewer.reset_view(layers=[lay for lay in viewer.layers if lay.visible])
    _process(viewer)
    shot("real-08-cs2star")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    p.add_argument("--work", type=Path, default=None, help="where the steps write (default: a temp dir)")
    p.add_argument("--size", default="1920x1080", help="window size WxH")
    p.add_argument(
        "--real",
        type=Path,
        default=None,
        nargs="?",
        const=REPO.parent / "shared" / "data" / "real",
        help="walk the real data in this folder (default ../shared/data/real) instead "
        "of the sample: pictures real-*.png",
    )
    p.add_argument(
        "--sample",
        type=Path,
        default=None,
        help="walk a sample folder already written (cryoddm demo's OUT/sample) instead of the cached sample",
    )
    args = p.parse_args(argv)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        print("unset QT_QPA_PLATFORM and run under Xvfb (xvfb-run -a …): offscreen has no OpenGL", file=sys.stderr)
        return 2
    import napari

    work = args.work or Path(tempfile.mkdtemp(prefix="cryoddm-shots-"))
    os.environ.setdefault("CRYODDM_CACHE_DIR", str(work / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    viewer = napari.Viewer(show=True, title="napari-cryoddm")
    viewer.window.resize(w, h)

    def shot(name: str) -> None:
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path}")

    try:
        if args.real is not None:
            widths = DockWidths(viewer)
            walk_real(viewer, args.real, work, shot, widths)
            print(
                f"dock widths (initial → widest): "
                f"{ {n: (widths.initial[n], widths.widest[n]) for n in widths.initial} }; "
                f"window ≤ {widths.window} px"
            )
        else:
            walk(viewer, work, shot, sample_folder=args.sample)
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
